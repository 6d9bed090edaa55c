"""Undoing a job on a node, shared by the epilog (lifecycle), a prolog that
finds an earlier run of the same job id, and reconcile: stop the background
prolog, stop what root started (by root's record), sweep the user's
leftovers, remove the job's cgroups, network and directory.
"""

from __future__ import annotations

from typing import Any, Callable

from . import asroot, backends, config, layout, options, shm
from .errors import CharlieError, NodeFault
from .log import log
from . import proc
from .proc import User, call_as


def stop_background(cfg: config.Config, node: str, job_id: str) -> list[NodeFault]:
    """End the job's background prolog on this node if it still runs (it
    may be starting things), before root's record is read, and remove its
    lock file: [] or the node fault of a process that does not end."""
    try:
        if asroot.stop_prolog(node, job_id, cfg["timeouts.kill"]):
            log.info("the job's background prolog was still running; stopped it")
        asroot.remove_prolog_lock(node, job_id)
    except OSError as e:
        fault = NodeFault("prolog", str(e), hint="the process is stuck in the kernel "
                          "(D state?): see /proc/PID/stack; the node needs a reboot")
        log.error("epilog: %s", fault.line())
        return [fault]
    return []


def undo(cfg: config.Config, paths: layout.JobPaths,
         rec: asroot.JobRecord | None, node: str,
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
                               job_id=paths.job_id, node=node,
                               guest_id=rec.guest_id if rec else 0, nodes=())
        if rec is not None:
            step(f"stop {rec.type}", lambda: backends.get(rec.type).stop(ctx, rec))
        if rec is None or rec.phase != "started":
            # the prolog died (or could not write its record) half way:
            # also look for the job user's processes that carry this job's marks
            for name in backends.NAMES:
                step(f"sweep {name}", lambda name=name: backends.get(name).stop(ctx, None))
        if rec is not None:
            used = asroot.cgroup_usage(ctx.node, user.uid, paths.job_id)
            if used:
                log.info("in the job's cgroup, %s used %.1f s CPU, peak memory %.1f MiB",
                         "QEMU" if rec.type == "vm" else "the container",
                         used.get("cpu_ns", 0) / 1e9, used.get("memory_peak", 0) / 2 ** 20)
        busy = shm.user_busy_elsewhere(paths.root, paths.job_id, user.uid, ctx.node)
        if busy:
            log.info("/dev/shm left alone: %s", busy)
        else:
            def sweep_shm() -> None:
                removed = call_as(user, shm.clean_as_user, limit=60)
                if removed:
                    log.info("removed %d leftover /dev/shm entries of %s",
                             len(removed), user.name)
            step("/dev/shm", sweep_shm)
        def end_leftovers() -> None:
            # what left the container's session, group and namespaces (a
            # double fork) is still in the cgroup root placed it in
            pids = asroot.kill_in_job_cgroup(ctx.node, user.uid, paths.job_id)
            if pids:
                log.warning("ended %d process(es) of the job that had left its %s but not "
                            "its cgroup: %s", len(pids), rec.type if rec else "container",
                            " ".join(map(str, pids[:20])))
        step("job's processes in its cgroup", end_leftovers)
        step("job cgroup", lambda: asroot.leave_job_cgroup(
            ctx.node, user.uid, paths.job_id))
    if rec is None or rec.type == "vm":
        # devices and filters by the job's name, whatever of them was made
        step("job network", lambda: asroot.remove_job_network(paths.job_id, node))
    step("job directory", lambda: asroot.remove_job_dir(paths))
    return faults


def unstick() -> None:
    """Before the hook ends: a step it ran as the user that SIGKILL did not
    end waits on a FUSE server of the user's that does not answer (the
    step's limit passed, proc.call_as).  Abort that connection so it dies,
    and reap it; the hook never waits for it without a bound."""
    stuck = proc.stuck_steps()
    if not stuck:
        return
    for uid in sorted({u for _, u in stuck}):
        asroot.abort_stalled_fuse(uid, [p for p, u in stuck if u == uid])
    left = proc.reap_stuck(10)
    if left:
        log.error("steps run as the user still do not end after their FUSE connections "
                  "were aborted: %s (left to init)", " ".join(map(str, left)))
