"""The one gate for running things: external commands and Python functions,
as root or as the job user.  (Reading /proc is procfs's.)

* run(argv, as_user=…)   logs argv and identity, empty stdin, stderr kept and
                         shown on failure, NodeFault when the program is missing.
* call_as(user, fn, …)   runs fn in a forked child that has dropped to the job
                         user (groups, gid, uid; cannot get root back), and
                         returns its JSON-able result or re-raises its
                         CharlieError in the parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from .errors import CharlieError, NodeFault, UserError
from .log import log
from .procfs import is_stopped, proc_stat


#: where root looks for the system tools it runs itself (ip, bridge, nft,
#: setpriv): never the PATH slurmd passes on
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def system_tool(name: str) -> str | None:
    """Absolute path of a system tool root runs, None if not installed."""
    return shutil.which(name, path=SYSTEM_PATH)


def slurm_conf_keys(name: str, environ=None) -> dict[str, str]:
    """KEY=VALUE lines of Slurm's file `name` (cgroup.conf, mpi.conf) beside
    the slurm.conf slurmd reads ($SLURM_CONF, which slurmd also sets for
    the prolog and epilog); keys lower-cased, comments dropped; {} without
    the file."""
    environ = os.environ if environ is None else environ
    conf = environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    out: dict[str, str] = {}
    try:
        with open(os.path.join(os.path.dirname(conf), name)) as f:
            for line in f:
                key, eq, value = line.split("#", 1)[0].strip().partition("=")
                if eq:
                    out[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return out


def slurm_tool(name: str) -> str:
    """Slurm's command `name` (srun, scontrol, squeue, sinfo): found on the
    PATH slurmd (or the user) passes on, where a site installs Slurm, else
    Debian's place.  The one lookup of Slurm's commands."""
    return shutil.which(name) or f"/usr/bin/{name}"


@dataclasses.dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str

    @classmethod
    def lookup(cls, uid: int, gid: int | None = None) -> "User":
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise NodeFault("user", "uid unknown on this node", uid,
                            hint="the node's passwd/NSS must know every job user") from None
        gid = pw.pw_gid if gid is None else gid
        return cls(uid, gid, tuple(os.getgrouplist(pw.pw_name, gid)),
                   pw.pw_name, pw.pw_dir)

    @classmethod
    def current(cls) -> "User":
        return cls.lookup(os.getuid(), os.getgid())

    def env(self) -> dict[str, str]:
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home,
                "PATH": "/usr/local/bin:/usr/bin:/bin"}

    def __str__(self) -> str:
        return f"{self.name}({self.uid}:{self.gid})"

    def for_guest(self) -> tuple:
        """The user as VM guests recreate it (meta/user): name, uid, gid,
        the group's name, then (gid, name) of every other group."""
        return (self.name, self.uid, self.gid, _group_name(self.gid),
                *((g, _group_name(g)) for g in self.groups if g != self.gid))


def _group_name(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"g{gid}"


def _drop(user: User) -> None:
    """Become user for good (called in a child)."""
    if os.getuid() == user.uid and os.geteuid() == user.uid:
        return
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise NodeFault("privileges", "could not drop root", user)


def _who(as_user: User | None) -> str:
    return str(as_user) if as_user else "root" if os.geteuid() == 0 else str(User.current())


def _not_found(program: str) -> NodeFault:
    return NodeFault(program, "program not found (exit 127)",
                     hint="install it or fix its path in the site config")


def run(argv: Sequence[str], as_user: User | None = None,
        env: Mapping[str, str] | None = None, timeout: float | None = None,
        check: bool = True, cwd: str | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    log.debug("run as %s: %s", _who(as_user), " ".join(argv))
    kwargs: dict[str, Any] = {}
    if as_user is not None and os.geteuid() == 0:
        kwargs = {"user": as_user.uid, "group": as_user.gid,
                  "extra_groups": list(as_user.groups)}
        if env is None:
            env = as_user.env()
    try:
        proc = subprocess.run(list(argv), input=input,
                              stdin=subprocess.DEVNULL if input is None else None,
                              capture_output=True, env=None if env is None else dict(env),
                              timeout=timeout, cwd=cwd, **kwargs)
    except FileNotFoundError:
        raise _not_found(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise NodeFault(argv[0], f"did not finish within {timeout} s",
                        " ".join(argv)) from None
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise NodeFault(argv[0], f"exited with {proc.returncode}",
                        err.splitlines()[-1] if err else None)
    return proc


def run_watched(argv: Sequence[str], timeout: float, tick: Callable[[float], None],
                every: float = 2.0) -> subprocess.CompletedProcess:
    """run(argv, check=False) for a long step, calling tick(seconds so far)
    every `every` seconds while it runs (progress reports).  Output goes
    through files, so a chatty program never blocks on a full pipe."""
    import tempfile
    log.debug("run as %s: %s", _who(None), " ".join(argv))
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)
        except FileNotFoundError:
            raise _not_found(argv[0]) from None
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - start > timeout:
                    proc.kill()
                    proc.wait()
                    raise NodeFault(argv[0], f"did not finish within {timeout} s",
                                    " ".join(argv)) from None
                tick(time.monotonic() - start)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out.read(1 << 20),
                                           err.read(1 << 20))


#: seconds a step as the user may take unless the caller says otherwise
CALL_LIMIT = 120.0
#: the most a step as the user may hand back (JSON bytes)
RESULT_MAX = 16 << 20


class _DropFailed(Exception):
    pass


def run_attached(argv: Sequence[str]) -> int:
    """Run argv with this process's stdin, stdout and stderr (an interactive
    console or ssh session); its exit status."""
    log.debug("run attached: %s", " ".join(argv))
    try:
        return subprocess.call(list(argv))
    except FileNotFoundError:
        raise NodeFault(argv[0], "program not found (exit 127)") from None


#: steps as the user this process has forked (each costs a hook a fork and
#: a drop: the prolog's log names the count, tests hold it to a number)
steps_as_user: list[str] = []


def call_as(user: User, fn: Callable[..., Any], *args: Any,
            limit: float | None = None, **kwargs: Any) -> Any:
    """Run fn(*args, **kwargs) as user in a forked child; return its result.

    The child is the user's: it may be killed or stopped by the user, and the
    data it works on is the user's.  So every way it can fail -- an error it
    reports, an exception, a signal, missing the deadline (`limit` seconds,
    CALL_LIMIT by default), a result too large or not JSON -- comes back as a
    UserError: the job fails, the node stays in service.  Only a failure to
    drop root is a NodeFault.  On the deadline the child's whole process
    group is killed (SIGKILL also ends a stopped process)."""
    if os.geteuid() != 0 or os.getuid() == user.uid:
        return fn(*args, **kwargs)
    limit = CALL_LIMIT if limit is None else limit
    what = getattr(fn, "__name__", "step")
    if len(steps_as_user) < 64:  # a long-lived caller does not grow it forever
        steps_as_user.append(what)
    libc = _libc()  # loaded here, not in the child's window between dropping
    # root and setting its death signal
    rfd, wfd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            os.setsid()  # its own process group: killed whole on the deadline
            try:
                _drop(user)
            except BaseException as e:
                raise _DropFailed(str(e)) from None
            _die_with(parent, libc)
            os.umask(0o077)
            out = {"ok": fn(*args, **kwargs)}
        except _DropFailed as e:
            out = {"drop_failed": str(e)}
        except CharlieError as e:
            out = {"error": e.to_dict()}
        except BaseException as e:  # report, never escape into the caller's code
            out = {"error": UserError(what, f"{type(e).__name__}: {e}",
                                      traceback.format_exc(limit=3)
                                      .strip().splitlines()[-1]).to_dict()}
        try:
            try:
                data = json.dumps(out).encode()
            except TypeError as e:
                data = json.dumps({"error": UserError(
                    what, "result of a step as the user is not JSON", e
                ).to_dict()}).encode()
            while data:
                data = data[os.write(wfd, data):]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    data, status, timed_out = _collect(pid, rfd, limit)
    if timed_out == "stopped":
        raise UserError(what, "a step run as the user was stopped (SIGSTOP)", user,
                        hint="the job fails, the node stays in service")
    if timed_out == "stuck":
        _STUCK.append((pid, user.uid))
        raise UserError(what, f"a step run as the user did not finish within {limit:g} s "
                        "and SIGKILL did not end it", user,
                        hint="it waits on a file system that does not answer (a FUSE "
                        "mount of yours?); root aborts that mount's connection; the job "
                        "fails, the node stays in service")
    if timed_out:
        raise UserError(what, f"a step run as the user did not finish within {limit:g} s",
                        user, hint="a file it reads may block (a FIFO?); the job "
                        "fails, the node stays in service")
    if len(data) > RESULT_MAX:
        raise UserError(what, "a step run as the user returned too much data",
                        f"{len(data)} bytes")
    try:
        out = json.loads(data or b"{}")
    except ValueError:
        out = {}
    if not isinstance(out, dict):
        out = {}
    if "drop_failed" in out:
        raise NodeFault("privileges", "could not become the job user", f"{user}: "
                        f"{out['drop_failed']}")
    if "error" in out and isinstance(out["error"], dict):
        err = CharlieError.from_dict(out["error"])
        if not isinstance(err, UserError):  # the user's side failed
            err = UserError(err.subject, err.problem, err.value, err.hint)
        raise err
    if "ok" not in out:
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        raise UserError(what, "a step run as the user died", how,
                        hint="was it killed? the job fails, the node stays in service")
    return out["ok"]


#: a step as the user whose process group stays stopped this long has failed
STOPPED_GRACE = 2.0


def _group_stopped(pgid: int) -> bool:
    """Some process of the process group pgid is stopped (T/t)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        fields = proc_stat(d)
        if is_stopped(fields) and len(fields) > 2 and fields[2] == str(pgid):
            return True
    return False


#: how long a killed step as the user may take to die before it counts as
#: stuck (see _collect)
REAP_WAIT = 5.0
#: steps as the user that SIGKILL did not end: (pid of root's child, uid)
_STUCK: list[tuple[int, int]] = []


_LIBC: list = []


def _libc():
    """The C library through ctypes (None where it cannot be loaded); once
    per process."""
    if not _LIBC:
        try:
            import ctypes
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (OSError, AttributeError, ImportError):
            _LIBC.append(None)
    return _LIBC[0]


def _die_with(parent: int, libc=None) -> None:
    """In a step as the user, once it is the user's: SIGKILL when root's
    process that forked it dies (the epilog kills a background prolog that
    is still running; a step it had stopped or left waiting would otherwise
    live on with the job's files open).  Set after the privileges are
    dropped, as changing them clears it (kernel: commit_creds)."""
    import signal
    PR_SET_PDEATHSIG = 1
    libc = libc or _libc()
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the setting took
        os._exit(1)


def _reap(pid: int, wait: float) -> bool:
    """Reap root's child pid within wait seconds (True), else leave it."""
    import time
    deadline = time.monotonic() + wait
    while True:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if got or time.monotonic() >= deadline:
            return bool(got)
        time.sleep(0.02)


def stuck_steps() -> list[tuple[int, int]]:
    """(pid, uid) of each step as the user (root's child) that SIGKILL did
    not end, not yet reaped."""
    return list(_STUCK)


def reap_stuck(wait: float) -> list[int]:
    """Reap what stuck_steps() names, waiting up to wait seconds in all;
    the pids still stuck."""
    import time
    deadline = time.monotonic() + wait
    for pid, uid in list(_STUCK):
        if _reap(pid, max(0.0, deadline - time.monotonic())):
            _STUCK.remove((pid, uid))
    return [pid for pid, _ in _STUCK]


def _collect(pid: int, rfd: int, limit: float) -> tuple[bytes, int, bool | str]:
    """Read the child's result until EOF and reap it, within limit seconds.
    Returns (data, wait status, timed out: False, True or "stopped": a
    process of its group stayed stopped for STOPPED_GRACE seconds).
    Grandchildren that keep the pipe open cannot hold us: once the child is
    gone, what is there is read."""
    import select
    import signal
    import time
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + limit
    status = None
    eof = False
    next_check = time.monotonic() + 0.5
    stopped_since: float | None = None
    try:  # readable once the child has exited: no polling after EOF
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            now = time.monotonic()
            left = deadline - now
            if now >= next_check:
                next_check = now + 0.5
                if _group_stopped(pid):
                    stopped_since = stopped_since or now
                else:
                    stopped_since = None
            timed_out: bool | str = left <= 0
            if stopped_since is not None and now - stopped_since >= STOPPED_GRACE:
                timed_out = "stopped"
            if timed_out:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                if not _reap(pid, REAP_WAIT):
                    # SIGKILL does not end it: it waits on a file system that
                    # does not answer (a FUSE server of the user's).  Never
                    # waited for without a bound; the hook aborts the
                    # connection before it ends (stuck_steps)
                    return b"", 0, "stuck"
                return b"", 0, timed_out
            if not eof:
                ready, _, _ = select.select([rfd], [], [], min(left, 0.05))
                if ready:
                    chunk = os.read(rfd, 1 << 16)
                    if not chunk:
                        eof = True
                    else:
                        size += len(chunk)
                        if size <= RESULT_MAX + 1:
                            chunks.append(chunk)
                        continue
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status = st
                break
            if eof:
                if pidfd is not None:
                    select.select([pidfd], [], [], min(max(left, 0), 0.5))
                else:
                    time.sleep(0.01)
        os.set_blocking(rfd, False)
        while True:
            try:
                chunk = os.read(rfd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        if pidfd is not None:
            os.close(pidfd)
    return b"".join(chunks), status, False


__all__ = ["User", "run", "call_as", "UserError", "NodeFault"]
