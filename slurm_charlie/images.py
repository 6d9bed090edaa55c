"""Tell what kind of image a path is, from the file itself (read as the user)."""

from __future__ import annotations

import os
import stat

from .errors import UserError

#: (offset, magic bytes, image kind, format)
MAGIC = (
    (0, b"QFI\xfb", "vm", "qcow2"),
    (0, b"hsqs", "container", "squashfs"),
    (0, b"\x1f\x8b", "container", "tar.gz"),
    (0, b"\xfd7zXZ\x00", "container", "tar.xz"),
    (257, b"ustar", "container", "tar"),
)
RAW_SUFFIXES = (".raw", ".img")
#: a registry image (--charlie-image=docker://...): see ``registry``, which
#: is imported only for those (hashlib, tempfile, its regexes)
REGISTRY_PREFIX = "docker://"
MISSING_HINT = ("check the path; relative paths are taken from the directory "
                "you submit from, and compute nodes must see the same path")


def is_registry_ref(image: str | None) -> bool:
    return bool(image) and image.startswith(REGISTRY_PREFIX)  # type: ignore[union-attr]


def detect(path: str) -> tuple[str, str]:
    """(kind, format) where kind is 'container' or 'vm'."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError("--charlie-image", f"cannot access: {e.strerror}", path,
                        hint=MISSING_HINT) from None
    if stat.S_ISDIR(st.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError("--charlie-image", "directory not readable by you",
                            path, hint=f"chmod u+rx {path}")
        return "container", "directory"
    if not stat.S_ISREG(st.st_mode):
        raise UserError("--charlie-image", "not a file or directory", path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise UserError("--charlie-image", f"cannot read: {e.strerror}", path,
                        hint="the image must be readable by you") from None
    for offset, magic, kind, fmt in MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return kind, fmt
    if path.endswith(RAW_SUFFIXES) and st.st_size > 0:
        return "vm", "raw"
    raise UserError("--charlie-image", "not a recognised image", path, hint=(
        "use a directory, .tar/.tar.gz/.tar.xz, squashfs, qcow2, or a raw "
        "disk named *.raw or *.img"))


#: archive formats the nodes unpack (and so need a digest to cache by)
ARCHIVES = ("tar", "tar.gz", "tar.xz")


def sha256_file(path: str) -> str:
    import hashlib  # only archives are hashed
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
