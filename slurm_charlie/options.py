"""The one option table.  Everything else is generated or checked from it:
the shim's C table (spank/charlie_options.h), the validator, the environment
variables the prolog reads, and the option reference in docs/.

Parsing and syntax checks here are pure; checks that look at files live in
validate.py and run as the job user.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Mapping

from . import images
from .errors import UserError

PREFIX = "charlie-"
ENV_PREFIX = "CHARLIE_"
#: prefix Slurm puts on variables set with spank_job_control_setenv()
SPANK_ENV_PREFIX = "SPANK_"
MAX_DIRS = 4
TYPES = ("auto", "container", "vm", "none")
#: longest value any option takes (PATH_MAX); numbers are shorter still
MAX_VALUE = 4096
MAX_DIGITS = 12


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str            # without the --charlie- prefix
    kind: str            # path | paths | choice | flag | optint | int | size
    arginfo: str | None  # shown in --help; None for flags
    help: str            # one line
    has_arg: int         # SPANK: 0 none, 1 required, 2 optional
    choices: tuple[str, ...] = ()
    max_count: int = 1   # how often it may be given
    default: str = ""    # documentation of the default

    @property
    def flag(self) -> str:
        return f"--{PREFIX}{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("image", "path", "PATH",
               "VM image (qcow2/raw) or container image (dir, tarball, squashfs, "
               "or docker://[REGISTRY/]NAME[:TAG] from a registry)",
               1, default="none"),
    OptionSpec("type", "choice", "TYPE",
               "auto|container|vm|none: what to start (auto: from the image)",
               1, choices=TYPES, default="auto"),
    OptionSpec("dir", "paths", "DIR",
               "host directory shown as /ch/dataN (repeat, up to 4); sets CH_DATAn",
               1, max_count=MAX_DIRS, default="none"),
    OptionSpec("job", "path", "SCRIPT",
               "VM batch mode: run SCRIPT on every guest at boot; the job's "
               "output and exit code are guest 0's",
               1, default="none"),
    OptionSpec("interactive", "flag", None,
               "boot the guests and wait; do not run a job script",
               0, default="off"),
    OptionSpec("commit", "optint", "GUEST",
               "at job end save guest GUEST's (default 0) root changes into the image",
               2, default="off"),
    OptionSpec("write", "flag", None,
               "container image writable (ch-run -w)",
               0, default="off"),
    OptionSpec("uid", "id", "UID",
               "container: run as this user id inside (e.g. 0), mapped to you",
               1, default="your uid"),
    OptionSpec("gid", "id", "GID",
               "container: run with this group id inside, mapped to your group",
               1, default="your gid"),
    OptionSpec("cpus", "int", "N",
               "VM CPUs per guest, at most the job's CPUs on that node (the default)",
               1, default="allocation"),
    OptionSpec("mem", "size", "SIZE",
               "VM memory per guest, e.g. 4G; with QEMU's share at most the job's "
               "memory on the node (default: the job's --mem less QEMU's share)",
               1, default="allocation"),
    OptionSpec("tmp-size", "size", "SIZE",
               "size of each guest's /ch/tmp disk, e.g. 2G (default: site config)",
               1, default="site config"),
)

BY_NAME = {o.name: o for o in OPTIONS}


@dataclasses.dataclass(frozen=True)
class Options:
    """Parsed, syntax-checked options.  Paths may still be relative here;
    validate.resolve() makes them absolute and checks them."""
    image: str | None = None
    type: str = "auto"
    dir: tuple[str, ...] = ()
    job: str | None = None
    interactive: bool = False
    commit: int | None = None
    write: bool = False
    uid: int | None = None
    gid: int | None = None
    cpus: int | None = None
    mem: int | None = None        # MiB
    tmp_size: int | None = None   # MiB
    #: not an option: what the validator found at submit for an archive
    #: image (see image_digest()); users never set it
    image_digest: str | None = None

    def given(self) -> bool:
        return self != Options()


_SIZE_RE = re.compile(r"^([0-9]{1,%d})([KMGT]?)(i?B)?$" % MAX_DIGITS, re.IGNORECASE)
_SIZE_MULT_MIB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size_mib(flag: str, text: str) -> int:
    """'512' (MiB, as Slurm's --mem), '512M', '4G', '1T' -> MiB."""
    m = _SIZE_RE.fullmatch(text.strip()) if text.isascii() else None
    if not m:
        raise UserError(flag, "not a size", repr(text),
                        hint="use a number with an optional K, M, G or T "
                             "suffix, e.g. 4G (no suffix means MiB)")
    mib = int(int(m.group(1)) * _SIZE_MULT_MIB[m.group(2).upper()])
    if mib < 1:
        raise UserError(flag, "size must be at least 1 MiB", repr(text))
    return mib



def digits(text: str) -> bool:
    """ASCII digits only, and not absurdly many: str.isdigit() is also true
    for '²' or '٣', which int() then refuses or reads as another number."""
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


def check_text(flag: str, value: str) -> None:
    """Reject values that cannot travel safely through env lines and logs."""
    if len(value) > MAX_VALUE:
        raise UserError(flag, f"value longer than {MAX_VALUE} characters",
                        repr(value[:40] + "…"))
    if "\n" in value or "\r" in value:
        raise UserError(flag, "value contains a newline", repr(value),
                        hint="paths and values given to slurm-charlie must be "
                             "on one line; rename the file or directory")
    if "\0" in value:
        raise UserError(flag, "value contains a NUL byte", repr(value))


def _convert(spec: OptionSpec, values: list[str | None]) -> object:
    flag = spec.flag
    if len(values) > spec.max_count:
        if spec.max_count == 1:
            raise UserError(flag, "given more than once", values[-1],
                            hint=f"give {flag} once")
        raise UserError(flag, f"given {len(values)} times, at most "
                              f"{spec.max_count} are allowed", values[-1],
                        hint=f"pass at most {spec.max_count} directories; "
                             "put others below one of them")
    for v in values:
        if v is not None:
            check_text(flag, v)
    if spec.kind == "flag":
        for v in values:
            if v not in (None, "", "1", "yes", "true"):
                raise UserError(flag, "takes no value", repr(v))
        return True
    if spec.kind == "optint":
        v = values[-1]
        if v is None or v == "":
            return 0
        if not digits(v):
            raise UserError(flag, "not a guest number", repr(v),
                            hint=f"use {flag} for guest 0 or {flag}=N with "
                                 "N a guest index (0 .. nodes-1)")
        return int(v)
    v = values[-1]
    if v is None or v == "":
        raise UserError(flag, "needs a value", hint=f"use {flag}={spec.arginfo}")
    if spec.kind == "choice":
        if v not in spec.choices:
            raise UserError(flag, "unknown value", repr(v),
                            hint="valid values: " + ", ".join(spec.choices))
        return v
    if spec.kind == "int":
        if not digits(v) or int(v) < 1:
            raise UserError(flag, "not a positive whole number", repr(v))
        return int(v)
    if spec.kind == "id":
        if not digits(v) or int(v) >= 2**32 - 1:
            raise UserError(flag, "not a numeric id", repr(v),
                            hint="give a number, e.g. 0 (names are not looked up)")
        return int(v)
    if spec.kind == "size":
        return parse_size_mib(flag, v)
    if spec.kind == "paths":
        return tuple(x for x in values if x is not None)
    return v  # path


def build(values: Mapping[str, list[str | None]]) -> Options:
    """Turn {option name: [values in order given]} into Options."""
    kwargs = {}
    for name, vals in values.items():
        spec = BY_NAME.get(name)
        if spec is None:
            raise UserError(f"--{PREFIX}{name}", "unknown option",
                            hint="valid options: " +
                                 " ".join(o.flag for o in OPTIONS))
        if vals:
            kwargs[spec.field] = _convert(spec, list(vals))
    return Options(**kwargs)


def parse_argv(argv: Iterable[str]) -> dict[str, list[str | None]]:
    """Parse ``--charlie-NAME[=VALUE]`` words (what the shim passes)."""
    values: dict[str, list[str | None]] = {}
    for word in argv:
        if not word.startswith("--" + PREFIX):
            raise UserError("option", "not a --charlie-* option", word)
        body = word[2 + len(PREFIX):]
        name, eq, value = body.partition("=")
        if name not in BY_NAME:
            raise UserError(f"--{PREFIX}{name}", "unknown option",
                            hint="valid options: " +
                                 " ".join(o.flag for o in OPTIONS))
        spec = BY_NAME[name]
        if spec.has_arg == 1 and not eq:
            raise UserError(spec.flag, "needs a value",
                            hint=f"use {spec.flag}={spec.arginfo}")
        values.setdefault(name, []).append(value if eq else None)
    return values


def parse_user_env(environ: Mapping[str, str]) -> dict[str, list[str | None]]:
    """CHARLIE_IMAGE=… etc. from the user's environment.  CHARLIE_DIR is a
    colon-separated list (like PATH); flags take 1/yes/true, 0/no/false/''
    means off; CHARLIE_COMMIT='' means guest 0."""
    values: dict[str, list[str | None]] = {}
    for spec in OPTIONS:
        if spec.env not in environ:
            continue
        raw = environ[spec.env]
        if spec.kind == "flag":
            low = raw.strip().lower()
            if low in ("", "0", "no", "false", "off"):
                continue
            if low not in ("1", "yes", "true", "on"):
                raise UserError(spec.env, "not a yes/no value", repr(raw),
                                hint=f"set {spec.env}=1 or unset it")
            values[spec.name] = [None]
        elif spec.kind == "paths":
            values[spec.name] = [p for p in raw.split(":") if p]
        else:
            values[spec.name] = [raw]
    return values


def merge(cmdline: Mapping[str, list[str | None]],
          env: Mapping[str, list[str | None]]) -> dict[str, list[str | None]]:
    """Command-line options win over environment variables, per option."""
    merged = dict(env)
    merged.update(cmdline)
    return merged


# --- the normalized form handed from submit to the prolog -----------------
# The validator prints these as NAME=VALUE lines; the shim passes each to
# spank_job_control_setenv(), and the prolog sees them as SPANK_NAME=VALUE.

MARKER = "CHARLIE"
#: an archive image's sha256 and the file's identity, hashed once at submit
DIGEST_ENV = ENV_PREFIX + "IMAGE_DIGEST"
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})@([0-9]{1,20}):([0-9]{1,20}):"
                        r"(-?[0-9]{1,21}):(-?[0-9]{1,21})")


def image_digest(sha256: str, st: os.stat_result) -> str:
    """The CHARLIE_IMAGE_DIGEST value: the archive's sha256 and what a node
    compares before it trusts it (inode, size, mtime and ctime in ns: the
    same on every client of a shared filesystem, and ctime is not the
    user's to set back)."""
    return (f"sha256:{sha256}@{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            f":{st.st_ctime_ns}")


def parse_image_digest(text: str) -> tuple[str, tuple[int, int, int, int]]:
    """-> (sha256, (inode, size, mtime_ns, ctime_ns)); UserError when it is
    not what image_digest() makes."""
    m = _DIGEST_RE.fullmatch(text) if text.isascii() else None
    if m is None:
        raise UserError(DIGEST_ENV, "not an image digest", repr(text[:100]),
                        hint="submit with the site's slurm-charlie")
    return m.group(1), (int(m.group(2)), int(m.group(3)), int(m.group(4)),
                        int(m.group(5)))


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def to_env(opts: Options) -> list[tuple[str, str]]:
    """Options -> the CHARLIE_* pairs the prolog reads back with from_env();
    every field comes from the table, so a new option travels too."""
    out = [(MARKER, "1")]
    for spec in OPTIONS:
        value = getattr(opts, spec.field)
        if spec.kind == "paths":
            out += [(f"{spec.env}{i}", d) for i, d in enumerate(value, start=1)]
        elif spec.kind == "flag":
            if value:
                out.append((spec.env, "1"))
        elif value is not None:
            out.append((spec.env, str(value)))
    if opts.image_digest is not None:
        out.append((DIGEST_ENV, opts.image_digest))
    return out


#: every CHARLIE_* name to_env() can produce; anything else is refused
def _known_names() -> set[str]:
    names = {MARKER, DIGEST_ENV}
    for spec in OPTIONS:
        if spec.kind == "paths":
            names |= {f"{spec.env}{i}" for i in range(1, spec.max_count + 1)}
        else:
            names.add(spec.env)
    return names


def from_env(environ: Mapping[str, str], prefix: str = SPANK_ENV_PREFIX
             ) -> Options | None:
    """Read what to_env() produced, as seen by the prolog (SPANK_CHARLIE_*).
    None when this is not a charlie job.  These values are hostile input: a
    user can load the shim with a validator of their own, so everything is
    checked again here and any fault is a UserError."""
    if environ.get(prefix + MARKER) is None:
        return None
    known = _known_names()
    for name in environ:
        if name.startswith(prefix + ENV_PREFIX) and name[len(prefix):] not in known:
            raise UserError(name, "not a variable slurm-charlie sets",
                            hint="submit with the --charlie-* options of the "
                            "site's slurm-charlie")
    values: dict[str, list[str | None]] = {}
    for spec in OPTIONS:
        if spec.kind == "paths":
            found = []
            for i in range(1, spec.max_count + 1):
                d = environ.get(f"{prefix}{spec.env}{i}")
                if d is None:
                    break
                found.append(d)
            if found:
                values[spec.name] = found
            continue
        raw = environ.get(prefix + spec.env)
        if raw is None:
            continue
        if spec.kind == "size":
            if not digits(raw):
                raise UserError(spec.flag, "not a size in MiB", repr(raw[:40]))
            values[spec.name] = [raw + "M"]
        elif spec.kind == "flag":
            if raw not in ("1", "", "(null)"):
                raise UserError(spec.flag, "takes no value", repr(raw[:40]))
            values[spec.name] = [None]
        else:
            values[spec.name] = [raw]
    opts = build(values)
    digest = environ.get(prefix + DIGEST_ENV)
    if digest is not None:
        parse_image_digest(digest)
        if opts.image is None:
            raise UserError(DIGEST_ENV, "given without an image",
                            hint="submit with the site's slurm-charlie")
        opts = dataclasses.replace(opts, image_digest=digest)
    # a registry image, pinned at submit
    pinned = images.is_registry_ref(opts.image) and "@sha256:" in opts.image  # type: ignore
    for path in ((opts.job, *opts.dir) if pinned else (opts.image, opts.job, *opts.dir)):
        if path is not None and not path.startswith("/"):
            raise UserError("--charlie-image/--charlie-job/--charlie-dir",
                            "not an absolute path on the node", repr(path[:80]),
                            hint="the submit side makes paths absolute; "
                            "submit with the site's slurm-charlie")
    return opts


def from_pairs(pairs: Iterable[Iterable[str]]) -> Options:
    """from_env() over (NAME, VALUE) pairs, as to_env() makes them."""
    env = {}
    for pair in pairs:
        name, value = pair
        env[SPANK_ENV_PREFIX + str(name)] = str(value)
    opts = from_env(env)
    if opts is None:
        raise UserError("options", "the charlie marker is missing")
    return opts
