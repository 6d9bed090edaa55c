"""PrologFlags=RunInJob on the Debian 13 lane (Slurm 24.11): refused with
its fix.  Runs last in the lane (tests/trixie/lane.py): it leaves the
sandbox's Slurm reconfigured."""

import os
import re

from helpers.vm import wait_for


def _log(cluster, node):
    return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()


def test_run_in_job_is_refused_with_its_fix(v2, images):
    """PrologFlags=RunInJob (Slurm 24.05+) runs the prolog inside the
    extern step, whose end would kill the guests before the epilog: doctor
    fails it, and a charlie job's prolog drains the node with a reason that
    names the flag and the fix.  The lane runs this last: 24.11's
    `scontrol reconfigure` re-executes slurmctld, after which the sandbox's
    controller did not schedule again, so nothing is restored."""
    conf = v2.sb.conf
    saved = open(conf).read()
    flags = v2.sb.prolog_flags
    assert f"PrologFlags={flags}\n" in saved
    wd = v2.workdir("v2-runinjob")
    with open(conf, "w") as f:
        f.write(saved.replace(f"PrologFlags={flags}\n", "PrologFlags=Alloc,Contain,RunInJob\n"))
    assert v2.run(["scontrol", "reconfigure"]).returncode == 0
    wait_for(lambda: "RunInJob" in v2.run(["scontrol", "show", "config"]).stdout,
             "slurmctld to take RunInJob", 60)
    v2.wait_nodes_idle(60)
    p = v2.run([v2.sb.charlie_bin(), "doctor", "--node", "node3"], timeout=300)
    assert re.search(r"^FAIL  cgroups: PrologFlags=\S*RunInJob\S*: the prolog runs inside "
                     r"the extern step", p.stdout, re.M), p.stdout
    assert "remove RunInJob from PrologFlags" in p.stdout
    p, job = v2.sbatch(wd, ["-N1", "-w", "node3", "--no-requeue", "-o", "job.out",
                            f"--charlie-image={images['bb']}", "--wrap", "srun true"],
                       timeout=300)
    assert p.returncode != 0
    reasons = v2.run(["sinfo", "-h", "-R", "-o", "%N|%E"]).stdout
    assert re.search(r"node3\|slurm-charlie: PrologFlags: RunInJob runs the prolog inside",
                     reasons), reasons
    log = _log(v2, "node3")
    assert "hint: remove RunInJob from PrologFlags in slurm.conf" in log, log[-2000:]
