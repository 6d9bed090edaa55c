"""Seed the sandbox's image registry from image directories (umoci builds
an OCI image, skopeo pushes it; no network beyond the sandbox)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


def push(registry: str, name: str, rootfs: str) -> str:
    """Push the directory rootfs as REGISTRY/NAME; returns the reference."""
    work = tempfile.mkdtemp(prefix="charlie-seed-")
    try:
        layout, bundle = os.path.join(work, "oci"), os.path.join(work, "bundle")
        subprocess.run(["umoci", "init", "--layout", layout], check=True)
        subprocess.run(["umoci", "new", "--image", f"{layout}:img"], check=True)
        subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:img", bundle],
                       check=True, capture_output=True)
        subprocess.run(["cp", "-a", f"{rootfs}/.", os.path.join(bundle, "rootfs")], check=True)
        subprocess.run(["umoci", "repack", "--image", f"{layout}:img", bundle], check=True)
        ref = f"{registry}/{name}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:img", f"docker://{ref}"], check=True)
        return ref
    finally:
        shutil.rmtree(work, ignore_errors=True)
