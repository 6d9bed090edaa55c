"""The guest's disks, as the job user: image checks, the overlay and tmp
disk, committing an overlay into its image, keeping one that cannot be
committed.  Everything here runs through proc.call_as (or in the user's own
`slurm-charlie commit`), never as root."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ...errors import UserError
from ...proc import run


def image_info(qemu_img: str, image: str, fmt: str) -> dict[str, Any]:
    p = run([qemu_img, "info", "--output=json", "-f", fmt, image], timeout=60, check=False)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        raise UserError("--charlie-image", f"qemu-img cannot read it as {fmt}",
                        image, hint=(err[-1] if err else "check the file"))
    return json.loads(p.stdout)


def check_image(qemu_img: str, image: str, fmt: str, commit: bool) -> dict[str, Any]:
    """Refuse images QEMU must not open for us (docs/faq.rst, "No bootable
    device"; docs/security.rst)."""
    info = image_info(qemu_img, image, fmt)
    if not info.get("virtual-size"):
        raise UserError("--charlie-image", "virtual size is 0 (empty disk: the "
                        "guest would find no bootable device)", image)
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("corrupt"):
        raise UserError("--charlie-image", "qcow2 image is marked corrupt", image,
                        hint=f"qemu-img check -r all {image} (on a copy first)")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UserError("--charlie-image", "has a backing file ("
                        f"{info.get('backing-filename')}); refused because a "
                        "backing file can point at any file", image,
                        hint=f"flatten it: qemu-img convert -O qcow2 {image} NEW.qcow2")
    if data.get("data-file"):
        raise UserError("--charlie-image", f"has an external data file "
                        f"({data['data-file']}); refused", image,
                        hint=f"flatten it: qemu-img convert -O qcow2 {image} NEW.qcow2")
    if commit and not os.access(image, os.W_OK):
        raise UserError("--charlie-commit", "image not writable by you", image,
                        hint="commit needs write access to the image; drop "
                        "--charlie-commit or use your own copy")
    return info


def qcow2_size_mib(path: str) -> int:
    """Virtual size of a qcow2 file from its header (bytes 24-31)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        head = os.pread(fd, 32, 0)
    finally:
        os.close(fd)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        raise UserError("vm disks", "overlay is not a qcow2 file", path)
    return -(-int.from_bytes(head[24:32], "big") // (1 << 20))


def make_disks(qemu_img: str, image: str, fmt: str, overlay: str, tmp: str,
                tmp_mib: int) -> tuple[str, int]:
    """Overlay and tmp disk (recreated: a rerun prolog starts fresh).
    Returns the cache mode (none, i.e. O_DIRECT, where the file system has
    it) and the overlay's virtual size in MiB (the image's)."""
    remove_files(overlay, tmp)
    for argv in ([qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt, "-b", image, overlay],
                 [qemu_img, "create", "-q", "-f", "qcow2", tmp, f"{tmp_mib}M"]):
        p = run(argv, timeout=60, check=False)
        if p.returncode != 0:
            raise UserError("vm disks", "qemu-img create failed",
                            p.stderr.decode(errors="replace").strip())
    size = qcow2_size_mib(overlay)
    try:
        fd = os.open(overlay, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        return "none", size
    except OSError:
        return "writeback", size


def commit(qemu_img: str, overlay: str, timeout: int) -> tuple[bool, str]:
    """qemu-img commit, retried while another process holds the image
    (QEMU's image locks: a running guest of any job keeps the base locked)."""
    deadline = time.monotonic() + timeout
    while True:
        p = run([qemu_img, "commit", "-f", "qcow2", "-d", overlay],
                timeout=max(60, timeout), check=False)
        err = p.stderr.decode(errors="replace").strip()
        if p.returncode == 0:
            return True, ""
        if "lock" not in err or time.monotonic() > deadline:
            return False, err.splitlines()[-1] if err else f"exit {p.returncode}"
        time.sleep(1)


def keep(overlay: str, kept_dir: str, name: str) -> str:
    """Move the overlay into kept_dir under name, or name.1, .2 … when a
    job of a reused id kept one there before: nothing kept is overwritten."""
    base, ext = name.removesuffix(".overlay.qcow2"), ".overlay.qcow2"
    for i in range(1000):
        dst = os.path.join(kept_dir, f"{base}{'' if i == 0 else f'.{i}'}{ext}")
        try:
            os.link(overlay, dst)  # fails on an existing name, unlike rename
        except FileExistsError:
            continue
        os.unlink(overlay)
        return dst
    raise UserError("vm", "too many kept overlays of this job id", kept_dir)


def remove_files(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
