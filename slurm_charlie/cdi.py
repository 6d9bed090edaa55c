"""Container Device Interface (CDI) specs: read them, check them, and turn a
job's devices into the edits its container gets.

A CDI spec (https://github.com/cncf-tags/container-device-interface,
SPEC.md; versions 0.3.0 to 1.1.0) is a JSON or YAML file a device vendor's
tool writes to /etc/cdi or /var/run/cdi.  It names devices of one kind
(``vendor.com/class``) and, for each, what a container needs: device
nodes, bind mounts, environment variables, extra groups and hooks.  Runtimes
that know CDI apply it themselves; Debian's ch-run does not, so
slurm-charlie reads the spec and gives ch-run the binds and the variables.

Nothing in a spec is executed.  Hooks are programs the spec asks the runtime
to run as root; slurm-charlie knows the few that vendors' specs carry
(``update-ldcache``, ``create-symlinks``, ``enable-cuda-compat``,
``disable-device-node-modification``, ``chmod`` of the NVIDIA hook program)
and does what they mean itself, as the job user, inside the container.  Any
other hook, and any field this module does not know, is an error that names
the spec file: a spec that asks for something we would silently skip gives
the job a device that does not work.

This module is pure reading and checking (plus ``load_dirs``, which lists
the spec directories); where a spec's paths are checked on the node and
who may own them is the caller's business (the prolog reads specs as root:
they must be root's files, ``files_ok``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from typing import Any, Iterable

from .errors import UserError

#: the spec versions this reader takes (SPEC.md's table); 1.1.0 is the newest.
#: 0.1.0 and 0.2.0 had another layout (cdiDevices, containerSpec) that the
#: reference implementation refuses too
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0",
            "1.0.0", "1.1.0")
#: where vendors' tools write specs, lowest priority first: a device named in
#: both comes from the later one (a generated spec in /var/run/cdi wins over
#: a static one in /etc/cdi)
DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
#: a spec larger than this is refused (NVIDIA's, for 8 GPUs with MIG, is ~100 KiB)
MAX_SPEC_BYTES = 4 << 20
SUFFIXES = (".json", ".yaml", ".yml")

_KIND_VENDOR = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_KIND_CLASS = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")
#: NAME=VALUE on one line (values go to the task.env lines the shim reads)
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^\n\r]{0,4096}")

HINT = ("the site's CDI spec is wrong or newer than this slurm-charlie: fix or "
        "regenerate it (slurm-charlie gpu-spec, or the vendor's tool), or ask the "
        "admin to")


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# --- the spec's objects ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceNode:
    path: str                      # in the container
    host_path: str = ""            # on the host ("" means path)
    type: str = ""                 # "c", "b", "u", "p" or ""
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    permissions: str = ""
    uid: int | None = None
    gid: int | None = None

    @property
    def source(self) -> str:
        return self.host_path or self.path


@dataclasses.dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ()
    type: str = ""


@dataclasses.dataclass(frozen=True)
class Hook:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclasses.dataclass(frozen=True)
class Edits:
    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    additional_gids: tuple[int, ...] = ()
    intel_rdt: dict[str, Any] | None = None
    net_devices: tuple[tuple[str, str], ...] = ()

    def __add__(self, other: "Edits") -> "Edits":
        if other.intel_rdt is not None and self.intel_rdt is not None \
                and other.intel_rdt != self.intel_rdt:
            raise UserError("CDI", "two devices ask for different intelRdt settings",
                            hint=HINT)
        return Edits(self.env + other.env, self.device_nodes + other.device_nodes,
                     self.mounts + other.mounts, self.hooks + other.hooks,
                     self.additional_gids + other.additional_gids,
                     self.intel_rdt if self.intel_rdt is not None else other.intel_rdt,
                     self.net_devices + other.net_devices)


@dataclasses.dataclass(frozen=True)
class Spec:
    path: str
    version: str
    kind: str
    devices: dict[str, Edits]
    edits: Edits = Edits()
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    device_annotations: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


# --- reading -----------------------------------------------------------------

class _Reader:
    """Walks one spec's parsed document: every object's fields are checked
    against what SPEC.md allows, with the place in the document (``where``)
    in each error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> UserError:
        return UserError(f"CDI spec {self.path}", f"{where}: {problem}" if where else problem,
                         hint=HINT)

    def obj(self, value: Any, where: str, fields: dict[str, str],
            required: Iterable[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"not an object but {_what(value)}")
        for key in value:
            if not isinstance(key, str) or key not in fields:
                known = ", ".join(sorted(fields))
                raise self.fail(where, f"unknown field {key!r} (known here: {known})")
        for key in required:
            if key not in value or value[key] is None:
                raise self.fail(where, f"required field {key!r} missing")
        out = {}
        for key, kind in fields.items():
            if key in value and value[key] is not None:
                out[key] = self.typed(value[key], f"{where}.{key}" if where else key, kind)
        return out

    def typed(self, value: Any, where: str, kind: str) -> Any:
        if kind == "str":
            if not isinstance(value, str):
                raise self.fail(where, f"not a string but {_what(value)}")
            if "\0" in value:
                raise self.fail(where, "contains a NUL byte")
            return value
        if kind in ("int", "uint32", "pint"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(where, f"not a whole number but {_what(value)}")
            low, high = {"int": (-(1 << 63), (1 << 63) - 1), "uint32": (0, (1 << 32) - 1),
                         "pint": (1, (1 << 31) - 1)}[kind]
            if not low <= value <= high:
                raise self.fail(where, f"{value} is out of range ({low} .. {high})")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(where, f"not true or false but {_what(value)}")
            return value
        if kind.startswith("list:"):
            if not isinstance(value, list):
                raise self.fail(where, f"not a list but {_what(value)}")
            return tuple(self.typed(v, f"{where}[{i}]", kind[5:]) for i, v in enumerate(value))
        if kind == "map":
            if not isinstance(value, dict):
                raise self.fail(where, f"not an object but {_what(value)}")
            return {self.typed(k, f"{where} key", "str"): self.typed(v, f"{where}.{k}", "str")
                    for k, v in value.items()}
        if kind == "env":
            text = self.typed(value, where, "str")
            if not _ENV.fullmatch(text):
                raise self.fail(where, f"not NAME=VALUE: {text!r}")
            return text
        if kind == "abspath":
            text = self.typed(value, where, "str")
            if not text.startswith("/"):
                raise self.fail(where, f"not an absolute path: {text!r}")
            return text
        if kind == "any":
            return value
        if kind == "edits":
            return self.edits(value, where)
        if kind == "node":
            return self.node(value, where)
        if kind == "mount":
            return self.mount(value, where)
        if kind == "hook":
            return self.hook(value, where)
        if kind == "rdt":
            return self.obj(value, where, {"closID": "str", "l3CacheSchema": "str",
                                           "memBwSchema": "str", "schemata": "list:str",
                                           "enableMonitoring": "bool"})
        if kind == "netdev":
            d = self.obj(value, where, {"hostInterfaceName": "str", "name": "str"},
                         ("hostInterfaceName", "name"))
            return (d["hostInterfaceName"], d["name"])
        raise AssertionError(kind)

    def edits(self, value: Any, where: str) -> Edits:
        d = self.obj(value, where, {"env": "list:env", "deviceNodes": "list:node",
                                    "mounts": "list:mount", "hooks": "list:hook",
                                    "additionalGids": "list:uint32", "intelRdt": "rdt",
                                    "netDevices": "list:netdev"})
        return Edits(env=d.get("env", ()), device_nodes=d.get("deviceNodes", ()),
                     mounts=d.get("mounts", ()), hooks=d.get("hooks", ()),
                     additional_gids=tuple(g for g in d.get("additionalGids", ()) if g),
                     intel_rdt=d.get("intelRdt"), net_devices=d.get("netDevices", ()))

    def node(self, value: Any, where: str) -> DeviceNode:
        d = self.obj(value, where, {"path": "abspath", "hostPath": "abspath", "type": "str",
                                    "major": "int", "minor": "int", "fileMode": "uint32",
                                    "permissions": "str", "uid": "uint32", "gid": "uint32"},
                     ("path",))
        if d.get("type", "") not in ("", "c", "b", "u", "p"):
            raise self.fail(f"{where}.type", f"not a device type (c, b, u or p): {d['type']!r}")
        perms = d.get("permissions", "")
        if perms != "none" and set(perms) - set("rwm"):
            raise self.fail(f"{where}.permissions", f"not made of r, w and m: {perms!r}")
        return DeviceNode(path=d["path"], host_path=d.get("hostPath", ""),
                          type=d.get("type", ""), major=d.get("major"), minor=d.get("minor"),
                          file_mode=d.get("fileMode"), permissions=perms,
                          uid=d.get("uid"), gid=d.get("gid"))

    def mount(self, value: Any, where: str) -> Mount:
        d = self.obj(value, where, {"hostPath": "abspath", "containerPath": "abspath",
                                    "options": "list:str", "type": "str"},
                     ("hostPath", "containerPath"))
        return Mount(d["hostPath"], d["containerPath"], d.get("options", ()), d.get("type", ""))

    def hook(self, value: Any, where: str) -> Hook:
        d = self.obj(value, where, {"hookName": "str", "path": "abspath", "args": "list:str",
                                    "env": "list:env", "timeout": "pint"},
                     ("hookName", "path"))
        return Hook(d["hookName"], d["path"], d.get("args", ()), d.get("env", ()),
                    d.get("timeout"))


def _what(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def parse(text: str | bytes, path: str) -> Spec:
    """A spec from its text (JSON, or YAML when path ends in .yaml/.yml)."""
    doc = _load(text, path)
    r = _Reader(path)
    top = r.obj(doc, "", _TOP, ("cdiVersion", "kind", "devices"))
    version = top["cdiVersion"].removeprefix("v")
    if version not in VERSIONS:
        raise r.fail("cdiVersion", f"unknown version {top['cdiVersion']!r} (this slurm-charlie "
                     f"reads {VERSIONS[0]} to {VERSIONS[-1]})")
    kind = top["kind"]
    vendor, slash, cls = kind.partition("/")
    if not slash or len(vendor) > 253 or not _KIND_VENDOR.fullmatch(vendor) \
            or not _KIND_CLASS.fullmatch(cls):
        raise r.fail("kind", f"not VENDOR/CLASS (e.g. vendor.com/gpu): {kind!r}")
    devices: dict[str, Edits] = {}
    dev_notes: dict[str, dict[str, str]] = {}
    if not top["devices"]:
        raise r.fail("devices", "must list at least one device")
    for i, raw in enumerate(top["devices"]):
        where = f"devices[{i}]"
        d = r.obj(raw, where, {"name": "str", "annotations": "map", "containerEdits": "edits"},
                  ("name", "containerEdits"))
        name = d["name"]
        if not _DEVICE_NAME.fullmatch(name):
            raise r.fail(f"{where}.name", f"not a device name: {name!r}")
        if name in devices:
            raise r.fail(f"{where}.name", f"device {name!r} named twice")
        devices[name] = d["containerEdits"]
        if d.get("annotations"):
            dev_notes[name] = d["annotations"]
    spec = Spec(path=path, version=version, kind=kind, devices=devices,
                edits=top.get("containerEdits", Edits()),
                annotations=top.get("annotations", {}), device_annotations=dev_notes)
    plan_hooks(spec.edits, path)
    for i, edits in enumerate(devices.values()):
        plan_hooks(edits, path, f"devices[{i}].containerEdits")
    need = minimum_version(spec)
    if _version_key(need) > _version_key(version):
        raise r.fail("cdiVersion", f"{version}, but the fields it uses need {need} or later")
    return spec


#: the top level's fields; devices are read one by one in parse()
_TOP = {"cdiVersion": "str", "kind": "str", "annotations": "map",
        "devices": "list:any", "containerEdits": "edits"}


def _load(text: str | bytes, path: str) -> Any:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # only for YAML specs
        except ImportError:
            raise UserError(f"CDI spec {path}", "is YAML and PyYAML is not installed",
                            hint="install python3-yaml (or pyyaml), or write the spec as "
                            "JSON") from None

        class Strict(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
            pass

        def mapping(loader: Any, node: Any) -> dict:
            out: dict = {}
            for k, v in node.value:
                key = loader.construct_object(k, deep=True)
                if key in out:
                    raise ValueError(f"key {key!r} given twice (line {k.start_mark.line + 1})")
                out[key] = loader.construct_object(v, deep=True)
            return out
        Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        try:
            return yaml.load(text, Loader=Strict)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise UserError(f"CDI spec {path}", "not valid YAML",
                            str(e).replace("\n", " ")[:300], hint=HINT) from None

    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"key {k!r} given twice")
            out[k] = v
        return out
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:
        raise UserError(f"CDI spec {path}", "not valid JSON", str(e)[:300], hint=HINT) from None


def minimum_version(spec: Spec) -> str:
    """The oldest spec version that has every field the spec uses (the
    reference implementation's MinimumRequiredVersion)."""
    every = [spec.edits, *spec.devices.values()]
    if any(e.net_devices or (e.intel_rdt is not None and ("schemata" in e.intel_rdt or
                                                          e.intel_rdt.get("enableMonitoring")))
           for e in every):
        return "1.1.0"
    if any(e.intel_rdt is not None or e.additional_gids for e in every):
        return "0.7.0"
    if spec.annotations or spec.device_annotations or "." in spec.kind.partition("/")[2]:
        return "0.6.0"
    if any(name[:1].isdigit() for name in spec.devices) or \
            any(n.host_path for e in every for n in e.device_nodes):
        return "0.5.0"
    if any(m.type for e in every for m in e.mounts):
        return "0.4.0"
    return "0.3.0"


# --- hooks: understood, never run -------------------------------------------

#: programs whose subcommands we know (NVIDIA's: nvidia-cdi-hook SUB ..., or
#: the older nvidia-ctk hook SUB ...)
HOOK_PROGRAMS = ("nvidia-cdi-hook", "nvidia-ctk")
#: the OCI lifecycle points a CDI hook may name
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop")


@dataclasses.dataclass(frozen=True)
class HookPlan:
    """What a spec's hooks ask for, to be done by us in the container."""
    symlinks: tuple[tuple[str, str], ...] = ()   # (target, link in the container)
    ldcache: tuple[str, ...] = ()                # folders for the loader's cache
    cuda_compat: str | None = None               # the host driver's version
    chmods: tuple[tuple[str, str], ...] = ()     # (octal mode, path in the container)

    def __add__(self, other: "HookPlan") -> "HookPlan":
        return HookPlan(self.symlinks + other.symlinks, self.ldcache + other.ldcache,
                        self.cuda_compat or other.cuda_compat, self.chmods + other.chmods)


def _flags(args: tuple[str, ...], known: dict[str, bool], fail) -> dict[str, list[str]]:
    """--name VALUE / --name=VALUE words (known: name -> takes a value)."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, value = word.partition("=")
        if not name.startswith("--") or name[2:] not in known:
            raise fail(f"unknown argument {word!r}")
        name = name[2:]
        if known[name]:
            if not eq:
                i += 1
                if i >= len(args):
                    raise fail(f"--{name} needs a value")
                value = args[i]
            out.setdefault(name, []).append(value)
        else:
            out.setdefault(name, []).append("")
        i += 1
    return out


def plan_hook(hook: Hook, path: str, where: str) -> HookPlan:
    """What one hook means, or a UserError naming the spec when we do not
    know it (it is never run)."""
    def fail(problem: str) -> UserError:
        return UserError(f"CDI spec {path}", f"{where}: {problem}", hint=(
            "slurm-charlie runs no program a spec names; it knows nvidia-cdi-hook's "
            "create-symlinks, update-ldcache, enable-cuda-compat, chmod and "
            "disable-device-node-modification. Regenerate the spec without other "
            "hooks (slurm-charlie gpu-spec) or ask the admin to"))
    if hook.hook_name not in HOOK_NAMES:
        raise fail(f"unknown hookName {hook.hook_name!r}")
    prog = os.path.basename(hook.path)
    args = hook.args[1:] if hook.args else ()
    if prog == "nvidia-ctk" and args[:1] == ("hook",):
        args = args[1:]
    if prog not in HOOK_PROGRAMS or not args:
        raise fail(f"unknown hook program {hook.path} {' '.join(hook.args[1:3])}".rstrip())
    sub, rest = args[0], args[1:]
    if sub == "create-symlinks":
        links = []
        for link in _flags(rest, {"link": True, "host-root": True, "container-spec": True},
                           fail).get("link", []):
            target, sep, name = link.partition("::")
            if not sep or not target or not name.startswith("/") or "\0" in link:
                raise fail(f"--link {link!r} is not TARGET::/ABSOLUTE/LINK")
            links.append((target, os.path.normpath(name)))
        return HookPlan(symlinks=tuple(links))
    if sub == "update-ldcache":
        got = _flags(rest, {"folder": True, "ldconfig-path": True, "container-spec": True},
                     fail)
        folders = tuple(got.get("folder", []))
        if any(not f.startswith("/") for f in folders):
            raise fail("update-ldcache --folder must be absolute")
        return HookPlan(ldcache=folders)
    if sub == "enable-cuda-compat":
        got = _flags(rest, {"host-driver-version": True, "container-spec": True}, fail)
        version = (got.get("host-driver-version") or [""])[-1]
        if version and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", version):
            raise fail(f"--host-driver-version {version!r} is not a version")
        return HookPlan(cuda_compat=version or None)
    if sub == "chmod":
        got = _flags(rest, {"mode": True, "path": True, "container-spec": True}, fail)
        mode = (got.get("mode") or [""])[-1]
        if not re.fullmatch(r"[0-7]{3,4}", mode):
            raise fail(f"chmod --mode {mode!r} is not an octal mode")
        if any(not p.startswith("/") for p in got.get("path", [])):
            raise fail("chmod --path must be absolute")
        return HookPlan(chmods=tuple((mode, p) for p in got.get("path", [])))
    if sub == "disable-device-node-modification":
        _flags(rest, {"container-spec": True}, fail)
        return HookPlan()  # ch-run never lets the container make device nodes
    raise fail(f"unknown hook {prog} {sub}")


def plan_hooks(edits: Edits, path: str, where: str = "containerEdits") -> HookPlan:
    plan = HookPlan()
    for i, hook in enumerate(edits.hooks):
        plan = plan + plan_hook(hook, path, f"{where}.hooks[{i}]")
    return plan


# --- the node's specs --------------------------------------------------------

def files_ok(st: os.stat_result) -> str | None:
    """Why a spec file (or its directory) is not one root may trust, else
    None: a spec decides what every job's container binds, so it must be
    root's and written by root only."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):o}: writable by others than root"
    return None


def read_spec(path: str) -> Spec:
    """One spec file, opened without following a link, checked to be
    root's (files_ok), at most MAX_SPEC_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"CDI spec {path}", "cannot open", e.strerror, hint=HINT) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"CDI spec {path}", "not a regular file", hint=HINT)
        why = files_ok(st)
        if why:
            raise UserError(f"CDI spec {path}", "not trusted", why,
                            hint="CDI specs must be root's and writable by root only")
        if st.st_size > MAX_SPEC_BYTES:
            raise UserError(f"CDI spec {path}", f"larger than {MAX_SPEC_BYTES >> 20} MiB",
                            hint=HINT)
        chunks, left = [], MAX_SPEC_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > MAX_SPEC_BYTES:
            raise UserError(f"CDI spec {path}", f"larger than {MAX_SPEC_BYTES >> 20} MiB",
                            hint=HINT)
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UserError(f"CDI spec {path}", "not UTF-8 text", hint=HINT) from None
    return parse(text, path)


def untrusted_source(path: str, device: bool = False, hops: int = 40) -> str | None:
    """Why root must not hand the host path a spec names to a job, or None.
    Every directory on the way and every link followed is root's and
    writable by root only (a link is followed only from such a directory);
    the end is root's and, unless it is a device node, not writable by
    others; a device node must be a character or block device.  Nothing
    is opened."""
    if not path.startswith("/"):
        return "not an absolute path"
    todo = [p for p in path.split("/") if p]
    cur = "/"
    while True:
        try:
            st = os.lstat(cur)
        except OSError as e:
            return f"{cur}: {e.strerror}"
        last = not todo
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                return f"{cur}: a link owned by uid {st.st_uid}"
            hops -= 1
            if hops < 0:
                return "too many links"
            target = os.readlink(cur)
            base = "/" if target.startswith("/") else os.path.dirname(cur)
            todo = [p for p in os.path.join(base, target).split("/") if p] + todo
            cur = "/"
            continue
        if st.st_uid != 0:
            return f"{cur}: owned by uid {st.st_uid}, not root"
        if last:
            if device:
                if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    return f"{cur}: not a device node"
            elif st.st_mode & 0o022:
                return f"{cur}: writable by others than root"
            return None
        if not stat.S_ISDIR(st.st_mode):
            return f"{cur}: not a directory"
        if st.st_mode & 0o022:
            return f"{cur}: a directory writable by others than root"
        part = todo.pop(0)
        if part == "..":
            cur = os.path.dirname(cur.rstrip("/")) or "/"
        elif part != ".":
            cur = os.path.join(cur, part)


def check_sources(edits: Edits, path: str) -> None:
    """Every host path a spec's edits name is one root may hand to a job
    (untrusted_source): a UserError naming the spec and the path if not.
    Edits this slurm-charlie cannot apply to a container are refused too."""
    def fail(what: str, why: str) -> UserError:
        return UserError(f"CDI spec {path}", f"{what}: {why}", hint=(
            "a spec may bind only root's files and device nodes into a job; fix the "
            "spec or the file, or ask the admin to"))
    for item in edits.env:
        if item.startswith("CH_"):
            raise fail(f"env {item.split('=', 1)[0]}", "CH_* variables are slurm-charlie's "
                       "own (the job's meta and data directories)")
    for node in edits.device_nodes:
        why = untrusted_source(node.source, device=True)
        if why:
            raise fail(f"device node {node.source}", why)
    for mount in edits.mounts:
        if mount.type not in ("", "bind", "none") or \
                set(mount.options) - {"ro", "rw", "nosuid", "nodev", "noexec", "bind",
                                      "rbind", "private", "rprivate", "slave", "rslave"}:
            raise fail(f"mount {mount.host_path}", f"not a bind mount this slurm-charlie "
                       f"can make (type {mount.type or 'none'}, options "
                       f"{','.join(mount.options) or 'none'})")
        why = untrusted_source(mount.host_path)
        if why:
            raise fail(f"mount {mount.host_path}", why)
    if edits.net_devices:
        raise fail("netDevices", "containers here share the node's network; a network "
                   "device cannot be moved into them")
    if edits.intel_rdt is not None:
        raise fail("intelRdt", "not supported by slurm-charlie")


def combine(parts: Iterable[tuple[str, Edits]]) -> Edits:
    """The edits of Registry.resolve_parts() as one."""
    out = Edits()
    for _, edits in parts:
        out = out + edits
    return out


@dataclasses.dataclass
class Registry:
    """The devices of every spec found, by qualified name
    (``vendor.com/class=name``)."""
    devices: dict[str, tuple[Spec, str]] = dataclasses.field(default_factory=dict)
    specs: list[Spec] = dataclasses.field(default_factory=list)
    #: why specs were not read: any of them fails every request (a device
    #: could come from the broken one, or be shadowed by it)
    broken: list[UserError] = dataclasses.field(default_factory=list)

    def kinds(self) -> list[str]:
        return sorted({s.kind for s in self.specs})

    def resolve(self, names: Iterable[str], check: bool = False) -> Edits:
        """The edits for these devices: each spec's own edits once, then
        each device's, in the order asked; with check, every host path in
        them checked (check_sources)."""
        return combine(self.resolve_parts(names, check))

    def resolve_parts(self, names: Iterable[str], check: bool = False
                      ) -> list[tuple[str, Edits]]:
        """resolve()'s edits one by one, each with the spec file it is from."""
        names = list(names)
        if names and self.broken:
            raise self.broken[0]
        out: list[tuple[str, Edits]] = []
        seen_specs, seen = set(), set()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            kind, eq, dev = name.partition("=")
            if not eq:
                raise UserError("CDI", f"not a qualified device name (VENDOR/CLASS=NAME): "
                                f"{name!r}")
            if name not in self.devices:
                have = sorted(d.partition("=")[2] for d in self.devices
                              if d.partition("=")[0] == kind)
                if not have:
                    raise UserError("CDI", f"no spec on this node has devices of kind {kind}",
                                    hint="known kinds: " + (", ".join(self.kinds()) or "none")
                                    + "; generate one with slurm-charlie gpu-spec")
                raise UserError("CDI", f"no device {dev!r} of kind {kind} in the node's "
                                "specs", hint="its devices: " + ", ".join(have[:20]))
            spec, _ = self.devices[name]
            if spec.path not in seen_specs:
                seen_specs.add(spec.path)
                if check:
                    check_sources(spec.edits, spec.path)
                out.append((spec.path, spec.edits))
            if check:
                check_sources(spec.devices[dev], spec.path)
            out.append((spec.path, spec.devices[dev]))
        return out


def load_dirs(dirs: Iterable[str]) -> Registry:
    """Every spec under dirs (not below them), lowest priority first.  In
    one directory two specs naming the same device are an error; a later
    directory's device replaces an earlier one's.  A spec that cannot be
    read is kept in ``broken``: resolve() then refuses."""
    reg = Registry()
    for d in dirs:
        if not os.path.lexists(d):
            continue
        why = untrusted_source(d)
        if why:  # whoever may write there decides what jobs get
            reg.broken.append(UserError(f"CDI spec directory {d}", "not trusted", why,
                                        hint="spec directories must be root's and "
                                        "writable by root only"))
            continue
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise UserError(f"CDI spec directory {d}", "cannot list", e.strerror,
                            hint=HINT) from None
        here: dict[str, str] = {}
        for n in names:
            if not n.endswith(SUFFIXES) or n.startswith("."):
                continue
            try:
                spec = read_spec(os.path.join(d, n))
            except UserError as e:
                reg.broken.append(e)
                continue
            twice = [q for q in (f"{spec.kind}={dev}" for dev in spec.devices) if q in here]
            if twice:
                reg.broken.append(UserError(f"CDI spec {spec.path}", f"device {twice[0]} is "
                                            f"also in {here[twice[0]]}",
                                            hint="keep one spec per device in a directory"))
                continue
            reg.specs.append(spec)
            for dev in spec.devices:
                here[f"{spec.kind}={dev}"] = spec.path
                reg.devices[f"{spec.kind}={dev}"] = (spec, dev)
    return reg
