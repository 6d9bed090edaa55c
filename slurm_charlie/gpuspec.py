"""A CDI spec for this node's GPUs, made from the driver itself, for nodes
whose vendor tools wrote none (``slurm-charlie gpu-spec``, or the prolog
when ``gpu.generate`` is on).

What goes in is what NVIDIA's ``nvidia-ctk cdi generate`` puts in, found
the same way:

- one device per GPU, named by its UUID (the driver's table), with the
  device file gres.conf gives it;
- the driver's control devices that exist (``/dev/nvidiactl``, ``-uvm``,
  ``-uvm-tools``, ``-modeset``);
- the driver's user-space libraries as the loader's cache lists them
  (``ldconfig -p`` of the driver root), each bound read-only at its own
  path, with its soname link made in the container and the loader's cache
  updated there;
- the driver's tools (``nvidia-smi`` ...), its sockets (persistenced,
  MPS) and its GSP firmware, where they exist.

The driver's version comes from the kernel module's ``version`` file beside
the driver's table (``/proc/driver/nvidia/version``).  Only files root owns
and alone may write are put in (the same rule as for a vendor's spec).
Root runs this on root's files; nothing of a user's is read.
"""

from __future__ import annotations

import json
import os
import re

from . import cdi, gpus
from .errors import NodeFault
from .proc import log, run

#: the driver's user-space libraries (names up to ".so"), as nvidia-ctk lists them
LIBRARIES = (
    "libcuda", "libcudadebugger", "libnvidia-allocator", "libnvidia-cfg",
    "libnvidia-gpucomp", "libnvidia-ml", "libnvidia-nvvm", "libnvidia-opencl",
    "libnvidia-pkcs11", "libnvidia-pkcs11-openssl3", "libnvidia-ptxjitcompiler",
    "libnvidia-fatbinaryloader", "libnvidia-compiler", "libnvidia-nscq",
    "libnvidia-encode", "libnvidia-opticalflow", "libnvcuvid", "libnvidia-fbc",
    "libnvidia-ngx", "libnvidia-rtcore", "libnvoptix", "libnvidia-tls",
    "libnvidia-glcore", "libnvidia-eglcore", "libnvidia-glsi", "libnvidia-glvkspirv",
)
TOOLS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced",
         "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
TOOL_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin", "usr/local/bin")
SOCKETS = ("/run/nvidia-persistenced/socket", "/run/nvidia-fabricmanager/socket")
CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                   "/dev/nvidia-modeset")
HOOK = "/usr/bin/nvidia-cdi-hook"  # named, never run by us (cdi.plan_hook)
#: what the loader's cache calls this machine's libraries
ARCH = {"x86_64": "x86-64", "aarch64": "AArch64", "ppc64le": "64bit"}
MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "bind"]

_VERSION = re.compile(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+(?:\.[0-9]+)+)")


def driver_version(table: str) -> str:
    """The kernel module's version: ``version`` beside the driver's table
    (NVIDIA: /proc/driver/nvidia/version, "... Kernel Module  550.54.14 ..."),
    else /sys/module/nvidia/version."""
    beside = os.path.join(os.path.dirname(table.rstrip("/")), "version")
    for path in (beside, "/sys/module/nvidia/version"):
        try:
            with open(path, errors="replace") as f:
                text = f.read(4096)
        except OSError:
            continue
        m = _VERSION.search(text) or re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)+)\s*", text)
        if m:
            return m.group(1)
    raise NodeFault("gpu-spec", "cannot tell the driver's version", beside,
                    hint="is the GPU driver loaded? (gpu.driver_table names its table; "
                    "the version file sits beside it)")


def loader_cache(root: str, ldconfig: str = "/sbin/ldconfig") -> dict[str, str]:
    """{soname: path in root} for this machine's architecture, from the
    loader's cache of root (``ldconfig -p``)."""
    cache = os.path.join(root, "etc/ld.so.cache")
    p = run([ldconfig, "-p", "-C", cache], timeout=60, check=False)
    if p.returncode != 0:
        raise NodeFault("gpu-spec", "cannot read the loader's cache", cache,
                        hint="is gpu.driver_root (or --driver-root) where the driver is "
                        "installed? Its etc/ld.so.cache lists the driver's libraries")
    arch = ARCH.get(os.uname().machine, "")
    out: dict[str, str] = {}
    for line in p.stdout.decode(errors="replace").splitlines():
        m = re.match(r"\s+(\S+) \(([^)]*)\) => (/\S+)$", line)
        if m and (not arch or arch in m.group(2).split(",")) and m.group(1) not in out:
            out[m.group(1)] = m.group(3)
    return out


def _inside(root: str, path: str) -> str | None:
    """path (as the container sees it) resolved in root, None when it
    leaves root or is missing; the answer is relative to root, with a /."""
    real = os.path.realpath(os.path.join(root, path.lstrip("/")))
    top = os.path.realpath(root)
    if not os.path.isfile(real) or os.path.commonpath([top, real]) != top:
        return None
    return "/" + os.path.relpath(real, top) if top != "/" else real


def _trusted(host: str, skipped: list[str]) -> bool:
    why = cdi.untrusted_source(host)
    if why:
        skipped.append(f"{host}: {why}")
    return not why


def generate(kind: str, devices: list[tuple[str, str]], root: str = "/",
             table: str = "/proc/driver/nvidia/gpus", env: tuple[str, ...] = (),
             ldconfig: str = "/sbin/ldconfig", dev_root: str = "/"
             ) -> tuple[dict, list[str]]:
    """(the spec as a dict, lines on what was left out and why).  devices:
    (UUID, device file) of each GPU; root: where the driver's files are
    (the host's /, or a driver container's root)."""
    version = driver_version(table)
    skipped: list[str] = []
    mounts, links, folders = [], [], []
    for soname, path in sorted(loader_cache(root, ldconfig).items()):
        if soname.split(".so", 1)[0] not in LIBRARIES:
            continue
        real = _inside(root, path)
        if real is None:
            skipped.append(f"{soname}: {path} is not a file in {root}")
            continue
        host = os.path.join(root, real.lstrip("/"))
        if not _trusted(host, skipped):
            continue
        mounts.append({"hostPath": host, "containerPath": real, "options": MOUNT_OPTIONS})
        folder, name = os.path.split(real)
        if name != soname:
            links.append(f"{name}::{folder}/{soname}")
        if folder not in folders:
            folders.append(folder)
    if not any(m["containerPath"].rsplit("/", 1)[1].startswith("libcuda.so") for m in mounts):
        raise NodeFault("gpu-spec", f"the loader's cache of {root} has no libcuda.so.1",
                        hint="is the driver's user-space part installed there? "
                        "(ldconfig -p | grep libcuda)")
    for tool in TOOLS:
        for d in TOOL_DIRS:
            real = _inside(root, f"/{d}/{tool}")
            if real is not None:
                host = os.path.join(root, real.lstrip("/"))
                if _trusted(host, skipped):
                    mounts.append({"hostPath": host, "containerPath": f"/usr/bin/{tool}",
                                   "options": MOUNT_OPTIONS})
                break
    firmware = os.path.join(root, "lib/firmware/nvidia", version)
    try:
        blobs = sorted(n for n in os.listdir(firmware) if n.endswith(".bin"))
    except OSError:
        blobs = []
    for n in blobs:
        host = os.path.join(firmware, n)
        if _trusted(host, skipped):
            mounts.append({"hostPath": host, "containerPath":
                           f"/lib/firmware/nvidia/{version}/{n}", "options": MOUNT_OPTIONS})
    for sock in SOCKETS:
        host = os.path.join(root, sock.lstrip("/"))
        if os.path.exists(host) and _trusted(host, skipped):
            mounts.append({"hostPath": host, "containerPath": sock,
                           "options": ["nosuid", "nodev", "bind"]})
    nodes = [{"path": d} for d in CONTROL_DEVICES
             if os.path.exists(os.path.join(dev_root, d.lstrip("/")))]
    hooks = []
    if links:
        hooks.append({"hookName": "createContainer", "path": HOOK,
                      "args": ["nvidia-cdi-hook", "create-symlinks",
                               *[a for link in links for a in ("--link", link)]]})
    hooks.append({"hookName": "createContainer", "path": HOOK,
                  "args": ["nvidia-cdi-hook", "update-ldcache",
                           *[a for f in folders for a in ("--folder", f)]]})
    edits: dict = {"env": list(env)} if env else {}
    if nodes:
        edits["deviceNodes"] = nodes
    edits.update(mounts=mounts, hooks=hooks)
    spec = {"cdiVersion": "0.5.0", "kind": kind,
            "devices": [{"name": uuid, "containerEdits": {"deviceNodes": [{"path": dev}]}}
                        for uuid, dev in devices],
            "containerEdits": edits}
    # what we wrote must be what we read: the strict reader checks it
    parsed = cdi.parse(json.dumps(spec), "<generated>")
    spec["cdiVersion"] = cdi.minimum_version(parsed)
    cdi.plan_hooks(parsed.edits, "<generated>")
    return spec, skipped


def node_devices(cfg, node: str, slurm_conf: str) -> list[tuple[str, str]]:
    """(UUID, device file) of each GPU gres.conf gives this node, by the
    driver's table."""
    from .config import expand_node
    path, text = gpus.read_gres(slurm_conf)
    if text is None:
        raise NodeFault("gres.conf", "missing", path, hint="gpu-spec names the GPUs "
                        "gres.conf gives this node")
    if not gpus.gres_entries(text, node, path):
        raise NodeFault("gres.conf", f"gives {node} no GPUs", path)
    got = gpus.node_gpus(text, node, expand_node(cfg["gpu.driver_table"], node), path)
    return [(g.uuid, g.device) for g in got]


def write(spec: dict, path: str) -> None:
    """The spec as JSON at path, root's, mode 0644, replaced in one step."""
    from . import files
    files.write_file(path, json.dumps(spec, indent=2) + "\n", 0o644)


GENERATED_DIR = ".cdi"  # in runtime_root: the spec the prolog generates (root's)
GENERATED = "generated.json"


def ensure(cfg, node: str, runtime_root: str, slurm_conf: str) -> str:
    """gpu.generate: the node's generated spec, made anew when the driver's
    version or the GPUs changed (a key file beside it says what it was made
    from); the directory it is in.  Prologs may race: each write replaces
    the file whole."""
    from . import asroot
    from .config import expand_node
    d = os.path.join(runtime_root, GENERATED_DIR)
    table = expand_node(cfg["gpu.driver_table"], node)
    devices = node_devices(cfg, node, slurm_conf)
    key = json.dumps([driver_version(table), cfg["gpu.cdi_kind"], cfg["gpu.driver_root"],
                      devices]) + "\n"
    try:
        with open(os.path.join(d, GENERATED + ".key")) as f:
            if f.read() == key and os.path.exists(os.path.join(d, GENERATED)):
                return d
    except OSError:
        pass
    spec, skipped = generate(cfg["gpu.cdi_kind"], devices, cfg["gpu.driver_root"], table)
    for line in skipped:
        log.warning("gpu.generate: left out %s", line)
    asroot.keep_node_file(runtime_root, GENERATED_DIR, GENERATED,
                          json.dumps(spec, indent=2) + "\n")
    asroot.keep_node_file(runtime_root, GENERATED_DIR, GENERATED + ".key", key)
    log.info("gpu.generate: wrote %s (driver %s, %d GPU(s))", os.path.join(d, GENERATED),
             json.loads(key)[0], len(devices))
    return d
