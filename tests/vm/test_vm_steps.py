"""Steps into the guests of one VM job: srun tasks, MPICH over PMI2, the
job's cgroup and memory, and scancel while a step runs.  The checks that
only look share one -N3 job's guests (booting three tcg guests costs tens
of seconds each time); the last test ends the job with scancel.

The job: -N3, 2 tasks per node, --mem=2048M, --charlie-mem=1500M and
--charlie-cpus=1 (one vCPU boots in 20 s where two took 34 s: three tcg
guests share two cores), a data share; its batch script stays on node1 and
sleeps.  (QEMU with tcg needs
far more than the guest's memory once MPI has run a while -- its
translation cache -- so a 600 MiB guest under a 900 MiB job limit was
killed by the job's own cgroup after a dozen MPICH runs.)  Steps are started from
the host as the user with ``srun --jobid`` (SLURM_JOB_ID for scripts that
run several), as a user's second terminal would."""

import os
import re
import shutil
import signal
import subprocess
import types

import pytest

from helpers.cluster import USER
from helpers.vm import (BOOT_TIMEOUT, assert_clean, image_copy, job_helpers, qemu_pids,
                        wait_for)

BATCH = r"""#!/bin/sh
echo "BATCH $(hostname)" > batch.host
exec sleep 3600
"""


@pytest.fixture(scope="module")
def shared(cluster, guest):
    wd = cluster.workdir("vm-shared")
    img = image_copy(cluster, guest, wd)
    share = os.path.join(wd, "data")
    os.mkdir(share)
    shutil.chown(share, USER, USER)
    cluster.write(os.path.join(wd, "batch.sh"), BATCH)
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N3",
                         "--ntasks-per-node=2", "--mem=2048M", "--charlie-mem=1500M", "--charlie-cpus=1",
                         "-o", "out", "-e", "err", f"--charlie-image={img}",
                         "--charlie-dir=data", "batch.sh"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()

    def guests_ready():
        dirs = sorted(d for d in cluster.job_dirs() if d.endswith(f"/{job}"))
        return len(dirs) == 3 and all(
            any(os.path.exists(f"{d}/meta/sync/{g}.ready") for d in dirs) for g in range(3))
    try:
        wait_for(guests_ready, "the three guests")
        wait_for(lambda: os.path.exists(os.path.join(wd, "batch.host")), "the batch script")
        yield types.SimpleNamespace(job=job, wd=wd, share=share, img=img)
    finally:
        cluster.run(["scancel", job])
        assert_clean(cluster, job)


def _in_job(cluster, shared, argv, timeout=300):
    """Run argv as the user on the host with the shared job's allocation."""
    return cluster.as_user(argv, shared.wd, env={"SLURM_JOB_ID": shared.job}, timeout=timeout)


SRUN_STEPS = r"""#!/bin/sh
cd "$1"
srun -N3 -n6 sh -c 'echo "TASK $SLURM_PROCID $(hostname) $(uname -r) $(id -un) $(pwd) $CH_GUEST_ID"'
echo "STEP-RC $?"
srun -N1 -n1 sh -c 'echo "to stderr" >&2; exit 5'
echo "FAIL-RC $?"
echo "via stdin" | srun -N1 -n1 cat
CHARLIE_ON_HOST=1 srun -N1 -n1 hostname | sed s/^/ONHOST-/
srun -N1 -n1 /no/such/program
echo "MISSING-RC $?"
srun -N1 -n1 sh -c 'trap "echo GOT-USR1; exit 3" USR1; touch waiting; while :; do sleep 0.2; done' &
pid=$!
while [ ! -e waiting ]; do sleep 0.2; done
kill -USR1 $pid
wait $pid
echo "SIGNAL-RC $?"
"""


def test_srun_tasks_run_in_the_guests(cluster, shared):
    """The batch script stays on the host; every srun task runs in its
    node's guest, as the user, in the share where the host had its working
    directory; exit codes, stderr and stdin come back."""
    assert open(os.path.join(shared.wd, "batch.host")).read() == "BATCH node1\n"
    cluster.write(os.path.join(shared.wd, "steps.sh"), SRUN_STEPS)
    p = _in_job(cluster, shared, ["sh", "steps.sh", shared.share])
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, (out, err)
    host_kernel = os.uname().release
    tasks = sorted(re.findall(r"^TASK (\d) (\S+) (\S+) (\S+) (\S+) (\d)$", out, re.M))
    assert [(t[0], t[1], t[3], t[4], t[5]) for t in tasks] == [
        (str(i), f"chgu{i // 2}", USER, "/ch/data1", str(i // 2)) for i in range(6)], out
    assert all(t[2] != host_kernel for t in tasks), (host_kernel, out)
    assert "STEP-RC 0" in out and "FAIL-RC 5" in out, out
    assert "to stderr" in err
    assert "via stdin" in out
    assert "ONHOST-node1" in out, out
    assert "MISSING-RC 127" in out and "cannot run /no/such/program in guest chgu0" in err
    assert "GOT-USR1" in out and "SIGNAL-RC 3" in out, out  # srun's signal, in the guest


MPICH_RUNS = 20
MPICH_STEPS = r"""#!/bin/sh
ok=0
for i in $(seq 1 %d); do
    if timeout 120 srun --mpi=pmi2 -N3 -n6 /usr/local/bin/mpi_allreduce.mpich > run.$i 2>&1 \
        && [ "$(grep -c ' of 6 on chgu. sum 6$' run.$i)" = 6 ]; then
        ok=$((ok + 1))
    else
        echo "RUN $i FAILED"; cat run.$i
    fi
done
echo "MPICH-OK $ok"
""" % MPICH_RUNS


def test_srun_mpich_over_pmi2_in_guests(cluster, shared):
    """MPICH ranks in the guests wire up through Slurm's own PMI2 server
    (the relay carries PMI_FD): 3 guests x 2 ranks, every run correct."""
    cluster.write(os.path.join(shared.wd, "mpich.sh"), MPICH_STEPS)
    p = _in_job(cluster, shared, ["sh", "mpich.sh"], timeout=MPICH_RUNS * 150)
    assert f"MPICH-OK {MPICH_RUNS}" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 0, (p.stdout, p.stderr)


def test_guest_size_given_within_the_job_request(cluster, shared):
    """--mem=2048M --charlie-mem=1500M --charlie-cpus=1: the guest gets the
    1500 MiB and the one CPU asked for (within the job's allocation; the
    job's request less the overhead is
    tests/vm/test_vm.py::test_exit_code_is_guest_zeros)."""
    for node in ("node1", "node2", "node3"):
        log = open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()
        seen = re.findall(rf"job {shared.job}: info: guest \d memory: (\d+) MiB \(([^)]*)\)",
                          log)
        assert seen == [("1500", "--charlie-mem")], (node, seen)
    p = _in_job(cluster, shared, ["srun", "-N3", "-n3", "sh", "-c",
                                  "echo CPUS $(nproc); awk '/MemTotal/ {print \"MEM\", $2}' "
                                  "/proc/meminfo"])
    kib = [int(k) for k in re.findall(r"MEM (\d+)", p.stdout)]
    assert len(kib) == 3 and all(k * 1024 <= 1500 << 20 for k in kib), (p.stdout, p.stderr)
    assert re.findall(r"CPUS (\d+)", p.stdout) == ["1", "1", "1"], (p.stdout, p.stderr)


def _cgroup_of(pid, controller):
    for line in open(f"/proc/{pid}/cgroup"):
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        if controller in ctrls.split(","):
            return path
    return None


def _hms(text):
    """Seconds of a Slurm time: [D-]HH:MM:SS[.mmm] or MM:SS.mmm."""
    days, _, rest = text.rpartition("-")
    parts = [float(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days or 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]


def _kib(text):
    units = {"": 1 / 1024, "K": 1, "M": 1024, "G": 1 << 20}
    m = re.fullmatch(r"([\d.]+)([KMG]?)", text)
    return float(m.group(1)) * units[m.group(2)]


def _helpers_on(job, node, uid):
    """{command: pid} of the user's slurm-charlie helpers of this job on
    this node (their command lines name the node's job run directory)."""
    return {name.decode(): pid for pid, cmd in job_helpers(uid, f"/{node}/{job}/run/")
            for name in (b"task-mux", b"ssh-relay") if name in cmd}


def _qemu_on(job, node):
    """The job's QEMU on a sandbox node (by its guest's name: chguN on nodeN+1)."""
    want = f"charlie-{job}-chgu{int(node[-1]) - 1}".encode()
    pids = [p for p in qemu_pids(job) if want in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(pids) == 1, (node, pids)
    return pids[0]


def test_qemu_runs_inside_the_jobs_cgroup(cluster, shared):
    """QEMU joins the job's memory and cpuacct cgroups (Slurm's own tree for
    the job, as the extern step's task): the job's memory limit covers it,
    and Slurm's own accounting (sstat of J.extern) reports the guest's CPU
    time and memory."""
    job = shared.job
    pid = _qemu_on(job, "node3")
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    want = f"/slurm_node3/uid_{uid}/job_{job}/step_extern/task_2"  # node3: the job's node 2
    assert _cgroup_of(pid, "memory") == want
    assert _cgroup_of(pid, "cpuacct") == want
    # the user's helpers root starts beside it (the ssh relay when the job
    # has its network, the task multiplexer when the prolog starts it) join
    # the same place at their spawn gate
    helpers = _helpers_on(job, "node3", uid)
    assert helpers, "no task-mux or ssh-relay of the job on node3"
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node3.log")).read()
    if re.search(rf"job {job}: info: guest 2: ssh through ", log):
        assert "ssh-relay" in helpers, helpers
    for name, hpid in helpers.items():
        assert _cgroup_of(hpid, "memory") == want, name
        assert _cgroup_of(hpid, "cpuacct") == want, name
    job_cg = f"/sys/fs/cgroup/memory/slurm_node3/uid_{uid}/job_{job}"
    assert int(open(f"{job_cg}/memory.limit_in_bytes").read()) == 2048 << 20
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())
              .group(1)) << 10
    assert int(open(f"{job_cg}/step_extern/memory.usage_in_bytes").read()) >= rss // 2
    assert int(open(f"{job_cg}/memory.usage_in_bytes").read()) >= rss // 2
    cpu = int(open(f"/sys/fs/cgroup/cpuacct/slurm_node3/uid_{uid}/job_{job}"
                   "/step_extern/cpuacct.usage").read())
    assert cpu > 10**9  # a tcg boot costs seconds of CPU, all of it the job's
    # Slurm's accounting: the extern step (PrologFlags=Contain) adopted
    # the task cgroup QEMU sits in; jobacct_gather/cgroup reads its totals
    assert "Contain" in cluster.sb.prolog_flags

    def extern_line():  # the extern step starts once every prolog is done
        return cluster.run(["sstat", "-a", "-n", "-P", "-j", f"{job}.extern",
                            "-o", "JobID,AveCPU,MaxRSS"]).stdout.strip()
    wait_for(lambda: extern_line().count("|") == 2 and "\n" not in extern_line(),
             "the extern step in sstat")
    line = extern_line()
    jid, ave_cpu, max_rss = line.split("|")
    assert jid == f"{job}.extern", line
    assert _hms(ave_cpu) >= 1.0, line  # seconds of the boot, not the sleep's 0
    assert _kib(max_rss) * 1024 >= rss // 2, (line, rss)  # not the sleep's ~1 MiB


def test_scancel_while_a_step_runs_in_the_guests(cluster, shared):
    """The last test of the module: it ends the shared job.  scancel while
    six tasks run in the guests leaves nothing behind, drains nothing, and
    the epilog logs what QEMU used in the job's cgroup."""
    started = [f for f in os.listdir(shared.share) if f.startswith("started.")]
    assert started == []
    step = subprocess.Popen(
        ["runuser", "-u", USER, "--", "env", f"SLURM_CONF={cluster.sb.conf}",
         "PATH=/usr/local/bin:/usr/bin:/bin", "sh", "-c",
         f'cd "{shared.share}" && exec srun --jobid={shared.job} -N3 -n6 sh -c '
         "'touch started.$SLURM_PROCID; exec sleep 300'"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for(lambda: len([f for f in os.listdir(shared.share)
                              if f.startswith("started.")]) == 6,
                 "six tasks running in the guests", BOOT_TIMEOUT)
        cluster.run(["scancel", shared.job], check=True)
        assert_clean(cluster, shared.job)
        assert step.wait(timeout=60) != 0
    finally:
        if step.poll() is None:
            os.killpg(step.pid, signal.SIGKILL)
            step.wait()
    for node in ("node1", "node2", "node3"):
        assert "drain" not in cluster.sb.node_states()[node]
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    assert not os.path.exists(f"/sys/fs/cgroup/memory/slurm_node3/uid_{uid}/job_{shared.job}")
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node3.log")).read()
    assert re.search(rf"job {shared.job}: info: in the job's cgroup, QEMU used [\d.]+ s CPU",
                     log)
