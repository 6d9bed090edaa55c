"""Build the guest initrd for direct kernel boot (`slurm-charlie vm-initrd`).

The initrd is busybox (static) plus the few kernel modules a guest needs
before its root disk and the 9p shares are usable, taken from the modules
directory of the guest kernel, and slurm-charlie's /init (guest/initrd-init).
Load order comes from modules.dep; compressed modules are unpacked here so
busybox's insmod can load them.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tempfile

from .errors import UserError
from .proc import run

#: what a guest needs before /ch/opt/boot.sh runs (dependencies are added)
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4",
           "9pnet_virtio", "9p", "button", "evdev", "virtio_console")
GUEST_DIR = os.path.join(os.path.dirname(__file__), "guest")


def _module_table(moddir: str) -> tuple[dict[str, tuple[str, list[str]]], set[str]]:
    """{name: (relative path, [dependency paths])}, builtin names."""
    dep = os.path.join(moddir, "modules.dep")
    if not os.path.exists(dep):
        raise UserError("modules", "no modules.dep", moddir,
                        hint=f"run: depmod -b <root> {os.path.basename(moddir)}")
    table = {}
    with open(dep) as f:
        for line in f:
            path, _, deps = line.partition(":")
            name = os.path.basename(path).split(".ko")[0].replace("-", "_")
            table[name] = (path, deps.split())
    builtin = set()
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            builtin = {os.path.basename(p).split(".ko")[0].replace("-", "_")
                       for p in f.read().split()}
    except OSError:
        pass
    return table, builtin


def load_order(moddir: str, wanted=MODULES) -> list[str]:
    """Relative module paths in an order insmod can load them."""
    table, builtin = _module_table(moddir)
    by_path = {path: deps for path, deps in table.values()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(by_path.get(path, [])):  # modules.dep lists users first
            visit(d)
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in table:
            raise UserError("modules", f"kernel has no module {name}", moddir,
                            hint="the guest kernel needs virtio, ext4 and 9p support")
        visit(table[name][0])
    return order


def _copy_module(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    opener = lzma.open if src.endswith(".xz") else gzip.open if src.endswith(".gz") \
        else open
    with opener(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)


def build_initrd(moddir: str, out: str, busybox: str = "/bin/busybox") -> list[str]:
    """Write a gzip'd newc initrd to out; returns the modules it loads."""
    if not os.path.isfile(busybox):
        raise UserError("busybox", "not found", busybox,
                        hint="install busybox-static (a static busybox)")
    order = load_order(moddir)
    with tempfile.TemporaryDirectory(prefix="charlie-initrd.") as tmp:
        for d in ("bin", "etc", "lib/modules", "proc", "sys", "dev", "newroot"):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        shutil.copy2(busybox, os.path.join(tmp, "bin/busybox"))
        shutil.copy2(os.path.join(GUEST_DIR, "initrd-init"), os.path.join(tmp, "init"))
        os.chmod(os.path.join(tmp, "init"), 0o755)
        names = []
        for rel in order:
            plain = rel.rsplit(".ko", 1)[0] + ".ko"
            _copy_module(os.path.join(moddir, rel), os.path.join(tmp, "lib/modules", plain))
            names.append(plain)
        with open(os.path.join(tmp, "etc/charlie-modules"), "w") as f:
            f.write("\n".join(names) + "\n")
        files = run(["find", ".", "-mindepth", "1"], cwd=tmp, timeout=60).stdout
        cpio = run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=tmp,
                   input=files, timeout=120)
        tmp_out = out + ".tmp"
        with gzip.open(tmp_out, "wb", compresslevel=6) as f:
            f.write(cpio.stdout)
        os.replace(tmp_out, out)
    return names
