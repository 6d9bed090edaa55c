"""Attack on the srun-task channel of a VM job (issue 10's relay): the
user talks to their node's task multiplexer themselves instead of through
`slurm-charlie task-relay`, with frames no relay sends.  The multiplexer
and the guest's agent run the real code (tests/helpers/tasks.py: the agent
as root, as in the guest; the job user is nobody).  Whatever arrives, a
task runs only as the job user, nothing crashes, and the next honest task
still runs."""

import json
import os
import socket
import struct
import time

import pytest

from helpers.tasks import NOBODY, agent_direct, agent_harness, relay
from slurm_charlie.guest import wire

pytestmark = pytest.mark.root  # the agent starts tasks as another user


def _send_raw(path, data, read=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(data)
    got = b""
    if read:
        s.settimeout(10)
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        except (socket.timeout, ConnectionResetError):
            pass
    s.close()
    return got


def _frames(data):
    out = []
    while len(data) >= wire.HEADER.size:
        ch, kind, n = wire.HEADER.unpack(data[:wire.HEADER.size])
        out.append((kind, data[wire.HEADER.size:wire.HEADER.size + n]))
        data = data[wire.HEADER.size + n:]
    return out


def _honest_task_runs(g):
    p = relay(g, ["/bin/sh", "-c", "echo still $(id -u)"])
    out, err = p.communicate(timeout=30)
    assert (p.returncode, out) == (0, f"still {NOBODY}\n".encode()), err


HOSTILE = {
    # a length far over the cap: the multiplexer drops the connection
    "huge length": wire.HEADER.pack(0, wire.OPEN, 0xFFFFFFFF) + b"x" * 100,
    "torn header": b"\x00\x00",
    "not JSON": wire.pack(0, wire.OPEN, b"\xff\xfe{{{"),
    "JSON list": wire.pack(0, wire.OPEN, b"[1, 2, 3]"),
    "JSON string": wire.pack(0, wire.OPEN, b'"sh"'),
    "argv of numbers": wire.pack(0, wire.OPEN, json.dumps({"argv": [1, 2]}).encode()),
    "argv a string": wire.pack(0, wire.OPEN, json.dumps({"argv": "id"}).encode()),
    "cwd a number": wire.pack(0, wire.OPEN, json.dumps({"argv": ["/bin/true"],
                                                         "cwd": 3}).encode()),
    "env not a dict": wire.pack(0, wire.OPEN, json.dumps({"argv": ["/bin/true"],
                                                          "env": ["A=1"]}).encode()),
    "frames of kinds only the guest sends": wire.pack(0, wire.EXIT, b"{}")
    + wire.pack(0, wire.HELLO, b"9") + wire.pack(0, 250, b"?"),
    "a signal before any task": wire.pack(0, wire.SIGNAL, b"\x09"),
    "a signal number out of range": wire.pack(0, wire.OPEN, json.dumps(
        {"argv": ["/bin/sleep", "5"]}).encode()) + wire.pack(0, wire.SIGNAL, b"\xff"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frames_harm_nothing(name):
    """The hostile connection stays open (nothing waits for a reply that
    never comes) while an honest task runs, and after it is closed."""
    with agent_harness() as g:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(g["tasks"])
        try:
            s.sendall(HOSTILE[name])
            time.sleep(0.3)
            assert g["agent"].poll() is None, g["agent"].stderr.read()
            assert g["mux"].poll() is None
            _honest_task_runs(g)
        finally:
            s.close()
        time.sleep(0.3)
        assert g["agent"].poll() is None, g["agent"].stderr.read()
        assert g["mux"].poll() is None
        _honest_task_runs(g)


def test_a_task_asking_for_root_runs_as_the_job_user():
    """The frame names no user; whatever it carries (uid fields, sudo-ish
    variables, LD_PRELOAD), the task runs as meta/user's uid."""
    with agent_harness() as g:
        spec = {"argv": ["/bin/sh", "-c", "id -u; id -g"], "uid": 0, "user": "root",
                "env": {"SUDO_UID": "0", "LD_PRELOAD": "/nonexistent.so", "USER": "root"}}
        got = _frames(_send_raw(g["tasks"], wire.pack(0, wire.OPEN, json.dumps(spec).encode())
                                + wire.pack(0, wire.STDIN_EOF)))
        out = b"".join(p for k, p in got if k == wire.STDOUT)
        assert out.split() == [str(NOBODY).encode(), str(NOBODY).encode()], got
        assert any(k == wire.EXIT for k, _ in got)


def test_a_flood_of_connections_leaves_honest_tasks_running():
    """200 connections opened and dropped at once, half with a partial
    frame: no task, no crash, the next honest task runs."""
    with agent_harness() as g:
        socks = []
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(g["tasks"])
            if i % 2:
                s.sendall(struct.pack(">IB", 0, wire.OPEN))
            socks.append(s)
        for s in socks:
            s.close()
        time.sleep(0.5)
        assert g["agent"].poll() is None and g["mux"].poll() is None
        _honest_task_runs(g)
        assert os.path.exists(g["tasks"])


def _until_exit(s, channel, timeout=30):
    """(stdout, exit status) of the task on channel, other frames skipped."""
    s.settimeout(timeout)
    out = b""
    while True:
        frame = wire.read_frame(s.recv)
        assert frame is not None, "the agent closed its port"
        ch, kind, payload = frame
        if ch != channel:
            continue
        if kind == wire.STDOUT:
            out += payload
        elif kind == wire.EXIT:
            return out, json.loads(payload)["status"]


#: frames straight onto the agent's port (whole frames: a torn stream only
#: ever ends the user's own guest's channel, as a port closing does)
TO_AGENT = {
    "a task asking for root": [wire.pack(7, wire.OPEN, json.dumps(
        {"argv": ["/bin/sh", "-c", "id -u"], "uid": 0, "user": "root",
         "env": {"USER": "root", "HOME": "/root"}}).encode())],
    "a length over the cap": [wire.HEADER.pack(7, wire.OPEN, wire.MAX_PAYLOAD + 1)],
    "frames for a channel with no task": [wire.pack(9, k, p) for k, p in (
        (wire.STDIN, b"x"), (wire.STDIN_EOF, b""), (wire.SIGNAL, b"\x09"),
        (wire.PMI, b"cmd=init\n"), (wire.CLOSE, b""))],
    "a task on the greeting channel": [wire.pack(0, wire.OPEN, json.dumps(
        {"argv": ["/bin/true"]}).encode())],
    "two tasks on one channel": [wire.pack(11, wire.OPEN, json.dumps(
        {"argv": ["/bin/sleep", "30"]}).encode())] * 2 + [wire.pack(11, wire.CLOSE)],
    "kinds only the guest sends": [wire.pack(12, k, b"{}") for k in (
        wire.STDOUT, wire.STDERR, wire.EXIT, wire.HELLO)] + [wire.pack(12, 250, b"?")],
    "a cwd the job user cannot enter": [wire.pack(13, wire.OPEN, json.dumps(
        {"argv": ["/bin/sh", "-c", "ls . >/dev/null 2>&1 && echo READ"],
         "cwd": "/root"}).encode())],
}


@pytest.mark.parametrize("name", list(TO_AGENT))
def test_hostile_frames_to_the_agent_itself(name):
    """The job user owns their multiplexer, so they can write anything to
    the guest agent's port (which runs tasks as root's child in the guest).
    Whatever arrives, the agent stays up, a task runs only as the job user,
    and an honest task on a fresh channel still runs."""
    with agent_direct() as (s, agent):
        hello = wire.read_frame(s.recv)
        assert hello is not None and hello[1] == wire.HELLO
        for frame in TO_AGENT[name]:
            s.sendall(frame)
        if name == "a task asking for root":
            out, status = _until_exit(s, 7)
            assert (out, status) == (f"{NOBODY}\n".encode(), 0)
        if name == "a cwd the job user cannot enter":
            out, _ = _until_exit(s, 13)
            assert b"READ" not in out
        time.sleep(0.3)
        assert agent.poll() is None, agent.stderr.read()
        s.sendall(wire.pack(21, wire.OPEN, json.dumps(
            {"argv": ["/bin/sh", "-c", "echo honest $(id -u)"]}).encode()))
        out, status = _until_exit(s, 21)
        assert (out, status) == (f"honest {NOBODY}\n".encode(), 0)
        assert agent.poll() is None
