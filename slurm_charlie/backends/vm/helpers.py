"""The job user's helper processes next to QEMU: the task multiplexer
(srun tasks reach the guest's agent through it) and the ssh relay (on the
job network).  Started by root as the user, recorded, waited for with
asroot.wait_until_ready, stopped by root's record."""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from ... import asroot, layout
from ...errors import UserError
from ...files import lstat_in_job, read_tail
from ...log import log
from ...proc import call_as
from ...procfs import exe_of, is_zombie, pids_of, starttime
from ..base import Context
from .qemu import TASKS_SOCKET, guest_paths

#: how long a helper may take to come up
HELPER_TIMEOUT = 20


def sweep(ctx: Context, role: str, needles: tuple[bytes, ...]) -> Any:
    """No record (the prolog died before writing it): the job user's live
    process whose command line holds every needle (they name the job), as
    an asroot.ProcRecord; None when there is none."""
    for pid in pids_of(ctx.user.uid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read(1 << 16)
        except OSError:
            continue
        exe = exe_of(pid)
        start = starttime(pid)
        if exe is not None and all(n in cmd for n in needles) and start \
                and not is_zombie(pid):
            return asroot.ProcRecord(role, pid, start, ctx.user.uid, exe)
    return None


def sweep_qemu(ctx: Context) -> Any:
    """No record: the job user's QEMU whose command line names this job and
    its run directory."""
    return sweep(ctx, "qemu", (f"charlie-{ctx.job_id}-chgu".encode(),
                               ctx.paths.run.encode()))


def _helper_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "slurm_charlie.cli", command, *args]


def start_relay(ctx: Context, netns: str, guest_ip: str) -> None:
    """The job user's ssh relay in its namespace on the job network: a
    unix socket in run/ to the guest's sshd.  ssh is a convenience: if
    the relay does not come up the job runs without it (logged)."""
    n = ctx.guest_id
    name = layout.SSH_SOCKET.format(guest=n)
    argv = _helper_argv("ssh-relay", os.path.join(ctx.paths.run, name), guest_ip)
    fd = asroot.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_relay.log")
    if fd is None:
        log.warning("guest %d: no ssh relay (cannot open its log)", n)
        return
    try:
        # in the job's cgroup like QEMU: its limits and accounting cover it
        proc = asroot.spawn_in_netns(ctx.user, netns, argv, fd, "relay",
                                     ctx.spawned_in_job([]))
    finally:
        os.close(fd)
    outcome = asroot.wait_until_ready(
        proc, lambda: lstat_in_job(ctx.paths, "run", name) is not None, HELPER_TIMEOUT)
    if outcome == asroot.READY:
        log.info("guest %d: ssh through %s/%s (relay in %s)", n, ctx.paths.run, name, netns)
        return
    log.warning("guest %d: the ssh relay did not start (%s; see out/%d_relay.log); "
                "slurm-charlie ssh will not reach this guest", n, outcome, n)


def start_mux(ctx: Context) -> None:
    """The node's task multiplexer (as the user): srun tasks reach the
    guest's agent through it.  Without it no step could run, so a
    multiplexer that does not come up fails the job."""
    n, p = ctx.guest_id, guest_paths(ctx)
    argv = _helper_argv("task-mux", p["agent"], p["tasks"], p["agent_status"])
    fd = asroot.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_mux.log")
    if fd is None:
        raise UserError("job directory", "cannot open", f"{ctx.paths.out}/{n}_mux.log",
                        hint="was out/ changed while the job started?")
    try:
        proc, _ = asroot.spawn(ctx.user, argv, fd, "mux", ctx.spawned_in_job([]))
    finally:
        os.close(fd)

    def listening() -> bool:
        # its socket (lstat only: a file or link the user put there is not it)
        st = lstat_in_job(ctx.paths, "run", TASKS_SOCKET)
        return st is not None and stat.S_ISSOCK(st.st_mode)

    outcome = asroot.wait_until_ready(proc, listening, HELPER_TIMEOUT)
    if outcome == asroot.READY:
        log.info("guest %d: srun tasks through %s", n, p["tasks"])
        return
    if outcome == asroot.STOPPED:
        raise UserError(f"guest {n}", "the task multiplexer was stopped (SIGSTOP) "
                        "before it was ready", hint="the job fails, the node stays "
                        "in service")
    log_tail = call_as(ctx.user, read_tail, f"{ctx.paths.out}/{n}_mux.log", 5, limit=30)
    raise UserError(f"guest {n}", "the task multiplexer did not start",
                    log_tail.strip().splitlines()[-1] if log_tail.strip() else None,
                    hint=f"see out/{n}_mux.log in the job directory")


def stop_helper(ctx: Context, record: Any, role: str, command: str) -> None:
    """Stop the user's ssh relay ("relay", ssh-relay) or task multiplexer
    ("mux", task-mux): root's record, or without one the user's process
    whose command line names this job's run directory."""
    proc = record.proc(role) if record is not None else None
    if proc is None:
        proc = sweep(ctx, role, (f"{command}\0{ctx.paths.run}/".encode(),))
    if proc is not None and asroot.alive(proc):
        asroot.stop_process(proc, 2, ctx.cfg["timeouts.kill"])
