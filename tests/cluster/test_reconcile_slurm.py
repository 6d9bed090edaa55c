"""`slurm-charlie reconcile` on the sandbox: it asks the real Slurm which jobs
run on the node and removes what a crashed job left (root's record and its
live process, a directory without a record), nothing of a running job."""

import os
import subprocess
import time

from slurm_charlie import asroot, layout, procfs

from slurm_charlie.proc import User

from helpers.cluster import USER


def test_reconcile_after_a_crash(cluster):
    node = "node2"
    root = os.path.join(cluster.sb.state, "runtime", node)
    user = User.lookup(int(cluster.run(["id", "-u", USER]).stdout))
    # a job that runs while reconcile looks: it must be left alone
    wd = cluster.workdir("reconcile")
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", node, "--charlie-type=none",
                         "-o", "out", "--wrap", "sleep 30"], wd)
    live = p.stdout.strip()
    assert live.isdigit(), p.stderr
    for _ in range(100):
        if os.path.isdir(os.path.join(root, live)):
            break
        time.sleep(0.1)
    # two leftovers of jobs Slurm never heard of: as a crashed epilog leaves them
    ghost = subprocess.Popen(["sleep", "300"], user=user.uid, group=user.gid)
    try:
        time.sleep(0.1)
        for jid, proc in (("990001", ghost), ("990002", None)):
            paths = layout.JobPaths(root, jid)
            asroot.create_job_dir(paths, user)
            if proc is not None:
                rec = asroot.ProcRecord("holder", proc.pid, procfs.starttime(proc.pid),
                                            user.uid, procfs.exe_of(proc.pid))
                asroot.Records(root).write(asroot.JobRecord(
                    jid, user.uid, user.gid, "container", 1, "started", (rec,), {}))
        out = cluster.run([cluster.sb.charlie_bin(), "reconcile", "--node", node,
                           "--min-age", "0"])
        assert out.returncode == 0, out.stderr
        assert "leftover job 990001: cleaned" in out.stdout
        assert "leftover job 990002: cleaned" in out.stdout
        assert ghost.wait(10) < 0
        assert sorted(os.listdir(root)) == sorted(
            n for n in os.listdir(root) if not n.startswith("99000"))
        assert os.path.isdir(os.path.join(root, live))
        assert asroot.Records(root).job_ids() == [live]
    finally:
        ghost.kill()
        ghost.wait()
    cluster.run(["scancel", live])
    cluster.wait_done(live)
    assert cluster.job_dirs() == [] and cluster.wait_nodes_idle()["node2"] == "idle"
