"""Issue 2 on the real sandbox: options at submit, meta fan-out, CH_* in
every task, the failure contract, and nothing left behind."""

import collections
import os
import re
import shutil
import time

import pytest

from slurm_charlie import hostlist


def test_help_lists_every_option(cluster):
    from slurm_charlie.options import OPTIONS
    for cmd in ("sbatch", "srun", "salloc"):
        out = cluster.as_user([cmd, "--help"], "/").stdout
        for o in OPTIONS:
            assert o.flag in out, f"{cmd} --help lacks {o.flag}"


META_JOB = """#!/bin/sh
echo "CPN=$SLURM_JOB_CPUS_PER_NODE NODES=$SLURM_JOB_NODELIST BATCH_ID=$CH_GUEST_ID"
srun -N3 -n3 --ntasks-per-node=1 sh -c '
  echo "TASK $(hostname) id=$CH_GUEST_ID count=$CH_GUEST_COUNT meta=$CH_META d1=$CH_DATA1 d2=$CH_DATA2 type=$CH_TYPE"
  cd "$CH_META" && for f in guest-count guests hosts hostfile nodes resolv.conf env; do
    echo "SUM $(hostname) $f $(sha256sum < $f | cut -c1-64)"; done
  echo "HOSTFILE $(hostname) $(tr "\\n" ";" < hostfile)"'
"""


def _meta_job_checks(out: str, data: list[str]):
    cpn = re.search(r"CPN=(\S+) NODES=(\S+) BATCH_ID=(\d)", out)
    assert cpn, out
    nodes = hostlist.expand(cpn.group(2))
    cpus = hostlist.expand_counts(cpn.group(1))
    assert nodes == ["node1", "node2", "node3"] and cpn.group(3) == "0"
    tasks = re.findall(r"TASK (\S+) id=(\d+) count=(\d+) meta=(\S+) d1=(\S*) d2=(\S*) type=(\S+)", out)
    assert sorted(t[0] for t in tasks) == nodes
    for host, gid, count, meta, d1, d2, type_ in tasks:
        assert int(gid) == nodes.index(host) and count == "3" and type_ == "none"
        assert meta.endswith(f"/{host}/{meta.split('/')[-2]}/meta"), meta
        assert [d1, d2] == data
    sums = collections.defaultdict(set)
    for host, name, digest in re.findall(r"SUM (\S+) (\S+) (\S+)", out):
        sums[name].add(digest)
    assert len(sums) == 7 and all(len(v) == 1 for v in sums.values()), sums
    want = ";".join(f"{n}:{c}" for n, c in zip(nodes, cpus)) + ";"
    hostfiles = set(re.findall(r"^HOSTFILE \S+ (.*)$", out, re.M))
    assert hostfiles == {want}, (hostfiles, want)


def test_meta_identical_on_every_node(cluster):
    wd = cluster.workdir("meta")
    for d in ("in", "out"):
        os.mkdir(os.path.join(wd, d))
        shutil.chown(os.path.join(wd, d), "chuser", "chuser")
    cluster.write(os.path.join(wd, "job.sh"), META_JOB)
    p, jobid = cluster.sbatch(wd, ["-N3", "-n4", "--charlie-dir=in",
                                   f"--charlie-dir={wd}/out", "-o", "job.out", "job.sh"])
    assert p.returncode == 0, p.stderr
    out = open(os.path.join(wd, "job.out")).read()
    _meta_job_checks(out, [f"{wd}/in", f"{wd}/out"])
    assert "CPN=2,1(x2)" in out  # -n4 on 3 nodes: the hostfile slots differ
    info = cluster.wait_done(jobid)
    assert info["JobState"] == "COMPLETED"
    assert cluster.job_dirs() == []
    assert cluster.user_processes() == []


def test_env_variables_instead_of_options(cluster):
    wd = cluster.workdir("envvars")
    for d in ("a", "b"):
        os.mkdir(os.path.join(wd, d))
    cluster.write(os.path.join(wd, "job.sh"), META_JOB)
    p, jobid = cluster.sbatch(wd, ["-N3", "-o", "job.out", "job.sh"],
                              env={"CHARLIE_DIR": "a:b", "CHARLIE_TYPE": "none"})
    assert p.returncode == 0, p.stderr
    _meta_job_checks(open(os.path.join(wd, "job.out")).read(), [f"{wd}/a", f"{wd}/b"])


def test_salloc_and_srun_allocations(cluster):
    wd = cluster.workdir("salloc")
    show = ["sh", "-c", 'echo "$(hostname) $CH_GUEST_ID $CH_GUEST_COUNT $CH_DATA1"']
    for cmd in (["salloc", "-N2", "--charlie-dir=.", "srun"], ["srun", "-N2", "--charlie-dir=."]):
        p = cluster.as_user([*cmd, *show], wd)
        assert p.returncode == 0, p.stderr
        lines = sorted(p.stdout.splitlines())
        assert len(lines) == 2 and lines[0] < lines[1], p.stdout
        # guest ids follow the order of the job's node list, whichever nodes it got
        assert [l.split()[1:] for l in lines] == [["0", "2", wd], ["1", "2", wd]]


def test_step_cannot_change_charlie_options(cluster):
    wd = cluster.workdir("stepopts")
    cluster.write(os.path.join(wd, "job.sh"),
                  "#!/bin/sh\nsrun -N1 --charlie-dir=/tmp true; echo step-rc=$?\n")
    p, jobid = cluster.sbatch(wd, ["-N1", "--charlie-dir=.", "-o", "job.out", "job.sh"])
    out = open(os.path.join(wd, "job.out")).read()
    assert "--charlie-* options belong to the allocation (sbatch/salloc)" in out
    assert "step-rc=1" in out


def test_plain_job_untouched(cluster):
    wd = cluster.workdir("plain")
    # a charlie job first: it shows that the node logs read below are the
    # ones the hooks write (an absent or wrong log would let anything pass).
    # It runs a step on every node: a node where no task starts never waits
    # for its background prolog, and the epilog may stop that prolog before
    # it logs "done" (cleanup.py; seen once in CI on node3)
    q, seen = cluster.sbatch(wd, ["-N3", "-o", "seen.out", "--charlie-type=none",
                                  "--wrap", "srun true"])
    assert q.returncode == 0, q.stderr
    # a CHARLIE_* variable that names no option (CI's CHARLIE_CHURN_JOBS
    # made every job of the suite a charlie job once) is someone else's
    p, jobid = cluster.sbatch(wd, ["-N3", "-o", "job.out", "--wrap",
                                   "srun sh -c 'echo x${CH_GUEST_ID}x'"],
                              env={"CHARLIE_CHURN_JOBS": "200", "CHARLIE_HOME": "/x"})
    assert p.returncode == 0, p.stderr
    assert open(os.path.join(wd, "job.out")).read().split() == ["xx"] * 3
    cluster.wait_done(jobid)
    for i in (1, 2, 3):
        log = open(os.path.join(cluster.sb.state, "log", f"charlie-node{i}.log")).read()
        assert f"job {seen}: info: prolog done" in log, f"node{i}"
        assert f"job {jobid}:" not in log, f"node{i}"  # the hooks never started Python


@pytest.mark.parametrize("var,want", [("CHARLIE_IMGAE", "CHARLIE_IMAGE"),
                                      ("CHARLIE_TPYE", "CHARLIE_TYPE"),
                                      ("CHARLIE_DIRS", "CHARLIE_DIR"),
                                      ("CHARLIE_TMPSIZE", "CHARLIE_TMP_SIZE")])
def test_a_misspelt_option_variable_is_refused_with_its_right_name(cluster, var, want):
    """CHARLIE_IMGAE=... would run the job on the bare host without what
    it asked for: the submission fails and names the variable meant."""
    wd = cluster.workdir("misspelt")
    for argv in (["srun", "-N1", "true"], ["sbatch", "--wrap", "true"]):
        p = cluster.as_user(argv, wd, env={var: "/x"})
        assert p.returncode != 0, (argv, p.stdout)
        assert f"slurm-charlie: {var} is not a slurm-charlie variable" in p.stderr, p.stderr
        assert f"hint: did you mean {want}?" in p.stderr, p.stderr


@pytest.fixture(scope="module")
def badtree(cluster):
    wd = cluster.workdir("bad")
    os.mkdir(os.path.join(wd, "data"))
    secret = os.path.join(wd, "secret")
    os.mkdir(secret, 0o700)  # root's, not the user's
    cluster.write(os.path.join(wd, "job.sh"), "#!/bin/sh\necho ran\n")
    cluster.write(os.path.join(wd, "secret.sh"), "#!/bin/sh\n", 0o600)
    os.chown(os.path.join(wd, "secret.sh"), 0, 0)
    for name, mode in (("disk.qcow2", 0o644), ("closed.qcow2", 0o600)):
        with open(os.path.join(wd, name), "wb") as f:
            f.write(b"QFI\xfb" + b"\0" * 508)  # qcow2 magic is enough to detect
        os.chmod(os.path.join(wd, name), mode)
    return wd


BAD_SUBMIT = [
    (["--charlie-image=missing.qcow2"], {},
     "--charlie-image: cannot access: No such file or directory: {wd}/missing.qcow2"),
    (["--charlie-image=closed.qcow2"], {},
     "--charlie-image: cannot read: Permission denied: {wd}/closed.qcow2"),
    (["--charlie-type=docker"], {}, "--charlie-type: unknown value: 'docker'"),
    (["--charlie-dir=data" for _ in range(5)][:1] +
     [f"--charlie-dir=/{d}" for d in ("tmp", "usr", "var", "etc")], {},
     "--charlie-dir: given more than 4 times"),
    (["--charlie-dir=job.sh"], {}, "--charlie-dir: not a directory: {wd}/job.sh"),
    (["--charlie-dir=secret"], {},
     "--charlie-dir: directory not readable by you: {wd}/secret"),
    (["--charlie-dir=nowhere"], {},
     "--charlie-dir: cannot access: No such file or directory: {wd}/nowhere"),
    (["--charlie-image=disk.qcow2", "--charlie-job=secret.sh"], {},
     "--charlie-job: file not readable by you: {wd}/secret.sh"),
    (["--charlie-image=disk.qcow2", "--charlie-job=gone.sh"], {},
     "--charlie-job: cannot access: No such file or directory"),
    (["--charlie-image=disk.qcow2", "--charlie-interactive", "--charlie-job=job.sh"], {},
     "--charlie-interactive: conflicts with --charlie-job"),
    (["--charlie-image=disk.qcow2", "--charlie-write"], {},
     "--charlie-write: applies to container images only: {wd}/disk.qcow2"),
    (["--charlie-dir=da\nta"], {}, "--charlie-dir: value contains a newline"),
    ([], {"CHARLIE_DIR": "da\nta"}, "--charlie-dir: value contains a newline"),
    ([], {"CHARLIE_TYPE": "docker"}, "--charlie-type: unknown value: 'docker'"),
    (["--charlie-commit=x"], {}, "--charlie-commit: not a guest number: 'x'"),
]


@pytest.mark.parametrize("args,env,message", BAD_SUBMIT,
                         ids=[m.split(":")[0] + ":" + m.split(":")[1] for _, _, m in BAD_SUBMIT])
def test_bad_input_refused_at_submit(cluster, badtree, args, env, message):
    before = cluster.run(["squeue", "-h", "-o", "%i"]).stdout
    p = cluster.as_user(["sbatch", "-N1", *args, "job.sh"], badtree, env)
    assert p.returncode != 0
    assert "Submitted batch job" not in p.stdout
    assert message.format(wd=badtree) in p.stderr, p.stderr
    assert re.search(r"slurm-charlie(\[\d+\])?: ", p.stderr)
    assert cluster.run(["squeue", "-h", "-o", "%i"]).stdout == before


def test_commit_guest_checked_against_node_count(cluster, badtree):
    """The node count is not known to the shim at submit; the validator checks
    it whenever it is given, and the prolog always does (tests/unit/test_hooks)."""
    bin_ = cluster.sb.charlie_bin()
    p = cluster.as_user([bin_, "validate", "--nodes", "3", "--charlie-image=disk.qcow2",
                         "--charlie-commit=5"], badtree)
    assert p.returncode == 1
    assert "--charlie-commit: guest 5 does not exist in a job of 3 node(s): 5" in p.stderr
    assert "hint: guests are numbered 0 .. 2" in p.stderr


def test_user_error_found_on_node_fails_job_keeps_node(cluster):
    wd = cluster.workdir("nodeerr")
    os.mkdir(os.path.join(wd, "vanishing"))
    p = cluster.as_user(["sbatch", "--parsable", "--hold", "--no-requeue", "-N3",
                         "--charlie-dir=vanishing", "-o", "job.out", "--wrap",
                         "echo should-not-run"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    os.rmdir(os.path.join(wd, "vanishing"))
    cluster.run(["scontrol", "release", jobid], check=True)
    info = cluster.wait_done(jobid)
    assert info["JobState"] == "FAILED"
    out = open(os.path.join(wd, "job.out")).read()
    assert f"job {jobid}: error: --charlie-dir: cannot access: No such file or directory: {wd}/vanishing" in out
    assert "hint:" in out and "should-not-run" not in out
    assert set(cluster.wait_nodes_idle().values()) == {"idle"}
    time.sleep(0.5)
    assert cluster.job_dirs() == []


def test_node_fault_drains_with_reason(cluster):
    wd = cluster.workdir("nodefault")
    blocker = os.path.join(cluster.sb.state, "runtime", "node3")
    shutil.rmtree(blocker, ignore_errors=True)
    open(blocker, "w").close()
    try:
        # The batch script may start as soon as node1's prolog is done (Slurm
        # waits per node), so the job needs a step on node3 to depend on it.
        p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N3",
                             "--charlie-type=none", "-o", "job.out", "--wrap",
                             "srun -N3 sh -c 'echo ran-on-$(hostname)'"], wd)
        assert p.returncode == 0, p.stderr
        info = cluster.wait_done(p.stdout.strip())
        assert info["JobState"] in ("CANCELLED", "FAILED", "NODE_FAIL"), info
        out = os.path.join(wd, "job.out")  # absent when cancelled before the batch step
        assert not os.path.exists(out) or "ran-on-node3" not in open(out).read()
        reasons = cluster.run(["sinfo", "-h", "-R", "-o", "%N|%E"]).stdout
        assert f"node3|slurm-charlie: runtime_root: not a directory: {blocker}" in reasons
        # the background prolog's lock file goes with the epilog, fault or not
        assert not os.path.exists(f"/run/slurm-charlie/node3/{p.stdout.strip()}")
        for i in (1, 2):  # the other nodes stay in service
            assert f"node{i}|" not in reasons
    finally:
        os.unlink(blocker)
        cluster.resume_until_stable("node3")
    assert set(cluster.wait_nodes_idle().values()) == {"idle"}
    time.sleep(0.5)
    assert cluster.job_dirs() == []


def test_sandbox_status_and_config_check(cluster):
    bin_ = cluster.sb.charlie_bin()
    p = cluster.run([bin_, "config", "check"])
    assert p.returncode == 0, p.stderr
    assert re.search(r"runtime_root\s+= '.*/runtime/%n'\s+# .*charlie.toml", p.stdout)
    assert re.search(r"vm\.accel\s+= 'tcg'\s+# .*charlie.toml", p.stdout)
    assert re.search(r"vm\.qemu\s+= 'qemu-system-x86_64'\s+# default", p.stdout)
    p = cluster.run([bin_, "sandbox", "status"])
    assert p.returncode == 0 and p.stdout.count("idle") == 3


def test_sandbox_up_is_idempotent(cluster):
    pids = {f: open(f).read().split()[0] for f in
            (os.path.join(cluster.sb.state, "run", n) for n in os.listdir(
                os.path.join(cluster.sb.state, "run"))) if f.endswith(".pid")}
    bin_ = cluster.sb.charlie_bin()
    p = cluster.run([bin_, "sandbox", "up", "--nodes", str(cluster.sb.nnodes)])
    assert p.returncode == 0, p.stderr
    # slurmctld, the image registry, the slurmds, MariaDB, slurmdbd and
    # slurmrestd, and with fake GPUs their fake sysfs's kernel
    # (slurm_charlie/fakesys.py)
    assert len(pids) == 5 + cluster.sb.nnodes + (1 if cluster.sb.gpus_per_node else 0), pids
    assert {f: open(f).read().split()[0] for f in pids} == pids  # nothing restarted
    assert cluster.sb.leftovers() != []  # the check sees a running sandbox
