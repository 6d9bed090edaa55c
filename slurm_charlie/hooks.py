"""Prolog and epilog entry points: the only place their exit codes are chosen.

Prolog (root, every allocated node, PrologFlags=Alloc):
    exit 0  not a charlie job; or job prepared; or a user error -- then the
            message is in run/error and the shim fails every task with it, so
            the job fails and the node stays in service
    exit 1  node fault: the node is drained with a reason that says what to fix
    Normally this runs in the process ``background`` forks once the hook has
    returned: there the exit code is no one's, so a node fault drains the
    node here and is also left in run/error for the job's tasks.
Epilog (root, every node): stops a background prolog still running, then
undoes the prolog by root's own record; safe to run twice, after a half-done
prolog and with the record missing.

What the hooks do, step by step, is in ``lifecycle``; this module only turns
its outcome (or a bug in it) into an exit code, a drain or a job error.
"""

from __future__ import annotations

from . import asroot, cleanup, config, jobenv, lifecycle, options
from . import log as logmod
from .errors import CharlieError, NodeFault, UserError, format_message
from .proc import call_as

log = logmod.log
drain = asroot.drain


def _setup_logging(cfg: config.Config | None, job_id: str | None, node: str) -> None:
    node_log = None
    if cfg is not None and cfg["log_file"]:
        node_log = config.expand_node(cfg["log_file"], node)
    logmod.setup(cfg["log_level"] if cfg else "info", job_id, stderr=True,
                 syslog=cfg["syslog"] if cfg else True, node_log=node_log)


def _unexpected(e: BaseException) -> NodeFault:
    import traceback
    log.error("internal error:\n%s", traceback.format_exc())
    return NodeFault("internal error", f"{type(e).__name__}: {e}",
                     hint="report this with the node's slurm-charlie log")


def _node_fault(at: lifecycle.Attempt, e: NodeFault) -> int:
    if at.cfg is None:
        _setup_logging(None, at.job_id, at.node)
    log.error("%s", e.line())
    if e.hint:
        log.error("hint: %s", e.hint)
    drain(at.node, e)
    return 1


def _record_for_job(at: lifecycle.Attempt, e: CharlieError, job_id: str | None) -> None:
    """Leave e in run/error: the shim fails every task of the job with it."""
    if at.user is not None and at.paths is not None:
        from .asuser import record_error  # the user's side: not for every epilog
        try:
            call_as(at.user, record_error, at.paths.error,
                    format_message(e, job_id) + "\n", limit=30)
        except CharlieError as e2:
            log.error("cannot record the error for the job: %s", e2.line())


def _drained_for_job(e: CharlieError, node: str) -> NodeFault:
    """A node fault as the job's tasks see it when the prolog ran in the
    background (its exit code no longer decides anything)."""
    return NodeFault(e.subject, e.problem, e.value,
                     hint=f"node {node} is drained for this; the job cannot run there"
                     + (f" ({e.hint})" if e.hint else ""))


def prolog_main(env: jobenv.Environ, background: bool = False,
                foreground_why: str | None = None, in_step: bool = False) -> int:
    """The prolog; with background, in the process ``background`` forked
    after the hook returned: a node fault then drains the node itself and
    fails the job with the fault in every task's stderr.  foreground_why:
    why it could not go to the background (logged).  in_step: slurmstepd, not
    slurmd, runs the prolog (PrologFlags=RunInJob): refused, a node fault."""
    job_id, node = jobenv.ids(env)
    at: lifecycle.Attempt | None = None
    try:
        try:
            raw, early = options.from_env(env), None
        except UserError as e:
            raw, early = None, e
        if raw is None and early is None:
            return 0  # not a charlie job
        at = lifecycle.Attempt(job_id, node)
        try:
            at.in_step = in_step
            lifecycle.prolog(env, raw, early, at, _setup_logging)
            if foreground_why:
                log.warning("prolog: the node was prepared in the prolog itself "
                            "(Slurm waited for it): %s", foreground_why)
            return 0
        except NodeFault as e:
            code = _node_fault(at, e)
            if background:
                _record_for_job(at, _drained_for_job(e, node), job_id)
            return code
        except UserError as e:
            if at.cfg is None:
                _setup_logging(None, job_id, node)
            log.error("%s (job fails, node stays in service)", e.line())
            _record_for_job(at, e, job_id)
            return 0
    except Exception as e:  # a bug in root's code must not look like success
        _setup_logging(None, job_id, node)
        fault = _unexpected(e)
        drain(node, fault)
        if background and at is not None:
            _record_for_job(at, _drained_for_job(fault, node), job_id)
        return 1
    finally:
        cleanup.unstick()


def epilog_main(env: jobenv.Environ) -> int:
    job_id, node = jobenv.ids(env)
    try:
        if env.get("SPANK_" + options.MARKER) is None:
            return 0  # not a charlie job
        at = lifecycle.Attempt(job_id, node)
        try:
            faults = lifecycle.epilog(env, at, _setup_logging)
        except NodeFault as e:
            return _node_fault(at, e)
        except UserError as e:
            log.error("epilog: %s", e.line())
            return 0
        if faults:
            drain(node, faults[0])
            return 1
        return 0
    except Exception as e:
        _setup_logging(None, job_id, node)
        drain(node, _unexpected(e))
        return 1
    finally:
        cleanup.unstick()

