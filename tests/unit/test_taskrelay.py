"""srun tasks of a VM job, end to end on this host without QEMU: the real
task relay, the real multiplexer and the real guest agent (as root, tasks as
nobody), with a unix socket standing in for the virtio-serial port that QEMU
gives the multiplexer (tests/vm runs the same through QEMU and Slurm)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers.tasks import NOBODY, agent_harness, relay
from slurm_charlie import taskrelay
from slurm_charlie.guest import wire


@pytest.fixture
def guest():
    with agent_harness() as g:
        yield g


pytestmark = pytest.mark.root  # the agent starts tasks as another user


def test_output_exit_status_and_user(guest):
    p = relay(guest, ["/bin/sh", "-c", 'echo "out $(id -u) $CH_JOB_ID $CH_GUEST_ID $SLURM_X"; '
                      'echo err >&2; exit 3'], env={"SLURM_X": "from-host"})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3, err
    assert out == f"out {NOBODY} 42 0 from-host\n".encode()
    assert err == b"err\n"


def test_stdin_reaches_the_task(guest):
    p = relay(guest, ["/bin/cat"], stdin=subprocess.PIPE)
    out, err = p.communicate(b"line one\n" + b"x" * 200000 + b"\n", timeout=30)
    assert p.returncode == 0, err
    assert out.startswith(b"line one\n") and len(out) == 9 + 200001


def test_signal_reaches_the_task_and_its_status_comes_back(guest):
    p = relay(guest, ["/bin/sh", "-c", 'trap "echo got TERM; exit 7" TERM; echo up; '
                      'while :; do sleep 0.1; done'])
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert out == b"got TERM\n" and p.returncode == 7, err


def test_killed_in_the_guest_is_killed_here(guest):
    p = relay(guest, ["/bin/sh", "-c", 'echo $$; exec sleep 100'])
    pid = int(p.stdout.readline())
    os.kill(pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL


def test_a_killed_relay_kills_its_task(guest):
    """scancel's SIGKILL reaches only the host side: the task in the guest
    must not outlive it."""
    p = relay(guest, ["/bin/sh", "-c", 'echo $$; exec sleep 100'])
    pid = int(p.stdout.readline())
    p.kill()
    p.wait()
    def gone():  # exited (reaped, or a zombie nobody reaps here)
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    end = time.monotonic() + 10
    while time.monotonic() < end and not gone():
        time.sleep(0.05)
    assert gone(), f"task {pid} outlived its relay"


def test_command_not_in_the_guest(guest):
    p = relay(guest, ["/no/such/program", "arg"])
    out, err = p.communicate(timeout=30)
    assert p.returncode == 127
    assert b"cannot run /no/such/program in guest chgu0" in err


def test_pmi_stream_is_relayed_both_ways(guest):
    """The task's PMI_FD reaches slurmstepd's end unchanged, both ways."""
    ours, theirs = socket.socketpair()
    code = ("import os; fd = int(os.environ['PMI_FD']); os.write(fd, b'cmd=init pmi_version=2\\n');"
            " print(os.read(fd, 100).decode(), end='')")
    p = relay(guest, [sys.executable, "-c", code], env={"PMI_FD": str(theirs.fileno())},
              pass_fds=(theirs.fileno(),))
    theirs.close()
    assert ours.recv(100) == b"cmd=init pmi_version=2\n"
    ours.sendall(b"cmd=response rc=0\n")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == b"cmd=response rc=0\n"


def test_working_directory_maps_to_the_share(guest):
    env = {"CH_DATA1": "/srv/proj", "CH_DATA2": "/scratch/run"}
    assert taskrelay.guest_cwd("/scratch/run/case1", env) == "/ch/data2/case1"
    assert taskrelay.guest_cwd("/srv/proj", env) == "/ch/data1"
    assert taskrelay.guest_cwd("/srv/project", env) == ""
    assert taskrelay.guest_cwd("/home/u", env) == ""


def test_many_tasks_at_once(guest):
    ps = [relay(guest, ["/bin/sh", "-c", f"echo task {i}; exit {i % 5}"]) for i in range(12)]
    for i, p in enumerate(ps):
        out, err = p.communicate(timeout=60)
        assert (out, p.returncode) == (f"task {i}\n".encode(), i % 5), err


def test_frames_round_trip():
    a, b = socket.socketpair()
    a.sendall(wire.pack(7, wire.STDOUT, b"hello") + wire.pack(0, wire.EXIT, b"{}"))
    a.close()
    assert wire.read_frame(b.recv) == (7, wire.STDOUT, b"hello")
    assert wire.read_frame(b.recv) == (0, wire.EXIT, b"{}")
    assert wire.read_frame(b.recv) is None


def test_a_guest_without_an_agent_says_why_at_once(tmp_path):
    """boot.sh leaves the reason (no python3) in sync/N.agent: a task gets it
    at once instead of waiting for an agent that will never come."""
    port, tasks, status = (str(tmp_path / n) for n in ("0.agent", "guest-tasks", "0.agent.st"))
    with open(status, "w") as f:
        f.write("the image has no python3 3.9 or later: srun cannot run tasks in guest 0\n")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(port)
    srv.listen(1)
    mux = subprocess.Popen([sys.executable, "-m", "slurm_charlie.cli", "task-mux", port,
                            tasks, status])
    try:
        conn, _ = srv.accept()  # QEMU's side: nobody in the guest answers
        while not os.path.exists(tasks):
            time.sleep(0.02)
        p = relay({"tasks": tasks}, ["/bin/true"])
        out, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert b"the guest's task agent is not running (the image has no python3" in err
        conn.close()
    finally:
        mux.kill()
        mux.wait()
        srv.close()
