"""Container back end: one long-lived Charliecloud container ("holder") per
node, started by the prolog as the job user; the shim's task_init moves every
task of the job into the holder's user and mount namespaces, so all ranks on
a node share one container (cross-memory attach works between them).

The holder is `ch-run [-w] -b META:/ch/meta -b DIRn:/ch/dataN IMAGE --
/bin/sh -c 'exec 3<>/ch/meta/.holder; read -r _ <&3'`: it needs nothing in
the image but /bin/sh, and blocks forever on a FIFO nobody writes.
run/holder holds "PID STARTTIME MNTNS" for the shim, which checks the start
time before it trusts the pid.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import stat
import time
from typing import Any

from ..config import Config  # noqa: F401 (type)
from ..errors import NodeFault, UserError
from ..options import Options
from .. import asroot, cdimount, config, files, images, layout, procfs
from ..meta import MOUNT_POINTS
from ..proc import call_as, log, run, slurm_conf_keys, slurm_tool
from ..procfs import children, fd_targets, ns_inode, starttime
from .base import Backend, Context

HOLDER_FIFO = ".holder"
HOLDER_SCRIPT = 'exec 3<>/ch/meta/.holder; read -r _ <&3'


def check_image_dir(image: str, write: bool, ndirs: int) -> None:
    """As the user: the directory image can run a holder and take our binds."""
    sh = os.path.join(image, "bin/sh")
    if not (os.path.exists(sh) and os.access(sh, os.X_OK)):
        raise UserError("--charlie-image", "image has no executable /bin/sh", image,
                        hint="slurm-charlie needs /bin/sh inside the image (any "
                        "POSIX shell, e.g. busybox)")
    # missing mount points (a stock image) come from an overlay on the node
    if write and not os.access(image, os.W_OK):
        raise UserError("--charlie-write", "image directory not writable by you",
                        image, hint="drop --charlie-write, or use an image you own")


DIR, ABSENT, LINK = "directory", "absent", "link"


def _kind_in(image: str, rel: str) -> tuple[str, str]:
    """What rel is in the image directory, following none of the image's
    links: (DIR, rel), (ABSENT, rel), or (LINK, the first component that is
    a symbolic link or not a directory).  ch-run binds onto the path it is given; through a link of
    the image's author that path would lead outside the image."""
    fd = os.open(image, os.O_PATH | os.O_DIRECTORY)
    parts = rel.split("/")
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return ABSENT, rel
            except OSError as e:  # O_NOFOLLOW on a link: ELOOP or, with O_PATH, ENOTDIR
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    return LINK, "/".join(parts[:i + 1])
                raise
            os.close(fd)
            fd = nxt
        return DIR, rel
    finally:
        os.close(fd)


def _linked_mount_point(image: str, where: str) -> UserError:
    return UserError("--charlie-image", f"the image's /{where} is a symbolic link or not a "
                     "directory (the mount points /ch/meta and /ch/data1-4 must be real "
                     "directories or absent)", image,
                     hint=f"rebuild the image without /{where}, or with real directories "
                     "there")


def _missing(kinds: dict[str, tuple[str, str]], image: str, ours: tuple[str, ...],
             extra: tuple[str, ...]) -> list[str]:
    """Mount points to make in an overlay: the absent ones, and a site
    path (container.tmpdir) that is a link in the image (the overlay's
    real directory hides it).  A link at one of ours is refused."""
    for m in ours:
        if kinds[m][0] == LINK:
            raise _linked_mount_point(image, kinds[m][1])
    return [m for m in (*ours, *extra) if kinds[m][0] != DIR]


def missing_mount_points(image: str, ndirs: int, extra: tuple[str, ...] = ()) -> list[str]:
    """As the user: which of /ch/meta, /ch/dataN (and the extra bind
    targets, relative) the image directory lacks, no link followed."""
    ours = MOUNT_POINTS[:1 + ndirs]
    return _missing({m: _kind_in(image, m) for m in (*ours, *extra)}, image, ours, extra)


def inspect_dir(image: str, ndirs: int, extra: tuple[str, ...] = ()
                ) -> tuple[list[str], dict[str, str]]:
    """As the user, in one child: the image directory's missing mount points
    and its MPI (check_squashfs's answer, for a directory)."""
    return missing_mount_points(image, ndirs, extra), mpi_flavours(image)


def first_look(source: str, ndirs: int, extra: tuple[str, ...], fifo: str
               ) -> dict[str, Any]:
    """As the user, in one child (each costs the prolog a fork): the
    holder's FIFO made, the image's format, and for a directory
    inspect_dir()'s answer ("missing", "mpi")."""
    _make_fifo(fifo)
    fmt = images.detect(source)[1]
    out: dict[str, Any] = {"fmt": fmt}
    if fmt == "directory":
        out["missing"], out["mpi"] = inspect_dir(source, ndirs, extra)
    return out


def _look_question(ctx: Context, source: str, ndirs: int, quiet: bool = False
                   ) -> tuple[str | None, tuple[str, ...], str, list[Any]]:
    """What first_look() is asked about source: (node tmpdir, extra mount
    points, holder FIFO, and the key that names the question).  The user's
    first step and root both ask through here, so an answer is reused only
    for the very question root would ask."""
    tmp = node_tmpdir(ctx.cfg, ctx.node, quiet=quiet)
    extra = (tmp.lstrip("/"),) if tmp else ()
    fifo = os.path.join(ctx.paths.meta, HOLDER_FIFO)
    return tmp, extra, fifo, [source, ndirs, list(extra), fifo]


def node_tmpdir(cfg: Config, node: str, quiet: bool = False) -> str | None:
    """container.tmpdir for this node, when it is an existing directory."""
    path = config.expand_node(cfg["container.tmpdir"], node) if cfg["container.tmpdir"] else ""
    if not path.startswith("/") or path == "/":
        return None
    try:
        st = os.stat(path)
    except OSError:
        if not quiet:
            log.warning("container.tmpdir %s: missing on this node; not bound", path)
        return None
    return path if stat.S_ISDIR(st.st_mode) else None


def _mkdir_hint(image: str) -> str:
    import shlex  # a path with a space stays one word when pasted
    return "create them once: mkdir -p " + " ".join(shlex.quote(os.path.join(image, m))
                                                    for m in MOUNT_POINTS)


OVERLAY_DIR = "overlay"  # in run/: the stock image's overlay (its namespace only)
#: run by `unshare --user --map-root-user --mount` as the job user: a tmpfs
#: on run/overlay, the missing mount points made in it as the upper layer
#: (there, not through the merged tree: the image's own directories may
#: belong to root, whom this namespace does not map), the image as the
#: read-only lower layer, the GPUs' CDI edits (cdimount: $4 is the plan),
#: then ch-run on the merged tree.  Nothing is written to the image; it all
#: goes with the namespace.
OVERLAY_SCRIPT = """set -e
o=$1; lower=$2; sqfs=$3; plan=$4; shift 4
""" + cdimount.SCRIPT + """
mkdir -p -m 0700 "$o"
mount -t tmpfs -o mode=0700 charlie-overlay "$o"
mkdir "$o/upper" "$o/work" "$o/merged"
if [ -n "$sqfs" ]; then
    # a squashfs image: squashfuse (as the user, this namespace only) is the
    # read-only lower layer; it stays the holder's child until the epilog
    mkdir "$o/lower"
    squashfuse -f "$sqfs" "$o/lower" </dev/null &
    i=0
    until mountpoint -q "$o/lower"; do
        kill -0 $! 2>/dev/null || { echo "squashfuse could not mount $sqfs" >&2; exit 1; }
        i=$((i + 1)); [ $i -lt 600 ] || { echo "squashfuse did not mount $sqfs" >&2; exit 1; }
        sleep 0.05
    done
    lower=$o/lower
fi
while [ "$1" != -- ]; do mkdir -p "$o/upper/$1"; shift; done
shift
gpu_prepare
mount -t overlay charlie-overlay -o "lowerdir=$lower,upperdir=$o/upper,workdir=$o/work" "$o/merged"
gpu_apply
exec "$@"
"""


SQUASHFS_MOUNT = "squashfs"  # in run/: where ch-run mounts a squashfs image (its namespace only)


def fuse_unusable(dev: str = "/dev/fuse") -> str | None:
    """Why the job user cannot mount through FUSE here (None: they can)."""
    try:
        st = os.stat(dev)
    except OSError:
        return f"{dev} missing (modprobe fuse)"
    if st.st_mode & 0o006 != 0o006:
        return f"{dev} is mode {st.st_mode & 0o777:o}, not usable by users (chmod 0666 {dev})"
    return None


LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib64",
            "usr/lib", "lib", "lib64", "usr/local/lib",
            "usr/lib/x86_64-linux-gnu/openmpi/lib", "usr/lib64/openmpi/lib")


def _mpi_in(paths) -> dict[str, str]:
    """{"openmpi"|"mpich": path} for the MPI libraries among paths (relative
    to the image root) that sit directly in one of LIB_DIRS."""
    found: dict[str, str] = {}
    for rel in sorted(paths):
        d, _, n = rel.rpartition("/")
        if d not in LIB_DIRS:
            continue
        if n.startswith("libmpi.so.40"):
            found.setdefault("openmpi", "/" + rel)
        elif n.startswith("libmpich.so"):
            found.setdefault("mpich", "/" + rel)
    return found


def mpi_flavours(image: str) -> dict[str, str]:
    """Which MPI libraries an image directory carries: {"openmpi"|"mpich": path}."""
    names = []
    for d in LIB_DIRS:
        try:
            names += [f"{d}/{n}" for n in os.listdir(os.path.join(image, d))]
        except OSError:
            continue
    return _mpi_in(names)


def check_squashfs(image: str, ndirs: int, mount_dir: str, optional: tuple[str, ...] = ()
                   ) -> tuple[list[str], dict[str, str]]:
    """As the user, from the squashfs image's listing (nothing unpacked):
    which of our mount points (and the optional ones) it lacks, and the MPI
    it carries (mpi_flavours).  A missing /bin/sh shows in the holder's log,
    as /bin may be a link.  Makes the mount point for ch-run."""
    ours = MOUNT_POINTS[:1 + ndirs]
    wanted = [*ours, *optional]
    parents = {"/".join(m.split("/")[:i]) for m in wanted for i in range(1, m.count("/") + 1)}
    p = run(["unsquashfs", "-lls", image, *sorted(parents), *wanted, *LIB_DIRS],
            timeout=60, check=False)
    if p.returncode != 0:
        raise UserError("--charlie-image", "not a readable squashfs image", image,
                        p.stderr.decode(errors="replace").strip()[-200:] or None)
    types: dict[str, str] = {}  # path in the image -> "d", "l", "-", ...
    for line in p.stdout.decode(errors="replace").splitlines():
        at = line.find(" squashfs-root/")
        if at > 0 and line[:1]:
            name = line[at + len(" squashfs-root/"):]
            if line[0] == "l":
                name = name.split(" -> ", 1)[0]
            types[name] = line[0]

    def kind(rel: str) -> tuple[str, str]:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            t = types.get("/".join(parts[:i]))
            if t is None:
                return ABSENT, rel
            if t != "d":
                return LINK, "/".join(parts[:i])
        return DIR, rel
    missing = _missing({m: kind(m) for m in wanted}, image, ours, tuple(optional))
    os.makedirs(mount_dir, mode=0o700, exist_ok=True)
    return missing, _mpi_in(set(types))


def mpi_plugins() -> list[str] | None:
    """The MPI plugins this node's Slurm offers (`srun --mpi=list`), None
    when srun cannot say."""
    try:
        p = run([slurm_tool("srun"), "--mpi=list"],
                timeout=30, check=False)
    except NodeFault as e:
        log.warning("srun --mpi=list: %s", e.line())
        return None
    if p.returncode != 0:
        return None
    return p.stdout.decode(errors="replace").split()


MPI_LIST_FILE = ".mpi-list"  # in runtime_root: what srun --mpi=list said, and when
MPI_LIST_TTL = 600  # seconds: a plugin installed meanwhile shows up after this


def _srun_key() -> str:
    srun = slurm_tool("srun")
    try:
        st = os.stat(srun)
        return f"{srun}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{srun}:missing"


def mpi_plugins_cached(root: str, now: float | None = None) -> list[str] | None:
    """mpi_plugins(), asked once per node every MPI_LIST_TTL seconds (and
    when srun changes) instead of by every prolog: `srun --mpi=list` loads
    every plugin and costs a fair part of a short job's life.  The answer
    lives in <runtime_root>/.mpi-list (root's, like the VM probe record)."""
    now = time.time() if now is None else now
    key, path = _srun_key(), os.path.join(root, MPI_LIST_FILE)
    try:
        with open(path) as f:
            stamp, cached_key, *plugins = f.read().split("\n")[0].split(" ")
        if cached_key == key and 0 <= now - float(stamp) < MPI_LIST_TTL:
            return plugins
    except (OSError, ValueError):
        pass
    plugins = mpi_plugins()
    if plugins is not None and " " not in key:
        try:
            files.write_file(path, " ".join([f"{now:.0f}", key, *plugins]) + "\n", 0o644)
        except OSError as e:
            log.debug("cannot keep %s: %s", path, e)
    return plugins


def mpi_offered(mpi_type: str, root: str | None = None) -> bool:
    """Does this node's Slurm offer the MPI plugin (`srun --mpi=list`)?"""
    offered = mpi_plugins_cached(root) if root else mpi_plugins()
    if mpi_type not in (offered or []):
        log.warning("container.default_mpi %s: not offered by `srun --mpi=list` "
                    "here; SLURM_MPI_TYPE left alone", mpi_type)
        return False
    return True


def mpi_for(flavours: dict[str, str]) -> str:
    """The MPI plugin for an image's MPI: pmix for Open MPI alone (Debian's
    has PMIx, not PMI2), else pmi2 (MPICH, or nothing known)."""
    return "pmix" if "openmpi" in flavours and "mpich" not in flavours else "pmi2"


def openmpi_warning(mpi: dict[str, str], shown_as: str, pmix: bool = False) -> list[str]:
    """Lines to warn with when the image's MPI (mpi_flavours) is Open MPI
    without MPICH and this Slurm offers no PMIx (with PMIx, such images get
    srun --mpi=pmix)."""
    if "openmpi" not in mpi or "mpich" in mpi or pmix:
        return []
    return [f"--charlie-image: image has Open MPI ({mpi['openmpi']}) and no MPICH: "
            "Open MPI built without PMI2 (Debian's, for one) aborts every rank in "
            f"MPI_Init under srun --mpi=pmi2: {shown_as}",
            "hint: build the image's MPI programs with MPICH, or use srun "
            "--mpi=pmix where Slurm and the image's Open MPI both have PMIx"]


class ContainerBackend(Backend):
    name = "container"

    def check(self, opts: Options, cfg: Config) -> None:
        if opts.image and os.path.isdir(opts.image):
            check_image_dir(opts.image, opts.write, len(opts.dir))
            mpi = mpi_flavours(opts.image)
            if "openmpi" in mpi:  # srun --mpi=list only for such images
                pmix = "pmix" in (mpi_plugins() or [])
                for line in openmpi_warning(mpi, opts.image, pmix):
                    log.warning("%s", line)
        elif opts.image and opts.write:
            raise UserError("--charlie-write", "needs an image directory; an "
                            "archive is unpacked into a private cache", opts.image,
                            hint="unpack it yourself and pass the directory")
        # archives are checked member by member when the prolog unpacks them

    def look_as_user(self, ctx: Context, opts: Options) -> dict[str, Any] | None:
        """As the user, in the prolog's first step: first_look() at an
        image that is already on the node (not a registry reference, which
        is pulled first)."""
        if not opts.image or images.is_registry_ref(opts.image):
            return None
        _, extra, fifo, key = _look_question(ctx, opts.image, len(opts.dir), quiet=True)
        return {"key": key, **first_look(opts.image, len(opts.dir), extra, fifo)}

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        """CH_* (always set) and, as defaults a task's own setting wins
        over, SLURM_MPI_TYPE and the site's container.env."""
        env = [("CH_META", "/ch/meta")]
        env += [(f"CH_DATA{i}", f"/ch/data{i}") for i in range(1, len(ctx.opts.dir) + 1)]
        mpi = ctx.cfg["container.default_mpi"]
        if mpi == "auto":
            mpi = mpi_for(getattr(self, "image_mpi", {}))
        if mpi and mpi_offered(mpi, ctx.paths.root):
            env.append(("SLURM_MPI_TYPE", mpi))
        # PMIx clients in the container keep their job data in their own
        # memory: the server's shared-memory store (gds ds12/ds21) takes
        # locks a container's user namespace cannot share (PMIX ERROR lines)
        env.append(("PMIX_MCA_gds", "hash"))
        env += [tuple(item.split("=", 1)) for item in ctx.cfg["container.env"]]
        # the job's GPUs' CDI variables (checked NAME=VALUE when the spec was read)
        env += [tuple(item.split("=", 1)) for item in getattr(self, "gpu_env", [])]
        return env

    # -- prolog ---------------------------------------------------------------
    def _unpacked(self, ctx: Context, overlay: bool = False) -> dict[str, Any]:
        """For an archive: unpack (or reuse) it in the user's node cache; a
        squashfs file is mounted by ch-run itself where FUSE allows it
        (squashfuse under an overlay when it lacks mount points, or when
        overlay: the GPUs' files go into one)."""
        source, notes = ctx.opts.image, []
        if images.is_registry_ref(source):
            source, note = self._pulled(ctx)
            notes = [note] if note else []
        tmp, extra, fifo, key = _look_question(ctx, source, len(ctx.opts.dir))
        if ctx.look is not None and ctx.look.get("key") == key:
            seen = ctx.look  # the prolog's first step took it: one fork fewer
        else:
            seen = call_as(ctx.user, first_look, source, len(ctx.opts.dir), extra, fifo)
        fmt = seen["fmt"]
        if fmt == "directory":
            return {"image_dir": source, "notes": notes, "tmpdir": tmp,
                    "missing": seen["missing"], "mpi": seen["mpi"]}
        if fmt == "squashfs" and ctx.cfg["container.squashfs"] == "mount" \
                and not ctx.opts.write:  # --charlie-write: a copy to write into
            why = fuse_unusable()
            if why is None:
                mnt = os.path.join(ctx.paths.run, SQUASHFS_MOUNT)
                missing, mpi = call_as(ctx.user, check_squashfs, source, len(ctx.opts.dir),
                                       mnt, extra)
                if not missing and not overlay:
                    log.info("image %s: mounted by ch-run at %s (nothing unpacked)",
                             source, mnt)
                    return {"image_dir": source, "squashfs_mount": mnt, "tmpdir": tmp,
                            "notes": notes, "missing": [], "mpi": mpi}
                if shutil.which("squashfuse"):
                    # the mount points come from an overlay on squashfuse
                    log.info("image %s: mounted by squashfuse under an overlay for %s "
                             "(nothing unpacked)", source,
                             ", ".join("/" + m for m in missing) or "the GPUs' files")
                    return {"image_dir": source, "squashfs_lower": True, "tmpdir": tmp,
                            "notes": notes, "missing": missing, "mpi": mpi}
                why = ("it lacks " + ", ".join("/" + m for m in missing) if missing
                       else "the GPUs' files need an overlay") \
                    + " and squashfuse (for an overlay) is not installed"
            log.warning("image %s: unpacked, not mounted: %s", source, why)
        cache = config.expand_node(ctx.cfg["container.cache_dir"], ctx.node)
        user_cache = asroot.create_user_dir(cache, ctx.user)
        from .. import unpack  # archives only: tarfile, filelock
        got = call_as(ctx.user, unpack.unpack, source, fmt, user_cache,
                      ctx.job_id, ctx.cfg["timeouts.unpack"], ctx.opts.image_digest,
                      limit=2 * ctx.cfg["timeouts.unpack"] + 60)
        log.info("image %s: digest %s", source,
                 {"submit": "made at submit", "index": "from this node's index",
                  "hashed": "read on this node: "
                  + ("the file changed after submit" if ctx.opts.image_digest
                     else "none from submit")}[got["digest_from"]])
        log.info("image %s: %s %s", source,
                 "unpacked into" if got["unpacked"] else "cached at", got["image"])
        running = set(layout.list_job_dirs(ctx.paths.root))
        removed = call_as(ctx.user, unpack.evict, user_cache,
                          ctx.cfg["container.cache_max_mib"] << 20, running,
                          limit=ctx.cfg["timeouts.unpack"])
        for sha in removed:
            log.info("image cache: evicted %s", sha)
        # an archive's content is only seen now: warn in the job's output
        missing, mpi = call_as(ctx.user, inspect_dir, got["image"], len(ctx.opts.dir), extra)
        pmix = "pmix" in (mpi_plugins_cached(ctx.paths.root) or []) if "openmpi" in mpi else False
        return {"image_dir": got["image"], "cache": user_cache, "sha": got["sha"],
                "warnings": openmpi_warning(mpi, source, pmix), "notes": notes,
                "tmpdir": tmp, "missing": missing, "mpi": mpi}

    def _pulled(self, ctx: Context) -> tuple[str, str | None]:
        """A registry image (pinned at submit): its squashfs in the user's
        registry cache, pulled by the job's first node, waited for by the
        others."""
        from .. import registry  # registry images only
        cache = ctx.cfg["container.registry_cache"]
        if cache.startswith("~/"):
            cache = os.path.join(ctx.user.home, cache[2:])
        limit = ctx.cfg["timeouts.unpack"]
        got = call_as(ctx.user, registry.fetch, ctx.opts.image, cache, ctx.guest_id == 0,
                      ctx.cfg["container.registry_insecure"], limit, limit=2 * limit + 60)
        if got["pulled"]:
            log.info("image %s: pulled into %s in %.1f s", ctx.opts.image, got["path"],
                     got["seconds"])
            return str(got["path"]), (f"{ctx.opts.image}: pulled once for the job by "
                                      f"{ctx.node} in {got['seconds']:.1f} s "
                                      f"({got['summary']}), kept in {got['path']}")
        log.info("image %s: from the cache %s", ctx.opts.image, got["path"])
        return str(got["path"]), None

    def _overlay(self, ctx: Context, image: dict[str, Any], gpu: bool = False
                 ) -> tuple[str, list[str]] | None:
        """A stock image (no /ch/meta, /ch/dataN, or no node TmpFS path) or
        a GPU job's (gpu: the CDI edits go into the overlay): (overlay dir,
        the missing mount points), else None.  The image itself is never
        written."""
        missing = image["missing"]
        if not (missing or gpu) or ctx.opts.write:
            return None
        if not image.get("squashfs_lower") and any(c in image["image_dir"] for c in ",:\\"):
            raise UserError("--charlie-image", ("image lacks mount points "
                            + ", ".join("/" + m for m in missing) if missing else
                            "a GPU job's image goes under an overlay") + " and its path has "
                            "',', ':' or '\\', which an overlay cannot take",
                            image["image_dir"], hint=_mkdir_hint(image["image_dir"]))
        overlay = os.path.join(ctx.paths.run, OVERLAY_DIR)  # OVERLAY_SCRIPT makes it
        if missing and not image.get("squashfs_lower"):  # that one is logged already
            log.info("image %s has no %s: they come from an overlay (the image is not "
                     "written)", image["image_dir"], ", ".join("/" + m for m in missing))
        return overlay, missing

    def _gpu_edits(self, ctx: Context) -> tuple[Any, cdimount.Plan]:
        """The CDI edits of the job's GPUs on this node, every host path in
        them checked, and what the overlay script makes of them; (None, an
        empty plan) without GPUs or without spec directories.  A bad spec
        fails the job (UserError), the node stays in service."""
        if not ctx.gpus:
            return None, cdimount.Plan()
        dirs = [config.expand_node(d, ctx.node) for d in ctx.cfg["gpu.cdi_dirs"]]
        if ctx.cfg["gpu.generate"]:  # the prolog's own spec (gpuspec.ensure), lowest first
            from ..gpuspec import GENERATED_DIR
            dirs.insert(0, os.path.join(ctx.paths.root, GENERATED_DIR))
        if not dirs:
            log.warning("the job has %d GPU(s) here and gpu.cdi_dirs is empty: its "
                        "container gets no driver libraries", len(ctx.gpus))
            return None, cdimount.Plan()
        from .. import cdi, gpus
        names = gpus.cdi_names(list(ctx.gpus), ctx.cfg["gpu.cdi_kind"])
        parts = cdi.load_dirs(dirs).resolve_parts(names, check=True)
        edits = cdi.combine(parts)
        plan = cdimount.plan_all(parts)
        log.info("CDI edits for the job's GPUs (%s): %d device node(s), %d mount(s), "
                 "%d link(s), %d variable(s), loader cache for %s", " ".join(names),
                 len(edits.device_nodes), len(plan.binds), len(plan.links), len(edits.env),
                 " ".join(plan.ldcache) or "no folder")
        return edits, plan

    def start(self, ctx: Context) -> dict[str, Any]:
        edits, gpu = self._gpu_edits(ctx)
        # the spec's variables go to every task (task_env); its device nodes
        # are in the host's /dev, which ch-run shows in the container; its
        # mounts, links and loader cache are made in the overlay (cdimount)
        self.gpu_env = list(edits.env) if edits is not None else []
        if gpu and ctx.opts.write:
            raise UserError("--charlie-write", "a GPU job's driver files would be bound "
                            "into the image you write", ctx.opts.image,
                            hint="run GPU work on the image without --charlie-write; "
                            "change the image in a job without GPUs")
        image = self._unpacked(ctx, overlay=bool(gpu))  # the holder's FIFO is made there too
        if ctx.gpus and slurm_conf_keys("cgroup.conf").get("constraindevices",
                                                           "no").lower() != "yes":
            unconfined = (f"node {ctx.node}: Slurm does not confine devices here "
                          "(ConstrainDevices is off): the job's tasks can open every GPU "
                          "of the node, not only the job's")
            log.warning("%s", unconfined)
            image["warnings"] = image.get("warnings", []) + [unconfined]
        self.image_mpi = image.pop("mpi")  # what MPI the image carries (task_env)
        tmp = image["tmpdir"]
        overlay = self._overlay(ctx, image, bool(gpu))
        runtime = ctx.cfg["container.runtime"]
        argv = [runtime]
        if ctx.opts.write:
            argv.append("-w")
        # in the overlay's namespace the user is root: ch-run maps them back
        uid = ctx.opts.uid if ctx.opts.uid is not None else ctx.user.uid if overlay else None
        gid = ctx.opts.gid if ctx.opts.gid is not None else ctx.user.gid if overlay else None
        if uid is not None:
            argv.append(f"--uid={uid}")
        if gid is not None:
            argv.append(f"--gid={gid}")
        argv += ["-b", f"{ctx.paths.meta}:/ch/meta"]
        for i, d in enumerate(ctx.opts.dir, start=1):
            argv += ["-b", f"{d}:/ch/data{i}"]
        if tmp and not overlay and tmp.lstrip("/") in image["missing"]:
            tmp = None  # --charlie-write on an image without it: ch-run cannot bind there
        if tmp:
            argv += ["-b", f"{tmp}:{tmp}"]
        for bind in ctx.cfg["container.binds"]:
            argv += ["-b", bind]
        if image.get("squashfs_mount"):
            argv += ["-m", image["squashfs_mount"]]
        if overlay:
            argv += [os.path.join(overlay[0], "merged"), "--", "/bin/sh", "-c", HOLDER_SCRIPT]
            argv = ["unshare", "--user", "--map-root-user", "--mount", "/bin/sh", "-c",
                    OVERLAY_SCRIPT, "sh", overlay[0], image["image_dir"],
                    image["image_dir"] if image.get("squashfs_lower") else "", gpu.text(),
                    *overlay[1], "--",
                    *argv]
        else:
            argv += [image["image_dir"], "--", "/bin/sh", "-c", HOLDER_SCRIPT]
        log.info("starting holder as %s: %s", ctx.user, " ".join(
            "<OVERLAY_SCRIPT>" if a == OVERLAY_SCRIPT else a.replace("\n", "; ")
            for a in argv))
        holder_log = os.path.join(ctx.paths.out, "holder.log")
        fd = asroot.open_out_as_root(ctx.paths, ctx.user.uid, "holder.log")
        if fd is None:
            raise UserError("job directory", "cannot open", holder_log,
                            hint="was out/ changed while the job started?")
        host_mnt = ns_inode("self", "mnt")
        joined: list[str] = []
        try:
            proc, rec = asroot.spawn(ctx.user, argv, fd, "holder",
                                     ctx.spawned_in_job(joined))
        except NodeFault:
            raise NodeFault("container.runtime", "not found", runtime,
                            hint="install charliecloud-runtime or fix "
                            "container.runtime in the site config") from None
        finally:
            os.close(fd)
        limit = ctx.cfg["timeouts.boot"]
        found: dict[str, Any] = {}

        def ready() -> bool:
            # a squashfs image: ch-run stays as the FUSE server and the
            # holder's sh is its child, in namespaces of its own
            holder = _only_child(proc.pid) if image.get("squashfs_mount") else proc.pid
            if not holder or not _in_read(holder):
                return False
            # read only now: before the image's sh opened the FIFO the same
            # pid was unshare's or ch-run's, in a namespace it then left (a
            # stale one recorded made the shim refuse every task)
            mnt = ns_inode(holder, "mnt")
            found.update(holder=holder, mnt=mnt)
            return bool(mnt and mnt != host_mnt)

        # the overlay's squashfuse: stopped, ch-run would wait on it
        outcome = asroot.wait_until_ready(
            proc, ready, limit, poll=0.005,
            also=(lambda: _squashfuse_of(proc.pid)) if image.get("squashfs_lower") else None)
        if outcome == asroot.STOPPED:
            raise UserError("container", "the container was stopped (SIGSTOP) "
                            "while it started", hint="the job fails, the node "
                            "stays in service")
        if outcome == asroot.EXITED:
            text = call_as(ctx.user, files.read_tail, holder_log, 1, limit=30)
            hint = f"{holder_log} has ch-run's output"
            if overlay:
                hint += ("; the image lacks mount points and the node could not "
                         "overlay them (unprivileged overlayfs needs Linux 5.11 or "
                         "later and user namespaces): " + _mkdir_hint(image["image_dir"]))
            raise UserError("container", f"ch-run exited with {proc.returncode}",
                            text.splitlines()[-1] if text else None, hint=hint)
        if outcome == asroot.TIMED_OUT:
            raise UserError("container", f"the container did not start within {limit} s "
                            "(its /bin/sh never opened the holder FIFO)", ctx.opts.image,
                            hint="the image's /bin/sh must be a POSIX shell that "
                            "runs `exec 3<>FILE; read -r _ <&3`")
        holder, mnt = found["holder"], found["mnt"]
        # ch-run has exec'd the image's /bin/sh by now: record that program
        # and the FUSE server (ch-run itself, or the overlay's squashfuse)
        server = proc.pid if holder != proc.pid else \
            _squashfuse_of(holder) if image.get("squashfs_lower") else None
        if server:
            fuse = dataclasses.replace(rec, role="fuse", pid=server,
                                       start=starttime(server) or 0,
                                       exe=procfs.exe_of(server) or rec.exe,
                                       mntns=ns_inode(server, "mnt") or 0)
            ctx.spawned(fuse)
            asroot.join_job_cgroup(ctx.node, fuse, ctx.job_id, ctx.guest_id)
        rec = dataclasses.replace(rec, pid=holder, start=starttime(holder) or 0, mntns=mnt or 0,
                                  exe=procfs.exe_of(holder) or rec.exe)
        ctx.spawned(rec)  # the same pid, now the image's /bin/sh: joined at its gate
        if joined:
            log.info("holder in the job's cgroups %s", " ".join(joined))
        if gpu.ldcache:  # the overlay script's word on the loader's cache, for the job
            said = call_as(ctx.user, files.read_tail, holder_log, 5, limit=30)
            image["warnings"] = image.get("warnings", []) + [
                line[len("CDI: warning: "):] for line in said.splitlines()
                if line.startswith("CDI: warning: ")]
        info = {"holder_mntns": mnt, "holder_userns": ns_inode(holder, "user"),
                **image}  # "warnings" is taken out by the prolog
        # written by the prolog's last step as the user (one fork fewer);
        # the tasks wait for the whole prolog anyway
        info["user_files"] = [(layout.SHIM_FILES["holder"], f"{holder} {rec.start} {mnt}\n")]
        return info

    # -- epilog ---------------------------------------------------------------
    def stop(self, ctx: Context, record: Any) -> None:
        """Kill the holder and every process of the job user in its mount
        namespace (root's record), or holding this job's FIFO.  Only the job
        user's processes are candidates; each is checked through a pidfd."""
        holder = record.proc("holder") if record is not None else None
        fuse = record.proc("fuse") if record is not None else None
        mntns = holder.mntns if holder is not None else 0
        fuse_ns = fuse.mntns if fuse is not None else 0
        # FUSE servers of this job's image: ch-run's mount point, squashfuse's
        fuse_dirs = (f"{ctx.paths.run}/{SQUASHFS_MOUNT}".encode(),
                     f"{ctx.paths.run}/{OVERLAY_DIR}/lower".encode())
        fifo = files.lstat_in_job(ctx.paths, "meta", HOLDER_FIFO)
        fifo_id = (fifo.st_dev, fifo.st_ino) if fifo and stat.S_ISFIFO(fifo.st_mode) \
            else None
        if holder is not None and not mntns and asroot.matches(holder, False):
            # recorded as it started, before its namespace was known (the
            # prolog was stopped half way): its namespace now, if its own
            ns = ns_inode(holder.pid, "mnt") or 0
            mntns = ns if ns != ns_inode("self", "mnt") else 0
        if holder is not None and asroot.alive(holder):
            # nothing of Slurm's (the extern step's end included) ended it
            log.info("container: holder %d still running at the job's end; stopping it",
                     holder.pid)
        for proc in (holder, fuse):
            if proc is not None:  # one pid from unshare to the image's /bin/sh
                asroot.signal_process(proc, signal.SIGKILL, same_program=False)
        n = asroot.kill_user_processes(
            ctx.user.uid, lambda pid: bool(mntns and ns_inode(pid, "mnt") == mntns)
            or bool(fuse_ns and ns_inode(pid, "mnt") == fuse_ns)
            or _holds_fifo(pid, fifo_id) or _mounts_for(pid, fuse_dirs),
            ctx.cfg["timeouts.kill"], "container")
        if n:
            log.info("container: %d processes of the job ended", n)
        facts = record.facts if record is not None else {}
        sha, cache = facts.get("sha"), facts.get("cache")
        if isinstance(sha, str) and isinstance(cache, str):
            here = config.expand_node(ctx.cfg["container.cache_dir"], ctx.node)
            if os.path.dirname(cache) == here:
                from .. import unpack
                call_as(ctx.user, unpack.release, cache, sha, ctx.job_id, limit=30)


def _only_child(pid: int) -> int | None:
    """pid's one child (ch-run's container process), None while it has none."""
    kids = children(pid)
    return kids[0] if len(kids) == 1 else None


def _squashfuse_of(pid: int) -> int | None:
    """The overlay's squashfuse: the child of pid (the overlay script, then
    the holder it becomes) that runs squashfuse, None before it starts."""
    for kid in children(pid):
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == "squashfuse":
                    return kid
        except OSError:
            continue
    return None


def _mounts_for(pid: int, mount_dirs: tuple[bytes, ...]) -> bool:
    """pid is a FUSE server (ch-run, squashfuse) serving this job's image
    (no record: its command line names one of the job's mount points)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return bool(set(mount_dirs) & set(f.read(1 << 16).split(b"\0")))
    except OSError:
        return False


def _in_read(pid: int) -> bool:
    """The holder has exec'd sh and opened its FIFO."""
    return any(t.endswith(HOLDER_FIFO) for t in fd_targets(pid))


def _holds_fifo(pid: int, fifo: tuple[int, int] | None) -> bool:
    """pid has this job's holder FIFO open.  Compared by inode: the path a
    holder shows for it is /ch/meta/.holder inside *every* job's container,
    so a path match would also hit the user's other jobs on this node."""
    if fifo is None:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == fifo:
            return True
    return False


def _make_fifo(path: str) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISFIFO(st.st_mode):
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o600)


