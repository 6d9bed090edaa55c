"""A job's GPUs on this node: what Slurm allotted, mapped to the devices and
to what the driver says of them.

Slurm gives the prolog the job's GPUs as gres indices (``SLURM_JOB_GPUS``,
e.g. ``0,2``; ``CUDA_VISIBLE_DEVICES`` holds the same numbers).  Index i is
the i-th GPU device file of this node in gres.conf's ``Name=gpu File=...``
lines, in their order.  The device file's minor number finds the GPU in the
driver's own table (NVIDIA's ``/proc/driver/nvidia/gpus/<PCI>/information``:
``GPU UUID``, ``Bus Location``, ``Device Minor``), never the order of device
files or of PCI addresses, which differ on real machines.  The UUID is what
a CDI spec names the device by.

A MIG device is a gres.conf entry with ``MultipleFiles=`` (its GPU's device
file first, then its ``nvidia-caps`` files): it maps to its GPU as above,
and to its own UUID (``MIG-…``) from what Slurm's GPU plugin gives the
prolog in ``CUDA_VISIBLE_DEVICES``, in the order of ``SLURM_JOB_GPUS``;
the CDI device is then named by that UUID.

Root reads gres.conf and the driver's table (both root's); nothing here
touches a user's file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat

from . import hostlist
from .jobenv import VARIABLES
from .errors import NodeFault

_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]{1,80}")
_PCI = re.compile(r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int           # Slurm's gres index on this node
    device: str          # the device file gres.conf names
    major: int
    minor: int
    uuid: str            # from the driver's table
    pci: str
    mig: str = ""        # a MIG device's UUID (its GPU is uuid)

    @property
    def name(self) -> str:
        """What a CDI spec names it by."""
        return self.mig or self.uuid

    def line(self) -> str:
        return (f"gpu {self.index}: {self.device} ({self.major}:{self.minor}), "
                f"{self.uuid} at {self.pci}" + (f", MIG device {self.mig}" if self.mig else ""))


def parse_indices(text: str) -> list[int]:
    """SLURM_JOB_GPUS ("0,2", "" for none) -> [0, 2]; a NodeFault when it is
    not that (Slurm wrote it: a mistake there is the node's to fix)."""
    text = text.strip()
    if not text:
        return []
    out = []
    for word in text.split(","):
        if not (word.isascii() and word.isdigit() and len(word) <= 6):
            raise NodeFault(VARIABLES["gpus"][0], "not a list of GPU indices", repr(text[:80]),
                            hint="the GPUs come from Slurm's gres gpu; check gres.conf")
        if int(word) not in out:
            out.append(int(word))
    return out


def gres_files(text: str, node: str, path: str = "gres.conf") -> list[str]:
    """The GPU device file of each of this node's GPUs (gres_entries), in
    gres.conf's order."""
    return [e[0] for e in gres_entries(text, node, path)]


def gres_entries(text: str, node: str, path: str = "gres.conf") -> list[tuple[str, ...]]:
    """This node's GPUs in gres.conf's order, each as its device files:
    every ``Name=gpu`` line for the node (no ``NodeName=``: every node),
    ``File=`` expanded (``/dev/nvidia[0-3]``: one GPU each) or
    ``MultipleFiles=`` (one GPU, a MIG device: ``/dev/nvidia0`` first).  A
    GPU line with neither (the devices left to AutoDetect) cannot be
    mapped: a NodeFault that says so."""
    files: list[tuple[str, ...]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words: dict[str, str] = {}
        for word in line.split():
            key, eq, value = word.partition("=")
            if eq:
                words[key.lower()] = value
        names = words.get("nodename")
        if names is not None and node not in hostlist.expand(names):
            continue
        if words.get("name", "").lower() != "gpu":
            continue
        file = words.get("file") or words.get("files")
        multiple = words.get("multiplefiles")
        if multiple:
            files.append(tuple(f for f in multiple.split(",") if f))
            continue
        if not file:
            raise NodeFault(f"{path} line {number}", "a GPU line without File=", raw.strip(),
                            hint="slurm-charlie maps Slurm's GPU indices to devices "
                            "through gres.conf's File= (docs/admin.rst, \"GPUs\")")
        files += [(f,) for f in hostlist.expand(file)]
    return files


def read_table(root: str) -> dict[int, tuple[str, str]]:
    """The driver's table: {device minor: (UUID, PCI address)}."""
    out: dict[int, tuple[str, str]] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        raise NodeFault("gpu.driver_table", "cannot list", f"{root}: {e.strerror}",
                        hint="is the GPU driver loaded? (gpu.driver_table in the site "
                        "config names its table)") from None
    for pci in entries:
        info = os.path.join(root, pci, "information")
        try:
            with open(info, errors="replace") as f:
                text = f.read(65536)
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, colon, value = line.partition(":")
            if colon:
                fields[key.strip().lower()] = value.strip()
        uuid, minor = fields.get("gpu uuid", ""), fields.get("device minor", "")
        bus = fields.get("bus location", pci)
        if not (_UUID.fullmatch(uuid) and minor.isascii() and minor.isdigit()
                and _PCI.fullmatch(bus)):
            raise NodeFault("gpu.driver_table", "an entry without GPU UUID, Bus Location "
                            "and Device Minor", info, hint="is gpu.driver_table the "
                            "driver's table of GPUs?")
        if int(minor) in out:
            raise NodeFault("gpu.driver_table", f"two GPUs with device minor {minor}", info)
        out[int(minor)] = (uuid, bus.lower())
    return out


def job_gpus(indices: list[int], gres_text: str, node: str, table_root: str,
             gres_path: str = "gres.conf", visible: str = "") -> list[Gpu]:
    """The job's GPUs on this node, each with its device and identity;
    visible: CUDA_VISIBLE_DEVICES as Slurm gave it to the prolog (MIG
    devices' UUIDs, in the order of indices)."""
    if not indices:
        return []
    entries = gres_entries(gres_text, node, gres_path)
    files = [e[0] for e in entries]
    table = read_table(table_root)
    said = [v.strip() for v in visible.split(",")] if visible else []
    out = []
    for k, i in enumerate(indices):
        if i >= len(files):
            raise NodeFault(VARIABLES["gpus"][0], f"GPU index {i}, but {gres_path} gives this "
                            f"node {len(files)} GPU device file(s)",
                            hint="gres.conf and the node's Gres= in slurm.conf disagree")
        dev = files[i]
        try:
            st = os.stat(dev)
        except OSError as e:
            raise NodeFault(gres_path, "GPU device file missing", f"{dev}: {e.strerror}") \
                from None
        if not stat.S_ISCHR(st.st_mode):
            raise NodeFault(gres_path, "GPU device file is not a character device", dev)
        minor = os.minor(st.st_rdev)
        if minor not in table:
            raise NodeFault("gpu.driver_table", f"no GPU with device minor {minor} "
                            f"({dev})", table_root, hint="the driver's table and gres.conf "
                            "disagree")
        uuid, pci = table[minor]
        mig = ""
        if len(entries[i]) > 1:  # a MIG device: Slurm says which one
            mig = said[k] if len(said) == len(indices) else ""
            if not (mig.startswith("MIG-") and _UUID.fullmatch(mig)):
                raise NodeFault(VARIABLES["cuda_visible"][0], f"GPU index {i} is a MIG "
                                f"device ({gres_path}: MultipleFiles), but Slurm gave the "
                                f"prolog no MIG UUID for it", repr(visible[:200]),
                                hint="Slurm's NVML GPU plugin (AutoDetect=nvml) gives the "
                                "prolog MIG devices' UUIDs; without it, MIG devices cannot "
                                "be mapped")
        out.append(Gpu(i, dev, os.major(st.st_rdev), minor, uuid, pci, mig))
    return out


def node_gpus(gres_text: str, node: str, table_root: str,
              gres_path: str = "gres.conf") -> list[Gpu]:
    """Every whole GPU gres.conf gives this node (a GPU split into MIG
    devices once, by its own device file), for doctor and gpu-spec."""
    entries = gres_entries(gres_text, node, gres_path)
    whole = [(i, e[0]) for i, e in enumerate(entries)]
    firsts = {}
    for i, dev in whole:
        firsts.setdefault(dev, i)
    text = "".join(f"Name=gpu File={dev}\n" for dev in firsts)
    return job_gpus(list(range(len(firsts))), text, node, table_root, gres_path)


def cdi_names(gpus: list[Gpu], kind: str) -> list[str]:
    """The CDI device names of the job's GPUs (by UUID)."""
    return [f"{kind}={g.name}" for g in gpus]


GRES_HINT = ("the job has GPUs: slurm-charlie reads gres.conf beside slurm.conf to "
             "find their devices")


def read_gres(slurm_conf: str) -> tuple[str, str | None]:
    """(path, text) of the gres.conf beside slurm.conf; text None when
    there is none; a NodeFault when it is there and cannot be read."""
    gres = os.path.join(os.path.dirname(slurm_conf), "gres.conf")
    try:
        with open(gres, errors="replace") as f:
            return gres, f.read(1 << 20)
    except FileNotFoundError:
        return gres, None
    except OSError as e:
        raise NodeFault("gres.conf", "cannot read", f"{gres}: {e.strerror}",
                        hint=GRES_HINT) from None


def for_prolog(slurm_gpus: str, node: str, table: str, slurm_conf: str,
               visible: str = "") -> list[Gpu]:
    """The prolog's question: the job's GPUs here ([] without GPU gres),
    from SLURM_JOB_GPUS (and CUDA_VISIBLE_DEVICES for MIG devices), the
    gres.conf beside slurm.conf and the driver's table."""
    indices = parse_indices(slurm_gpus)
    if not indices:
        return []
    gres, text = read_gres(slurm_conf)
    if text is None:
        raise NodeFault("gres.conf", "cannot read", f"{gres}: No such file or directory",
                        hint=GRES_HINT)
    return job_gpus(indices, text, node, table, gres, visible)
