"""srun tasks of a VM job run in the node's guest (docs/vm.rst, "srun in a
VM job").

Two programs, both as the job user, nothing as root:

* the multiplexer (`slurm-charlie task-mux`, started by the prolog once the
  guest is ready) holds QEMU's end of the guest's virtio-serial port (a unix
  socket QEMU listens on in the 0700 job directory) and accepts the node's
  task relays on run/guest-tasks, giving each its own channel;
* the task relay (`slurm-charlie task-relay`, what the shim's task_init
  turns every task of a step into) sends the task's command, environment
  and working directory to the guest's agent, then carries stdin, stdout,
  stderr, the PMI_FD stream, signals and the exit status both ways.

The frames are in guest/wire.py, shared with the agent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

from .guest import wire

PROG = "slurm-charlie"
HELLO_WAIT = 60.0  # seconds a relay waits for the guest's agent
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCONT,
                   signal.SIGTSTP, signal.SIGWINCH)


def _send(sock: socket.socket, lock: threading.Lock, channel: int, kind: int,
          payload: bytes = b"") -> None:
    data = wire.pack(channel, kind, payload)
    with lock:
        sock.sendall(data)


# --- the node's multiplexer ---------------------------------------------------

class Mux:
    def __init__(self, agent_sock: str, tasks_sock: str, status_file: str) -> None:
        self.agent_sock, self.tasks_sock, self.status_file = agent_sock, tasks_sock, status_file
        self.port: socket.socket | None = None
        self.port_lock = threading.Lock()
        self.hello = threading.Event()
        self.conns: dict[int, socket.socket] = {}
        self.conn_locks: dict[int, threading.Lock] = {}
        self.lock = threading.Lock()
        self.next_channel = 1

    def connect_port(self, timeout: float = 30.0) -> None:
        """QEMU's socket for the port (QEMU listens; one client: us)."""
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.agent_sock)
                self.port = s
                return
            except OSError:
                s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def listen(self) -> socket.socket:
        old = os.umask(0o077)
        try:
            if os.path.lexists(self.tasks_sock):
                os.unlink(self.tasks_sock)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(self.tasks_sock)
            srv.listen(128)
        finally:
            os.umask(old)
        return srv

    def read_port(self) -> None:
        """Guest -> relays.  The agent's frames are routed by channel; a
        relay that stopped reading only loses its own output."""
        assert self.port is not None
        read = self.port.recv
        while True:
            frame = wire.read_frame(read)
            if frame is None:
                print(f"{PROG}: task-mux: the guest's port closed", file=sys.stderr)
                os._exit(0)  # QEMU is gone: so is every task
            channel, kind, payload = frame
            if kind == wire.HELLO:
                self.hello.set()
                continue
            with self.lock:
                conn, lock = self.conns.get(channel), self.conn_locks.get(channel)
            if conn is None or lock is None:
                continue
            try:
                _send(conn, lock, 0, kind, payload)
            except OSError:
                pass
            if kind == wire.EXIT:
                self.drop(channel, tell_guest=False)

    def drop(self, channel: int, tell_guest: bool) -> None:
        with self.lock:
            conn = self.conns.pop(channel, None)
            self.conn_locks.pop(channel, None)
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if tell_guest and conn is not None:
            self.to_guest(channel, wire.CLOSE)

    def to_guest(self, channel: int, kind: int, payload: bytes = b"") -> None:
        assert self.port is not None
        try:
            _send(self.port, self.port_lock, channel, kind, payload)
        except OSError:
            os._exit(0)

    def serve_relay(self, conn: socket.socket) -> None:
        with self.lock:
            channel = self.next_channel
            self.next_channel += 1
            self.conns[channel] = conn
            self.conn_locks[channel] = threading.Lock()
        try:  # the relay's OPEN first: a socket closed with unread data resets
            first = wire.read_frame(conn.recv)
        except OSError:
            first = None
        if first is None:
            self.drop(channel, tell_guest=False)
            return
        status = _read_small(self.status_file)  # boot.sh wrote it before "ready"
        if not self.hello.is_set() and status and status != "started":
            self.refuse(channel, f"the guest's task agent is not running ({status})")
            return
        if not self.hello.wait(HELLO_WAIT):
            self.refuse(channel, "the guest's task agent is not running (it did not "
                        f"answer in {HELLO_WAIT:g} s; see the guest's console)")
            return
        read = conn.recv
        frame = first
        while True:
            if frame is None:
                try:
                    frame = wire.read_frame(read)
                except OSError:
                    frame = None
            if frame is None:
                self.drop(channel, tell_guest=True)  # the relay died: kill the task
                return
            _, kind, payload = frame
            frame = None
            if kind in (wire.OPEN, wire.STDIN, wire.STDIN_EOF, wire.SIGNAL, wire.PMI):
                self.to_guest(channel, kind, payload)

    def refuse(self, channel: int, why: str) -> None:
        with self.lock:
            conn, lock = self.conns.get(channel), self.conn_locks.get(channel)
        if conn is not None and lock is not None:
            try:
                _send(conn, lock, 0, wire.STDERR, f"{PROG}: error: {why}\n".encode())
                _send(conn, lock, 0, wire.EXIT, json.dumps({"status": 1}).encode())
            except OSError:
                pass
        self.drop(channel, tell_guest=False)

    def run(self) -> int:
        self.connect_port()
        srv = self.listen()
        threading.Thread(target=self.read_port, daemon=True).start()
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=self.serve_relay, args=(conn,), daemon=True).start()


def _read_small(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(500).strip()
    except OSError:
        return ""


def mux(agent_sock: str, tasks_sock: str, status_file: str) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return Mux(agent_sock, tasks_sock, status_file).run()


# --- one task's relay ---------------------------------------------------------

def guest_cwd(cwd: str, env: dict[str, str]) -> str:
    """Where the guest has the host's working directory: below the job's
    --charlie-dir shares (CH_DATAn on the host is /ch/dataN in the guest),
    else "" (the agent uses the user's home in the guest)."""
    i = 1
    while f"CH_DATA{i}" in env:
        share = os.path.realpath(env[f"CH_DATA{i}"])
        if cwd == share or cwd.startswith(share.rstrip("/") + "/"):
            return f"/ch/data{i}" + cwd[len(share):]
        i += 1
    return ""


def relay(sock_path: str, argv: list[str]) -> int:
    env = dict(os.environ)
    pmi_fd = env.pop("PMI_FD", None)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = ""
    spec = {"argv": argv, "env": env, "cwd": guest_cwd(cwd, env), "pmi": pmi_fd is not None}
    try:
        s = _connect(sock_path)
    except OSError as e:
        print(f"{PROG}: error: cannot reach the guest's task agent through {sock_path}: "
              f"{e.strerror}\n{PROG}: hint: the node's slurm-charlie log says why; "
              "CHARLIE_ON_HOST=1 runs a step on the host instead", file=sys.stderr)
        return 1
    lock = threading.Lock()
    try:
        _send(s, lock, 0, wire.OPEN, json.dumps(spec).encode())
    except OSError as e:
        print(f"{PROG}: error: the guest's task agent went away ({e.strerror})",
              file=sys.stderr)
        return 1

    def forward(sig: int, _frame: object) -> None:
        try:
            _send(s, lock, 0, wire.SIGNAL, bytes([sig]))
        except OSError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, forward)
    _pipe_in(0, s, lock, wire.STDIN, wire.STDIN_EOF)
    pmi = int(pmi_fd) if pmi_fd and pmi_fd.isdigit() else None
    if pmi is not None:
        _pipe_in(pmi, s, lock, wire.PMI, None)
    status = 1
    while True:
        try:
            frame = wire.read_frame(s.recv)
        except OSError:
            frame = None
        if frame is None:
            print(f"{PROG}: error: the guest's task agent went away", file=sys.stderr)
            break
        _, kind, payload = frame
        try:
            if kind == wire.STDOUT:
                _write_all(1, payload)
            elif kind == wire.STDERR:
                _write_all(2, payload)
            elif kind == wire.PMI and pmi is not None:
                _write_all(pmi, payload)
        except OSError:
            pass
        if kind == wire.EXIT:
            status = int(json.loads(payload).get("status", 1))
            break
    if status < 0:  # killed by a signal in the guest: so is this task
        for sig in RELAYED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            signal.signal(-status, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL, SIGSTOP: nothing to reset
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def _connect(path: str, tries: int = 20) -> socket.socket:
    """The multiplexer's socket; it may be between bind and listen for an
    instant right after the prolog saw it appear."""
    for i in range(tries):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except ConnectionRefusedError:
            s.close()
            if i == tries - 1:
                raise
            time.sleep(0.05)
    raise OSError("unreachable")


def _pipe_in(fd: int, s: socket.socket, lock: threading.Lock, kind: int,
             eof: int | None) -> None:
    def run() -> None:
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                _send(s, lock, 0, kind, data)
            if eof is not None:
                _send(s, lock, 0, eof)
        except OSError:
            pass
    threading.Thread(target=run, daemon=True).start()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
