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
from typing import Any, Mapping

from . import backends, config, hostlist, jobenv, layout, meta, options, state, validate
from . import log as logmod
from .errors import CharlieError, NodeFault, UserError, format_message
from .proc import User, call_as, fd_targets, pids_of, run

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


def drain(node: str, err: CharlieError) -> None:
    reason = f"slurm-charlie: {err.line()}"[:200]
    scontrol = shutil.which("scontrol") or "/usr/bin/scontrol"
    try:
        run([scontrol, "update", f"NodeName={node}", "State=DRAIN",
             f"Reason={reason}"], timeout=30)
    except CharlieError as e:
        log.error("could not drain %s: %s", node, e.line())


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
    except Exception as e:  # a bug must not look like success
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
        user = User.lookup(job.uid, job.gid)
        layout.create_job_dir(paths, user.uid, user.gid)
        fd = layout.open_log_as_root(paths, user.uid)
        ctx = backends.Context(opts=raw or options.Options(), cfg=cfg, paths=paths,
                               user=user, job_id=job.job_id, node=job.node_name,
                               guest_id=nodes.index(job.node_name), nodes=nodes,
                               cpus=cpus[nodes.index(job.node_name)],
                               work_dir=job.work_dir or None)
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
        opts = options.from_env({"SPANK_" + k: v for k, v in prepared["opts"]})
        ctx = dataclasses.replace(ctx, opts=opts)
        backend = backends.get(opts.type)
        started = backend.start(ctx)
        warnings += started.pop("warnings", [])
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
                call_as(user, layout.write_file, paths.error,
                        (format_message(e, job_id) + "\n").encode())
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


def _shm_in_use(uid: int, shm_dir: str) -> set[str]:
    """Names in shm_dir that a live process of uid has open or mapped."""
    used: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for pid in pids_of(uid):
        for target in fd_targets(pid):
            if target.startswith(prefix):
                used.add(target[len(prefix):].split("/")[0].split(" ")[0])
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at + len(prefix):].split("/")[0].split()[0])
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


def _epilog(env: Mapping[str, str]) -> int:
    if env.get("SPANK_" + options.MARKER) is None:
        return 0
    node = env.get("SLURMD_NODENAME", "?")
    cfg = None
    try:
        job, cfg, paths = _context(env)
        _setup_logging(cfg, job.job_id, node)
        if not os.path.isdir(paths.job_dir):
            log.debug("epilog: nothing to clean")
            return 0
        try:
            user = User.lookup(job.uid, job.gid)
            st = call_as(user, state.read, paths.state)
        except CharlieError as e:
            log.warning("epilog: %s; cleaning without state", e.line())
            user, st = None, None
        if st is None:
            log.warning("epilog: state.json missing or corrupt; removing what "
                        "can be found")
        type_name = (st or {}).get("type") or env.get("SPANK_CHARLIE_TYPE", "none")
        try:
            backend = backends.get(type_name)
        except UserError:
            backend = backends.get("none")
        if user is not None:
            ctx = backends.Context(opts=options.Options(), cfg=cfg, paths=paths,
                                   user=user, job_id=job.job_id, node=node,
                                   guest_id=int((st or {}).get("guest_id", 0)),
                                   nodes=())
            backend.stop(ctx, st)
            if not _user_has_other_jobs(paths.root, job.job_id, user.uid):
                removed = call_as(user, clean_shm_as_user)
                if removed:
                    log.info("removed %d leftover /dev/shm entries of %s",
                             len(removed), user.name)
        layout.remove_job_dir(paths)
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
