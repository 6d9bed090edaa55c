"""The sandbox's fake PCI sysfs and /dev/vfio, for VM jobs with GPUs on
machines without an IOMMU (docs/sandbox.rst, "GPUs").

Per node, under <state>/fakevfio/<node>/ (gpu.vfio_root there):

    sys/bus/pci/devices/<PCI>/      class, vendor, resource, driver_override,
                                    driver -> ../../drivers/<name>,
                                    iommu_group -> ../../../../kernel/iommu_groups/<N>
    sys/bus/pci/drivers/<name>/     bind, unbind (nvidia, snd_hda_intel, vfio-pci)
    sys/bus/pci/drivers_probe
    sys/kernel/iommu_groups/<N>/devices/<PCI> -> ../../../../bus/pci/devices/<PCI>
    dev/vfio/<N>                    a character device node (never opened)

Each fake GPU has an IOMMU group of its own, shared with its audio
function (.1) and a PCI bridge, as real boards have.  serve() is the fake
kernel: it polls the bind, unbind and drivers_probe files and moves the
driver links as the kernel would (driver_override wins over the device's
own driver; a cleared override is left as written, where the kernel would
show "(null)"), truncating each file once read.  A device with a file
``fake-stuck`` in its directory will not bind to its own driver again (a
GPU that does not come back).  Nothing here is used outside the sandbox.
"""

from __future__ import annotations

import os
import stat
import sys
import time

VFIO_MAJOR = 511  # any number: the node is only stat'ed and chown'ed
GPU_CLASS, AUDIO_CLASS, BRIDGE_CLASS = "0x030200", "0x040300", "0x060400"
BAR = 32 << 30  # one 32 GiB 64-bit prefetchable BAR, as large GPUs have


def _w(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def build(root: str, gpus: list[str], first_group: int = 10) -> None:
    """The tree for GPUs at these PCI addresses (function .0 each)."""
    pci_dir = os.path.join(root, "sys/bus/pci")
    for name in ("nvidia", "snd_hda_intel", "vfio-pci", "pcieport"):
        d = os.path.join(pci_dir, "drivers", name)
        os.makedirs(d, exist_ok=True)
        for f in ("bind", "unbind"):
            _w(os.path.join(d, f), "")
    _w(os.path.join(pci_dir, "drivers_probe"), "")
    os.makedirs(os.path.join(root, "dev/vfio"), exist_ok=True)
    for i, gpu in enumerate(gpus):
        group = str(first_group + i)
        slot = gpu.rsplit(".", 1)[0]
        bridge = f"{gpu[:5]}{int(gpu[5:7], 16) - 1:02x}:00.0"
        gdir = os.path.join(root, "sys/kernel/iommu_groups", group, "devices")
        os.makedirs(gdir, exist_ok=True)
        for pci, cls, native in ((gpu, GPU_CLASS, "nvidia"),
                                 (f"{slot}.1", AUDIO_CLASS, "snd_hda_intel"),
                                 (bridge, BRIDGE_CLASS, "pcieport")):
            dev = os.path.join(pci_dir, "devices", pci)
            os.makedirs(dev, exist_ok=True)
            _w(os.path.join(dev, "class"), cls + "\n")
            _w(os.path.join(dev, "vendor"), "0x10de\n")
            _w(os.path.join(dev, "driver_override"), "(null)\n")
            _w(os.path.join(dev, "fake-native"), native)
            bar = f"0x{0x38 << 40:016x} 0x{(0x38 << 40) + BAR - 1:016x} 0x{0x0014220c:016x}" \
                if cls == GPU_CLASS else "0x0000000000000000 0x0000000000000000 0x0"
            _w(os.path.join(dev, "resource"), bar + "\n")
            _link(os.path.join(dev, "driver"), f"../../drivers/{native}")
            _link(os.path.join(dev, "iommu_group"), f"../../../../kernel/iommu_groups/{group}")
            _link(os.path.join(gdir, pci), f"../../../../bus/pci/devices/{pci}")
        node = os.path.join(root, "dev/vfio", group)
        if not os.path.exists(node):
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(VFIO_MAJOR, i))


def _link(path: str, target: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def _take(path: str) -> list[str]:
    """What was written to a fake sysfs file since it was last read."""
    try:
        with open(path, "r+") as f:
            text = f.read()
            if text:
                f.seek(0)
                f.truncate()
    except OSError:
        return []
    return [w for w in text.split() if w]


def _driver(dev: str) -> str:
    try:
        return os.path.basename(os.readlink(os.path.join(dev, "driver")))
    except OSError:
        return ""


def step(root: str) -> None:
    """One round of the fake kernel over one node's tree."""
    pci_dir = os.path.join(root, "sys/bus/pci")
    devices = os.path.join(pci_dir, "devices")
    for drv in sorted(os.listdir(os.path.join(pci_dir, "drivers"))):
        for pci in _take(os.path.join(pci_dir, "drivers", drv, "unbind")):
            dev = os.path.join(devices, pci)
            if _driver(dev) == drv:
                os.unlink(os.path.join(dev, "driver"))
        for pci in _take(os.path.join(pci_dir, "drivers", drv, "bind")):
            _probe(devices, pci, only=drv)
    for pci in _take(os.path.join(pci_dir, "drivers_probe")):
        _probe(devices, pci)


def _probe(devices: str, pci: str, only: str | None = None) -> None:
    dev = os.path.join(devices, pci)
    if not os.path.isdir(dev) or _driver(dev):
        return
    override = open(os.path.join(dev, "driver_override")).read().strip()
    want = override if override not in ("", "(null)") else \
        open(os.path.join(dev, "fake-native")).read().strip()
    if only and only != want and override not in ("", "(null)"):
        return
    want = only or want
    if os.path.exists(os.path.join(dev, "fake-stuck")) and want != "vfio-pci":
        return
    _link(os.path.join(dev, "driver"), f"../../drivers/{want}")


def serve(roots: list[str], poll: float = 0.005) -> None:
    while True:
        for root in roots:
            try:
                step(root)
            except OSError as e:  # a node's tree removed under us: the next round
                print(f"fakesys: {root}: {e}", file=sys.stderr, flush=True)
        time.sleep(poll)


if __name__ == "__main__":
    serve(sys.argv[1:])
