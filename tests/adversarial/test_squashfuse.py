"""The user against the FUSE server of their own stock squashfs image (a
squashfs without /ch: squashfuse under the overlay, as the user).  They
own it, so they can stop or kill it while their container starts or runs;
the prolog must not wait on a stopped one (ch-run would block on the mount
for as long as it stays stopped), and root's epilog must end it -- a
stopped one too -- and leave the node clean."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.cluster import PROC_CMDLINES, USER, build_busybox_image

# The user's own program: SIGSTOP every squashfuse of theirs whose command
# line names the image, the moment it appears; reports how many it stopped.
STOPPER = PROC_CMDLINES + r"""
import signal, sys, time
needle, want, end = sys.argv[1].encode(), int(sys.argv[2]), time.monotonic() + 120
stopped = set()
while time.monotonic() < end and len(stopped) < want:
    for d, cmd in cmdlines(stopped):
        if cmd and cmd[0] == b"squashfuse" and needle in cmd:
            os.kill(int(d), signal.SIGSTOP)
            stopped.add(d)
print("STOPPED", len(stopped), flush=True)
"""


def _squashfuse_pids(uid):
    """The user's live squashfuse processes (zombies hold nothing, and this
    machine's PID 1 does not reap them: docs/sandbox.rst)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid and \
                    open(f"/proc/{d}/comm").read().strip() == "squashfuse" and \
                    open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(d))
        except OSError:
            pass
    return out


def _stock_sqfs(wd):
    src = build_busybox_image(os.path.join(wd, "img"), mount_points=False)
    sqfs = os.path.join(wd, "stock.sqfs")
    subprocess.run(["mksquashfs", src, sqfs, "-quiet", "-no-progress", "-all-root"],
                   check=True, capture_output=True)
    os.chmod(sqfs, 0o644)
    return sqfs


def _settled(cluster, uid):
    end = time.monotonic() + 60
    while time.monotonic() < end and (cluster.user_processes() or cluster.job_dirs()):
        time.sleep(0.2)
    assert cluster.user_processes() == []  # a stopped squashfuse included
    assert cluster.job_dirs() == []
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states
    assert _squashfuse_pids(uid) == []


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stop", "kill"])
def test_the_user_stopping_or_killing_their_squashfuse_while_the_job_runs(cluster, sig):
    wd = cluster.workdir(f"adv-squashfuse-{sig.name}")
    sqfs = _stock_sqfs(wd)
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    p = cluster.as_user(["sbatch", "--parsable", "-N2", f"--charlie-image={sqfs}", "-o", "out",
                         "--wrap", "srun sh -c 'echo up; exec sleep 300'"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    out = os.path.join(wd, "out")
    end = time.monotonic() + 120
    while time.monotonic() < end and (not os.path.exists(out)
                                      or open(out).read().count("up") < 2):
        time.sleep(0.2)
    pids = _squashfuse_pids(uid)
    assert len(pids) == 2, (pids, open(out).read())  # one per node, the tasks running
    for pid in pids:
        os.kill(pid, sig)
    time.sleep(1)
    cluster.run(["scancel", job], check=True)
    cluster.wait_done(job, timeout=120)
    _settled(cluster, uid)


def test_the_user_stopping_their_squashfuse_as_the_container_starts(cluster):
    """Stopped while the prolog waits for the container: the prolog notices
    within seconds (a stopped FUSE server, like a stopped holder) and fails
    the job.  Should the user's scan be slower than the start, the stopped
    mount blocks only their own step, which their timeout ends."""
    wd = cluster.workdir("adv-squashfuse-start")
    sqfs = _stock_sqfs(wd)
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    stopper = subprocess.Popen(["runuser", "-u", USER, "--", sys.executable, "-c", STOPPER,
                                sqfs, "2"], stdout=subprocess.PIPE, text=True)
    p = cluster.as_user(["sbatch", "--parsable", "-N2", f"--charlie-image={sqfs}", "-o", "out",
                         "--wrap", "timeout 20 srun true; echo STEP-RC $?"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    cluster.wait_done(job, timeout=120)  # no hook waits out a long limit
    stopped, _ = stopper.communicate(timeout=150)
    assert stopped.split() == ["STOPPED", "2"], stopped
    out = open(os.path.join(wd, "out")).read()
    assert "the container was stopped (SIGSTOP) while it started" in out \
        or "STEP-RC 124" in out, out
    _settled(cluster, uid)
