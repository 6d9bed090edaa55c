"""The background prolog (slurm_charlie/background.py) against what can
happen while it prepares a node: the job is cancelled, the process is
killed, the lock directory is not usable.  Each ends with the node in
service and nothing left: no job directory, record, lock file or process
of the job's (and the background prolog gone).

The image used has a /bin/sh that never returns, so the background prolog
waits for the container for as long as the test wants (timeouts.boot)."""

import os
import signal
import subprocess
import time

import pytest

from helpers.cluster import build_busybox_image, make_cluster

SETUP_DIR = "/run/slurm-charlie"


@pytest.fixture(scope="module")
def cluster():
    return make_cluster()


def _hanging_image(cluster, wd):
    """A stock image whose /bin/sh pauses for ever (a static C program)."""
    img = build_busybox_image(os.path.join(wd, "hang"), shell=False)
    src = os.path.join(wd, "hang.c")
    with open(src, "w") as f:
        f.write("#include <unistd.h>\nint main(void) { for (;;) pause(); }\n")
    subprocess.run(["gcc", "-static", "-O2", "-o", os.path.join(img, "bin", "sh"), src],
                   check=True, capture_output=True)
    return img


def _lock_files():
    """The jobs' lock files (the warm hook server's warm.lock and warm.sock
    live beside them)."""
    return sorted(os.path.join(SETUP_DIR, n, j) for n in os.listdir(SETUP_DIR)
                  if n.startswith("node") and os.path.isdir(os.path.join(SETUP_DIR, n))
                  for j in os.listdir(os.path.join(SETUP_DIR, n))
                  if j.isdigit()) \
        if os.path.isdir(SETUP_DIR) else []


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _background_waiting(cluster, job, timeout=60):
    """(node, pid) of the job's background prolog once it waits for the
    container (its node log says it started the holder)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        node = cluster.job(job).get("NodeList", "")
        path = os.path.join(SETUP_DIR, node, job)
        log = os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")
        if node.startswith("node") and os.path.exists(path) and os.path.exists(log) \
                and any(f"job {job}: info: starting holder" in line for line in open(log)):
            # "PID START", written just after the hook made the file: empty
            # for a moment (seen under tcg in the Debian 13 lane)
            words = open(path).read().split()
            if words and words[0].isdigit():
                assert _alive(int(words[0]))
                return node, int(words[0])
        time.sleep(0.1)
    raise AssertionError(f"job {job}: no background prolog waiting for its container")


def _job_being_prepared(cluster, name):
    """A one-node batch job of the hanging image, its background prolog
    waiting for the container: (work dir, job id, node, that process's pid)."""
    wd = cluster.workdir(name)
    img = _hanging_image(cluster, wd)
    p = cluster.as_user(["sbatch", "--parsable", "-N1", f"--charlie-image={img}",
                         "-o", "out", "--wrap", "echo RAN"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    try:
        node, pid = _background_waiting(cluster, job)
    except BaseException:  # the hanging job must not outlive the test
        cluster.run(["scancel", job])
        raise
    return wd, job, node, pid


def _settled(cluster):
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states
    end = time.monotonic() + 30
    while time.monotonic() < end and (cluster.job_dirs() or _lock_files()):
        time.sleep(0.2)
    assert cluster.job_dirs() == []
    assert _lock_files() == []
    assert cluster.user_processes() == []


def test_scancel_while_the_node_is_prepared_stops_the_background_prolog(cluster):
    """The job ends while its container starts: the epilog kills the
    background prolog first (it could start or record more), then undoes
    what it recorded: the container that was starting goes too."""
    wd, job, node, pid = _job_being_prepared(cluster, "adv-bg-cancel")
    assert cluster.job(job)["JobState"] == "RUNNING"  # the hook has returned
    cluster.run(["scancel", job], check=True)
    cluster.wait_done(job)
    end = time.monotonic() + 20
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the epilog left the background prolog running"
    log = open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()
    assert f"job {job}: info: the job's background prolog was still running; stopped it" in log
    assert not os.path.exists(os.path.join(wd, "out")) or \
        "RAN" not in open(os.path.join(wd, "out")).read()
    _settled(cluster)


def test_a_killed_background_prolog_fails_the_job_at_once(cluster):
    """Root's background prolog dies (the OOM killer, an admin): the job's
    tasks stop waiting when its lock goes and fail with a clear message;
    the node stays in service and the epilog cleans up after it."""
    wd, job, node, pid = _job_being_prepared(cluster, "adv-bg-killed")
    os.kill(pid, signal.SIGKILL)
    info = cluster.wait_done(job, timeout=60)
    assert info["JobState"] == "FAILED", info
    out = open(os.path.join(wd, "out")).read()
    assert "this node was not prepared for the job" in out and "RAN" not in out, out
    _settled(cluster)


def test_without_a_usable_lock_directory_the_prolog_prepares_the_node_itself(cluster):
    """The lock directory of the nodes is not root's alone (here: a file in
    its place): the prolog does not go to the background, says why in the
    node log, and the job runs as before."""
    wd = cluster.workdir("adv-bg-fallback")
    img = build_busybox_image(os.path.join(wd, "bb"))
    os.makedirs(SETUP_DIR, mode=0o755, exist_ok=True)
    moved = []
    try:
        for n in ("node1", "node2", "node3"):
            d = os.path.join(SETUP_DIR, n)
            if os.path.isdir(d):
                os.rename(d, d + ".away")
                moved.append(d)
            open(d, "w").close()
        p = cluster.as_user(["srun", "-N3", f"--charlie-image={img}", "cat", "/MARKER"], wd)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["inside-the-image"] * 3, p.stdout
        log = open(os.path.join(cluster.sb.state, "log", "charlie-node2.log")).read()
        assert "prolog: the node was prepared in the prolog itself (Slurm waited for it): " \
               f"cannot make {SETUP_DIR}/node2/" in log
    finally:
        for n in ("node1", "node2", "node3"):
            d = os.path.join(SETUP_DIR, n)
            if os.path.isfile(d):
                os.unlink(d)
        for d in moved:
            os.rename(d + ".away", d)
    _settled(cluster)
