"""What the prolog and epilog do, in order: the orchestration between the
edge (``hooks``: exit codes, draining), the user's work (``asuser``), root's
operations (``asroot``) and the back ends.

Every step is recorded in root's own record before the next one starts
(``Book``), so that ``undo`` -- run by the epilog, by a prolog that finds an
earlier run of the same job id, and by ``reconcile`` -- knows what to stop
after a crash at any point.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

# jobnet and sshkey (socket, hashlib) are VM-only: imported where used, as
# every import here is paid by each prolog and epilog on every node
from . import asroot, backends, cleanup, config, hostlist, jobenv, layout, options, proc
from . import log as logmod
from .errors import NodeFault, UserError
from .proc import User, call_as
from .procfs import process_age

log = logmod.log


@dataclasses.dataclass
class Attempt:
    """What the edge needs to report a failure: filled in as it is known."""
    job_id: str | None
    node: str
    cfg: config.Config | None = None
    user: User | None = None
    paths: layout.JobPaths | None = None
    #: slurmstepd, not slurmd, runs the prolog (PrologFlags=RunInJob)
    in_step: bool = False


class Book:
    """Root's record of the job being prepared, written at every change so
    that an epilog (or reconcile) after a prolog that died half way knows
    what was started."""

    def __init__(self, records: asroot.Records, rec: asroot.JobRecord) -> None:
        self.records, self.rec = records, rec
        records.write(rec)

    def update(self, **changes: Any) -> None:
        self.rec = dataclasses.replace(self.rec, **changes)
        self.records.write(self.rec)

    def add_proc(self, proc: asroot.ProcRecord) -> None:
        """Record (or, for a role already recorded, re-record) a process."""
        self.update(procs=tuple(p for p in self.rec.procs if p.role != proc.role)
                    + (proc,))


#: how this process started, for the "done in" lines: the warm server's
#: children say so (asroot/warm.py)
STARTED = "started cold"

def _context(env: jobenv.Environ, at: Attempt) -> jobenv.JobEnv:
    job = jobenv.from_environ(env)
    at.cfg = config.load(env)
    at.paths = layout.JobPaths(at.cfg.runtime_root(job.node_name), job.job_id)
    return job


def _gpus(env: jobenv.Environ, job: jobenv.JobEnv, cfg: config.Config) -> list:
    """The job's GPUs on this node (gpus.py), logged; [] without GPU gres."""
    if not job.gpus:
        return []
    from . import gpus
    found = gpus.for_prolog(job.gpus, job.node_name,
                            config.expand_node(cfg["gpu.driver_table"], job.node_name),
                            env.get("SLURM_CONF") or "/etc/slurm/slurm.conf",
                            job.cuda_visible)
    for g in found:
        log.info("the job's %s", g.line())
    if found and cfg["gpu.generate"]:
        from . import gpuspec
        gpuspec.ensure(cfg, job.node_name, cfg.runtime_root(job.node_name),
                       env.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    return found


def prolog(env: jobenv.Environ, raw: options.Options | None, early: UserError | None,
           at: Attempt, setup_logging: Callable[[config.Config, str, str], None]) -> None:
    """Prepare the job on this node and start its container or guest.
    Raises NodeFault (the node's fault) or UserError (the job's)."""
    job = _context(env, at)
    cfg, paths = at.cfg, at.paths
    assert cfg is not None and paths is not None
    setup_logging(cfg, job.job_id, job.node_name)
    proc.steps_as_user.clear()  # this prolog's own, for its last log line
    if at.in_step:
        raise NodeFault("PrologFlags", "RunInJob runs the prolog inside the job's "
                        "extern step, whose end kills what it starts before the "
                        "epilog can power guests off and commit", "RunInJob",
                        hint="remove RunInJob from PrologFlags in slurm.conf "
                        "(Alloc,Contain) and restart slurmctld and slurmd")
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
    user = at.user = User.lookup(job.uid, job.gid)
    if user.uid == 0:
        at.user = None
        raise UserError("job user", "charlie jobs do not run as root", user,
                        hint="submit as an ordinary user")
    gpus = _gpus(env, job, cfg)
    records = asroot.Records(paths.root)
    old = records.read(job.job_id)
    if old is not None:  # an earlier prolog of this id: undo it first
        log.warning("prolog: root's record of an earlier run of job %s found; "
                    "cleaning it up first", job.job_id)
        cleanup.undo(cfg, paths, old, job.node_name)
    guest_id = nodes.index(job.node_name)
    book = Book(records, asroot.JobRecord(job_id=job.job_id, uid=user.uid,
                                               gid=user.gid, guest_id=guest_id))
    asroot.create_job_dir(paths, user)
    fd = asroot.open_log_as_root(paths, user.uid)
    ctx = backends.Context(opts=raw or options.Options(), cfg=cfg, paths=paths,
                           user=user, job_id=job.job_id, node=job.node_name,
                           guest_id=guest_id, nodes=nodes, cpus=cpus[guest_id],
                           work_dir=job.work_dir or None, gpus=tuple(gpus),
                           on_spawn=book.add_proc,
                           on_facts=lambda f: book.update(facts={**book.rec.facts, **f}))
    if early is not None:
        raise early
    from . import asuser  # the user's side of the prolog (meta, validate): not the epilog's
    vm_user, ssh = (), None
    if raw is not None and raw.type in ("vm", "auto"):
        from . import sshkey
        vm_user = user.for_guest()
        ssh = sshkey.job_keys(cfg["vm.ssh_secret"], job.job_id, user.uid)
    prepared = call_as(user, asuser.prepare_as_user, ctx, raw, cpus, vm_user, ssh)
    if fd is None:
        fd = asroot.open_log_as_root(paths, user.uid)
    if fd is not None:
        logmod.add_fd(fd, job.job_id)
    warnings = list(prepared["warnings"])
    # what the user's step resolved, checked again as hostile input
    opts = options.from_pairs(prepared["opts"])
    look = prepared.get("look")
    ctx = dataclasses.replace(ctx, opts=opts, look=look if isinstance(look, dict) else None)
    backend = backends.get(opts.type)
    book.update(type=opts.type)
    if ctx.guest_id == 0:  # one line in accounting per job, as checked here
        from . import accounting
        asroot.note_job(job.job_id, accounting.entry(opts))
    started = backend.start(ctx)
    warnings += started.pop("warnings", [])
    notes = started.pop("notes", [])
    user_files = started.pop("user_files", [])
    book.update(phase="started", facts=started)
    for w in warnings:
        log.warning("%s", w)
    notices = [f"slurm-charlie: job {job.job_id}: "
               + (w if w.startswith("hint: ") else f"warning: {w}") for w in warnings]
    notices += [f"slurm-charlie: job {job.job_id}: {n}" for n in notes]
    task_env = [("CH_JOB_ID", job.job_id), ("CH_TYPE", opts.type),
                ("CH_GUEST_ID", str(ctx.guest_id)),
                ("CH_GUEST_COUNT", str(len(nodes))),
                ("CH_JOB_DIR", paths.job_dir)] + backend.task_env(ctx)
    call_as(user, asuser.finish_as_user, ctx, task_env, started, notices, user_files)
    log.info("prolog done: type %s, guest %d of %d; steps as the user: %s", opts.type,
             ctx.guest_id, len(nodes), " ".join(proc.steps_as_user))
    from . import reconcile
    reconcile.from_prolog(cfg, job.node_name)
    log.info("prolog done in %.3f s (this process's life, %s)", process_age() or 0.0, STARTED)


def epilog(env: jobenv.Environ, at: Attempt,
           setup_logging: Callable[[config.Config, str, str], None]) -> list[NodeFault]:
    """Undo the job on this node by root's record; returns the node faults
    met (the edge drains for the first)."""
    job = _context(env, at)
    cfg, paths = at.cfg, at.paths
    assert cfg is not None and paths is not None
    setup_logging(cfg, job.job_id, job.node_name)
    stuck = cleanup.stop_background(cfg, job.node_name, job.job_id)
    if stuck:
        return stuck
    records = asroot.Records(paths.root)
    rec = records.read(job.job_id)
    if rec is None and not os.path.lexists(paths.job_dir):
        log.debug("epilog: nothing to clean")
        return []
    if rec is None:
        log.warning("epilog: no record of what the prolog started; removing "
                    "what can be found")
    try:
        user: User | None = User.lookup(job.uid, job.gid)
    except NodeFault as e:
        log.warning("epilog: %s", e.line())
        user = None
    if rec is not None and user is not None and rec.uid != user.uid:
        user = None  # an earlier job of this id: its own user is used
    faults = cleanup.undo(cfg, paths, rec, job.node_name, user)
    if not faults:
        records.remove(job.job_id)
        log.info("epilog done: job directory removed")
    log.info("epilog done in %.3f s (this process's life, %s)", process_age() or 0.0, STARTED)
    return faults
