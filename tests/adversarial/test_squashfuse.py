"""The user against the FUSE server of their own stock squashfs image (a
squashfs without /ch: squashfuse under the overlay, as the user).  They
own it, so they can stop or kill it while their job runs; root's epilog
must still end it (a stopped one too) and leave the node clean."""

import os
import signal
import subprocess
import time

import pytest

from helpers.cluster import build_busybox_image


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


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stop", "kill"])
def test_the_user_stopping_or_killing_their_squashfuse(cluster, sig):
    wd = cluster.workdir(f"adv-squashfuse-{sig.name}")
    src = build_busybox_image(os.path.join(wd, "img"), mount_points=False)
    sqfs = os.path.join(wd, "stock.sqfs")
    subprocess.run(["mksquashfs", src, sqfs, "-quiet", "-no-progress", "-all-root"],
                   check=True, capture_output=True)
    os.chmod(sqfs, 0o644)
    uid = int(cluster.run(["id", "-u", "chuser"]).stdout)
    p = cluster.as_user(["sbatch", "--parsable", "-N2", f"--charlie-image={sqfs}", "-o", "out",
                         "--wrap", "srun sleep 300"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    end = time.monotonic() + 60
    while time.monotonic() < end and len(_squashfuse_pids(uid)) < 2:
        time.sleep(0.2)
    pids = _squashfuse_pids(uid)
    assert len(pids) == 2, pids  # one per node of the job
    for pid in pids:
        os.kill(pid, sig)
    time.sleep(1)
    cluster.run(["scancel", job], check=True)
    cluster.wait_done(job, timeout=120)
    end = time.monotonic() + 60
    while time.monotonic() < end and (cluster.user_processes() or cluster.job_dirs()):
        time.sleep(0.2)
    assert cluster.user_processes() == []  # the stopped squashfuse included
    assert cluster.job_dirs() == []
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states
    assert _squashfuse_pids(uid) == []
