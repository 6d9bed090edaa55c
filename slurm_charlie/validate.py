"""Checks that look at files.  They run as the job user: at submit inside the
user's sbatch/srun/salloc, on the node in a child that dropped to the user."""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Mapping

from . import backends, images, options
from .config import Config
from .errors import UserError
from .files import read_small, write_file
from .options import Options


def _absolute(flag: str, path: str, cwd: str | None) -> str:
    if not path:
        raise UserError(flag, "empty path")
    if os.path.isabs(path):
        return os.path.normpath(path)
    if cwd is None:
        raise UserError(flag, "relative path", path,
                        hint="give an absolute path")
    return os.path.normpath(os.path.join(cwd, path))


def _stat(flag: str, path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise UserError(flag, f"cannot access: {e.strerror}", path,
                        hint=images.MISSING_HINT) from None


def _readable_dir(flag: str, path: str) -> None:
    st = _stat(flag, path)
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(flag, "not a directory", path,
                        hint=f"{flag} takes a directory; to pass one file, "
                             "pass its directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(flag, "directory not readable by you", path,
                        hint=f"chmod u+rx {path}")


def _readable_file(flag: str, path: str) -> None:
    st = _stat(flag, path)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(flag, "not a regular file", path)
    if not os.access(path, os.R_OK):
        raise UserError(flag, "file not readable by you", path,
                        hint=f"chmod u+r {path}")


def _under_roots(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def check_conflicts(opts: Options) -> None:
    """Option combinations that make no sense, whatever the files hold."""
    if opts.interactive and opts.job:
        raise UserError("--charlie-interactive", "conflicts with --charlie-job",
                        hint="interactive mode boots and waits; drop one of them")
    if opts.type in ("container", "vm") and not opts.image:
        raise UserError(f"--charlie-type={opts.type}", "needs an image",
                        hint="add --charlie-image=PATH")
    if opts.write and opts.type == "vm":
        raise UserError("--charlie-write", "applies to container images only",
                        opts.image, hint="a VM's root disk is always writable "
                        "(an overlay); use --charlie-commit to keep changes")
    if opts.commit is not None and opts.type not in ("vm", "auto"):
        raise UserError("--charlie-commit", f"not supported for type {opts.type}",
                        hint="commit saves a VM guest's disk; for containers "
                             "use --charlie-write on a writable image")
    vm_only = {"job": opts.job, "cpus": opts.cpus, "mem": opts.mem,
               "tmp-size": opts.tmp_size, "interactive": opts.interactive or None}
    if opts.type != "container":
        for name, value in (("uid", opts.uid), ("gid", opts.gid)):
            if value is not None:
                raise UserError(f"--charlie-{name}", "applies to container jobs only, "
                                f"not type {opts.type}")
    if opts.type in ("container", "none"):
        for name, value in vm_only.items():
            if value is not None:
                raise UserError(f"--charlie-{name}", f"applies to VM jobs only, "
                                f"not type {opts.type}")


def check_nodes(opts: Options, num_nodes: int) -> None:
    if opts.commit is not None and opts.commit >= num_nodes:
        raise UserError("--charlie-commit", f"guest {opts.commit} does not "
                        f"exist in a job of {num_nodes} node(s)", opts.commit,
                        hint=f"guests are numbered 0 .. {num_nodes - 1}")


def resolve(opts: Options, cfg: Config, cwd: str | None,
            num_nodes: int | None = None) -> Options:
    """Make paths absolute, check them as the calling user, settle the type.
    Returns the normalized Options the prolog will receive."""
    remote = images.is_registry_ref(opts.image)
    image = (opts.image if remote else _absolute("--charlie-image", opts.image, cwd)) \
        if opts.image else None
    dirs = tuple(_absolute("--charlie-dir", d, cwd) for d in opts.dir)
    job = _absolute("--charlie-job", opts.job, cwd) if opts.job else None
    type_ = cfg["default_type"] if opts.type == "auto" else opts.type
    if opts.type == "none" and image:
        raise UserError("--charlie-type=none", "takes no image", image,
                        hint="drop --charlie-image or choose another type")
    if image is not None and remote:
        if type_ not in ("auto", "container"):
            raise UserError("--charlie-image", "a registry image is a container image, "
                            f"which does not fit --charlie-type={type_}", image)
        type_ = "container"
        # pinned to its digest now: every node runs the same image
        from . import registry
        image = registry.pin(image, cfg["container.registry_insecure"])
    elif image is not None:
        if cfg["image_roots"] and not _under_roots(image, cfg["image_roots"]):
            raise UserError("--charlie-image", "outside the allowed image "
                            "directories", image, hint="allowed: " +
                            ", ".join(cfg["image_roots"]))
        kind, fmt = images.detect(image)
        if type_ == "auto":
            type_ = kind
        elif type_ != kind:
            raise UserError("--charlie-image", f"is a {fmt} image, which does "
                            f"not fit --charlie-type={type_}", image)
    elif type_ == "auto":
        type_ = "none"
    for d in dirs:
        _readable_dir("--charlie-dir", d)
    if job is not None:
        _readable_file("--charlie-job", job)
    out = dataclasses.replace(opts, image=image, dir=dirs, job=job, type=type_)
    if num_nodes is not None:
        check_nodes(out, num_nodes)
    check_conflicts(out)
    if out.commit is not None and cfg["commit.policy"] == "deny":
        raise UserError("--charlie-commit", "disabled on this cluster",
                        hint="the site config sets commit.policy = \"deny\"")
    backends.get(type_).check(out, cfg)
    return out


#: hashing at submit says so on the terminal from this size on
DIGEST_NOTE_BYTES = 256 << 20


def submit_digest(opts: Options, cfg: Config, cache_home: str | None) -> Options:
    """At submit, as the user: an image the nodes will unpack (a tarball; a
    squashfs when the site unpacks them or --charlie-write asks for a copy)
    is hashed here once, so that no node reads a multi-GB file only to name
    its cache entry.  The nodes trust the digest while the file's identity
    (inode, size, mtime, ctime) is unchanged, and hash it themselves
    otherwise.  A digest already made for this very file version is reused
    from cache_home (the user's ~/.cache/slurm-charlie), so a resubmit pays
    nothing."""
    if opts.image is None or opts.type != "container" or images.is_registry_ref(opts.image):
        return opts
    _kind, fmt = images.detect(opts.image)
    unpacked = fmt in images.ARCHIVES or (
        fmt == "squashfs" and (opts.write or cfg["container.squashfs"] != "mount"))
    if not unpacked:
        return opts
    st = _stat("--charlie-image", opts.image)
    memo = None
    if cache_home:
        memo = os.path.join(cache_home, "digests", "-".join(
            str(n) for n in (st.st_dev, *options.file_identity(st))))
        known = (read_small(memo, 128) or "").strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return dataclasses.replace(opts, image_digest=options.image_digest(known, st))
    if st.st_size >= DIGEST_NOTE_BYTES:
        import sys
        print(f"slurm-charlie: hashing {opts.image} ({st.st_size >> 20} MiB) once "
              "for the nodes' image cache", file=sys.stderr, flush=True)
    try:
        sha = images.sha256_file(opts.image)
    except OSError as e:
        raise UserError("--charlie-image", f"cannot read: {e.strerror}", opts.image,
                        hint="the image must be readable by you") from None
    if options.file_identity(_stat("--charlie-image", opts.image)) \
            != options.file_identity(st):
        return opts  # changed while it was read: the nodes hash what they find
    if memo is not None:
        try:
            os.makedirs(os.path.dirname(memo), mode=0o700, exist_ok=True)
            write_file(memo, sha + "\n", 0o600)
        except OSError:
            pass  # a read-only or full home: the next submit hashes again
    return dataclasses.replace(opts, image_digest=options.image_digest(sha, st))


def user_cache_home(environ: Mapping[str, str]) -> str | None:
    """$XDG_CACHE_HOME/slurm-charlie, else ~/.cache/slurm-charlie."""
    base = environ.get("XDG_CACHE_HOME") or (
        os.path.join(environ["HOME"], ".cache") if environ.get("HOME") else None)
    return os.path.join(base, "slurm-charlie") if base and os.path.isabs(base) else None
