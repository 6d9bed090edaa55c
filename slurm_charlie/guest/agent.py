"""slurm-charlie task agent: runs the srun tasks of a VM job inside its guest.

Started by /ch/opt/boot.sh as root before the guest reports ready.  It
reads frames (wire.py) from the virtio-serial port the node's multiplexer
writes, starts each task as the job user (from /ch/meta/user, whatever the
frame says) with the task's environment, its PMI_FD stream relayed, its
output and exit status sent back, and signals from srun delivered to the
task's process group.  A channel whose relay went away is killed.

Needs Python 3.9 or later and nothing outside the standard library.
"""

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pmifence  # noqa: E402  (beside this file in /ch/opt)
import wire  # noqa: E402

PORT_NAME = "org.slurm-charlie.tasks"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg):
    print(f"charlie agent: {msg}", file=sys.stderr, flush=True)


def find_port(name=PORT_NAME):
    base = "/sys/class/virtio-ports"
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, d, "name")) as f:
                if f.read().strip() == name:
                    return "/dev/" + d
        except OSError:
            pass
    return None


def job_user(path="/ch/meta/user"):
    """(name, uid, gid, [gids], home) of the job user."""
    with open(path) as f:
        lines = f.read().splitlines()
    name, uid, gid = lines[0].split()[:3]
    groups = [int(ln.split()[0]) for ln in lines[1:] if ln.split()]
    return name, int(uid), int(gid), groups, f"/home/{name}"


def read_small(path):
    try:
        with open(path) as f:
            return f.read(200).strip()
    except OSError:
        return ""


def guest_env(path="/ch/meta/env"):
    """The CH_* variables every guest has (meta/env, shell-quoted)."""
    env = {}
    with open(path) as f:
        for line in f:
            words = shlex.split(line)
            if words and "=" in words[0]:
                k, v = words[0].split("=", 1)
                env[k] = v
    return env


def fence_release(task_env, ch_env, default=1.0):
    """Seconds after which a rank is released from a PMI fence (pmifence.py):
    the task's CHARLIE_PMI_FENCE_RELEASE, else the site's (meta/env
    CH_PMI_FENCE_RELEASE), else default; 0 = never."""
    for value in (task_env.get("CHARLIE_PMI_FENCE_RELEASE"),
                  ch_env.get("CH_PMI_FENCE_RELEASE")):
        try:
            if value is not None and float(value) >= 0:
                return float(value)
        except ValueError:
            pass
    return default


class Port:
    """The serial port: frames out under one lock, frames in by one reader."""

    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, channel, kind, payload=b""):
        data = wire.pack(channel, kind, payload)
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]

    def read(self, n):
        return os.read(self.fd, n)


class Sink(threading.Thread):
    """Writes queued data to fd (a task's stdin or PMI socket) without ever
    blocking the port's reader; None closes fd."""

    def __init__(self, fd):
        super().__init__(daemon=True)
        self.fd, self.q = fd, queue.SimpleQueue()
        self.start()

    def run(self):
        while True:
            data = self.q.get()
            if data is None:
                break
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:
                break  # the task closed it: drop the rest
        os.close(self.fd)


def bad_spec(spec):
    """Why an OPEN frame's request cannot be a task (None: it can).  The
    relay sends {"argv": [str, ...], "env": {str: str}, "cwd": str, "pmi":
    bool}; anything else came from someone else's program."""
    if not isinstance(spec, dict):
        return "not a JSON object"
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a
                                                         for a in argv):
        return "argv is not a list of strings"
    if any("\0" in a for a in argv):
        return "argv has a NUL byte"
    for key, kind in (("env", dict), ("cwd", str), ("pmi", bool)):
        if key in spec and not isinstance(spec[key], kind):
            return f"{key} is not a {kind.__name__}"
    return None


class Task:
    def __init__(self, agent, channel, spec):
        self.agent, self.channel = agent, channel
        self.proc, self.stdin, self.pmi, self.pumps = None, None, None, []
        self.fence = None
        port = agent.port
        env = self.environment(spec)
        cwd = spec.get("cwd") or ""
        if not cwd or not os.path.isdir(cwd):
            cwd = agent.user[4] if os.path.isdir(agent.user[4]) else "/"
        pmi_child = None
        if spec.get("pmi"):
            parent, child = socket.socketpair()
            pmi_parent, pmi_child = parent.detach(), child.detach()  # plain fds from here
            self.pmi = Sink(os.dup(pmi_parent))
            env["PMI_FD"] = str(pmi_child)
            self.fence = pmifence.FenceRelease(
                self.pmi.q.put, lambda m: port.send(channel, wire.PMI, m),
                fence_release(spec.get("env") or {}, agent.ch_env), self.fence_failed,
                on_release=lambda after: log(
                    f"channel {channel} ({(spec.get('argv') or ['?'])[0]}): released "
                    f"from a PMI fence after {after:g} s"))
            self.pumps.append(self.pump(pmi_parent, wire.PMI, self.fence.from_task))
        argv = spec.get("argv") or []
        try:
            _, uid, gid, groups, _ = agent.user
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, user=uid, group=gid, extra_groups=groups,
                start_new_session=True, pass_fds=(pmi_child,) if pmi_child is not None else ())
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            code = 127 if isinstance(e, FileNotFoundError) else 126
            what = argv[0] if argv else "(no command)"
            port.send(channel, wire.STDERR, (
                f"slurm-charlie: error: cannot run {what} in guest {agent.name}: "
                f"{getattr(e, 'strerror', None) or e}\n").encode())
            port.send(channel, wire.EXIT, json.dumps({"status": code}).encode())
            for p in self.pumps:
                p.join(0)
            if self.pmi:
                self.pmi.q.put(None)
            self.proc = None
            return
        finally:
            if pmi_child is not None:
                os.close(pmi_child)
        self.stdin = Sink(os.dup(self.proc.stdin.fileno()))
        self.proc.stdin.close()
        self.pumps.append(self.pump(os.dup(self.proc.stdout.fileno()), wire.STDOUT))
        self.pumps.append(self.pump(os.dup(self.proc.stderr.fileno()), wire.STDERR))
        self.proc.stdout.close()
        self.proc.stderr.close()
        threading.Thread(target=self.wait, daemon=True).start()

    def environment(self, spec):
        name, uid, _, _, home = self.agent.user
        # the host's CH_* name host paths (CH_JOB_DIR, CH_DATAn): the
        # guest's own come from meta/env
        env = {k: v for k, v in (spec.get("env") or {}).items()
               if isinstance(k, str) and isinstance(v, str) and "=" not in k
               and not k.startswith("CH_")}
        env.update(self.agent.ch_env)
        env.update({"HOME": home, "USER": name, "LOGNAME": name, "PATH": GUEST_PATH,
                    "CH_GUEST_ID": self.agent.guest})
        if "UCX_NET_DEVICES" not in env and self.agent.job_iface:
            # the job network, not the host-only link a multicast-network
            # guest also has (same 10.0.2.15 in every guest)
            env["UCX_NET_DEVICES"] = self.agent.job_iface
        if not os.path.isdir(env.get("TMPDIR", "/tmp")):
            env["TMPDIR"] = "/tmp"
        env.pop("PMI_FD", None)
        return env

    def pump(self, fd, kind, handle=None):
        """fd's data to the host as `kind` frames (or to handle(data))."""
        send = handle or (lambda data: self.agent.port.send(self.channel, kind, data))

        def run():
            try:
                while True:
                    data = os.read(fd, 65536)
                    if not data:
                        break
                    send(data)
            except OSError:
                pass
            finally:
                os.close(fd)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def fence_failed(self, answer):
        self.agent.port.send(self.channel, wire.STDERR, (
            "slurm-charlie: error: the PMI fence this task was released from "
            f"failed: {answer.decode(errors='replace').strip()}\n").encode())
        self.deliver(wire.SIGNAL, bytes([signal.SIGTERM]))

    def wait(self):
        status = self.proc.wait()
        for p in self.pumps[-2:]:  # stdout, stderr: all of it before the exit
            p.join(5)
        if self.pmi:
            self.pmi.q.put(None)
        self.agent.port.send(self.channel, wire.EXIT, json.dumps({"status": status}).encode())
        self.agent.forget(self.channel)

    def deliver(self, kind, payload):
        if self.proc is None:
            return
        if kind == wire.STDIN and self.stdin:
            self.stdin.q.put(payload)
        elif kind == wire.STDIN_EOF and self.stdin:
            self.stdin.q.put(None)
        elif kind == wire.PMI and self.fence:
            self.fence.from_server(payload)
        elif kind in (wire.SIGNAL, wire.CLOSE):
            sig = payload[0] if kind == wire.SIGNAL and payload else signal.SIGKILL
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass


class Agent:
    def __init__(self, port_fd, guest, meta="/ch/meta"):
        self.port = Port(port_fd)
        self.guest, self.name = guest, f"chgu{guest}"
        self.user = job_user(os.path.join(meta, "user"))
        self.ch_env = guest_env(os.path.join(meta, "env"))
        self.tasks, self.lock = {}, threading.Lock()
        self.job_iface = read_small("/run/charlie/job-iface")

    def forget(self, channel):
        with self.lock:
            self.tasks.pop(channel, None)

    def serve(self):
        while True:
            try:  # blocks until the node's multiplexer is connected to the port
                self.port.send(0, wire.HELLO, self.guest.encode())
            except OSError as e:
                log(f"cannot greet the node's multiplexer: {e}")
                time.sleep(1)
                continue
            log(f"ready for srun tasks as {self.user[0]}")
            self.read_frames()
            log("the node's multiplexer went away: tasks killed, waiting for it")
            with self.lock:
                tasks, self.tasks = list(self.tasks.values()), {}
            for task in tasks:
                task.deliver(wire.CLOSE, b"")
            time.sleep(0.5)

    def read_frames(self):
        while True:
            frame = wire.read_frame(self.port.read)
            if frame is None:
                return
            channel, kind, payload = frame
            if kind == wire.OPEN:
                try:
                    spec = json.loads(payload)
                except ValueError:
                    spec = None
                why = bad_spec(spec)
                if why is None:
                    try:
                        task = Task(self, channel, spec)
                    except Exception as e:  # noqa: BLE001 -- one task, never the agent
                        why = f"{type(e).__name__}: {e}"
                if why is not None:
                    self.port.send(channel, wire.STDERR, (
                        f"slurm-charlie: error: bad task request for guest {self.name}: "
                        f"{why}\n").encode())
                    self.port.send(channel, wire.EXIT, json.dumps({"status": 126}).encode())
                    continue
                if task.proc is not None:
                    with self.lock:
                        self.tasks[channel] = task
                continue
            with self.lock:
                task = self.tasks.get(channel)
            if task is not None:
                task.deliver(kind, payload)
                if kind == wire.CLOSE:
                    self.forget(channel)


def main(argv):
    """agent.py GUEST [--fd N --meta DIR]: the port is the virtio-serial one;
    --fd and --meta let tests run the agent on a host with a socket as port."""
    guest = argv[0] if argv else "0"
    if "--fd" in argv:
        fd = int(argv[argv.index("--fd") + 1])
    else:
        path = find_port()
        if path is None:
            log(f"no virtio-serial port {PORT_NAME}: srun runs no tasks in this guest")
            return 1
        fd = os.open(path, os.O_RDWR)
    meta = argv[argv.index("--meta") + 1] if "--meta" in argv else "/ch/meta"
    Agent(fd, guest, meta).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
