"""The srun-task channel of a VM job on this host, without QEMU: the real
multiplexer and the real guest agent (as root, tasks as nobody), a unix
socket standing in for the virtio-serial port QEMU gives the multiplexer.
Used by tests/unit/test_taskrelay.py and tests/adversarial."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

from slurm_charlie import taskrelay

AGENT = os.path.join(os.path.dirname(taskrelay.__file__), "guest", "agent.py")
NOBODY = 65534


@contextlib.contextmanager
def agent_harness():
    base = tempfile.mkdtemp(prefix="charlie-tasks-")
    os.chmod(base, 0o755)
    meta = os.path.join(base, "meta")
    data = os.path.join(base, "data")
    os.mkdir(meta)
    os.mkdir(data)
    os.chmod(data, 0o777)
    with open(os.path.join(meta, "user"), "w") as f:
        f.write(f"nobody {NOBODY} {NOBODY} nogroup\n")
    with open(os.path.join(meta, "env"), "w") as f:
        f.write("CH_JOB_ID=42\nCH_DATA1=/ch/data1\nCH_META=/ch/meta\n")
    port, tasks = os.path.join(base, "0.agent"), os.path.join(base, "guest-tasks")
    # QEMU's part: listen for the multiplexer, hand the connection to the agent
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(port)
    srv.listen(1)
    mux = subprocess.Popen([sys.executable, "-m", "slurm_charlie.cli", "task-mux", port,
                            tasks, os.path.join(base, "0.status")])
    conn, _ = srv.accept()
    agent = subprocess.Popen([sys.executable, AGENT, "0", "--fd", str(conn.fileno()),
                              "--meta", meta], pass_fds=(conn.fileno(),),
                             stderr=subprocess.PIPE, text=True)
    conn.close()
    srv.close()
    while not os.path.exists(tasks):
        time.sleep(0.02)
    try:
        yield {"tasks": tasks, "data": data, "base": base, "agent": agent, "mux": mux}
    finally:
        for p in (mux, agent):
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", base])


def relay(g, command, stdin=None, env=None, cwd=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "slurm_charlie.cli", "task-relay",
                             g["tasks"], *command], stdin=stdin or subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e,
                            cwd=cwd, **kw)


@contextlib.contextmanager
def agent_direct():
    """The guest agent (as root, tasks as nobody) with the test as its only
    peer on the port: what a job user gets who kills their multiplexer and
    writes to QEMU's end of the port themselves.  Yields (socket, agent)."""
    base = tempfile.mkdtemp(prefix="charlie-agent-")
    os.chmod(base, 0o755)
    meta = os.path.join(base, "meta")
    os.mkdir(meta)
    with open(os.path.join(meta, "user"), "w") as f:
        f.write(f"nobody {NOBODY} {NOBODY} nogroup\n")
    with open(os.path.join(meta, "env"), "w") as f:
        f.write("CH_JOB_ID=42\nCH_META=/ch/meta\n")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent = subprocess.Popen([sys.executable, AGENT, "0", "--fd", str(theirs.fileno()),
                              "--meta", meta], pass_fds=(theirs.fileno(),),
                             stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        yield ours, agent
    finally:
        ours.close()
        agent.kill()
        agent.wait()
        subprocess.run(["rm", "-rf", base])
