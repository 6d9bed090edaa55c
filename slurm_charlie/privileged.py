"""Everything root does for a job, in one place.

Like OpenSSH's privilege-separation monitor, this module is the fixed set of
operations the hooks perform as root; everything else (parsing user data,
reading user paths, templating) runs as the job user through proc.call_as.
A reviewer finds every root action on a job here:

    Records(root)                 root's own record of a job, kept in
                                  <runtime_root>/.root/ (root, 0700): what
                                  root started and what it must undo.  The
                                  epilog acts on this record only; files in
                                  the user-owned job directory are hints.
    create_job_dir(paths, user)   <runtime_root>/<job>, owned by the user, 0700
    remove_tree(parent, name)     iterative removal, no link followed, nothing
                                  opened that can block, no recursion limit
    spawn(user, argv, log_fd)     start a program as the user, recorded
    signal_process(rec, sig)      signal a recorded process through a pidfd,
                                  only if it is still the job user's process
                                  with the recorded start time and program
    kill_user_processes(uid, fn)  SIGKILL the user's processes fn selects,
                                  each identified by pidfd before it is hit
    drain(node, err)              scontrol update State=DRAIN

Inputs are typed and checked here (job ids are digits, uids are ints,
records are schema-checked); no path handed in is followed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from typing import Any, Callable, Iterable

from . import layout
from .config import check_root_safe
from .errors import CharlieError, NodeFault, UserError
from .proc import (User, is_stopped, is_zombie, log, pids_of, proc_stat, run,
                   starttime, system_tool)

RECORD_DIR = ".root"
RECORD_VERSION = 1
RECORD_MAX = 1 << 20


# --- root's records -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcRecord:
    """A process root started: identified by more than its pid."""
    role: str           # "qemu", "holder"
    pid: int
    start: int          # /proc/PID/stat field 22 (clock ticks since boot)
    uid: int
    exe: str            # /proc/PID/exe when started
    mntns: int = 0      # container holder: its mount namespace inode

    @classmethod
    def from_dict(cls, d: Any) -> "ProcRecord":
        if not isinstance(d, dict):
            raise ValueError("process record is not an object")
        out = cls(role=_typed(d, "role", str), pid=_typed(d, "pid", int),
                  start=_typed(d, "start", int), uid=_typed(d, "uid", int),
                  exe=_typed(d, "exe", str), mntns=_typed(d, "mntns", int, 0))
        if out.pid <= 1 or out.start <= 0 or out.uid <= 0:
            raise ValueError("process record out of range")
        return out


@dataclasses.dataclass(frozen=True)
class JobRecord:
    job_id: str
    uid: int
    gid: int
    type: str = "none"          # container | vm | none (resolved by root)
    guest_id: int = 0
    phase: str = "preparing"    # preparing | started
    procs: tuple[ProcRecord, ...] = ()
    facts: dict = dataclasses.field(default_factory=dict)  # back end's own

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["version"] = RECORD_VERSION
        return json.dumps(d, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "JobRecord":
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("version") != RECORD_VERSION:
            raise ValueError("not a version-1 record")
        procs = d.get("procs", [])
        facts = d.get("facts", {})
        if not isinstance(procs, list) or not isinstance(facts, dict):
            raise ValueError("bad record")
        rec = cls(job_id=_typed(d, "job_id", str), uid=_typed(d, "uid", int),
                  gid=_typed(d, "gid", int), type=_typed(d, "type", str, "none"),
                  guest_id=_typed(d, "guest_id", int, 0),
                  phase=_typed(d, "phase", str, "preparing"),
                  procs=tuple(ProcRecord.from_dict(p) for p in procs), facts=facts)
        layout.check_job_id(rec.job_id)
        return rec

    def proc(self, role: str) -> ProcRecord | None:
        return next((p for p in self.procs if p.role == role), None)


def _typed(d: dict, key: str, kind: type, default: Any = ...) -> Any:
    value = d.get(key, default)
    if value is ... or type(value) is not kind:  # bool is not int here
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


class Records:
    """<runtime_root>/.root/<job>.json, written and read by root only."""

    def __init__(self, runtime_root: str) -> None:
        self.root = runtime_root

    def _dirfd(self, create: bool) -> int | None:
        if create:
            rootfd = layout._open_root(self.root)
        else:
            check_root_safe(self.root)
            try:
                rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise NodeFault("runtime_root", f"cannot open: {e.strerror}",
                                self.root) from None
        try:
            if create:
                try:
                    os.mkdir(RECORD_DIR, 0o700, dir_fd=rootfd)
                except FileExistsError:
                    pass
            try:
                fd = os.open(RECORD_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=rootfd)
            except FileNotFoundError:
                return None
        finally:
            os.close(rootfd)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            if create:
                os.fchown(fd, os.geteuid(), os.getegid())
                os.fchmod(fd, 0o700)
            else:
                os.close(fd)
                raise NodeFault("runtime_root", f"{RECORD_DIR} is not root's and 0700",
                                os.path.join(self.root, RECORD_DIR),
                                hint="remove it; slurm-charlie recreates it")
        return fd

    def write(self, rec: JobRecord) -> None:
        layout.check_job_id(rec.job_id)
        fd = self._dirfd(create=True)
        assert fd is not None
        name = f"{rec.job_id}.json"
        try:  # no fsync: after a crash a torn record reads as none, and
            # reconcile then goes by the job directory's owner
            layout.write_file(name, rec.to_json(), 0o600, dir_fd=fd)
        except OSError as e:
            where = os.path.join(self.root, RECORD_DIR, name)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a job can fill it
                raise UserError("runtime_root", "full: the job cannot be set up on "
                                "this node", where, hint="tell the site's admins "
                                "(slurm-charlie doctor shows the free space)") from None
            raise NodeFault("runtime_root", f"cannot write root's job record: {e.strerror}",
                            where) from None
        finally:
            os.close(fd)

    def read(self, job_id: str) -> JobRecord | None:
        """The record, or None when there is none.  A record that does not
        parse is reported and treated as none (root wrote it; only a crash
        mid-write or a disk fault gets here)."""
        layout.check_job_id(job_id)
        fd = self._dirfd(create=False)
        if fd is None:
            return None
        try:
            data = layout.read_bytes(f"{job_id}.json", RECORD_MAX, dir_fd=fd)
        finally:
            os.close(fd)
        if data is None:
            return None
        try:
            rec = JobRecord.from_json(data)
        except (ValueError, TypeError) as e:
            log.warning("root's record of job %s is unreadable (%s); ignored", job_id, e)
            return None
        return rec if rec.job_id == job_id else None

    def remove(self, job_id: str) -> None:
        layout.check_job_id(job_id)
        fd = self._dirfd(create=False)
        if fd is None:
            return
        try:
            os.unlink(f"{job_id}.json", dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def job_ids(self) -> list[str]:
        fd = self._dirfd(create=False)
        if fd is None:
            return []
        try:
            return sorted((n[:-5] for n in os.listdir(fd)
                           if n.endswith(".json") and n[:-5].isascii()
                           and n[:-5].isdigit()), key=int)
        finally:
            os.close(fd)


# --- the job directory ---------------------------------------------------------

def create_job_dir(paths: layout.JobPaths, user: User) -> None:
    """<runtime_root>/<job>, owned by the user, 0700, always new: whatever a
    job of the same id left there is removed first (a reused id inherits
    nothing)."""
    layout.check_job_id(paths.job_id)
    rootfd = layout._open_root(paths.root)
    try:
        remove_tree(rootfd, paths.job_id)
    finally:
        os.close(rootfd)
    layout.create_job_dir(paths, user.uid, user.gid)


def remove_job_dir(paths: layout.JobPaths) -> bool:
    """Remove the job directory; True when something was there."""
    layout.check_job_id(paths.job_id)
    try:
        rootfd = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise NodeFault("runtime_root", f"cannot open: {e.strerror}", paths.root) from None
    try:
        return remove_tree(rootfd, paths.job_id)
    finally:
        os.close(rootfd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: directory fds held at once while removing; deeper levels are reopened
MAX_HELD = 64


def remove_tree(parent_fd: int, name: str) -> bool:
    """Remove parent_fd/name and everything below it, iteratively.

    Never follows a symbolic link (entries are unlinked, directories opened
    with O_NOFOLLOW|O_DIRECTORY relative to their parent's fd), opens nothing
    but directories (so a FIFO cannot block it), and needs neither recursion
    nor one fd per level: at most MAX_HELD directory fds are held, and a
    level whose fd was let go is reopened from its parent by name and checked
    by (device, inode).  If someone changes the tree under it, it starts
    again from the top.  True when something was removed; NodeFault when the
    tree cannot be removed (a mount inside, EBUSY, a disk error)."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return True
    for _attempt in range(100):
        try:
            if _remove_tree_once(parent_fd, name):
                return True
        except FileNotFoundError:
            pass
        try:
            os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return True
    raise NodeFault("job directory", "cannot remove: it keeps changing under removal",
                    name, hint="a process outside the job writes into it; stop it")


def _remove_tree_once(parent_fd: int, name: str) -> bool:
    # stack entries: [name in parent, fd or -1, (dev, ino)]
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    st = os.fstat(top)
    stack: list[list[Any]] = [[name, top, (st.st_dev, st.st_ino)]]
    try:
        while stack:
            fd = _level_fd(parent_fd, stack)
            if fd is None:
                return False  # changed under us: start again
            child = None
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                child = entry.name
                                break
                            os.unlink(entry.name, dir_fd=fd)
                        except (FileNotFoundError, IsADirectoryError):
                            continue
            except OSError as e:
                raise NodeFault("job directory", f"cannot list: {e.strerror}",
                                "/".join(s[0] for s in stack)) from None
            if child is not None:
                try:
                    cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped
                        continue
                    raise
                cst = os.fstat(cfd)
                stack.append([child, cfd, (cst.st_dev, cst.st_ino)])
                if len(stack) > MAX_HELD:  # let go of a level; reopened later
                    held = stack[-MAX_HELD - 1]
                    if held[1] >= 0 and len(stack) - MAX_HELD - 1 > 0:
                        os.close(held[1])
                        held[1] = -1
                continue
            # empty: remove it from its parent
            done = stack.pop()
            os.close(done[1])
            if stack:
                pfd = _level_fd(parent_fd, stack)
                if pfd is None:
                    return False
                try:
                    os.rmdir(done[0], dir_fd=pfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY:  # something was added; again
                        continue
                    raise NodeFault("job directory", f"cannot remove: {e.strerror}",
                                    done[0], hint="look for mounts below it and "
                                    "processes using it (fuser -vm)") from None
            else:
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY:
                        return False
                    if e.errno != errno.ENOENT:
                        raise NodeFault("job directory", f"cannot remove: {e.strerror}",
                                        name, hint="look for mounts below it and "
                                        "processes using it (fuser -vm)") from None
                return True
        return True
    finally:
        for entry in stack:
            if entry[1] >= 0:
                os.close(entry[1])


def _level_fd(parent_fd: int, stack: list[list[Any]]) -> int | None:
    """The fd of the deepest level, reopening let-go levels top-down from
    the nearest held one; None when a level is no longer what it was."""
    if stack[-1][1] >= 0:
        return stack[-1][1]
    i = len(stack) - 1
    while stack[i][1] < 0:
        i -= 1
    for j in range(i + 1, len(stack)):
        try:
            fd = os.open(stack[j][0], _DIR_FLAGS, dir_fd=stack[j - 1][1])
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != stack[j][2]:
            os.close(fd)
            return None
        stack[j][1] = fd
    # keep at most MAX_HELD open: let go of the levels above the window again
    for j in range(1, max(1, len(stack) - MAX_HELD)):
        if stack[j][1] >= 0:
            os.close(stack[j][1])
            stack[j][1] = -1
    return stack[-1][1]


# --- processes -----------------------------------------------------------------

def _status_uids(pid: int) -> tuple[int, ...] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return tuple(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _is_users(pid: int, uid: int) -> bool:
    """Every uid of pid (real, effective, saved, fs) is the job user's: a
    setuid program the user started is not the user's to have killed."""
    uids = _status_uids(pid)
    return bool(uids) and all(u == uid for u in uids)


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
    except BaseException:
        os.close(gate_w)
        proc.wait()
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
    if not (starttime(rec.pid) == rec.start and _is_users(rec.pid, rec.uid)):
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


class StopWatch:
    """Tells when a process root waits for has stayed stopped too long: the
    user can SIGSTOP their own QEMU or holder; that must fail the job at
    once, not hold the prolog until its boot timeout."""

    def __init__(self, pid: int, grace: float = 2.0) -> None:
        self.pid, self.grace, self.since = pid, grace, None

    def expired(self) -> bool:
        if not is_stopped(proc_stat(self.pid)):
            self.since = None
            return False
        now = time.monotonic()
        self.since = self.since or now
        return now - self.since >= self.grace


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
    deadline = time.monotonic() + kill_wait
    while alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(rec):
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
            if not (_is_users(pid, uid) and select(pid)):
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
    deadline = time.monotonic() + kill_wait
    left = hit
    while left and time.monotonic() < deadline:
        left = [(p, s) for p, s in left if starttime(p) == s and not is_zombie(p)]
        time.sleep(0.02)
    if left:
        raise NodeFault(what, "processes did not die after SIGKILL",
                        " ".join(str(p) for p, _ in left),
                        hint="look for processes in D state (hung I/O)")
    return len(hit)


# --- the node -------------------------------------------------------------------

def drain(node: str, err: CharlieError) -> None:
    """Take the node out of service with a reason that says what to fix."""
    reason = f"slurm-charlie: {err.line()}"[:200]
    scontrol = shutil.which("scontrol") or "/usr/bin/scontrol"
    try:
        run([scontrol, "update", f"NodeName={node}", "State=DRAIN",
             f"Reason={reason}"], timeout=30)
    except CharlieError as e:
        log.error("could not drain %s: %s", node, e.line())


# --- the job's cgroup ---------------------------------------------------------------

CGROUP_FS = "/sys/fs/cgroup"
#: cgroup v1 controllers Slurm's job tree lives in and that QEMU/the holder
#: join: memory (the job's limit, usage) and cpuacct (CPU time)
CGROUP_CONTROLLERS = ("memory", "cpuacct")
#: where QEMU/the holder sit inside the job's cgroup: the extern step's task
#: cgroup (task_<node index>), made before Slurm's extern step exists.  With
#: PrologFlags=Contain slurmstepd adopts the directories for the extern step
#: and jobacct_gather/cgroup reports their totals as ``J.extern`` (sstat,
#: sacct); Slurm's signals reach only its freezer cgroup, so QEMU is still
#: powered off by the epilog.  Without Contain they are plain directories.
CGROUP_STEP = "step_extern"


def _leaf(job_cg: str, index: int) -> str:
    return os.path.join(job_cg, CGROUP_STEP, f"task_{int(index)}")


def _slurm_cgroup_root(controller: str, node: str) -> str | None:
    """Slurm's cgroup v1 root for this node: slurm_<node> (a build for
    several slurmd per host, as the sandbox) or slurm; None when Slurm
    keeps no cgroups there."""
    for name in (f"slurm_{node}", "slurm"):
        path = os.path.join(CGROUP_FS, controller, name)
        if os.path.isdir(path):
            return path
    return None


def job_cgroups(node: str, uid: int, job_id: str) -> list[str]:
    """The job's cgroup directories (<ctrl>/<slurm root>/uid_U/job_J) of the
    controllers Slurm uses here; [] without Slurm cgroups (v1)."""
    layout.check_job_id(job_id)
    out = []
    for ctrl in CGROUP_CONTROLLERS:
        root = _slurm_cgroup_root(ctrl, node)
        if root is not None:
            out.append(os.path.join(root, f"uid_{int(uid)}", f"job_{job_id}"))
    return out


def _locked(root: str) -> int:
    import fcntl
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # Slurm locks its cgroup root the same way
    return fd


def join_job_cgroup(node: str, rec: ProcRecord, job_id: str, index: int,
                    memory_limit_mib: int | None = None) -> list[str]:
    """Move the recorded process into <job cgroup>/step_extern/task_<index>
    (index: the node's place in the job, Slurm's node id) in every controller
    Slurm uses (the directories are made before the extern step exists;
    Slurm adopts them).  With memory_limit_mib, the job's memory limit
    is set as Slurm sets it, so that it holds before the first step too.
    Returns the cgroups joined; [] where Slurm uses no cgroups."""
    joined = []
    for job_cg in job_cgroups(node, rec.uid, job_id):
        root = os.path.dirname(os.path.dirname(job_cg))
        lock = _locked(root)
        try:
            leaf = _leaf(job_cg, index)
            os.makedirs(leaf, exist_ok=True)
            if memory_limit_mib and "/memory/" in job_cg:
                with open(os.path.join(job_cg, "memory.limit_in_bytes"), "w") as f:
                    f.write(str(memory_limit_mib << 20))
            pidfd = _pidfd(rec.pid)
            # just spawned, it may still be the gate (/bin/sh): pid, start, owner
            if pidfd is None or not matches(rec, same_program=False):
                raise UserError(rec.role, "ended before it could join the job's "
                                "cgroup", rec.pid)
            try:
                with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                    f.write(str(rec.pid))
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
            joined.append(leaf)
        except OSError as e:
            if e.errno == errno.ESRCH:  # it ended (or was killed) meanwhile
                raise UserError(rec.role, "ended before it could join the job's "
                                "cgroup", rec.pid) from None
            raise NodeFault("cgroup", f"cannot place the {rec.role} in the job's cgroup: "
                            f"{e.strerror}", job_cg, hint="check Slurm's cgroup setup "
                            "(slurm-charlie doctor)") from None
        finally:
            os.close(lock)
    return joined


def stale_job_cgroups(node: str, running: set[str]) -> list[tuple[int, str]]:
    """(uid, job id) of every <job cgroup>/step_extern of a job not in running."""
    found = set()
    for ctrl in CGROUP_CONTROLLERS:
        root = _slurm_cgroup_root(ctrl, node)
        if root is None:
            continue
        for u in os.listdir(root):
            if not u.startswith("uid_") or not u[4:].isdigit():
                continue
            try:
                jobs = os.listdir(os.path.join(root, u))
            except OSError:
                continue
            for j in jobs:
                jid = j[4:]
                if (j.startswith("job_") and jid.isascii() and jid.isdigit()
                        and jid not in running
                        and os.path.isdir(os.path.join(root, u, j, CGROUP_STEP))):
                    found.add((int(u[4:]), jid))
    return sorted(found)


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def cgroup_usage(node: str, uid: int, job_id: str) -> dict[str, int]:
    """CPU time (ns) and peak memory (bytes) of the job's extern step cgroup,
    where slurm-charlie placed QEMU or the holder."""
    out = {}
    for job_cg in job_cgroups(node, uid, job_id):
        leaf = os.path.join(job_cg, CGROUP_STEP)
        for key, name in (("cpu_ns", "cpuacct.usage"),
                          ("memory_peak", "memory.max_usage_in_bytes")):
            try:
                with open(os.path.join(leaf, name)) as f:
                    out[key] = int(f.read().strip())
            except (OSError, ValueError):
                continue
    return out


def leave_job_cgroup(node: str, uid: int, job_id: str) -> None:
    """Remove <job cgroup>/step_extern (its task_* first) once its processes
    are gone, then the job's (and the user's) cgroup when empty: Slurm could
    not remove them while ours were inside.  An rmdir that finds a cgroup
    still in use (another job of the user, a step) just leaves it."""
    for job_cg in job_cgroups(node, uid, job_id):
        root = os.path.dirname(os.path.dirname(job_cg))
        lock = _locked(root)
        try:
            step = os.path.join(job_cg, CGROUP_STEP)
            try:
                tasks = [os.path.join(step, t) for t in os.listdir(step)
                         if t.startswith("task_") and t[5:].isascii() and t[5:].isdigit()]
            except OSError:
                tasks = []
            deadline = time.monotonic() + 5  # killed processes take a moment to go
            for leaf in (*tasks, step):
                while os.path.isdir(leaf) and time.monotonic() < deadline:
                    try:
                        os.rmdir(leaf)
                    except OSError:
                        time.sleep(0.05)
            for path in (*tasks, step, job_cg, os.path.dirname(job_cg)):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno == errno.EBUSY and (path == step or path in tasks):
                        live = [p for p in _cgroup_pids(path) if not is_zombie(p)]
                        if live:
                            raise NodeFault("cgroup", "processes left in the job's "
                                            "cgroup", f"{path}: {live}",
                                            hint="look for processes in D state") from None
                        # only zombies nobody reaped yet: reconcile removes it later
                        log.info("%s: held by exited processes not reaped yet; "
                                 "left for reconcile", path)
                    break
        finally:
            os.close(lock)
