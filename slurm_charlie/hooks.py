"""Prolog and epilog: the only place their exit codes are chosen.

Prolog (root, every allocated node, PrologFlags=Alloc):
    exit 0  not a charlie job; or job prepared; or a user error -- then the
            message is in run/error and the shim fails every task with it, so
            the job fails and the node stays in service
    exit 1  node fault: the node is drained with a reason that says what to fix
Epilog (root, every node): undoes the prolog from state.json; safe to run twice,
after a half-done prolog and with state.json missing or corrupt.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import time
from typing import Any, Callable, Mapping

from . import (backends, config, hostlist, jobenv, layout, meta, options, privileged,
               state, validate)
from . import log as logmod
from .errors import CharlieError, NodeFault, UserError, format_message
from .proc import User, call_as, fd_targets, is_zombie, pids_of

log = logmod.log


# --- work done as the job user --------------------------------------------

def _link_jobscript(src: str, dst: str) -> str | None:
    """Hard link the --charlie-job script into meta (edits stay visible, as
    in the seed tutorial); copy when linking fails.  Returns a warning."""
    try:
        os.unlink(dst)
    except FileNotFoundError:
        pass
    try:
        os.link(src, dst, follow_symlinks=True)
        return None
    except OSError as e:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755)
        return (f"--charlie-job: hard link failed ({e.strerror}), copied "
                f"instead: {src}; later edits of the script will not be seen "
                "by the job (put it on the same filesystem as the runtime root "
                "to get a link)")


def _group_name(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"g{gid}"


def guest_user(user: User) -> tuple:
    """The job user as VM guests recreate it (meta/user)."""
    return (user.name, user.uid, user.gid, _group_name(user.gid),
            *((g, _group_name(g)) for g in user.groups if g != user.gid))


def prepare_as_user(ctx: backends.Context, raw: options.Options,
                    cpus: tuple[int, ...], vm_user: tuple = (),
                    ssh: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs as the job user: re-validate, render meta, write task env."""
    p = ctx.paths
    for d in (p.meta, p.run, p.out, os.path.join(p.meta, meta.SYNC_DIR)):
        os.makedirs(d, mode=0o755 if d.startswith(p.meta) else 0o700, exist_ok=True)
    os.chmod(p.job_dir, 0o700)
    opts = validate.resolve(raw, ctx.cfg, cwd=None, num_nodes=len(ctx.nodes))
    try:  # left by an earlier run of this prolog
        os.unlink(p.error)
    except FileNotFoundError:
        pass
    inp = meta.MetaInput(job_id=ctx.job_id, nodes=ctx.nodes, cpus=cpus,
                         type=opts.type, data_dirs=len(opts.dir),
                         subnet=ctx.cfg["vm.subnet"],
                         nameservers=tuple(ctx.cfg["vm.nameservers"]),
                         mode=("" if opts.type != "vm" else
                               "interactive" if opts.interactive or not opts.job
                               else "batch"),
                         user=vm_user if opts.type == "vm" else ())
    files = meta.render(inp)
    if opts.type == "vm" and ssh:
        files.update(meta.ssh_files(ssh["public"].encode(), ssh["private"].encode(),
                                    ctx.cfg["vm.subnet"]))
    for name, data in files.items():
        path = os.path.join(p.meta, name)
        if data is None:
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            # 0644 whatever the user's umask: guests read meta as others
            layout.write_file(path, data, 0o600 if name == "ssh/id_ed25519" else 0o644)
    warnings = []
    if opts.job:
        w = _link_jobscript(opts.job, os.path.join(p.meta, "jobscript"))
        if w:
            warnings.append(w)
    state.write(p.state, {"job_id": ctx.job_id, "node": ctx.node,
                          "type": opts.type, "phase": "prepared",
                          "guest_id": ctx.guest_id})
    return {"opts": options.to_env(opts), "warnings": warnings}


def _ssh_keys(cfg: config.Config, job_id: str, uid: int) -> dict[str, str] | None:
    """As root: the job's ssh key, the same on every node (sshkey.py)."""
    from . import sshkey
    path = cfg["vm.ssh_secret"]
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read()
    except OSError as e:
        log.warning("vm.ssh_secret %s: %s; guests get no ssh keys", path, e.strerror)
        return None
    private, public = sshkey.openssh_keys(sshkey.job_seed(secret, job_id, uid),
                                          f"slurm-charlie-job-{job_id}")
    return {"private": private.decode(), "public": public.decode()}


def _record_error(path: str, text: str) -> None:
    """As the user: run/error, for the shim to show in every task (run/ may
    not exist yet when the options themselves were refused)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    layout.write_file(path, text, 0o600)


def _task_env_lines(pairs: list[tuple[str, str]]) -> bytes:
    # raw NAME=VALUE lines for the shim (values never contain newlines)
    return "".join(f"{k}={v}\n" for k, v in pairs).encode()


def finish_as_user(ctx: backends.Context, task_env: list[tuple[str, str]],
                   started: dict[str, Any], notices: list[str]) -> None:
    if notices:  # the shim copies these to the batch script's stderr
        layout.write_file(ctx.paths.notice, "".join(n + "\n" for n in notices).encode(), 0o600)
    else:
        try:  # left by an earlier run of this prolog
            os.unlink(ctx.paths.notice)
        except FileNotFoundError:
            pass
    layout.write_file(ctx.paths.task_env, _task_env_lines(task_env), 0o600)
    state.update(ctx.paths.state, phase="started", backend=started)


# --- prolog / epilog -------------------------------------------------------

def _setup_logging(cfg: config.Config | None, job_id: str | None, node: str) -> None:
    node_log = None
    if cfg is not None and cfg["log_file"]:
        node_log = config.expand_node(cfg["log_file"], node)
    logmod.setup(cfg["log_level"] if cfg else "info", job_id, stderr=True,
                 syslog=cfg["syslog"] if cfg else True, node_log=node_log)


drain = privileged.drain


def _context(env: Mapping[str, str]) -> tuple[jobenv.JobEnv, config.Config,
                                              layout.JobPaths]:
    job = jobenv.from_environ(env)
    cfg = config.load(env)
    return job, cfg, layout.JobPaths(cfg.runtime_root(job.node_name), job.job_id)


def _unexpected(e: BaseException) -> NodeFault:
    import traceback
    log.error("internal error:\n%s", traceback.format_exc())
    return NodeFault("internal error", f"{type(e).__name__}: {e}",
                     hint="report this with the node's slurm-charlie log")


def prolog_main(env: Mapping[str, str]) -> int:
    try:
        return _prolog(env)
    except Exception as e:  # a bug in root's code must not look like success
        _setup_logging(None, env.get("SLURM_JOB_ID"), env.get("SLURMD_NODENAME", "?"))
        drain(env.get("SLURMD_NODENAME", "?"), _unexpected(e))
        return 1


def epilog_main(env: Mapping[str, str]) -> int:
    try:
        return _epilog(env)
    except Exception as e:
        _setup_logging(None, env.get("SLURM_JOB_ID"), env.get("SLURMD_NODENAME", "?"))
        drain(env.get("SLURMD_NODENAME", "?"), _unexpected(e))
        return 1


class Book:
    """Root's record of the job being prepared, written at every change so
    that an epilog (or reconcile) after a prolog that died half way knows
    what was started."""

    def __init__(self, records: privileged.Records, rec: privileged.JobRecord) -> None:
        self.records, self.rec = records, rec
        records.write(rec)

    def update(self, **changes: Any) -> None:
        self.rec = dataclasses.replace(self.rec, **changes)
        self.records.write(self.rec)

    def add_proc(self, proc: privileged.ProcRecord) -> None:
        """Record (or, for a role already recorded, re-record) a process."""
        self.update(procs=tuple(p for p in self.rec.procs if p.role != proc.role)
                    + (proc,))


def _prolog(env: Mapping[str, str]) -> int:
    try:
        raw = options.from_env(env)
    except UserError as e:
        raw, early = None, e
    else:
        early = None
    if raw is None and early is None:
        return 0
    node = env.get("SLURMD_NODENAME", "?")
    job_id = env.get("SLURM_JOB_ID")
    cfg = user = paths = None
    try:
        job, cfg, paths = _context(env)
        _setup_logging(cfg, job.job_id, node)
        nodes = tuple(hostlist.expand(job.nodelist))
        cpus = tuple(hostlist.expand_counts(job.cpus_per_node)) \
            if job.cpus_per_node else (1,) * len(nodes)
        if job.node_name not in nodes:
            raise NodeFault("node name", f"not in the job's node list {job.nodelist}",
                            job.node_name, hint="NodeName in slurm.conf must match "
                            "SLURMD_NODENAME")
        if len(cpus) != len(nodes):
            raise NodeFault("environment", "SLURM_JOB_CPUS_PER_NODE does not match "
                            "the node list", f"{job.cpus_per_node} / {job.nodelist}")
        user = User.lookup(job.uid, job.gid)
        if user.uid == 0:
            raise UserError("job user", "charlie jobs do not run as root", user,
                            hint="submit as an ordinary user")
        records = privileged.Records(paths.root)
        old = records.read(job.job_id)
        if old is not None:  # an earlier prolog of this id: undo it first
            log.warning("prolog: root's record of an earlier run of job %s found; "
                        "cleaning it up first", job.job_id)
            undo(cfg, paths, old, env)
        guest_id = nodes.index(job.node_name)
        book = Book(records, privileged.JobRecord(job_id=job.job_id, uid=user.uid,
                                                   gid=user.gid, guest_id=guest_id))
        privileged.create_job_dir(paths, user)
        fd = layout.open_log_as_root(paths, user.uid)
        ctx = backends.Context(opts=raw or options.Options(), cfg=cfg, paths=paths,
                               user=user, job_id=job.job_id, node=job.node_name,
                               guest_id=guest_id, nodes=nodes, cpus=cpus[guest_id],
                               work_dir=job.work_dir or None, on_spawn=book.add_proc)
        if early is not None:
            raise early
        vm_user, ssh = (), None
        if raw is not None and raw.type in ("vm", "auto"):
            vm_user, ssh = guest_user(user), _ssh_keys(cfg, job.job_id, user.uid)
        prepared = call_as(user, prepare_as_user, ctx, raw, cpus, vm_user, ssh)
        if fd is None:
            fd = layout.open_log_as_root(paths, user.uid)
        if fd is not None:
            logmod.add_fd(fd, job.job_id)
        warnings = list(prepared["warnings"])
        # what the user's step resolved, checked again as hostile input
        opts = options.from_pairs(prepared["opts"])
        ctx = dataclasses.replace(ctx, opts=opts)
        backend = backends.get(opts.type)
        book.update(type=opts.type)
        started = backend.start(ctx)
        warnings += started.pop("warnings", [])
        book.update(phase="started", facts=started)
        for w in warnings:
            log.warning("%s", w)
        notices = [f"slurm-charlie: job {job.job_id}: "
                   + (w if w.startswith("hint: ") else f"warning: {w}") for w in warnings]
        task_env = [("CH_JOB_ID", job.job_id), ("CH_TYPE", opts.type),
                    ("CH_GUEST_ID", str(ctx.guest_id)),
                    ("CH_GUEST_COUNT", str(len(nodes))),
                    ("CH_JOB_DIR", paths.job_dir)] + backend.task_env(ctx)
        call_as(user, finish_as_user, ctx, task_env, started, notices)
        log.info("prolog done: type %s, guest %d of %d", opts.type,
                 ctx.guest_id, len(nodes))
        from . import reconcile
        reconcile.from_prolog(cfg, job.node_name)
        return 0
    except NodeFault as e:
        if cfg is None:
            _setup_logging(None, job_id, node)
        log.error("%s", e.line())
        if e.hint:
            log.error("hint: %s", e.hint)
        drain(node, e)
        return 1
    except UserError as e:
        if cfg is None:
            _setup_logging(None, job_id, node)
        log.error("%s (job fails, node stays in service)", e.line())
        if user is not None and paths is not None:
            try:  # every task prints this and fails (the shim's task_init)
                call_as(user, _record_error, paths.error,
                        format_message(e, job_id) + "\n", limit=30)
            except CharlieError as e2:
                log.error("cannot record the error for the job: %s", e2.line())
        return 0


SHM_DIR = "/dev/shm"


def _user_has_other_jobs(root: str, job_id: str, uid: int) -> bool:
    for other in layout.list_job_dirs(root):
        if other == job_id:
            continue
        try:
            if os.lstat(os.path.join(root, other)).st_uid == uid:
                return True
        except OSError:
            pass
    return False


def _user_busy_elsewhere(root: str, job_id: str, uid: int, node: str) -> bool:
    """Might the user have something else on this node that uses /dev/shm?
    Another charlie job here; or, where Slurm keeps cgroups, any live
    process of the user outside this job's cgroups (a plain job of theirs,
    a login session).  Without Slurm cgroups only the first can be told."""
    if _user_has_other_jobs(root, job_id, uid):
        return True
    if not privileged.job_cgroups(node, uid, job_id):
        return False
    mark = f"/job_{job_id}/"
    for pid in pids_of(uid):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cg = f.read()
        except OSError:
            continue
        if not is_zombie(pid) and mark not in cg.replace("\n", "/\n"):
            return True
    return False


def _shm_name(rest: str) -> str:
    """The /dev/shm entry a path below it names: its first component, with
    blanks kept (names may have them) and the kernel's " (deleted)" cut."""
    return rest.removesuffix(" (deleted)").split("/")[0]


def _shm_in_use(uid: int, shm_dir: str) -> set[str]:
    """Names in shm_dir that a live process of uid has open or mapped."""
    used: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for pid in pids_of(uid):
        for target in fd_targets(pid):
            if target.startswith(prefix):
                used.add(_shm_name(target[len(prefix):]))
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(_shm_name(line[at + len(prefix):].rstrip("\n")))
        except OSError:
            continue
    return used


SHM_MIN_AGE = 1.0  # seconds; younger entries may be between shm_open and mmap


def clean_shm_as_user(shm_dir: str = SHM_DIR, min_age: float = SHM_MIN_AGE) -> list[str]:
    """As the job user: remove what the user left in /dev/shm (MPI segments
    of killed ranks).  Other jobs of the user may run here, so an entry stays
    when a live process of the user has it open or mapped, or when it is
    younger than min_age (it may be between shm_open and mmap).  The listing
    is taken before the process scan, so nothing created meanwhile is seen.
    Entries are unlinked, never followed."""
    removed = []
    uid = os.getuid()
    fd = os.open(shm_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        now = time.time()
        candidates = []
        for name in os.listdir(fd):
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if st.st_uid == uid and now - st.st_mtime >= min_age:
                candidates.append(name)
        in_use = _shm_in_use(uid, shm_dir)
        for name in candidates:
            try:
                if name in in_use:
                    continue
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
                removed.append(name)
            except OSError:
                pass
    finally:
        os.close(fd)
    return removed


def undo(cfg: config.Config, paths: layout.JobPaths,
          rec: privileged.JobRecord | None, env: Mapping[str, str],
          user: User | None = None) -> list[NodeFault]:
    """Stop what root started for the job (by root's record; without one,
    the job user's processes that carry the job's marks), clean the user's
    leftovers, remove the job directory.  Every step runs whatever the
    others did; returns the node faults met (facts root checked itself)."""
    faults: list[NodeFault] = []

    def step(what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except NodeFault as e:
            log.error("epilog: %s: %s", what, e.line())
            faults.append(e)
        except CharlieError as e:
            log.warning("epilog: %s: %s", what, e.line())
        except Exception:  # a bug: logged loudly, the next step still runs
            import traceback
            log.error("epilog: %s: internal error:\n%s", what, traceback.format_exc())

    if user is None and rec is not None:
        try:
            user = User.lookup(rec.uid, rec.gid)
        except NodeFault as e:
            log.warning("epilog: %s", e.line())
    if user is not None and user.uid != 0:
        ctx = backends.Context(opts=options.Options(), cfg=cfg, paths=paths, user=user,
                               job_id=paths.job_id, node=env.get("SLURMD_NODENAME", "?"),
                               guest_id=rec.guest_id if rec else 0, nodes=())
        if rec is not None:
            step(f"stop {rec.type}", lambda: backends.get(rec.type).stop(ctx, rec))
        if rec is None or rec.phase != "started":
            # the prolog died (or could not write its record) half way:
            # also look for the job user's processes that carry this job's marks
            for name in backends.NAMES:
                step(f"sweep {name}", lambda name=name: backends.get(name).stop(ctx, None))
        if rec is not None:
            used = privileged.cgroup_usage(ctx.node, user.uid, paths.job_id)
            if used:
                log.info("in the job's cgroup, %s used %.1f s CPU, peak memory %d MiB",
                         "QEMU" if rec.type == "vm" else "the container",
                         used.get("cpu_ns", 0) / 1e9, used.get("memory_peak", 0) >> 20)
        if not _user_busy_elsewhere(paths.root, paths.job_id, user.uid, ctx.node):
            def shm() -> None:
                removed = call_as(user, clean_shm_as_user, limit=60)
                if removed:
                    log.info("removed %d leftover /dev/shm entries of %s",
                             len(removed), user.name)
            step("/dev/shm", shm)
        step("job cgroup", lambda: privileged.leave_job_cgroup(
            ctx.node, user.uid, paths.job_id))
    step("job directory", lambda: privileged.remove_job_dir(paths))
    return faults


def _epilog(env: Mapping[str, str]) -> int:
    if env.get("SPANK_" + options.MARKER) is None:
        return 0
    node = env.get("SLURMD_NODENAME", "?")
    cfg = None
    try:
        job, cfg, paths = _context(env)
        _setup_logging(cfg, job.job_id, node)
        records = privileged.Records(paths.root)
        rec = records.read(job.job_id)
        if rec is None and not os.path.lexists(paths.job_dir):
            log.debug("epilog: nothing to clean")
            return 0
        if rec is None:
            log.warning("epilog: no record of what the prolog started; removing "
                        "what can be found")
        try:
            user = User.lookup(job.uid, job.gid)
        except NodeFault as e:
            log.warning("epilog: %s", e.line())
            user = None
        if rec is not None and user is not None and rec.uid != user.uid:
            user = None  # an earlier job of this id: its own user is used
        faults = undo(cfg, paths, rec, env, user)
        if faults:
            drain(node, faults[0])
            return 1
        records.remove(job.job_id)
        log.info("epilog done: job directory removed")
        return 0
    except NodeFault as e:
        if cfg is None:
            _setup_logging(None, env.get("SLURM_JOB_ID"), node)
        log.error("%s", e.line())
        drain(node, e)
        return 1
    except UserError as e:
        log.error("epilog: %s", e.line())
        return 0
