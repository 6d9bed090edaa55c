"""Trust round 2, class 2: a FUSE file system of the user's that stops
answering makes the processes that wait on it unkillable (SIGKILL does
nothing while the server holds a request it read).  Root never waits on
such a process without a bound, and ends it by aborting the connection
(fusectl): no hook hangs, no node drains, nothing is left.

The server is tests/helpers/stallfs.py, run as the user through
fusermount3, as on any cluster with FUSE; the sandbox opens /dev/fuse to
users as such a cluster does (docs/sandbox.rst)."""

import os
import re
import shutil
import subprocess
import time

import pytest

from helpers.procs import state as _state

from helpers import stallfs as stallfs_server
from helpers.cluster import USER, holder_job, holder_sh_image
from slurm_charlie import cleanup, proc
from slurm_charlie.errors import UserError



def _waiting(mnt):
    """Requests waiting on the FUSE connection mounted at mnt (fusectl)."""
    dev = None
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == mnt:
            dev = int(f[2].split(":")[1])
    try:
        return int(open(f"/sys/fs/fuse/connections/{dev}/waiting").read())
    except (OSError, ValueError):
        return 0


def _killed_but_stuck(mnt):
    """(uid, Popen): the user's process looking `stall` up in the stalled
    mount, SIGKILLed and still there (uninterruptible until the connection
    ends)."""
    uid = int(subprocess.run(["id", "-u", USER], capture_output=True, text=True).stdout)
    stuck = subprocess.Popen(["stat", os.path.join(mnt, "stall")], user=uid, group=uid,
                             extra_groups=[], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(500):  # waits (interruptibly) for the lookup's answer
        if _state(stuck.pid) == "S" and _waiting(mnt):
            break
        time.sleep(0.01)
    os.kill(stuck.pid, 9)
    time.sleep(0.2)
    assert _state(stuck.pid) == "D", "SIGKILL ended the lookup: the mount does not stall"
    return uid, stuck


@pytest.fixture
def stallfs(cluster):
    """(work directory, mount point): the user's stalling FUSE file system,
    served from outside any job, as from a login shell."""
    wd = cluster.workdir("adv-fuse")
    mnt = os.path.join(wd, "mnt")
    os.makedirs(mnt)
    shutil.chown(mnt, USER, USER)
    server = stallfs_server.start(mnt, USER)
    try:
        yield wd, mnt
    finally:
        server.kill()  # its connection ends: anything still stuck on it dies
        server.wait()
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_a_step_as_the_user_stuck_on_their_fuse_does_not_hold_root(stallfs):
    """A step root runs as the user (proc.call_as) that follows a path into
    the stalled mount passes its limit and does not die of SIGKILL.  Root
    no longer waits for it for ever: the step fails with a message that
    names the cause, and the hook's end aborts the connection and reaps it."""
    _, mnt = stallfs
    user = proc.User.lookup(int(subprocess.run(["id", "-u", USER], capture_output=True,
                                               text=True).stdout))
    with pytest.raises(UserError, match="SIGKILL did not end it") as err:
        proc.call_as(user, os.stat, os.path.join(mnt, "stall"), limit=1)
    assert "FUSE" in (err.value.hint or ""), err.value.hint
    stuck = proc.stuck_steps()
    assert [u for _, u in stuck] == [user.uid]
    pid = stuck[0][0]
    assert _state(pid) == "D"  # SIGKILL sent, still there: what root used to wait on
    cleanup.unstick()
    assert proc.stuck_steps() == []
    assert _state(pid) is None  # ended and reaped
    # the connection is aborted: the user's mount now fails instead of hanging
    again = subprocess.run(["runuser", "-u", USER, "--", "stat", os.path.join(mnt, "stall")],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "not connected" in again.stderr, again.stderr


def test_a_process_of_the_job_stuck_on_the_users_fuse_ends_with_the_job(cluster, stallfs):
    """The image's /bin/sh starts a process, in a session of its own, that
    looks a name up in the user's stalled FUSE mount (bound at /ch/data1).
    SIGKILL did not end it, the job's cgroup could not be removed and the
    epilog drained the node.  Now the epilog aborts that connection, the
    process dies, the node stays in service and nothing is left."""
    wd, mnt = stallfs
    img = holder_sh_image(os.path.join(wd, "img"),
                          "/bin/busybox setsid /bin/busybox stat /ch/data1/stall")
    jobid, log = holder_job(cluster, wd, img, f"--charlie-dir={mnt}",
                            task="sleep 2; echo inside $(cat /MARKER)")
    assert re.search(rf"job {jobid}: warning: aborted FUSE connection \d+ of uid \d+: "
                     r"\d+ request\(s\) had waited unanswered", log), log[-3000:]
    assert not [c for c in cluster.user_processes() if "stat /ch/data1/stall" in c]
    settled_apart_from_the_server(cluster)


def test_a_connection_another_node_aborted_first_still_frees_this_nodes_process(stallfs,
                                                                              monkeypatch):
    """A job on two sandbox nodes (or two jobs of one user on one node) with
    processes stuck on the same connection: both epilogs wait, then both look
    for stalled connections.  The first aborts it; the second found no
    request waiting any more, aborted nothing, gave up without waiting
    again, and drained its node ("processes did not die after SIGKILL"), while
    its process was dying of the other's abort (seen in the 200-job churn).
    The wait after the abort is now taken whoever aborted."""
    from slurm_charlie.asroot import fuse
    _, mnt = stallfs
    uid, stuck = _killed_but_stuck(mnt)
    victim = stuck.pid
    try:
        real = fuse.abort_stalled

        def the_other_node_first(u, pids):
            assert real(u, pids), "the other node found nothing to abort"
            return real(u, pids)
        monkeypatch.setattr(fuse, "abort_stalled", the_other_node_first)
        left = fuse.wait_or_abort(uid, lambda: [victim] if _state(victim) not in (None, "Z")
                                  else [], 1.0)
        assert left == []
    finally:
        stuck.kill()  # not waited for here: it ends when the fixture ends the server


def test_a_process_dying_of_another_nodes_abort_is_waited_for(stallfs, monkeypatch):
    """The same race a moment later (seen in the churn again): the other
    node's abort came as this node looked, the process was exiting and
    showed no mounts any more, so this node saw no FUSE connection of the
    user's, skipped its second wait and drained its node."""
    from slurm_charlie.asroot import fuse
    _, mnt = stallfs
    uid, stuck = _killed_but_stuck(mnt)
    victim = stuck.pid
    try:
        real_abort, real_seen = fuse.abort_stalled, fuse.users_connections
        other_node: list = []
        looked = []

        def exiting_as_looked_at(u, pids):
            if looked:
                return real_seen(u, pids)
            looked.append(1)  # the other node aborts now; this one sees nothing left
            other_node.append(real_abort(u, pids))
            return []
        monkeypatch.setattr(fuse, "users_connections", exiting_as_looked_at)
        left = fuse.wait_or_abort(uid, lambda: [victim] if _state(victim) not in (None, "Z")
                                  else [], 1.0)
        assert other_node and other_node[0], "the other node aborted nothing"
        assert left == []
    finally:
        stuck.kill()  # not waited for here: it ends when the fixture ends the server


def settled_apart_from_the_server(cluster):
    """settled(), the stalling server aside (the fixture ends it)."""
    end = time.monotonic() + 30
    while time.monotonic() < end and [c for c in cluster.user_processes(0)
                                      if "stallfs" not in c]:
        time.sleep(0.2)
    others = [c for c in cluster.user_processes(0) if "stallfs" not in c]
    assert others == []
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states
    assert cluster.job_dirs() == []
