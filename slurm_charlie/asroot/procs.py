"""Processes root starts for a job, and how root ends them.

Everything root starts runs as the job user behind a gate (see _GATE) and is
recorded before it runs; root signals a process only through a pidfd, after
checking it is still the one it recorded (pid, start time, owner, program).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Any, Callable, Iterable

from ..errors import NodeFault, UserError
from ..log import log
from ..proc import User, system_tool
from ..procfs import exe_of, is_stopped, is_users, is_zombie, pids_of, proc_stat, starttime
from . import fuse
from .records import ProcRecord

#: the first program of every process root starts for a job, as the job
#: user: it waits until root has recorded it (a line on its standard input,
#: a pipe from root) and ends without running the program when root died
#: first -- so nothing root starts runs unrecorded, whenever root's process
#: is killed.  The program's standard input is /dev/null.
_GATE = 'read -r _ || exit 125; exec "$@" </dev/null'


def _gated(argv: list[str]) -> list[str]:
    return ["/bin/sh", "-c", _GATE, "sh", *argv]


def _start_gated(full: list[str], exe: str, role: str, owner: User,
                 record: Callable[[ProcRecord], None], **popen: Any
                 ) -> tuple[subprocess.Popen, ProcRecord]:
    """Popen(full, **popen) with the gate's pipe as standard input; record
    its record (pid, start time, owner, exe), then open the gate.  When
    recording fails the gate closes and the process ends unrun."""
    gate_r, gate_w = os.pipe()
    try:
        proc = subprocess.Popen(full, stdin=gate_r, start_new_session=True, **popen)
    except BaseException:
        os.close(gate_w)
        raise
    finally:
        os.close(gate_r)
    rec = ProcRecord(role=role, pid=proc.pid, start=starttime(proc.pid) or 0,
                     uid=owner.uid, exe=exe)
    try:
        record(rec)
        os.write(gate_w, b"go\n")
    except BaseException as e:
        # the program never ran.  The gate is root's own child, not yet
        # reaped (the pid is still it): killed, as the user may have
        # stopped it, and waiting for a stopped gate would hang the hook
        os.close(gate_w)
        proc.kill()
        proc.wait()
        if isinstance(e, BrokenPipeError):  # the user killed their gate first
            raise UserError(role, "ended before it could start (killed by its user?)",
                            proc.pid, hint="the job fails, the node stays in "
                            "service") from None
        raise
    os.close(gate_w)
    return proc, rec


def spawn(user: User, argv: list[str], log_fd: int, role: str,
          record: Callable[[ProcRecord], None], cwd: str = "/",
          env: dict[str, str] | None = None, pass_fds: Iterable[int] = ()
          ) -> tuple[subprocess.Popen, ProcRecord]:
    """Start argv as the user (its groups, no way back to root), stdout and
    stderr to log_fd, in a session of its own; record(its record) runs
    before argv does (see _GATE).  Returns it and its record: pid, start
    time, and as program argv[0]'s (the process is /bin/sh until the gate
    opens)."""
    env = env if env is not None else user.env()
    prog = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0], path=env.get("PATH"))
    if prog is None or not os.access(prog, os.X_OK):
        raise NodeFault(argv[0], "program not found",
                        hint="install it or fix its path in the site config")
    return _start_gated(_gated(argv), os.path.realpath(prog), role, user, record,
                        stdout=log_fd, stderr=log_fd, cwd=cwd, env=env, user=user.uid,
                        group=user.gid, extra_groups=list(user.groups),
                        pass_fds=tuple(pass_fds))


def spawn_in_netns(user: User, netns: str, argv: list[str], log_fd: int, role: str,
                   record: Callable[[ProcRecord], None]) -> subprocess.Popen:
    """Start argv as the user inside a network namespace root made: root
    enters it (ip netns exec) and setpriv drops to the user for good (uid,
    gid, the user's groups, no new privileges) before argv runs.  One pid
    throughout (ip, setpriv, the gate, argv[0]); record(its record) runs
    before argv does.  argv[0] must be an absolute path."""
    ip, setpriv = system_tool("ip"), system_tool("setpriv")
    if ip is None or setpriv is None:
        raise NodeFault("ip/setpriv", "program not found",
                        hint="install iproute2 and util-linux")
    groups = ["--groups=" + ",".join(str(g) for g in user.groups)] if user.groups \
        else ["--clear-groups"]
    full = [ip, "netns", "exec", netns, setpriv, f"--reuid={user.uid}",
            f"--regid={user.gid}", *groups, "--no-new-privs", "--", *_gated(argv)]
    return _start_gated(full, os.path.realpath(argv[0]), role, user, record,
                        stdout=log_fd, stderr=log_fd, cwd="/", env=user.env())[0]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as e:  # pidfd_open needs Linux 5.3
        log.debug("pidfd_open(%d): %s", pid, e.strerror)
        return -1


def _send(pid: int, pidfd: int, sig: int) -> None:
    if pidfd >= 0:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        os.kill(pid, sig)


def matches(rec: ProcRecord, same_program: bool = True) -> bool:
    """pid is still the process root recorded (start time, owner and, with
    same_program, program).  Without same_program: a process recorded as
    it started, that has exec'd since (the holder: unshare, sh, ch-run, the
    image's /bin/sh, one pid) -- pid and start time are unique per boot."""
    if not (starttime(rec.pid) == rec.start and is_users(rec.pid, rec.uid)):
        return False
    if not same_program:
        return True
    exe = exe_of(rec.pid)
    return exe is not None and exe.removesuffix(" (deleted)") == rec.exe \
        .removesuffix(" (deleted)")


def signal_process(rec: ProcRecord, sig: int, same_program: bool = True) -> bool:
    """Send sig to the recorded process if it still is that process: opened
    by pidfd first, then checked (see matches), so the pid cannot be reused
    in between.  False when it is gone or is not the process root started."""
    pidfd = _pidfd(rec.pid)
    if pidfd is None:
        return False
    try:
        if not matches(rec, same_program):
            if starttime(rec.pid) is not None and not is_zombie(rec.pid):
                log.warning("pid %d is not the %s root started (start time, owner or "
                            "program differ); not signalled", rec.pid, rec.role)
            return False
        try:
            _send(rec.pid, pidfd, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


class _StoppedFor:
    """Tells when a process has stayed stopped (SIGSTOP, traced) for grace
    seconds: the user can SIGSTOP their own QEMU or holder, and that must
    fail the job at once, not hold the prolog until its timeout."""

    def __init__(self, pid: int, grace: float) -> None:
        self.pid, self.grace, self.since = pid, grace, None

    def expired(self) -> bool:
        if not is_stopped(proc_stat(self.pid)):
            self.since = None
            return False
        now = time.monotonic()
        self.since = self.since or now
        return now - self.since >= self.grace


#: outcomes of wait_until_ready
READY, EXITED, STOPPED, TIMED_OUT = "ready", "exited", "stopped", "timed out"


def wait_until_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float,
                     poll: float = 0.05, also: Callable[[], int | None] | None = None,
                     grace: float = 2.0) -> str:
    """Wait until ready() while proc -- root's own child from spawn(), not
    yet reaped, so its pid is still it -- runs.  The one wait of every
    process root starts for a job (QEMU, the holder, the task multiplexer,
    the ssh relay).  Returns READY; or, with proc killed and reaped:
    EXITED (it ended by itself: proc.returncode), STOPPED (it, or the pid
    also() names, e.g. a FUSE server it started, stayed stopped for grace
    seconds) or TIMED_OUT.  The caller turns an outcome into its message."""
    deadline = time.monotonic() + timeout
    watches = {proc.pid: _StoppedFor(proc.pid, grace)}
    while True:
        if proc.poll() is not None:
            return EXITED
        if ready():
            return READY
        if also is not None and len(watches) == 1:  # looked for until found
            extra = also()
            if extra and extra != proc.pid:
                watches[extra] = _StoppedFor(extra, grace)
        if any(w.expired() for w in watches.values()):
            outcome = STOPPED
        elif time.monotonic() > deadline:
            outcome = TIMED_OUT
        else:
            time.sleep(poll)
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        return outcome


def alive(rec: ProcRecord) -> bool:
    """The recorded process still runs (not gone, not a zombie)."""
    return starttime(rec.pid) == rec.start and not is_zombie(rec.pid)


def stop_process(rec: ProcRecord, grace: float, kill_wait: float,
                 first: int | None = signal.SIGTERM) -> bool:
    """Wait up to grace seconds for the recorded process to end (after
    `first`, when given), then SIGKILL it.  True when it ended; NodeFault
    when it survives SIGKILL for kill_wait seconds (a node fact)."""
    if first is not None:
        signal_process(rec, first)
    deadline = time.monotonic() + grace
    while alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not alive(rec):
        return True
    signal_process(rec, signal.SIGKILL)
    # a process waiting on the user's stalled FUSE server does not die of
    # SIGKILL until its connection is aborted (fuse.py)
    if fuse.wait_or_abort(rec.uid, lambda: [rec.pid] if alive(rec) else [], kill_wait):
        raise NodeFault(rec.role, "process did not die after SIGKILL", rec.pid,
                        hint="look for it in D state (hung I/O)")
    return False


def kill_user_processes(uid: int, select: Callable[[int], bool], kill_wait: float,
                        what: str) -> int:
    """SIGKILL every process of uid that select(pid) picks.  Each is opened
    by pidfd, then checked (owner, select) and signalled through the pidfd.
    Waits kill_wait seconds; NodeFault when any survives.  Returns how many."""
    if uid <= 0:
        raise NodeFault("kill", "refusing to kill processes of uid", uid)
    hit: list[tuple[int, int]] = []
    for pid in pids_of(uid):
        pidfd = _pidfd(pid)
        if pidfd is None:
            continue
        try:
            if not (is_users(pid, uid) and select(pid)):
                continue
            start = starttime(pid)
            try:
                _send(pid, pidfd, signal.SIGKILL)
                hit.append((pid, start or 0))
            except ProcessLookupError:
                pass
        finally:
            if pidfd >= 0:
                os.close(pidfd)
    left = fuse.wait_or_abort(uid, lambda: [p for p, s in hit if starttime(p) == s
                                            and not is_zombie(p)], kill_wait)
    if left:
        raise NodeFault(what, "processes did not die after SIGKILL",
                        " ".join(map(str, left)),
                        hint="look for processes in D state (hung I/O)")
    return len(hit)
