"""Site configuration: one TOML file, every key listed in DEFAULTS.

Path: $SLURM_CHARLIE_CONF, else /etc/slurm/charlie.toml.  A missing file at
the default path means "all defaults"; a file named by the variable must
exist.  Unknown keys and wrong types are refused with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import ConfigError

ENV_VAR = "SLURM_CHARLIE_CONF"
_ENV_ITEM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^\n]*$")
DEFAULT_PATH = "/etc/slurm/charlie.toml"


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _env_items(value: list) -> str | None:
    bad = [v for v in value if not _ENV_ITEM.match(v)]
    return f"not NAME=VALUE: {bad[0]!r}" if bad else None


@dataclasses.dataclass(frozen=True)
class Key:
    name: str             # "section.key" or "key"
    default: Any
    type: type
    help: str
    choices: tuple = ()
    #: the key's own rule beyond type and choices: returns what is wrong, or None
    rule: Callable[[Any], str | None] | None = None


DEFAULTS: tuple[Key, ...] = (
    Key("runtime_root", "/var/spool/slurm-charlie", str,
        "node-local directory for job directories (not NFS); '%n' becomes the "
        "node name. It and its parents must not be writable by ordinary users.",
        rule=_absolute),
    Key("image_roots", [], list,
        "if not empty, images must live below one of these directories"),
    Key("default_type", "auto", str,
        "type used when the user gives no --charlie-type",
        ("auto", "container", "vm", "none")),
    Key("log_level", "info", str, "debug, info, warning or error",
        ("debug", "info", "warning", "error")),
    Key("syslog", True, bool, "also log to syslog (facility daemon)"),
    Key("log_file", "", str,
        "node-local log file the hooks append to ('%n' = node name); "
        "empty: none"),
    Key("container.runtime", "ch-run", str, "Charliecloud ch-run binary"),
    Key("container.cache_dir", "/var/cache/slurm-charlie/%n", str,
        "node-local cache of unpacked container images (one directory per "
        "user); same safety rule as runtime_root", rule=_absolute),
    Key("container.squashfs", "mount", str,
        "squashfs images: 'mount' (ch-run mounts the file itself, per job, through "
        "FUSE as the user: nothing unpacked; needs /dev/fuse usable by users, else "
        "the image is unpacked) or 'unpack' (into the per-user node cache)",
        rule=lambda v: None if v in ("mount", "unpack") else "not 'mount' or 'unpack'"),
    Key("container.cache_max_mib", 51200, int,
        "size bound of each user's unpacked-image cache on a node; least "
        "recently used images no running job uses are removed beyond it"),
    Key("container.binds", [], list,
        "extra SRC[:DST] bind mounts for every container"),
    Key("container.env", [], list,
        "NAME=VALUE set in every task of a container job (a task's own "
        "setting wins)", rule=_env_items),
    Key("container.tmpdir", "/tmp", str,
        "the node's TmpFS as Slurm has it (%n = node name; empty: none), bound "
        "at the same path in every container: tasks get the node's writable "
        "/tmp, and Slurm's PMIx plugin's per-step directories (srun --mpi=pmix) "
        "are where its server says"),
    Key("container.registry_cache", "~/.cache/slurm-charlie/images", str,
        "where a user's registry images (docker://...) are kept as squashfs files, "
        "by digest; ~ is the job user's home; must be on a filesystem every node "
        "sees (the job's first node pulls, the others wait for the file)"),
    Key("container.registry_insecure", [], list,
        "registries reached without TLS verification (plain HTTP allowed): HOST:PORT, "
        "or HOST for all its ports"),
    Key("container.default_mpi", "auto", str,
        "SLURM_MPI_TYPE for container jobs whose user did not choose one: 'auto' "
        "(pmix for an image with Open MPI and no MPICH, else pmi2), a plugin name "
        "(used for every image), or empty (leave Slurm's MpiDefault)"),
    Key("gpu.driver_table", "/proc/driver/nvidia/gpus", str,
        "the GPU driver's table (a directory per GPU with an 'information' file "
        "giving its GPU UUID, Bus Location and Device Minor, as NVIDIA's driver "
        "writes it): how Slurm's GPU indices become devices; %n is the node name",
        rule=_absolute),
    Key("gpu.cdi_dirs", ["/etc/cdi", "/var/run/cdi"], list,
        "where a container job's GPUs are described (CDI specs, lowest priority "
        "first; %n is the node name); empty: the GPUs' CDI edits are not read",
        rule=lambda v: next((f"not an absolute path: {d!r}" for d in v
                             if not str(d).startswith("/")), None)),
    Key("gpu.driver_root", "/", str,
        "where the GPU driver's files are (its libraries, the loader's cache "
        "listing them, its tools): / , or a driver container's root",
        rule=_absolute),
    Key("gpu.vfio_root", "/", str,
        "where sysfs (sys/) and /dev/vfio (dev/vfio/) are for handing a VM job's GPUs "
        "to its guest: / on a real node; %n is the node name (the sandbox's fake tree)",
        rule=_absolute),
    Key("gpu.generate", False, bool,
        "the prolog of a GPU job writes a CDI spec for the node's GPUs from the "
        "driver (as slurm-charlie gpu-spec does) into <runtime_root>/.cdi, again "
        "when the driver or gres.conf changes; specs in gpu.cdi_dirs win over it"),
    Key("gpu.cdi_kind", "nvidia.com/gpu", str,
        "the CDI kind (VENDOR/CLASS) whose devices, named by UUID, are the GPUs",
        rule=lambda v: None if re.fullmatch(r"[a-z0-9.-]+/[A-Za-z0-9_.-]+", v)
        else "not VENDOR/CLASS, e.g. nvidia.com/gpu"),
    Key("vm.qemu", "qemu-system-x86_64", str, "QEMU system emulator"),
    Key("vm.qemu_img", "qemu-img", str, "qemu-img binary"),
    Key("vm.accel", "kvm", str, "kvm or tcg (tcg: full emulation, slow)",
        ("kvm", "tcg")),
    Key("vm.cpu_model", "", str,
        "QEMU -cpu model; empty: 'host' with kvm, 'max' with tcg"),
    Key("vm.kernel", "", str, "guest kernel for direct boot: a vmlinuz, or the "
        "faster-booting vmlinux slurm-charlie vm-kernel writes (empty: boot the "
        "image's own boot loader)"),
    Key("vm.initrd", "", str, "guest initrd for direct boot (slurm-charlie vm-initrd)"),
    Key("vm.tmp_size_mib", 2048, int, "default size of /ch/tmp in each guest"),
    Key("vm.pmi_fence_release", 1.0, float,
        "seconds after which the guest agent releases an srun task from a PMI "
        "fence that has not ended, holding back its next PMI requests until it "
        "has (works around Debian 12 MPICH's MPI_Finalize hang between guests; "
        "0: off; a task's CHARLIE_PMI_FENCE_RELEASE overrides)",
        rule=lambda v: None if 0 <= v <= 3600 else "not between 0 and 3600 seconds"),
    Key("vm.disk_max_mib", 0, int,
        "most a guest's disks may grow to on a node: its /ch/tmp size plus the "
        "image's virtual size (the overlay's bound); 0: only the free space of "
        "runtime_root bounds them"),
    Key("vm.subnet", "172.22.0.0/16", str, "private guest network of a job"),
    Key("vm.nameservers", [], list, "nameservers written to meta/resolv.conf"),
    Key("vm.memory_mib", 1024, int,
        "guest memory when neither --charlie-mem nor the job's memory "
        "request (sbatch --mem/--mem-per-cpu) says"),
    Key("vm.memory_overhead_mib", 256, int,
        "kept for QEMU out of the job's memory request when the guest size "
        "comes from it"),
    Key("vm.cmdline", "root=/dev/vda rw console=ttyS0", str,
        "guest kernel command line for direct boot (charlie.guest=N is added)"),
    Key("vm.network", "vxlan", str,
        "the job's guest network: vxlan (built by root per job: VXLAN + "
        "bridge + TAP, filtered so that only the job's nodes, from "
        "privileged ports, reach it; needs ip, bridge, nft and /dev/net/tun) "
        "or multicast (a UDP multicast group per job: no root networking, "
        "NOT isolated from others on the nodes' network)",
        ("vxlan", "multicast")),
    Key("vm.vxlan_port", 4789, int, "UDP port of the job networks' VXLAN traffic",
        rule=lambda v: None if 0 < v < 65536 else "not a UDP port"),
    Key("vm.node_addresses", "", str,
        "file of 'NODENAME IPV4ADDRESS' lines: where each node's VXLAN traffic "
        "goes (empty: the node names resolve through the name service)"),
    Key("vm.mcast_group", "239.77.0.0/16", str,
        "multicast range for the guest networks: job J uses group "
        "base + J mod size, port mcast_port + J mod 10000"),
    Key("vm.mcast_port", 20000, int, "lowest UDP port of the guest networks"),
    Key("vm.mcast_localaddr", "", str,
        "host address whose interface carries the guest networks (empty: "
        "the route to 224.0.0.0/4 decides)"),
    Key("vm.ssh_port_base", 40000, int,
        "guest N of job J is reachable by ssh on its node at 127.0.0.1:"
        "base + J mod 20000 (a second, restricted user-mode NIC; 0: off)"),
    Key("vm.ssh_secret", "/etc/munge/munge.key", str,
        "root-only file, identical on all nodes, from which each job's guest "
        "ssh key is derived (empty: no ssh keys)"),
    Key("vm.kept_dir", "", str,
        "where overlays that could not be committed are kept (empty: "
        "<runtime_root>/kept; %n is the node name)"),
    Key("timeouts.boot", 300, int, "seconds to wait for a guest to be ready"),
    Key("timeouts.shutdown", 60, int, "seconds to wait for a clean guest power-off"),
    Key("timeouts.kill", 10, int, "seconds to wait for killed processes to go"),
    Key("timeouts.probe", 120, int,
        "seconds the first VM job on a node waits for the accel/CPU probe "
        "(the guest kernel booting to a panic)"),
    Key("timeouts.commit", 120, int,
        "seconds a commit waits for other users of the image to let go"),
    Key("timeouts.unpack", 600, int,
        "seconds a job waits for another job unpacking the same image"),
    Key("reconcile.interval", 3600, int,
        "seconds between two leftover sweeps started by a prolog on a node "
        "(slurm-charlie reconcile; 0: only when an admin runs it)"),
    Key("reconcile.min_age", 600, int,
        "a job directory or record younger than this is never swept (its job "
        "may be starting)"),
    Key("reconcile.kept_max_days", 30, int,
        "kept VM overlays older than this many days are removed by reconcile "
        "(0: kept until removed by hand)"),
    Key("hooks.warm", True, bool,
        "keep a root process per node with the hook code imported that forks "
        "each prolog and epilog (faster job start and end); false: every hook "
        "starts Python afresh"),
    Key("hooks.warm_idle", 600, int,
        "seconds without a job after which the warm hook server ends",
        rule=lambda v: None if 1 <= v <= 86400 else "not between 1 and 86400 seconds"),
    Key("commit.policy", "allow", str,
        "allow: --charlie-commit works; deny: refused at submit",
        ("allow", "deny")),
)

BY_NAME = {k.name: k for k in DEFAULTS}
SECTIONS = sorted({k.name.split(".")[0] for k in DEFAULTS if "." in k.name})


@dataclasses.dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    path: str | None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def runtime_root(self, node: str) -> str:
        return expand_node(self.values["runtime_root"], node)

    def kept_dir(self, node: str) -> str:
        """Where overlays that could not be committed are kept."""
        if self.values["vm.kept_dir"]:
            return expand_node(self.values["vm.kept_dir"], node)
        return os.path.join(self.runtime_root(node), "kept")


def expand_node(path: str, node: str) -> str:
    return path.replace("%n", node)


def _valid_keys() -> str:
    return ", ".join(k.name for k in DEFAULTS)


def _flatten(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(path, "unknown section", f"[{key}]",
                                  hint="valid keys: " + _valid_keys())
            for sub, subval in value.items():
                flat[f"{key}.{sub}"] = subval
        else:
            flat[key] = value
    return flat


def _check(name: str, value: Any, path: str) -> Any:
    key = BY_NAME.get(name)
    if key is None:
        raise ConfigError(path, "unknown key", name,
                          hint="valid keys: " + _valid_keys())
    ok = isinstance(value, key.type) and not (
        key.type is int and isinstance(value, bool))
    if ok and key.type is list:
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        want = "list of strings" if key.type is list else key.type.__name__
        raise ConfigError(path, f"{name}: wrong type, want {want}", repr(value),
                          hint=f"default is {key.default!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(path, f"{name}: not one of {', '.join(key.choices)}",
                          repr(value))
    if key.type is int and value < 0:
        raise ConfigError(path, f"{name}: must not be negative", value)
    problem = key.rule(value) if key.rule else None
    if problem:
        raise ConfigError(path, f"{name}: {problem}", repr(value))
    return value


def parse(text: str, path: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "not valid TOML", str(e),
                          hint="see docs/charlie.toml.example") from None
    values = {k.name: k.default for k in DEFAULTS}
    sources = {k.name: "default" for k in DEFAULTS}
    for name, value in _flatten(data, path).items():
        values[name] = _check(name, value, path)
        sources[name] = path
    return Config(MappingProxyType(values), MappingProxyType(sources), path)


def config_path(environ: Mapping[str, str]) -> tuple[str, bool]:
    """(path, explicitly given)"""
    if environ.get(ENV_VAR):
        return environ[ENV_VAR], True
    return DEFAULT_PATH, False


def load(environ: Mapping[str, str] | None = None, path: str | None = None) -> Config:
    environ = os.environ if environ is None else environ
    explicit = path is not None
    if path is None:
        path, explicit = config_path(environ)
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(path, "site config not found", hint=(
                f"create it (see docs/charlie.toml.example) or unset {ENV_VAR}"))
        return Config(MappingProxyType({k.name: k.default for k in DEFAULTS}),
                      MappingProxyType({k.name: "default" for k in DEFAULTS}),
                      None)
    except OSError as e:
        raise ConfigError(path, "cannot read site config", e.strerror) from None
    return parse(text, path)


def check_root_safe(path: str, what: str = "runtime_root") -> None:
    """Refuse a root-managed directory that an ordinary user could have
    prepared or could redirect: every existing component from / down must be
    a real directory owned by root and not writable by group or others."""
    if not path.startswith("/"):
        raise ConfigError(what, "must be an absolute path", path)
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for i in range(len(parts) + 1):
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return  # the rest will be created by root
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(what, "path contains a symbolic link", cur,
                              hint=f"point {what} at the real directory")
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(what, "not a directory", cur,
                              hint=f"remove it or choose another {what}")
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(what, "inside a path an ordinary user can write",
                              cur, hint=f"choose a {what} whose every parent is "
                              "owned by root and not group/world-writable "
                              "(e.g. /var/spool/slurm-charlie)")
        if i < len(parts):
            cur = os.path.join(cur, parts[i])


def render_example() -> str:
    """A commented example config holding every key at its default."""
    def toml_value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(toml_value(x) for x in v) + "]"
        return str(v)

    lines = ["# slurm-charlie site configuration (TOML).",
             f"# Read from ${ENV_VAR}, else {DEFAULT_PATH}.",
             "# Every key is shown at its default; uncomment to change.",
             "# Generated by `slurm-charlie config example`; do not edit by hand.",
             ""]
    section = None
    for k in DEFAULTS:
        sec, _, short = k.name.rpartition(".")
        if sec != section:
            if sec:
                lines += ["", f"[{sec}]"]
            section = sec
        lines.append(f"# {k.help}")
        if k.choices:
            lines.append(f"# one of: {', '.join(k.choices)}")
        lines.append(f"#{short or k.name} = {toml_value(k.default)}")
    return "\n".join(lines) + "\n"
