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


# -- the guest kernel, uncompressed ------------------------------------------
#
# A distribution's kernel is a bzImage: a small setup program and the real
# kernel (an ELF file) compressed inside it.  The guest decompresses it
# itself, before its first message; under software emulation (vm.accel =
# "tcg") that is about 3 s of every boot for an xz kernel.  QEMU boots the
# ELF file directly through its PVH entry point (CONFIG_PVH, set in Debian's,
# Ubuntu's and RHEL's kernels), which skips that work.

#: payload compressions by their magic; the stdlib ones and two by tool
_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"),
                 (b"\x5d\x00\x00", "lzma"), (b"\x28\xb5\x2f\xfd", "zstd"),
                 (b"\x02\x21\x4c\x18", "lz4"))
_TOOLS = {"zstd": (["zstd", "-dcq"], "zstd"), "lz4": (["lz4", "-dcq"], "lz4")}
_ELF_NOTE_PVH = 18  # XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen"


def _payload(image: bytes, path: str) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol 2.08 and later
    say where it is)."""
    import struct
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise UserError("vm kernel", "neither an ELF kernel nor a bzImage", path,
                        hint="give the guest's vmlinuz (a bzImage) or vmlinux")
    version, = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise UserError("vm kernel", f"boot protocol {version >> 8}.{version & 0xff} "
                        "is too old to say where its kernel is", path,
                        hint="use a kernel from this decade (protocol 2.08 or later)")
    setup_sects = image[0x1f1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return image[start:start + length]


def _decompress(data: bytes, path: str) -> bytes:
    import bz2
    import zlib
    kind = next((k for magic, k in _COMPRESSIONS if data.startswith(magic)), None)
    try:
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise UserError("vm kernel", f"its {kind} payload does not decompress ({e})",
                        path, hint="the file is damaged: copy the kernel again") from None
    if kind in _TOOLS:
        argv, package = _TOOLS[kind]
        if not shutil.which(argv[0]):
            raise UserError("vm kernel", f"the kernel is {kind}-compressed", path,
                            hint=f"apt-get install {package}, then run this again")
        # the kernel's build appends the decompressed size (4 bytes), which
        # the Python decoders stop before and these tools take for a frame
        return run(argv, input=data[:-4], timeout=120).stdout
    raise UserError("vm kernel", "its payload's compression is not one this knows "
                    "(gzip, xz, lzma, bzip2, zstd, lz4)", path,
                    hint="boot the compressed kernel as it is (vm.kernel)")


def has_pvh_entry(elf: bytes) -> bool:
    """Does this 64-bit little-endian ELF file carry a PVH entry note?"""
    import struct
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _ELF_NOTE_PVH:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def kernel_is_compressed(path: str) -> bool | None:
    """True for a bzImage, False for an ELF kernel, None when unreadable or
    neither (doctor's question)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError:
        return None
    if head[:4] == b"\x7fELF":
        return False
    return True if head[0x202:0x206] == b"HdrS" else None


def extract_kernel(src: str, out: str) -> str:
    """Write the ELF kernel inside bzImage src to out (0644, atomically);
    returns the payload's compression.  UserError when QEMU could not boot
    the result (no PVH entry) -- then the compressed kernel stays the one
    to use."""
    with open(src, "rb") as f:
        image = f.read()
    if image[:4] == b"\x7fELF":
        kind, elf = "none", image
    else:
        payload = _payload(image, src)
        kind = next((k for magic, k in _COMPRESSIONS if payload.startswith(magic)), "?")
        elf = _decompress(payload, src)
    if not has_pvh_entry(elf):
        raise UserError("vm kernel", "the kernel has no PVH entry point, so QEMU "
                        "cannot boot it uncompressed", src,
                        hint="keep vm.kernel on the compressed kernel, or use a "
                        "kernel built with CONFIG_PVH=y")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(elf)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return kind
