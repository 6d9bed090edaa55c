"""One VM job on the Debian 13 lane node: QEMU inside the node, which is
itself emulated (tcg inside tcg), so slow: `make test-trixie-vm` runs it,
`make test` does not (docs/developer.rst, "The Debian 13 lane")."""

import os
import re

from helpers.cluster import USER
from helpers.vm import assert_clean, image_copy, job_helpers, qemu_pids, wait_for

SCOPE = "/sys/fs/cgroup/system.slice/{node}_slurmstepd.scope"


def _helpers(job, uid):
    """Pids of the user's task-mux and ssh-relay of this job (their command
    lines name the job's run directory); [] until the multiplexer runs."""
    found = [(pid, cmd) for pid, cmd in job_helpers(uid, f"/{job}/run/")
             if b"task-mux" in cmd or b"ssh-relay" in cmd]
    return [pid for pid, _ in found] if any(b"task-mux" in c for _, c in found) else []


def test_qemu_lives_under_the_job_cgroup_with_its_memory_limit(cluster, guest):
    assert cluster.sb.cgroup_mode == "v2", "runs on the Debian 13 lane node"
    wd = cluster.workdir("v2-vm")
    img = image_copy(cluster, guest, wd)
    go = os.path.join(wd, "go")
    cluster.write(os.path.join(wd, "job.sh"),
                  f"#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 1; done\n")
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "--mem=1024M",
                         "--charlie-mem=512M", f"--charlie-image={img}", "-o", "job.out",
                         "job.sh"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    job_cg = os.path.join(SCOPE.format(node="node1"), f"job_{job}")
    try:
        pids = wait_for(lambda: qemu_pids(job), "QEMU to start", 600)
        for pid in pids:
            assert open(f"/proc/{pid}/cgroup").read().strip() == \
                f"0::/system.slice/node1_slurmstepd.scope/job_{job}/charlie"
        assert int(open(os.path.join(job_cg, "memory.max")).read()) == 1024 << 20
        log_path = os.path.join(cluster.sb.state, "log", "charlie-node1.log")
        wait_for(lambda: f"job {job}: info: guest 0 ready" in open(log_path).read(),
                 "the guest to boot (tcg inside tcg)", 1500)
        # the task multiplexer (and the ssh relay when the job has its
        # network) are in the same leaf, joined at their spawn gate
        uid = int(cluster.run(["id", "-u", USER]).stdout)
        helpers = wait_for(lambda: _helpers(job, uid), "the task multiplexer", 300)
        for pid in helpers:
            assert open(f"/proc/{pid}/cgroup").read().strip() == \
                f"0::/system.slice/node1_slurmstepd.scope/job_{job}/charlie"
    finally:
        cluster.write(go, "", 0o644)
    assert_clean(cluster, job)
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node1.log")).read()
    assert re.search(rf"job {job}: info: guest 0: power-off requested", log), log[-3000:]
    assert re.search(rf"job {job}: info: in the job's cgroup, QEMU used [\d.]+ s CPU, "
                     r"peak memory [\d.]*[1-9][\d.]* MiB", log), log[-3000:]
    assert not os.path.exists(job_cg)
