"""cgroup v2 on a node that really runs it: the Debian 13 lane (make
test-trixie boots it; tests/trixie/lane.py runs these inside, against the
project's sandbox on Slurm 24.11 with cgroup/v2).  On any other node they
fail: the lane is the only place they mean something."""

import os
import re

from helpers.vm import wait_for

SCOPE = "/sys/fs/cgroup/system.slice/{node}_slurmstepd.scope"


def _log(cluster, node="node1"):
    return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()


def _drained(cluster):
    return [n for n, s in cluster.sb.node_states().items() if "drain" in s or "down" in s]


def test_doctor_names_the_v2_layout(v2, monkeypatch):
    """doctor's cgroup check on the real v2 tree (its own function: the
    whole doctor, with its VM probe under tcg, takes 90 s here; its output
    lines are checked on the host)."""
    from slurm_charlie import doctor
    monkeypatch.setenv("SLURM_CONF", v2.sb.conf)
    scope = SCOPE.format(node="node1")
    status, text, _ = doctor._cgroups("node1")
    assert status == "ok", (status, text)
    assert re.search(r"^mounts: v2; cgroup.conf: CgroupPlugin=cgroup/v2; "
                     rf"layout v2, scope {re.escape(scope)} \(root's processes go to "
                     r"job_J/charlie\)", text), text


def test_doctor_names_a_controller_missing_below_the_jobs(v2, monkeypatch):
    """The memory controller taken away below Slurm's scope (as on a node
    whose cgroup.conf does not enable it): doctor's cgroup check warns,
    naming the controller and the fix.  Its own function, on the real tree:
    the whole doctor (a VM probe under tcg) takes a minute here."""
    from slurm_charlie import doctor
    monkeypatch.setenv("SLURM_CONF", v2.sb.conf)
    scope = SCOPE.format(node="node1")
    control = os.path.join(scope, "cgroup.subtree_control")
    v2.wait_nodes_idle(60)  # no job below the scope uses memory.max now
    assert "memory" in open(control).read().split()
    with open(control, "w") as f:
        f.write("-memory")
    try:
        status, text, hint = doctor._cgroups("node1")
    finally:
        with open(control, "w") as f:
            f.write("+memory")
    assert "memory" in open(control).read().split()
    assert status == "warn", (status, text)
    assert f"v2 scope {scope} does not enable memory below the jobs" in text, text
    assert "EnableControllers=yes in cgroup.conf" in hint


def test_holder_and_fuse_server_live_under_the_job_cgroup(v2, images):
    """A squashfs image (mounted by squashfuse, a FUSE server) with
    --mem=256M: the holder and the FUSE server are in job_J/charlie with the
    job's memory.max above them; status shows their usage; after the job
    nothing is left (process, cgroup, mount, job directory)."""
    wd = v2.workdir("v2-place")
    go = os.path.join(wd, "go")
    v2.write(os.path.join(wd, "job.sh"), """#!/bin/sh
srun -N1 -n1 sh -c 'echo INSIDE $(cat /MARKER); while [ ! -e /ch/data1/go ]; do sleep 0.2; done'
""")
    p = v2.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "--mem=256M",
                    f"--charlie-image={images['sqfs']}", "--charlie-dir=.", "-o", "job.out",
                    "job.sh"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    scope = SCOPE.format(node="node1")
    leaf = os.path.join(scope, f"job_{job}", "charlie")
    try:
        wait_for(lambda: "INSIDE" in _read(os.path.join(wd, "job.out")), "the task", 300)
        pids = open(os.path.join(leaf, "cgroup.procs")).read().split()
        comms = {open(f"/proc/{pid}/comm").read().strip() for pid in pids}
        assert "squashfuse" in comms or "squashfuse_ll" in comms, comms
        assert comms & {"ch-run", "sh", "sleep", "busybox"}, comms
        for pid in pids:
            assert open(f"/proc/{pid}/cgroup").read().strip() == \
                f"0::/system.slice/node1_slurmstepd.scope/job_{job}/charlie"
        assert int(open(os.path.join(scope, f"job_{job}", "memory.max")).read()) == 256 << 20
        # the leaf has its own memory and CPU accounting (enabled below job_J)
        enabled = open(os.path.join(scope, f"job_{job}", "cgroup.subtree_control")).read()
        assert {"memory", "cpu", "cpuset"} <= set(enabled.split()), enabled
        assert int(open(os.path.join(leaf, "memory.peak")).read()) > 0
        # no process in an inner cgroup: job_J itself holds none
        assert open(os.path.join(scope, f"job_{job}", "cgroup.procs")).read() == ""
        st = v2.run([v2.sb.charlie_bin(), "status", "--node", "node1"])
        assert re.search(rf"^{job}\ttype=container\tphase=started\tcpu=\d+\.\ds\t"
                         r"mem_peak=[1-9]\d*KiB$", st.stdout, re.M), st.stdout
    finally:
        v2.write(go, "", 0o644)
    info = v2.wait_done(job, timeout=300)
    assert info["JobState"] == "COMPLETED", info
    log = _log(v2)
    assert f"job {job}: info: holder in the job's cgroups {leaf}" in log, log[-3000:]
    assert re.search(rf"job {job}: info: container: holder \d+ still running at the "
                     r"job's end; stopping it", log), log[-3000:]
    assert re.search(rf"job {job}: info: in the job's cgroup, the container used "
                     r"[\d.]+ s CPU, peak memory \d+\.\d MiB", log), log[-3000:]
    wait_for(lambda: not os.path.exists(os.path.join(scope, f"job_{job}")),
                "the job's cgroup to go", 30)
    assert v2.job_dirs() == [] and v2.user_processes() == []
    mounts = open("/proc/self/mountinfo").read()
    assert "squashfuse" not in mounts and f"/{job}/" not in mounts, mounts


def _read(path):
    try:
        return open(path).read()
    except OSError:
        return ""


def test_memory_limit_kills_only_that_job(v2, images):
    """--mem=256M and a task that touches 512 MiB: the job's limit (on
    job_J, above the step and our leaf) ends it; no node is drained and the
    next job on the node runs."""
    wd = v2.workdir("v2-oom")
    p, job = v2.sbatch(wd, ["-N1", "-w", "node2", "--mem=256M",
                            f"--charlie-image={images['bb']}", "-o", "oom.out", "--wrap",
                            "srun dd if=/dev/zero of=/dev/null bs=512M count=1; "
                            "echo STEP-RC=$?"], timeout=300)
    out = _read(os.path.join(wd, "oom.out"))
    rc = re.search(r"STEP-RC=(\d+)", out)
    assert rc and rc.group(1) != "0", out
    assert re.search(r"oom|Killed|out of memory|OUT_OF_MEMORY", out, re.I), out
    assert _drained(v2) == []
    p, job2 = v2.sbatch(wd, ["-N1", "-w", "node2", "--mem=256M",
                             f"--charlie-image={images['bb']}", "-o", "ok.out", "--wrap",
                             "srun cat /MARKER"], timeout=300)
    assert p.returncode == 0 and "inside-the-image" in _read(os.path.join(wd, "ok.out"))
    assert not os.path.exists(os.path.join(SCOPE.format(node="node2"), f"job_{job}"))


def test_reconcile_removes_a_planted_leftover_job_cgroup(v2):
    scope = SCOPE.format(node="node3")
    planted = os.path.join(scope, "job_999999")
    os.makedirs(os.path.join(planted, "charlie"))
    p = v2.run([v2.sb.charlie_bin(), "reconcile", "--node", "node3", "--min-age", "0"])
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert not os.path.exists(planted), os.listdir(scope)

