"""Attacks on the helpers the prolog starts for the user of a VM job (the
task multiplexer that carries srun tasks into the guest), on the sandbox
with a real guest.  The user owns these processes and their run/ entries,
so they can stop them or put something else in their place; the prolog's
wait for them is bounded, it never follows what it finds there, and the
job fails (or its steps do) with a message -- no node is drained and the
epilog leaves nothing behind."""

import os
import re
import subprocess
import sys

import pytest

from helpers.cluster import PROC_CMDLINES, USER
from helpers.vm import assert_clean, image_copy

# The user's own program: SIGSTOP their task multiplexer the moment it
# appears (before it can bind its socket, as far as a tight /proc scan
# gets there first); prints whether the socket was there at that moment.
STOPPER = PROC_CMDLINES + r"""
import signal, sys, time
needle, end = sys.argv[1].encode(), time.monotonic() + 600
at_bind = sys.argv[2] == "bind"
me = str(os.getpid())
while time.monotonic() < end:
    for d, cmd in cmdlines((me,)):
        if b"task-mux" in cmd and any(needle in c for c in cmd):
            sock = [c for c in cmd if c.endswith(b"/guest-tasks")][0].decode()
            while at_bind and not os.path.lexists(sock) and time.monotonic() < end:
                pass  # the moment its socket appears: bound, maybe not listening
            os.kill(int(d), signal.SIGSTOP)
            print("STOPPED", d, "socket-was-there" if os.path.lexists(sock)
                  else "before-the-socket", flush=True)
            sys.exit(0)
"""

# The user's own program: put a FIFO and then a symlink to a file of root's
# where the multiplexer's socket goes, again and again while the job starts.
PLANTER = r"""
import os, sys, time
run, end = sys.argv[1], time.monotonic() + 600
sock = os.path.join(run, "guest-tasks")
n = seen = 0
while time.monotonic() < end and not (seen and not os.path.isdir(run)):
    if os.path.isdir(run):
        seen = 1
        try:
            if n % 2:
                os.symlink("/etc/shadow", sock)
            else:
                os.mkfifo(sock)
            n += 1
        except OSError:
            pass
    time.sleep(0.01)
print("PLANTED", n, flush=True)
"""


def _user_program(cluster, code, *args):
    return subprocess.Popen(["runuser", "-u", USER, "--", sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _settled(cluster, job):
    assert_clean(cluster, job)
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states


@pytest.mark.parametrize("when", ["start", "bind"])
def test_the_user_stopping_their_multiplexer_fails_only_their_job(cluster, guest, when):
    """SIGSTOP on the multiplexer as it starts: the prolog's wait for it is
    bounded (a stopped helper is noticed within seconds, not at its 20 s
    limit) and the job fails saying so.  Should the user's scan be slower
    than the multiplexer's bind -- or should they wait for the socket to
    appear and stop it as it binds, before it listens or accepts -- the
    stopped multiplexer holds only their own steps: the step times out or
    fails, and the epilog still cleans up."""
    wd = cluster.workdir("adv-mux-stop")
    img = image_copy(cluster, guest, wd)
    job_runs = os.path.join(cluster.sb.state, "runtime", "node1")
    stopper = _user_program(cluster, STOPPER, job_runs, when)
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-w", "node1",
                         "-t", "3", "-o", "out", f"--charlie-image={img}", "--wrap",
                         "timeout 30 srun -N1 hostname; echo STEP-RC $?"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    cluster.wait_done(job, timeout=300)
    stopped, _ = stopper.communicate(timeout=30)
    assert stopped.startswith("STOPPED"), stopped
    out = open(os.path.join(wd, "out")).read()
    if "before-the-socket" in stopped:
        assert "the task multiplexer was stopped (SIGSTOP) before it was ready" in out, out
        assert cluster.job(job).get("JobState") != "COMPLETED"
    else:  # stopped after it bound: the user's own steps wait on it or fail
        assert re.search(r"STEP-RC (124|1)\b", out), out
        assert "Traceback" not in out, out
    _settled(cluster, job)


def test_something_planted_at_the_multiplexers_socket(cluster, guest):
    """A FIFO or a symlink to /etc/shadow at run/guest-tasks while the job
    starts: root only lstat()s it (a non-socket is not the multiplexer),
    the multiplexer replaces it or the job fails with a message; /etc/shadow
    is untouched; no drain, nothing left."""
    wd = cluster.workdir("adv-mux-plant")
    img = image_copy(cluster, guest, wd)
    before = os.stat("/etc/shadow")
    shadow = open("/etc/shadow", "rb").read()
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-w", "node2",
                         "-t", "3", "-o", "out", f"--charlie-image={img}", "--wrap",
                         "timeout 60 srun -N1 hostname; echo STEP-RC $?"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    run = os.path.join(cluster.sb.state, "runtime", "node2", job, "run")
    planter = _user_program(cluster, PLANTER, run)
    cluster.wait_done(job, timeout=300)
    planted, _ = planter.communicate(timeout=180)  # it ends when run/ is gone
    assert int(planted.split()[1]) > 0, planted  # the attack did happen
    out = open(os.path.join(wd, "out")).read()
    # the step ran in the guest, or it (or the job) failed with a message
    assert ("chgu0" in out and "STEP-RC 0" in out) or "slurm-charlie" in out, out
    assert "Traceback" not in out, out
    after = os.stat("/etc/shadow")
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == \
        (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert open("/etc/shadow", "rb").read() == shadow
    _settled(cluster, job)
