"""Warm hooks: one root process per node with the hook code already
imported forks a child for each prolog and epilog.

Why: a charlie job's preparation and its epilog are mostly Python starting
and importing (docs/developer.rst, "Benchmarks"); the tasks wait for the
preparation and the next job waits for the epilog.  A child forked from a
process that has imported everything starts its work at once.

It is never needed.  The hooks ask the server first and, when it is absent,
refuses, is stale (the code on disk changed since it started), is not
root's, lives in another network or mount namespace, or does not answer
within ``ASK_TIMEOUT``, they do the work themselves exactly as without it.

The pieces, all in root's directory ``SETUP_DIR/<node>/`` (0755, root's):

``warm.lock``
    the server holds an exclusive flock on it while it lives and keeps
    "PID STARTTIME" in it (``stop`` and ``status`` read it).  A second
    server finds it locked and leaves.
``warm.sock``
    a SOCK_SEQPACKET unix socket, 0600 (only root can connect); the server
    also checks the peer's credentials (uid 0) and the hook checks the
    server's (uid 0, same namespaces).

One request is one message: ``MAGIC``, the kind (``prolog`` or
``epilog``), the hook's umask, working directory and environment, and file
descriptors (prolog: the job's lock file, ``background``; epilog: the
hook's standard streams).  The server forks; the child answers ``ready PID
START`` and waits for ``go``.  The hook records the child (prolog: in the
job's lock file, as ``background.detach`` does for a child it forks
itself) and sends ``go``; a hook that never sends it (died, timed out,
fell back) leaves a child that ends at once without doing anything, so a
request is never carried out twice.  The prolog hook then returns; the
epilog hook waits for ``rc N`` and exits with N (no answer: 1, as a
crashed epilog).

The server is started in the background by a prolog that found none
(``start``, configuration ``hooks.warm``), ends after ``hooks.warm_idle``
seconds without a request, on SIGTERM, and when its code is stale.  It
reads no configuration and no job's data itself; each child reads the
configuration afresh, as a hook does.

Import-light like ``background``: the hook side uses only os, sys and
_socket; the server imports the hook code before it listens.
"""

from __future__ import annotations

import os
import sys

from .background import SETUP_DIR, _proc_start, _root_dir, _safe_name

MAGIC = b"charlie-warm/1"
#: a request larger than this is refused (a job's environment is far smaller)
MAX_REQUEST = 1 << 20
#: how long a hook waits for the server's child to say it is ready
ASK_TIMEOUT = 2.0
#: how long a forked child waits for the hook's "go"
GO_TIMEOUT = 10.0
KINDS = {b"prolog": 1, b"epilog": 3}  # kind -> how many descriptors come with it

SOCKET = "warm.sock"
LOCK = "warm.lock"

TYPE_CHECKING = False  # no typing import on the hook's path (~12 ms)
if TYPE_CHECKING:
    from typing import Callable


def paths(node: str, base: str = SETUP_DIR) -> tuple[str, str]:
    """(socket, lock file) of the node's server."""
    d = os.path.join(base, node)
    return os.path.join(d, SOCKET), os.path.join(d, LOCK)


# --- the hook's side: os, sys and _socket only ------------------------------

class Asked:
    """A child of the server, ready and waiting for ``go``."""

    def __init__(self, conn, pid: int, start: int) -> None:
        self.conn, self.pid, self.start = conn, pid, start

    def go(self) -> bool:
        try:
            self.conn.send(b"go")
            return True
        except OSError:
            self.close()
            return False

    def close(self) -> None:
        self.conn.close()


def _same_namespaces(pid: int) -> bool:
    try:
        return all(os.stat(f"/proc/{pid}/ns/{ns}").st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino
                   for ns in ("net", "mnt"))
    except OSError:
        return False


def ask(kind: str, node: str, fds: list[int], base: str = SETUP_DIR,
        timeout: float = ASK_TIMEOUT) -> Asked | None:
    """Hand a hook's work to the node's server: an Asked child waiting for
    ``go``, or None when there is no usable server (the caller then does the
    work itself; nothing was started)."""
    import _socket
    if not _safe_name(node):
        return None
    sock = paths(node, base)[0]
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(sock)
        pid, uid, _gid = _unpack_cred(s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
        if uid != 0 or not _same_namespaces(pid):
            s.close()
            return None
        mask = os.umask(0o022)
        os.umask(mask)
        try:
            cwd = os.fsencode(os.getcwd())
        except OSError:
            cwd = b"/"
        fields = [MAGIC, kind.encode(), b"%o" % mask, cwd]
        fields += [k + b"=" + v for k, v in os.environb.items() if b"\0" not in k + v]
        payload = b"\0".join(fields)
        if len(payload) > MAX_REQUEST:
            s.close()
            return None
        s.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                               b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        reply = s.recv(256).split()
        if len(reply) != 3 or reply[0] != b"ready":
            s.close()
            return None
        s.settimeout(None)
        return Asked(s, int(reply[1]), int(reply[2]))
    except (OSError, ValueError):
        s.close()
        return None


def _unpack_cred(b: bytes) -> tuple[int, int, int]:
    return tuple(int.from_bytes(b[i:i + 4], sys.byteorder, signed=True)  # type: ignore[return-value]
                 for i in (0, 4, 8))


def prolog(node: str, lock_fd: int, base: str = SETUP_DIR) -> Asked | None:
    """The node's server forks the background prolog, which holds the job's
    lock file (lock_fd) while it lives (background.detach records it)."""
    return ask("prolog", node, [lock_fd], base)


def epilog(node: str, base: str = SETUP_DIR) -> int | None:
    """The epilog by the node's server: its exit code, or None when the
    server cannot take it (the hook then runs the epilog itself)."""
    asked = ask("epilog", node, [0, 1, 2], base)
    if asked is None or not asked.go():
        return None
    try:
        reply = asked.conn.recv(64).split()
    except OSError:
        reply = []
    asked.close()
    if len(reply) == 2 and reply[0] == b"rc" and reply[1].isdigit():
        return int(reply[1])
    os.write(2, b"slurm-charlie: the warm epilog ended without an exit code "
                b"(see the node's slurm-charlie log)\n")
    return 1


def start(node: str, idle: int, base: str = SETUP_DIR, errors: str | None = None) -> None:
    """Start the node's server in the background (a session of its own,
    standard streams on /dev/null, a clean environment); it leaves at once
    when one already runs.  Returns when it is started, not when it is
    ready.  errors: a root log file (the node's slurm-charlie log) its
    standard error is appended to, for what it says before it serves."""
    if not _safe_name(node):
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(null, std)
            if errors:
                try:
                    err = os.open(errors, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
                                  | os.O_NONBLOCK)
                    if os.fstat(err).st_uid == 0 and not os.fstat(err).st_mode & 0o022:
                        os.dup2(err, 2)
                    os.close(err)
                except OSError:
                    pass
            os.chdir("/")
            os.execve(sys.executable,
                      [sys.executable, "-I", "-c",
                       "import sys; from slurm_charlie.warm_main import main; sys.exit(main())",
                       node, base, str(idle)],
                      {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def running(node: str, base: str = SETUP_DIR) -> tuple[int, int] | None:
    """(pid, start time) of the node's server while it runs (its lock is
    held and the process is root's and the same), else None."""
    import fcntl
    from .background import _is_it, _read
    if not _safe_name(node):
        return None
    try:
        fd = os.open(paths(node, base)[1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it
        except BlockingIOError:
            pass
        rec = _read(fd)
        if rec is None or not _is_it(*rec):
            return None
        return rec
    finally:
        os.close(fd)


def stop(node: str, base: str = SETUP_DIR, timeout: float = 10.0) -> bool:
    """End the node's server (SIGTERM, then SIGKILL): True when one ran.
    Children it forked for hooks are not touched: each is a hook's work."""
    import select
    import signal
    rec = running(node, base)
    if rec is None:
        return False
    pid, start_time = rec
    from .background import _is_it
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not _is_it(pid, start_time):
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            if select.select([pidfd], [], [], wait)[0]:
                return True
        raise OSError(f"the warm hook server (pid {pid}) does not end after SIGKILL")
    finally:
        os.close(pidfd)


# --- the server ---------------------------------------------------------------

def fingerprint() -> tuple:
    """What the code on disk looks like: (name, size, mtime, inode) of every
    file of the package and of this Python.  A server whose fingerprint no
    longer matches is stale: it refuses and leaves."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    todo = [pkg]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name == "__pycache__":
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.is_dir(follow_symlinks=False):
                todo.append(e.path)
            else:
                out.append((e.path, st.st_size, st.st_mtime_ns, st.st_ino))
    st = os.stat(sys.executable)
    out.append((sys.executable, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def serve(node: str, run: Callable[[bytes], int], base: str = SETUP_DIR,
          idle: float = 600.0, preload: Callable[[], None] | None = None) -> int:
    """Serve the node's hooks until idle, SIGTERM or stale code: each
    request is forked, and the child calls run(kind) once the
    hook said go (warm_main.run_hook).  preload: imports what a child needs,
    before the code's fingerprint is taken and the socket opened."""
    import fcntl
    import select
    import signal
    import socket
    import time
    if not _safe_name(node):
        return 2
    _root_dir(base)
    _root_dir(os.path.join(base, node))
    sock_path, lock_path = paths(node, base)
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                   | os.O_NONBLOCK, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # one runs already
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()} {(_proc_start(os.getpid()) or ('', 0))[1]}\n".encode(), 0)
    if preload is not None:
        preload()
    stamp = fingerprint()
    os.umask(0o077)
    try:
        os.unlink(sock_path)  # a dead server's: we hold the lock
    except FileNotFoundError:
        pass
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ls.bind(sock_path)
    ls.listen(64)
    ino = os.stat(sock_path).st_ino
    def stop_now(signum: int, frame: object) -> None:
        raise _Stop
    signal.signal(signal.SIGTERM, stop_now)
    last = time.monotonic()
    try:
        while True:
            _reap()
            try:
                ready = select.select([ls], [], [], min(5.0, idle))[0]
            except InterruptedError:
                continue
            if not ready:
                if time.monotonic() - last >= idle:
                    break
                continue
            try:
                conn, _ = ls.accept()
            except OSError:
                continue
            last = time.monotonic()
            with conn:
                if _handle(conn, ls, lock, stamp, run) == "stale":
                    break
    except _Stop:
        pass
    finally:
        try:
            if os.stat(sock_path).st_ino == ino:
                os.unlink(sock_path)
        except OSError:
            pass
        ls.close()
    return 0


class _Stop(Exception):
    """SIGTERM: the server ends (select is retried after a signal otherwise)."""


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(conn, ls, lock: int, stamp: tuple, run: Callable[[bytes], int]) -> str | None:
    """One request: fork a child for it.  'stale' when the code changed."""
    import socket
    import struct
    _pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))
    if uid != 0:
        return None
    conn.settimeout(ASK_TIMEOUT)
    fds: list[int] = []
    try:
        msg, anc, flags, _ = conn.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(4 * 4))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], sys.byteorder)
                        for i in range(0, len(data) - len(data) % 4, 4)]
        fields = msg.split(b"\0")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fields) < 4 \
                or fields[0] != MAGIC or KINDS.get(fields[1]) != len(fds):
            conn.send(b"refused")
            return None
        if fingerprint() != stamp:
            conn.send(b"stale")
            return "stale"
        try:
            mask = int(fields[2], 8) & 0o777
        except ValueError:
            conn.send(b"refused")
            return None
        env = dict(f.split(b"=", 1) for f in fields[4:] if b"=" in f)
        child = os.fork()
        if child == 0:
            code = 1
            try:
                code = _child(conn, ls, lock, fields[1], mask, fields[3], env, fds, run)
            finally:
                os._exit(code)
        return None
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _child(conn, ls, lock: int, kind: bytes, mask: int, cwd: bytes,
           env: dict[bytes, bytes], fds: list[int], run: Callable[[bytes], int]) -> int:
    """In the forked child: become what the hook's process would have been,
    say ready, wait for go, do the work."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGALRM,
                signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
    ls.close()
    os.close(lock)
    os.setsid()
    if kind == b"epilog":
        for std, fd in enumerate(fds):
            os.dup2(fd, std)
        keep = -1
    else:  # the prolog runs in the background: nothing of Slurm's stays open
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        keep = fds[0]  # the job's lock file: held until this process ends
    for fd in fds:
        if fd != keep:
            os.close(fd)
    os.umask(mask)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
    os.environb.clear()
    os.environb.update(env)
    me = os.getpid()
    conn.settimeout(GO_TIMEOUT)
    conn.send(b"ready %d %d" % (me, (_proc_start(me) or ("", 0))[1]))
    try:
        if conn.recv(16) != b"go":
            return 1  # the hook went its own way: do nothing
    except OSError:
        return 1
    if kind == b"prolog":
        conn.close()
        from .background import YIELD_SECONDS, _yield_briefly
        _yield_briefly(YIELD_SECONDS)
        return run(kind)
    code = run(kind)
    conn.settimeout(None)
    try:
        conn.send(b"rc %d" % code)
    except OSError:
        pass
    return code
