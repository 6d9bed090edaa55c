"""A VM job's GPUs, taken from the host's driver for its guest (VFIO) and
given back.

For each of the job's GPUs on this node (its PCI address from the driver's
table, never "any free one"):

- plan(): the GPU's IOMMU group must hold nothing but the job's GPUs, other
  functions of their own slots (a GPU's audio or USB function: taken along,
  not given to the guest) and PCI bridges; no IOMMU, or a group shared with
  something else, fails the job with the reason;
- busy(): no process of the node has the GPU's device node open;
- take(): driver_override set to vfio-pci (this device only, never a
  model-wide new_id), unbound from its driver, probed again, checked bound
  to vfio-pci; the group's /dev/vfio/N handed to the job user;
- give_back() (the epilog, by root's record, also after a prolog that died
  half way): override cleared, unbound from vfio-pci, probed again, checked
  bound to the driver it had; /dev/vfio/N root's again.  A GPU that does
  not come back is a node fault: the node drains with the GPU and the fix.

Every sysfs path is below gpu.vfio_root (/ on a real node; the sandbox's
fake tree, served by slurm_charlie/fakesys.py, elsewhere).  Root writes
only to sysfs files of the devices its record names.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import stat
import time

from ..errors import NodeFault, UserError
from ..log import log
from ..procfs import fd_targets, ns_inode

BRIDGE = 0x0604
VFIO = "vfio-pci"
#: sysfs resource flags: a 64-bit memory BAR
MEM_64 = 0x00100000
IOMMU_HINT = ("a VM job takes whole IOMMU groups: the admin turns the IOMMU on "
              "(intel_iommu=on or amd_iommu=on on the kernel command line) and gives "
              "each GPU a group of its own (ACS), docs/admin.rst \"GPUs in VMs\"")


@dataclasses.dataclass(frozen=True)
class Device:
    pci: str
    driver: str          # the host driver it had ("" for none), to give it back to
    group: str
    guest: bool          # handed to QEMU (the job's GPU), or only taken along
    bar64: int = 0       # bytes of 64-bit memory BARs (the guest's MMIO window)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Device":
        return cls(pci=str(d["pci"]), driver=str(d["driver"]), group=str(d["group"]),
                   guest=bool(d["guest"]), bar64=int(d.get("bar64", 0)))


def _sys(root: str, *parts: str) -> str:
    return os.path.join(root, "sys", *parts)


def _dev(root: str, pci: str) -> str:
    return _sys(root, "bus/pci/devices", pci)


def _link_name(path: str) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def driver_of(root: str, pci: str) -> str:
    return _link_name(os.path.join(_dev(root, pci), "driver"))


def _read(path: str, limit: int = 4096) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    """One write to a sysfs file (the fake tree's regular files are
    truncated: the fake kernel reads what the last write said)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _class(root: str, pci: str) -> int:
    try:
        return int(_read(os.path.join(_dev(root, pci), "class")).strip(), 16) >> 8
    except (OSError, ValueError):
        return 0


def _bar64(root: str, pci: str) -> int:
    total = 0
    try:
        text = _read(os.path.join(_dev(root, pci), "resource"), 65536)
    except OSError:
        return 0
    for line in text.splitlines():
        try:
            start, end, flags = (int(w, 16) for w in line.split()[:3])
        except ValueError:
            continue
        if flags & MEM_64 and end > start:
            total += end - start + 1
    return total


def plan(root: str, gpus: list[str]) -> list[Device]:
    """The devices to take for these GPUs (PCI addresses), their groups
    checked: a UserError when a group holds what the job may not take."""
    out: list[Device] = []
    seen: set[str] = set()
    for pci in gpus:
        if not os.path.isdir(_dev(root, pci)):
            raise NodeFault(f"GPU {pci}", "not in sysfs", _dev(root, pci),
                            hint="the driver's table names a PCI device the kernel does "
                            "not show")
        group = _link_name(os.path.join(_dev(root, pci), "iommu_group"))
        if not group:
            raise UserError("VM with GPUs", f"this node has no IOMMU group for GPU {pci}: "
                            "a guest cannot be given it", hint=IOMMU_HINT)
        members = sorted(os.listdir(_sys(root, "kernel/iommu_groups", group, "devices")))
        for m in members:
            if m in seen:
                continue
            if m in gpus:
                kind = True
            elif _class(root, m) == BRIDGE:
                continue
            elif m.rsplit(".", 1)[0] == pci.rsplit(".", 1)[0]:
                kind = False  # another function of the GPU's slot
            else:
                raise UserError("VM with GPUs", f"GPU {pci}'s IOMMU group {group} also "
                                f"holds {m} (class {_class(root, m):04x}), which is not "
                                "the job's", hint=IOMMU_HINT + "; or ask for every GPU "
                                "of the group")
            seen.add(m)
            out.append(Device(m, driver_of(root, m), group, kind,
                              _bar64(root, m) if kind else 0))
    return out


def busy(devices: list[str]) -> dict[str, list[int]]:
    """{device node: pids that have it open} for the GPUs' device nodes (a
    guest cannot take a GPU a process uses; the driver would not let it
    go).  By the links in /proc/PID/fd, never stat (a FUSE file a user
    holds open could make root wait forever), and only for processes in
    root's own mount namespace (in its own, a user can make any path name
    anything)."""
    want = set(devices)
    ours = ns_inode("self", "mnt")
    found: dict[str, list[int]] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        hit = want.intersection(fd_targets(pid))
        if hit and ns_inode(pid, "mnt") == ours:
            for d in hit:
                found.setdefault(d, []).append(int(pid))
    return found


def _wait_driver(root: str, pci: str, want: str, limit: float) -> str:
    """The device's driver once it is want, or what it is after limit
    seconds (the kernel binds at once; the sandbox's fake one polls)."""
    end = time.monotonic() + limit
    while True:
        now = driver_of(root, pci)
        if now == want or time.monotonic() > end:
            return now
        time.sleep(0.01)


def _vfio_node(root: str, group: str) -> str:
    return os.path.join(root, "dev", "vfio", group)


def _own_group(root: str, group: str, uid: int, mode: int) -> None:
    node = _vfio_node(root, group)
    try:
        st = os.lstat(node)
    except OSError as e:
        raise NodeFault(f"IOMMU group {group}", f"no {node}", e.strerror,
                        hint="modprobe vfio-pci (it makes /dev/vfio/N)") from None
    if not stat.S_ISCHR(st.st_mode):
        raise NodeFault(f"IOMMU group {group}", "not a character device", node)
    os.chown(node, uid, 0 if uid == 0 else -1, follow_symlinks=False)
    os.chmod(node, mode)  # a device node of root's /dev (checked above), not a link


def take(root: str, devices: list[Device], uid: int, limit: float = 10.0) -> None:
    """Bind every device to vfio-pci (safe to repeat) and hand each group's
    /dev/vfio/N to uid.  A device that will not bind is a node fault."""
    for d in devices:
        dev = _dev(root, d.pci)
        now = driver_of(root, d.pci)
        if now == VFIO:
            continue
        _write(os.path.join(dev, "driver_override"), VFIO)
        if now:
            _write(_sys(root, "bus/pci/drivers", now, "unbind"), d.pci)
            if _wait_driver(root, d.pci, "", limit):
                raise NodeFault(f"GPU {d.pci}", f"{now} did not let it go",
                                hint="a process of the node may still use it")
        _write(_sys(root, "bus/pci/drivers_probe"), d.pci)
        got = _wait_driver(root, d.pci, VFIO, limit)
        if got != VFIO:
            raise NodeFault(f"GPU {d.pci}", f"not bound to {VFIO} (driver: {got or 'none'})",
                            hint="modprobe vfio-pci")
        log.info("GPU %s: taken from %s for the guest (IOMMU group %s)", d.pci,
                 now or "no driver", d.group)
    for group in sorted({d.group for d in devices}):
        _own_group(root, group, uid, 0o600)


def give_back(root: str, devices: list[Device], limit: float = 10.0) -> None:
    """Each device back to the driver it had (override cleared), each group
    root's; every device is tried, then the first that did not come back
    is a node fault (the node drains: a GPU is missing from it)."""
    faults = []
    for d in reversed(devices):
        dev = _dev(root, d.pci)
        try:
            _write(os.path.join(dev, "driver_override"), "\n")
            if driver_of(root, d.pci) == VFIO:
                _write(_sys(root, "bus/pci/drivers", VFIO, "unbind"), d.pci)
                _wait_driver(root, d.pci, "", limit)
            if d.driver and driver_of(root, d.pci) != d.driver:
                _write(_sys(root, "bus/pci/drivers_probe"), d.pci)
            got = _wait_driver(root, d.pci, d.driver, limit)
        except OSError as e:
            got = f"error: {e.strerror}"
        if got != d.driver:
            had = d.driver or "no driver"
            faults.append(NodeFault(f"GPU {d.pci}", f"not given back to {had} (now: "
                                    f"{got or 'no driver'})",
                                    hint=f"echo {d.pci} > /sys/bus/pci/drivers_probe, check "
                                    "dmesg, then resume the node; a GPU that will not "
                                    "rebind needs a reboot"))
        else:
            log.info("GPU %s: given back to %s", d.pci, d.driver or "no driver")
    for group in sorted({d.group for d in devices}):
        try:
            _own_group(root, group, 0, 0o600)
        except NodeFault as e:
            log.warning("IOMMU group %s: %s", group, e.line())
        except OSError as e:
            log.warning("IOMMU group %s: %s", group, e.strerror)
    if faults:
        raise faults[0]


def set_memlock(pid: int, nbytes: int) -> int:
    """Let the guest's QEMU lock nbytes (VFIO pins all guest memory): its
    limit raised (root needs CAP_SYS_RESOURCE for another's process), else
    left as slurmd gave it.  Returns the limit now in effect."""
    try:
        resource.prlimit(pid, resource.RLIMIT_MEMLOCK, (nbytes, nbytes))
        return nbytes
    except PermissionError:  # even reading another's limits needs it: /proc says
        soft = _memlock_of(pid)
    return nbytes if soft is None or soft >= nbytes else soft


def _memlock_of(pid: int) -> int | None:
    """pid's soft locked-memory limit in bytes (None: unlimited)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max locked memory"):
                soft = line[26:].split()[0]
                return None if soft == "unlimited" else int(soft)
    return None
