"""The shim under each Slurm release's SPANK rules (22.05 on these hosts,
24.11 in the Debian 13 lane, which runs this file too).

Two changes since 22.05 touch a SPANK plugin (Slurm's NEWS): from 23.11 a
callback that fails marks the step failed and srun, salloc and
``sbatch --wait`` return 1; from 23.11 and 24.05 the option variables
reach the remote side even with ``--export=NONE``.  So the shim fails a
callback only where the task must not run (the node's preparation
failed, a step changed the allocation's options) and never for a job
that is not a charlie job, and a job's options must not depend on the
user's environment reaching the nodes."""

import os
import subprocess
import time

from helpers.cluster import USER


def test_export_none_still_makes_a_charlie_job(cluster):
    """sbatch and srun with --export=NONE: the tasks still get the job's
    meta directory and data directories (the options reach every node
    through Slurm, not through the user's environment)."""
    wd = cluster.workdir("spank-export-none")
    os.mkdir(os.path.join(wd, "data"))
    p, jobid = cluster.sbatch(wd, ["--export=NONE", "-N2", "--charlie-type=none",
                                   f"--charlie-dir={wd}/data", "-o", "out", "--wrap",
                                   "srun --export=NONE /bin/sh -c "
                                   "'echo task $CH_GUEST_ID $CH_GUEST_COUNT $CH_DATA1'; "
                                   "echo srun-rc=$?"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode == 0, p.stderr
    assert sorted(ln for ln in out.splitlines() if ln.startswith("task")) == [
        f"task 0 2 {wd}/data", f"task 1 2 {wd}/data"], out
    assert "srun-rc=0" in out, out


def test_steps_of_plain_and_charlie_jobs_return_0(cluster):
    """Every callback of the shim succeeds for a job that is not a charlie
    job and for one whose preparation went well: srun, salloc and
    sbatch --wait all return 0 (on 24.11 any failed callback makes them
    return 1)."""
    wd = cluster.workdir("spank-rc")
    for argv in (["srun", "-N2", "true"],
                 ["srun", "-N2", "--charlie-type=none", "true"],
                 ["salloc", "-N1", "--charlie-type=none", "srun", "true"],
                 # one sbatch --wait: it polls the job at 2, 10, 42 s (slow)
                 ["sbatch", "--wait", "-N1", "--charlie-type=none", "-o", "/dev/null",
                  "--wrap", "srun true"]):
        p = cluster.as_user(argv, wd)
        assert p.returncode == 0, (argv, p.stderr)
        assert "error" not in p.stderr.lower(), (argv, p.stderr)


def test_a_preparation_that_fails_fails_the_job_and_sbatch_wait(cluster):
    """The node's preparation fails for the user's reason (a data directory
    removed between submit and start): the shim fails the batch step with
    the prolog's message, sbatch --wait returns non-zero, the job is
    FAILED and the node stays in service."""
    wd = cluster.workdir("spank-fail")
    os.mkdir(os.path.join(wd, "vanishing"))
    p = subprocess.Popen(["runuser", "-u", USER, "--", "env",
                          f"SLURM_CONF={cluster.sb.conf}", "PATH=/usr/bin:/bin",
                          "sh", "-c", f'cd "{wd}" && exec sbatch --wait --hold --no-requeue '
                          '-N1 --charlie-dir=vanishing -o out --wrap "echo should-not-run"'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    line = p.stdout.readline()
    assert line.startswith("Submitted batch job"), (line, p.stderr.read() if p.poll() else "")
    jobid = line.split()[-1]
    os.rmdir(os.path.join(wd, "vanishing"))
    cluster.run(["scontrol", "release", jobid], check=True)
    try:
        rc = p.wait(timeout=300)  # sbatch --wait polls at 2, 10, 42, 74 s
    finally:
        if p.poll() is None:
            p.kill()
    assert rc != 0
    assert cluster.wait_done(jobid)["JobState"] == "FAILED"
    out = open(os.path.join(wd, "out")).read()
    assert "--charlie-dir: cannot access: No such file or directory" in out, out
    assert "should-not-run" not in out
    # the failed job's epilog: seconds here, over 30 s under tcg (the lane)
    assert set(cluster.wait_nodes_idle(120).values()) == {"idle"}
    end = time.monotonic() + 10
    while cluster.job_dirs() and time.monotonic() < end:
        time.sleep(0.2)
    assert cluster.job_dirs() == []
