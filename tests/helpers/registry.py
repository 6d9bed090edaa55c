"""Seed the sandbox's image registry, as `make sandbox-up` and `make test` do
(and the registry tests, which need the images): two stock images, built
once into an OCI layout under the Makefile's cache and pushed with skopeo
(no network beyond the sandbox; pushing blobs the registry already has is a
HEAD request each):

  charlie/busybox:latest     static busybox and /MARKER, no /ch directories
  charlie/debian-mpi:latest  the test guest's Debian root (`make guest`:
                             .cache/vm/debian.sqfs) with Open MPI, MPICH and
                             the test programs, /ch removed: an MPI image as
                             people have them

    python -m helpers.registry CACHE_DIR DEBIAN_SQFS [REGISTRY]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from helpers.cluster import build_busybox_image

IMAGES = ("busybox", "debian-mpi")


def _tags(layout: str) -> dict[str, str]:
    """tag -> stamp of what it was built from (the tags built completely)."""
    try:
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        with open(os.path.join(layout, "stamps.json")) as f:
            stamps = json.load(f)
    except FileNotFoundError:
        return {}
    return {tag: stamp for tag, stamp in stamps.items()
            if any(m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
                   for m in index.get("manifests", []))}


def _add(layout: str, tag: str, fill, stamp: str) -> None:
    """Add rootfs (made by fill(dir)) to the layout as tag."""
    work = tempfile.mkdtemp(prefix="charlie-seed-", dir=os.path.dirname(layout))
    try:
        bundle = os.path.join(work, "bundle")
        subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", bundle],
                       check=True, capture_output=True)
        fill(os.path.join(bundle, "rootfs"))
        subprocess.run(["umoci", "repack", "--image", f"{layout}:{tag}", bundle], check=True)
        subprocess.run(["umoci", "gc", "--layout", layout], check=True)
        stamps = os.path.join(layout, "stamps.json")
        try:
            with open(stamps) as f:
                have = json.load(f)
        except FileNotFoundError:
            have = {}
        have[tag] = stamp
        with open(stamps + ".tmp", "w") as f:
            json.dump(have, f)
        os.rename(stamps + ".tmp", stamps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{int(st.st_mtime)}"


def build(cache: str, debian_sqfs: str, tags=IMAGES) -> str:
    """The OCI layout CACHE/oci with the images tags names (each rebuilt
    only when missing or, debian-mpi, when debian.sqfs changed); returns its
    path."""
    layout = os.path.join(cache, "oci")
    if not os.path.isdir(layout):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(["umoci", "init", "--layout", layout], check=True)
    have = _tags(layout)
    if "busybox" in tags and "busybox" not in have:
        def busybox(rootfs: str) -> None:
            build_busybox_image(rootfs + ".tmp", mount_points=False)
            subprocess.run(["cp", "-a", rootfs + ".tmp/.", rootfs], check=True)
        _add(layout, "busybox", busybox, "busybox-static")
    if "debian-mpi" in tags and have.get("debian-mpi") != _stamp(debian_sqfs):
        def debian(rootfs: str) -> None:
            subprocess.run(["unsquashfs", "-f", "-q", "-n", "-d", rootfs, debian_sqfs],
                           check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(os.path.join(rootfs, "ch"))  # a stock image: no /ch
        print(f"registry seed: building debian-mpi from {debian_sqfs}", flush=True)
        _add(layout, "debian-mpi", debian, _stamp(debian_sqfs))
    return layout


def push_layout(registry: str, layout: str, tags=IMAGES) -> dict[str, str]:
    """Push the layout's images tags names as REGISTRY/charlie/TAG:latest."""
    refs = {}
    for tag in tags:
        ref = f"{registry}/charlie/{tag}:latest"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:{tag}", f"docker://{ref}"], check=True)
        refs[tag] = ref
    return refs


def seed(registry: str, cache: str, debian_sqfs: str, tags=IMAGES) -> dict[str, str]:
    return push_layout(registry, build(cache, debian_sqfs, tags), tags)


def push(registry: str, name: str, rootfs: str) -> str:
    """Push the directory rootfs as REGISTRY/NAME (a one-off image)."""
    work = tempfile.mkdtemp(prefix="charlie-seed-")
    try:
        layout = os.path.join(work, "oci")
        subprocess.run(["umoci", "init", "--layout", layout], check=True)
        _add(layout, "img", lambda r: subprocess.run(["cp", "-a", f"{rootfs}/.", r],
                                                    check=True), "")
        ref = f"{registry}/{name}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:img", f"docker://{ref}"], check=True)
        return ref
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from slurm_charlie.sandbox import REGISTRY
    cache_dir, sqfs = sys.argv[1], sys.argv[2]
    for name, pushed in seed(sys.argv[3] if len(sys.argv) > 3 else REGISTRY,
                             cache_dir, sqfs).items():
        print(f"registry seed: docker://{pushed}")
