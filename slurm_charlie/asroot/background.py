"""The prolog in the background: the hook returns at once, the node is
prepared by a process of its own, and the job's tasks wait for it.

Why: ``srun`` polls for a prolog still running at 0.1 s, then 0.3 s, 0.6 s
... after the allocation (``_wait_nodes_ready``), so a prolog that takes
0.12 s costs a job 0.3 s.  A hook that returns in a few milliseconds is
seen at the first or second poll, and the preparation runs while Slurm
launches the step.

How, in order:

1. The prolog hook (root, ``prolog_hook.main``) imports nothing but ``os``:
   it makes ``SETUP_DIR/<node>/<job>`` (root's directory, 0755; the file
   0644) and takes an exclusive ``flock`` on it.
2. It forks.  The child starts a session of its own (Slurm kills the
   prolog's process group), points its standard streams at /dev/null
   (Slurm reads the prolog's output until it is closed) and waits.
3. The hook writes "PID STARTTIME" of the child into the file, lets the
   child go, and exits 0.  The child holds the lock (the same open file)
   until it ends, however it ends, and runs the whole prolog
   (``hooks.prolog_main`` with background=True).
4. The shim's task_init waits while the lock is held and neither
   run/task.env nor run/error exists (``spank/charlie.c``: wait_for_setup).
5. The epilog, a later prolog of the same job id, and reconcile ``stop``
   a child still running (by pid, start time and owner, through a pidfd)
   before they look at root's record; the epilog then removes the file.

The file sits in a directory only root writes, so root trusts what it
reads there; the user's shim only reads it and tries a shared lock.
Without the directory (read-only /run, ...) the hook prepares the node
itself, and Slurm waits for it as for any prolog.
"""

from __future__ import annotations

import os

#: root's directory of the lock files: <SETUP_DIR>/<node>/<job id>
#: (spank/charlie_options.h: CHARLIE_SETUP_DIR)
SETUP_DIR = "/run/slurm-charlie"


def path(node: str, job_id: str, base: str = SETUP_DIR) -> str:
    return os.path.join(base, node, job_id)


def _safe_name(s: str | None) -> bool:
    return bool(s) and len(s) < 256 and s not in (".", "..", "?") and "/" not in s \
        and "\0" not in s


def _root_dir(p: str) -> None:
    """mkdir p (0755) unless it is there; either way it must be a real
    directory (not a link) of root's that no one else can write."""
    try:
        os.mkdir(p, 0o755)
        os.chmod(p, 0o755)  # whatever slurmd's umask: the shim reads in it
    except FileExistsError:
        pass
    why = _not_roots(p)
    if why:
        raise OSError(why)


def _not_roots(p: str) -> str | None:
    """What is wrong with p as a lock directory; None when it is fine."""
    import stat
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 \
            or st.st_mode & 0o555 != 0o555:
        return f"{p} is not root's directory (mode 0755)"
    return None


def unusable(node: str, base: str = SETUP_DIR) -> str | None:
    """Why the prolog could not go to the background on this node (doctor);
    None when it can, or will make the directories itself."""
    for p in (base, os.path.join(base, node)):
        try:
            why = _not_roots(p)
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"{p}: {e.strerror}"
        if why:
            return why
    return None


# _not_roots, _proc_start and _is_it are small twins of config.check_root_safe,
# procfs.proc_stat and procfs.is_users on purpose: those modules import
# dataclasses, subprocess and json (~25 ms), which the hook must not pay
# before it forks (tests/unit/test_house.py checks what it loads).


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time) of pid from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _read(fd: int) -> tuple[int, int] | None:
    try:
        pid, start = os.pread(fd, 64, 0).split()[:2]
        return int(pid), int(start)
    except ValueError:
        return None


def stop(node: str, job_id: str, timeout: float, base: str = SETUP_DIR) -> bool:
    """Kill the background prolog of the job on this node if it still runs
    (by pid, start time and owner root, through a pidfd) and wait until it
    has ended, so that it starts or records nothing more.  True when it was
    still running.  OSError when it does not end within timeout (stuck in
    the kernel)."""
    if not (_safe_name(node) and job_id.isdigit()):
        return False
    try:
        fd = os.open(path(node, job_id, base), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return _stop(fd, timeout)
    finally:
        os.close(fd)


def _stop(fd: int, timeout: float) -> bool:
    import fcntl
    try:  # free: nobody holds it, nothing to stop
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        pass
    rec = _read(fd)
    if rec is None or rec[0] <= 1 or rec[0] == os.getpid():
        return False
    pid, start = rec
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds (Linux < 5.3): checked kill() and /proc polls
        pidfd = -1
    try:
        if not _is_it(pid, start):
            return False  # ended (the pid may be another process's now)
        import signal
        try:
            # frozen first, so that it starts nothing more while its children
            # are looked up; SIGKILL ends a stopped process as well
            _signal(pid, pidfd, signal.SIGSTOP)
            steps = _children(pid)
            _signal(pid, pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        _end_steps(steps)
        import select
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pidfd >= 0:
                if select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    return True  # ended (a zombie no one reaps counts)
            elif not _is_it(pid, start):
                return True
            else:
                time.sleep(0.01)
        raise OSError(f"the background prolog (pid {pid}) does not end after "
                      f"SIGKILL within {timeout:g} s")
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _signal(pid: int, pidfd: int, sig: int) -> None:
    import signal
    if pidfd >= 0:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        os.kill(pid, sig)


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _children(pid: int) -> list[tuple[int, int, int]]:
    """(pid, start time, pidfd or -1) of pid's forked children that run no
    other program (its command line): its steps as the user and spawns
    not yet started.  What it started (the holder, QEMU) is left to the
    epilog's undo, which ends it the way it must (a guest is powered off
    before its disk is committed)."""
    out: list[tuple[int, int, int]] = []
    mine = _cmdline(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            st = _proc_start(kid)
            if st is None or mine is None or _cmdline(kid) != mine:
                continue
            try:
                fd = os.pidfd_open(kid)
            except OSError:
                fd = -1
            out.append((kid, st[1], fd))
    return out


def _end_steps(steps: list[tuple[int, int, int]]) -> None:
    """SIGKILL the background prolog's steps as the user, each with its
    process group when it leads one (proc.call_as starts a session): a
    step sets its death signal only after dropping root, so one the user
    stopped in between would outlive the prolog.  Checked by start time
    (and pidfd) that each is still the process seen before the prolog
    died."""
    import signal
    for kid, start, fd in steps:
        try:
            now = _proc_start(kid)
            if now is None or now[1] != start or now[0] == "Z":
                continue
            try:
                if os.getpgid(kid) == kid:
                    os.killpg(kid, signal.SIGKILL)
            except OSError:
                pass
            try:
                _signal(kid, fd, signal.SIGKILL)
            except OSError:
                pass
        finally:
            if fd >= 0:
                os.close(fd)


def _is_it(pid: int, start: int) -> bool:
    """pid is alive, started at start and is root's in every uid."""
    now = _proc_start(pid)
    if now is None or now[1] != start or now[0] == "Z":
        return False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return line.split()[1:] == [b"0"] * 4
    except OSError:
        pass
    return False


def remove(node: str, job_id: str, base: str = SETUP_DIR) -> None:
    if _safe_name(node) and job_id.isdigit():
        try:
            os.unlink(path(node, job_id, base))
        except FileNotFoundError:
            pass


def job_ids(node: str, base: str = SETUP_DIR) -> list[str]:
    """Job ids with a lock file on this node (reconcile)."""
    try:
        return sorted((n for n in os.listdir(os.path.join(base, node))
                       if n.isascii() and n.isdigit()), key=int)
    except OSError:
        return []


#: how long the background prolog's first steps (Python's imports, mostly)
#: give way to others on the node's CPUs
YIELD_SECONDS = 0.05


def _yield_briefly(seconds: float) -> None:
    """Give way to everything else on the node for the first `seconds`:
    slurmd telling slurmctld that the prolog is done, and on the sandbox the
    other nodes' prolog hooks, are what the job waits for, and srun polls
    for them at 0.1 s steps.  The process's scheduling group (autogroup,
    made by setsid) gets nice 19, and is set back by a one-shot timer, so on
    a busy node the delay is bounded; processes started in sessions of
    their own (the holder, QEMU, steps as the user) are in groups of their
    own at nice 0.  Nothing is done where the kernel has no autogroups."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("19")
    except OSError:
        return
    import signal

    def back(signum: int, frame: object) -> None:
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write("0")
        except OSError:
            pass
    signal.signal(signal.SIGALRM, back)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def detach(node: str, job_id: str, base: str = SETUP_DIR, ask=None) -> int | str:
    """Make and lock the job's file and fork: in the child, returns 0 once
    the parent has recorded it (the child goes on with the prolog and must
    end with os._exit); in the parent, the child's pid.  Why not, having
    forked nothing, when the file cannot be made or locked: the caller then
    runs the prolog itself.  ask(fd of the locked file): the node's warm
    server (``warm.prolog``) forks the child when it can, and this process
    then never forks; it returns None when it cannot."""
    import fcntl
    if not (_safe_name(node) and job_id.isdigit()):
        return f"no usable node name and job id ({node!r}, {job_id!r})"
    where = path(node, job_id, base)
    try:
        _root_dir(base)
        _root_dir(os.path.join(base, node))
        # read-only: the lock's fd is shared with the forks that drop to the
        # job user (call_as), which must not be able to change the record
        fd = os.open(where, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        return f"cannot make {where}: {e.strerror or e}"
    try:
        os.fchmod(fd, 0o644)  # the job user's shim opens it (umask aside)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # an earlier prolog of this job id still runs
            _stop(fd, 10.0)  # timeouts.kill's default: no config is read here
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        wfd = os.open(where, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        os.close(fd)
        return f"cannot lock {where}: {e.strerror or e}"
    if ask is not None:
        asked = ask(fd)
        if asked is not None:
            try:
                os.pwrite(wfd, f"{asked.pid} {asked.start}\n".encode(), 0)
                if asked.go():
                    os.close(wfd)
                    os.close(fd)
                    asked.close()
                    return asked.pid
            except OSError:
                asked.close()
            os.ftruncate(wfd, 0)  # its child ends without "go": fork one here
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(wfd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        if os.read(go_r, 1) != b"1":  # the hook died before it recorded us
            os._exit(1)
        os.close(go_r)
        _yield_briefly(YIELD_SECONDS)
        return 0  # fd stays open in this process: the lock is held until it ends
    os.close(go_r)
    try:
        now = _proc_start(pid)
        os.pwrite(wfd, f"{pid} {now[1] if now else 0}\n".encode(), 0)
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        os.close(wfd)
        os.close(fd)
    return pid
