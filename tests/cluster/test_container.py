"""Container jobs (issue 3, first part) on the sandbox: one holder per node,
every task of a step inside it, the batch script on the host, cleanup."""

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import time

import pytest

from helpers.cluster import USER, build_busybox_image


@pytest.fixture(scope="module")
def images(cluster):
    base = os.path.join(cluster.home, "charlie-tests", "images")
    os.makedirs(base, exist_ok=True)
    return {
        "bb": build_busybox_image(os.path.join(base, "bb")),
        "nosh": build_busybox_image(os.path.join(base, "nosh"), shell=False),
        "nomounts": build_busybox_image(os.path.join(base, "nomounts"), mount_points=False),
        "mine": build_busybox_image(os.path.join(base, "mine"), owner="chuser"),
    }


PROBE = ('echo "TASK $(hostname) rank=$SLURM_PROCID $(cat /MARKER) '
         'mnt=$(readlink /proc/self/ns/mnt) user=$(readlink /proc/self/ns/user) '
         'meta=$CH_META d1=$CH_DATA1 pwd=$(pwd) uid=$(id -u) '
         'hostfile=$(wc -l < /ch/meta/hostfile) data=$(cat /ch/data1/input)"')


def test_tasks_run_in_the_nodes_container(cluster, images):
    wd = cluster.workdir("container")
    cluster.write(os.path.join(wd, "input"), "from-the-host\n", 0o644)
    cluster.write(os.path.join(wd, "job.sh"), f"""#!/bin/sh
echo "BATCH marker=$(cat /MARKER 2>/dev/null || echo none) pwd=$(pwd)"
srun sh -c '{PROBE}'
srun -N1 -n1 --chdir=/tmp pwd
""")
    p, jobid = cluster.sbatch(wd, ["-N3", "-n6", f"--charlie-image={images['bb']}",
                                   "--charlie-dir=.", "-o", "job.out", "job.sh"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    # the batch script stays on the host
    assert f"BATCH marker=none pwd={wd}" in out
    tasks = re.findall(r"TASK (\S+) rank=(\d+) (\S+) mnt=(\S+) user=(\S+) meta=(\S+) "
                       r"d1=(\S+) pwd=(\S+) uid=(\d+) hostfile=(\d+) data=(\S+)", out)
    assert len(tasks) == 6, out
    uid = cluster.run(["id", "-u", "chuser"]).stdout.strip()
    by_node = {}
    for host, rank, marker, mnt, user, meta, d1, pwd, tuid, hostfile, data in tasks:
        assert marker == "inside-the-image"
        assert (meta, d1, pwd, tuid, hostfile, data) == (
            "/ch/meta", "/ch/data1", "/", uid, "3", "from-the-host")
        by_node.setdefault(host, set()).add((mnt, user))
    assert sorted(by_node) == ["node1", "node2", "node3"]
    # both ranks of a node share its container; nodes have their own
    assert all(len(v) == 1 for v in by_node.values()), by_node
    assert len({next(iter(v)) for v in by_node.values()}) == 3
    assert "\n/tmp\n" in out  # a working directory that exists inside is kept
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node1.log")).read()
    # the holder joined the job's cgroup: wherever the machine has Slurm's
    # cgroup v1 controllers (these machines do), never skipped silently
    if cluster.sb.cgroup_mode == "v2":  # the Debian 13 lane
        assert re.search(rf"job {jobid}: info: holder in the job's cgroups "
                         rf"/sys/fs/cgroup/system.slice/node1_slurmstepd.scope/job_{jobid}/"
                         "charlie", log), log[-2000:]
    elif cluster.sb.cgroups or os.access("/sys/fs/cgroup/memory/cgroup.procs", os.W_OK):
        assert re.search(rf"job {jobid}: info: holder in the job's cgroups "
                         rf"/sys/fs/cgroup/memory/slurm_node1/uid_{uid}/job_{jobid}/step_extern/task_0",
                         log), log[-2000:]
    cluster.wait_done(jobid)
    assert cluster.job_dirs() == [] and cluster.user_processes() == []


def _wait_for_sleeps(cluster, n: int) -> None:
    """Until n tasks `sleep 300` run (the tasks themselves, "PID [S] sleep
    300", not srun or the script): seconds here, minutes in the Debian 13
    lane, so no fixed wait."""
    def sleeps():
        return sum(bool(re.search(r"\] (\S*/)?sleep 300\s*$", c))
                   for c in cluster.user_processes(timeout=0))
    end = time.monotonic() + 240
    while time.monotonic() < end and sleeps() < n:
        time.sleep(0.2)
    assert sleeps() == n, cluster.user_processes(timeout=0)


def test_a_directory_images_prolog_forks_two_steps_as_the_user(cluster, images):
    """Each step as the user costs the prolog a fork and a drop (issue 23):
    for an image directory the image's first look is taken inside the
    first step and the holder's record written by the last, so the whole
    user side is two steps.  The prolog's log line names them."""
    wd = cluster.workdir("container-steps")
    p = cluster.as_user(["sbatch", "--parsable", "--wait", "-N1", "-w", "node2",
                         f"--charlie-image={images['bb']}", "-o", "job.out",
                         "--wrap", "srun cat /MARKER"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    assert open(os.path.join(wd, "job.out")).read().strip() == "inside-the-image"
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node2.log")).read()
    steps = re.findall(rf"job {jobid}: info: prolog done: type container, guest 0 of 1; "
                       r"steps as the user: (.*)", log)
    assert steps == ["prepare_as_user finish_as_user"], steps


def test_a_task_never_runs_on_the_host_when_the_containers_record_is_gone(cluster, images):
    """run/holder is the job user's file, so they can remove it: the next
    step's tasks then fail and say why instead of running on the host as
    if the job were a plain one; the node stays in service."""
    wd = cluster.workdir("container-no-record")
    p = cluster.as_user(["sbatch", "--parsable", "--wait", "-N1", "-w", "node2",
                         f"--charlie-image={images['bb']}", "-o", "job.out", "--wrap",
                         'srun cat /MARKER; rm "$CH_JOB_DIR/run/holder"; '
                         'srun cat /MARKER; echo "second step: $?"'], wd)
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, (p.stderr, out)
    assert out.count("inside-the-image") == 1, out
    assert "error: container: the job's container record" in out, out
    assert "the task is not run outside the container" in out, out
    assert "second step: 0" not in out and "second step: " in out, out
    assert "No such file" not in out.replace("(No such file or directory)", ""), out
    cluster.wait_nodes_idle()


def test_scancel_leaves_nothing(cluster, images):
    wd = cluster.workdir("container-scancel")
    p = cluster.as_user(["sbatch", "--parsable", "-N3", f"--charlie-image={images['bb']}",
                         "-o", "job.out", "--wrap", "srun -N3 sleep 300"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    try:
        _wait_for_sleeps(cluster, 3)
    finally:  # a failure here must not leave the nodes busy for later tests
        cluster.run(["scancel", jobid], check=True)
    cluster.wait_done(jobid, timeout=120)
    assert cluster.user_processes() == []
    assert cluster.job_dirs() == []


def test_another_jobs_end_leaves_my_container_alone(cluster, images):
    """Two container jobs of one user on one node: the first to end must not
    kill the other's holder (every holder shows its FIFO as
    /ch/meta/.holder; the epilog matches this job's FIFO by inode)."""
    wd = cluster.workdir("container-two-jobs")
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-n1",
                         "-w", "node1", f"--charlie-image={images['bb']}", "-o", "a.out",
                         "--wrap", "while [ ! -e b-done ]; do sleep 0.1; done; "
                         "srun cat /MARKER"], wd)
    assert p.returncode == 0, p.stderr
    job_a = p.stdout.strip()
    end = time.monotonic() + 30
    while time.monotonic() < end and not any(
            d.endswith(f"/{job_a}") and os.path.exists(f"{d}/run/holder")
            for d in cluster.job_dirs()):
        time.sleep(0.1)
    p, job_b = cluster.sbatch(wd, ["-N1", "-n1", "-w", "node1",
                                   f"--charlie-image={images['bb']}", "-o", "b.out",
                                   "--wrap", "srun cat /MARKER"])
    assert p.returncode == 0, p.stderr
    cluster.wait_done(job_b)  # B has ended (epilog included) while A ran
    if cluster.sb.cgroups:  # root's view of A while it runs: what its holder used
        st = cluster.run([cluster.sb.charlie_bin(), "status", "--node", "node1"])
        assert re.search(rf"^{job_a}\ttype=container\tphase=started\tcpu=\d+\.\ds\t"
                         r"mem_peak=[1-9]\d*KiB$", st.stdout, re.M), st.stdout
    cluster.write(os.path.join(wd, "b-done"), "")
    info = cluster.wait_done(job_a, timeout=60)
    out = open(os.path.join(wd, "a.out")).read()
    assert info["JobState"] == "COMPLETED" and "inside-the-image" in out, (info, out)
    assert cluster.user_processes() == []


def test_write_mode(cluster, images):
    wd = cluster.workdir("container-write")
    target = os.path.join(images["mine"], "written")
    if os.path.exists(target):
        os.unlink(target)
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={images['mine']}",
                                   "--charlie-write", "-o", "job.out", "--wrap",
                                   "srun sh -c 'echo ok > /written'"])
    assert p.returncode == 0, open(os.path.join(wd, "job.out")).read()
    assert open(target).read() == "ok\n"


def test_uid_gid_inside(cluster, images):
    """docs/faq.rst: programs that want a particular id inside (uid 0, a gid of
    /dev/pts) get it with --charlie-uid/--charlie-gid; outside it is still you."""
    wd = cluster.workdir("container-uid")
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={images['bb']}", "--charlie-uid=0",
                                   "--charlie-gid=5", "-o", "job.out", "--wrap",
                                   "srun sh -c 'echo ID $(id -u) $(id -g); touch /tmp/uidprobe.$SLURM_JOB_ID'"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0 and "ID 0 5" in out, out
    probe = f"/tmp/uidprobe.{jobid}"
    assert os.stat(probe).st_uid == int(cluster.run(["id", "-u", "chuser"]).stdout)
    os.unlink(probe)


def test_open_mpi_image_gets_pmix(cluster, images):
    """An image with Open MPI and no MPICH: no warning where Slurm offers
    PMIx (the sandbox does), and its tasks get SLURM_MPI_TYPE=pmix; an image
    with MPICH (or no MPI) gets pmi2 (container.default_mpi = "auto")."""
    ompi = os.path.join(cluster.home, "charlie-tests", "images", "ompi")
    shutil.rmtree(ompi, ignore_errors=True)
    shutil.copytree(images["bb"], ompi, symlinks=True)
    libdir = os.path.join(ompi, "usr/lib/x86_64-linux-gnu")
    os.makedirs(libdir)
    open(os.path.join(libdir, "libmpi.so.40.30.2"), "w").close()
    subprocess.run(["chmod", "-R", "a+rX", ompi], check=True)
    wd = cluster.workdir("container-ompi")
    for image, want in ((ompi, "pmix"), (images["bb"], "pmi2")):
        p, _ = cluster.sbatch(wd, ["-N1", f"--charlie-image={image}", "-o", "job.out",
                                   "--wrap", 'srun sh -c "echo TYPE=$SLURM_MPI_TYPE"'])
        assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
        assert f"TYPE={want}" in open(os.path.join(wd, "job.out")).read(), image


def test_garbage_file_as_image(cluster):
    wd = cluster.workdir("container-garbage")
    garbage = cluster.write(os.path.join(wd, "image.tar.gz"), "this is not an image\n", 0o644)
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={garbage}", "--wrap", "true"], wd)
    assert p.returncode != 0 and "Submitted" not in p.stdout
    assert f"--charlie-image: not a recognised image: {garbage}" in p.stderr


BAD = [
    ("bb", ["--charlie-uid=root"], "--charlie-uid: not a numeric id: 'root'"),
    ("nosh", [], "--charlie-image: image has no executable /bin/sh: {img}"),
    ("bb", ["--charlie-write"], "--charlie-write: image directory not writable by you: {img}"),
    ("bb", ["--charlie-cpus=2"], "--charlie-cpus: applies to VM jobs only, not type container"),
]


@pytest.mark.parametrize("image,args,message", BAD, ids=[m.split(": ")[1] for _, _, m in BAD])
def test_bad_container_input(cluster, images, image, args, message):
    wd = cluster.workdir("container-bad")
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={images[image]}", *args,
                         "--wrap", "true"], wd)
    assert p.returncode != 0 and "Submitted" not in p.stdout
    assert message.format(img=images[image]) in p.stderr, p.stderr


def _tree_digest(path: str) -> str:
    """Names, modes, link targets and contents of a tree: any change shows."""
    import hashlib
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, path)} {st.st_mode:o}\n".encode())
            if os.path.islink(full):
                h.update(os.readlink(full).encode())
            elif os.path.isfile(full):
                h.update(open(full, "rb").read())
    return h.hexdigest()


def test_stock_image_runs_unmodified(cluster, images):
    """An image without /ch/meta and /ch/dataN (a stock image, perhaps not
    the user's to change) runs as is: the mount points come from an overlay
    in the holder's namespace, / stays read-only as for any image, the
    shares are writable, and the image is the same afterwards, byte for
    byte."""
    wd = cluster.workdir("container-stock")
    data = os.path.join(wd, "data")
    os.mkdir(data)
    shutil.chown(data, USER, USER)
    stock = images["nomounts"]
    before = _tree_digest(stock)
    p, jobid = cluster.sbatch(wd, ["-N3", "--ntasks-per-node=2", f"--charlie-image={stock}",
                                   "--charlie-dir=data", "-o", "job.out", "--wrap",
                                   "srun -N3 -n6 sh -c 'cat /MARKER; ls -d /ch/meta /ch/data1; "
                                   "id -u; touch /written-by-$SLURM_PROCID 2>/dev/null || echo READ-ONLY; "
                                   "echo $SLURM_PROCID > /ch/data1/task.$SLURM_PROCID'"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    uid = cluster.run(["id", "-u", USER]).stdout.strip()
    lines = out.splitlines()
    for line in ("inside-the-image", "/ch/meta", "/ch/data1", uid, "READ-ONLY"):
        assert lines.count(line) == 6, (line, out)  # every task: its own uid inside
    assert sorted(os.listdir(data)) == [f"task.{i}" for i in range(6)]
    assert _tree_digest(stock) == before
    assert not any(n.startswith("written-by") for n in os.listdir(stock))
    logged = [l for l in _charlie_log(cluster, "node1").splitlines() if f"job {jobid}:" in l]
    assert any("they come from an overlay (the image is not written)" in l for l in logged)


@pytest.fixture(scope="module")
def mpi_image(cluster):
    from helpers.cluster import build_mpi_image
    return build_mpi_image(os.path.join(cluster.home, "charlie-tests", "images", "mpi"))


def test_mpi_pmi2_in_containers(cluster, mpi_image):
    """3 nodes x 2 ranks, srun --mpi=pmi2 (and srun with no --mpi: the job
    defaults to pmi2): right rank/size, correct allreduce, inside the image,
    node peers in one container."""
    wd = cluster.workdir("container-mpi")
    cluster.write(os.path.join(wd, "job.sh"), """#!/bin/sh
echo "MPI_TYPE=$SLURM_MPI_TYPE"
srun --mpi=pmi2 sh -c 'echo "NS $SLURM_PROCID $(hostname) $(readlink /proc/self/ns/mnt) $(cat /MARKER)"; exec /usr/bin/mpi_allreduce'
srun /usr/bin/mpi_allreduce
""")
    p, jobid = cluster.sbatch(wd, ["-N3", "--ntasks-per-node=2",
                                   f"--charlie-image={mpi_image}", "-o", "job.out", "job.sh"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    assert "MPI_TYPE=pmi2" in out
    ranks = re.findall(r"rank (\d+) of (\d+) on (\S+) sum (\d+)", out)
    assert sorted(int(r) for r, _, _, _ in ranks) == sorted(list(range(6)) * 2), out
    assert all(size == "6" and total == "6" for _, size, _, total in ranks), out
    ns = re.findall(r"NS (\d+) (\S+) (\S+) (\S+)", out)
    assert len(ns) == 6 and all(m == "inside-the-image" for *_, m in ns)
    per_node = {}
    for _, host, mnt, _ in ns:
        per_node.setdefault(host, set()).add(mnt)
    assert len(per_node) == 3 and all(len(v) == 1 for v in per_node.values())


def test_cross_memory_attach_needs_the_shared_container(cluster, mpi_image):
    """process_vm_readv between two ranks on one node works inside the job's
    container, and fails (EPERM) when each rank has its own ch-run container:
    docs/faq.rst's 'ranks on the same node fail' entry."""
    wd = cluster.workdir("container-cma")
    p = cluster.as_user(["srun", "-N1", "-n2", f"--charlie-image={mpi_image}",
                         "--charlie-dir=.", "/usr/bin/cma", "/ch/data1"], wd)
    assert p.returncode == 0 and "CMA OK: secret-from-task-0" in p.stdout, p.stdout + p.stderr
    control = cluster.as_user(["srun", "-N1", "-n2", "ch-run", "-b", f"{wd}:/mnt",
                               mpi_image, "--", "/usr/bin/cma", "/mnt"], wd)
    assert control.returncode != 0
    assert "CMA FAILED: Operation not permitted" in control.stdout, control.stdout + control.stderr


@pytest.fixture(scope="module")
def archives(cluster, images):
    base = os.path.join(cluster.home, "charlie-tests", "archives")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    parent, name = os.path.split(images["bb"])
    out = {
        "tgz": os.path.join(base, "bb.tar.gz"),
        "topdir": os.path.join(base, "bb-topdir.tar.xz"),
        "tar": os.path.join(base, "bb.tar"),
        "sqfs": os.path.join(base, "bb.sqfs"),
        "evil": os.path.join(base, "evil.tar.gz"),
        "other": os.path.join(base, "other.tar.gz"),
    }
    subprocess.run(["tar", "-C", images["bb"], "-czf", out["tgz"], "."], check=True)
    # xz by Python: xz-utils is not on every node (Debian 13's minbase has
    # none), and the product reads archives with tarfile too
    with tarfile.open(out["topdir"], "w:xz") as tar:
        tar.add(images["bb"], arcname=name)
    subprocess.run(["tar", "-C", images["bb"], "-cf", out["tar"], "."], check=True)
    # the squashfs has every mount point, the nodes' TmpFS paths included
    # (as any image has /tmp where TmpFS=/tmp): ch-run mounts it as it is
    full = os.path.join(base, "bb-full")
    shutil.copytree(images["bb"], full, symlinks=True)
    for n in ("node1", "node2", "node3"):
        os.makedirs(full + os.path.join(cluster.sb.state, "tmp", n))
    subprocess.run(["mksquashfs", full, out["sqfs"], "-quiet", "-no-progress"],
                   check=True, capture_output=True)
    subprocess.run(["tar", "-C", images["nomounts"], "-czf", out["other"], "."], check=True)
    evil_src = os.path.join(base, "evil-src")
    os.makedirs(evil_src)
    open(os.path.join(evil_src, "x"), "w").close()
    subprocess.run(["tar", "-C", evil_src, "-czf", out["evil"], "--transform",
                    "s,^./x,../escaped-by-tar,", "./x"], check=True)
    for p in out.values():
        os.chmod(p, 0o644)
    return out


def _charlie_log(cluster, node: str) -> str:
    return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()


@pytest.mark.parametrize("kind", ["tgz", "topdir", "tar", "sqfs"])
def test_archive_images(cluster, archives, kind):
    wd = cluster.workdir(f"archive-{kind}")
    p, jobid = cluster.sbatch(wd, ["-N2", f"--charlie-image={archives[kind]}", "-o",
                                   "job.out", "--wrap", "srun sh -c 'cat /MARKER; ls /ch'"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    assert out.count("inside-the-image") == 2 and "meta" in out


def test_tarball_hashed_once_at_submit_not_on_the_nodes(cluster, images):
    """A new tarball is hashed by sbatch (as the user) once: none of the 3
    nodes reads it to name its cache entry, and a resubmit reuses the
    digest from the user's ~/.cache.  A tarball rewritten between submit and
    job start (a held job) is hashed by each node instead, and the job runs
    what the file holds then."""
    wd = cluster.workdir("archive-digest")
    src = os.path.join(wd, "src")
    shutil.copytree(images["bb"], src, symlinks=True)
    with open(os.path.join(src, "unique"), "w") as f:
        f.write(f"{time.time_ns()}\n")
    tgz = os.path.join(wd, "digest.tar.gz")
    subprocess.run(["tar", "-C", src, "-czf", tgz, "."], check=True)
    os.chmod(tgz, 0o644)
    memo_dir = os.path.join(cluster.home, ".cache", "slurm-charlie", "digests")
    before = set(os.listdir(memo_dir)) if os.path.isdir(memo_dir) else set()
    jobs = []
    for i in range(2):
        p, jobid = cluster.sbatch(wd, ["-N3", f"--charlie-image={tgz}", "-o", f"j{i}.out",
                                       "--wrap", "srun cat /unique"])
        assert p.returncode == 0, p.stderr + open(os.path.join(wd, f"j{i}.out")).read()
        jobs.append(jobid)
    new = set(os.listdir(memo_dir)) - before
    assert len(new) == 1, new  # one tarball version, one digest, made once
    sha = open(os.path.join(memo_dir, new.pop())).read().strip()
    assert sha == hashlib.sha256(open(tgz, "rb").read()).hexdigest()
    for n in ("node1", "node2", "node3"):
        log = _charlie_log(cluster, n)
        for j in jobs:
            assert f"job {j}: info: image {tgz}: digest made at submit" in log, (n, j)
        assert f"/{sha}" in log  # the cache entry is named by it
    # rewritten while the job waits: the nodes see a new file version
    p = cluster.as_user(["sbatch", "--parsable", "-H", "-N3", f"--charlie-image={tgz}",
                         "-o", "held.out", "--wrap", "srun cat /unique"], wd)
    assert p.returncode == 0, p.stderr
    held = p.stdout.strip()
    with open(os.path.join(src, "unique"), "w") as f:
        f.write("rewritten\n")
    subprocess.run(["tar", "-C", src, "-czf", tgz, "."], check=True)
    cluster.run(["scontrol", "release", held], check=True)
    assert cluster.wait_done(held)["JobState"] == "COMPLETED"
    assert open(os.path.join(wd, "held.out")).read().split() == ["rewritten"] * 3
    for n in ("node1", "node2", "node3"):
        assert (f"job {held}: info: image {tgz}: digest read on this node: the file "
                "changed after submit") in _charlie_log(cluster, n), n


def test_concurrent_jobs_share_one_unpack(cluster, archives, images):
    wd = cluster.workdir("archive-shared")
    fresh = os.path.join(wd, "fresh.tar.gz")  # new content: not in any cache yet
    src = os.path.join(wd, "src")
    shutil.copytree(images["bb"], src, symlinks=True)
    with open(os.path.join(src, "unique"), "w") as f:
        f.write(f"{time.time_ns()}\n")
    subprocess.run(["tar", "-C", src, "-czf", fresh, "."], check=True)
    os.chmod(fresh, 0o644)
    jobs = []
    for i in range(2):
        p = cluster.as_user(["sbatch", "--parsable", "-N1", "-n1", "-w", "node2",
                             f"--charlie-image={fresh}", "-o", f"job{i}.out", "--wrap",
                             "srun sh -c 'cat /MARKER; sleep 2'"], wd)
        assert p.returncode == 0, p.stderr
        jobs.append(p.stdout.strip())
    for j in jobs:
        assert cluster.wait_done(j)["JobState"] == "COMPLETED"
    log = _charlie_log(cluster, "node2")
    lines = [l for l in log.splitlines() if f"image {fresh}:" in l
             and any(f"job {j}:" in l for j in jobs) and "digest" not in l]
    assert sum("unpacked into" in l for l in lines) == 1, lines
    assert sum("cached at" in l for l in lines) == 1, lines
    cache = {l.split()[-1] for l in lines}
    assert len(cache) == 1


def test_eviction_beyond_the_cache_bound(cluster, archives):
    wd = cluster.workdir("archive-evict")
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    try:
        with open(conf, "a") as f:  # the prolog reads the config at every job
            f.write("cache_max_mib = 1\n")
        first = None
        for kind in ("tgz", "other"):
            p, jobid = cluster.sbatch(wd, ["-N1", "-w", "node3", f"--charlie-image={archives[kind]}",
                                           "-o", f"{kind}.out", "--wrap", "srun true"])
            assert p.returncode == 0, p.stderr
            if first is None:
                line = [l for l in _charlie_log(cluster, "node3").splitlines()
                        if f"job {jobid}:" in l and f"image {archives[kind]}:" in l][-1]
                first = line.split()[-1]
                assert os.path.isdir(first)
        assert not os.path.exists(first)  # evicted when the second image came in
        assert "image cache: evicted" in _charlie_log(cluster, "node3")
    finally:
        with open(conf, "w") as f:
            f.write(saved)


def test_unsafe_tarball_fails_job_writes_nothing_outside(cluster, archives):
    wd = cluster.workdir("archive-evil")
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={archives['evil']}",
                                   "-o", "job.out", "--wrap", "srun cat /MARKER"])
    info = cluster.wait_done(jobid)
    out = open(os.path.join(wd, "job.out")).read()
    assert info["JobState"] == "FAILED"
    assert "--charlie-image: unsafe tarball: member path with '..'" in out
    assert not any(os.path.exists(os.path.join(d, "escaped-by-tar")) for d in
                   (os.path.dirname(archives["evil"]), cluster.sb.state,
                    os.path.join(cluster.sb.state, "cache")))
    assert cluster.job_dirs() == []


def test_scancel_mpi_job_leaves_no_shm(cluster, mpi_image):
    """Ranks killed mid-run leave UCX segments in /dev/shm; the epilog removes
    the user's entries once no other job of theirs runs on the node."""
    wd = cluster.workdir("container-shm")
    uid = int(cluster.run(["id", "-u", "chuser"]).stdout)
    cluster.write(os.path.join(wd, "job.sh"), """#!/bin/sh
srun --mpi=pmi2 sh -c '/usr/bin/mpi_allreduce; touch /dev/shm/charlie-test-leak.$SLURM_PROCID; sleep 300'
""")
    p = cluster.as_user(["sbatch", "--parsable", "-N2", "--ntasks-per-node=2",
                         f"--charlie-image={mpi_image}", "-o", "job.out", "job.sh"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    end = time.monotonic() + 60
    while time.monotonic() < end and len([f for f in os.listdir("/dev/shm")
                                          if f.startswith("charlie-test-leak")]) < 4:
        time.sleep(0.2)
    mine = [f for f in os.listdir("/dev/shm") if os.lstat(f"/dev/shm/{f}").st_uid == uid]
    assert len([f for f in mine if f.startswith("charlie-test-leak")]) == 4, mine
    time.sleep(1.5)  # the epilog spares entries younger than a second
    cluster.run(["scancel", jobid], check=True)
    cluster.wait_done(jobid)
    left = [f for f in os.listdir("/dev/shm") if os.lstat(f"/dev/shm/{f}").st_uid == uid]
    assert left == []
    assert cluster.user_processes() == [] and cluster.job_dirs() == []


def test_no_mounts_or_open_deleted_files_outlive_the_job(cluster, images):
    """docs/faq.rst, "du and df disagree": space is only freed when nobody holds the deleted
    file.  A task keeps a deleted 8 MB file open in the job directory; after
    scancel no process holds it, the host's mount table never saw the
    container's mounts, and no process is left in the holder's namespace."""
    wd = cluster.workdir("container-leaks")
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1",
                         f"--charlie-image={images['bb']}", "-o", "job.out", "--wrap",
                         "srun sh -c 'exec 8</ch/meta/hosts;"
                         " dd if=/dev/zero of=/tmp/held.$SLURM_JOB_ID bs=1M count=8 2>/dev/null;"
                         " exec 9</tmp/held.$SLURM_JOB_ID; rm /tmp/held.$SLURM_JOB_ID; sleep 300'"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    holder_file = os.path.join(cluster.sb.state, "runtime", "node1", jobid, "run", "holder")
    end = time.monotonic() + 30
    held = []
    while time.monotonic() < end and not held:
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit():
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == f"/tmp/held.{jobid} (deleted)":
                            held.append(pid)
            except OSError:
                pass
        time.sleep(0.2)
    assert held, "the task never held the deleted file"
    holder_mntns = int(open(holder_file).read().split()[2])
    assert images["bb"] not in open("/proc/self/mountinfo").read()  # mounts live in the container
    cluster.run(["scancel", jobid], check=True)
    cluster.wait_done(jobid)
    assert cluster.user_processes() == []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit():
                assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != holder_mntns, pid
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    assert f"held.{jobid}" not in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    assert cluster.job_dirs() == []


def test_default_mpi_only_when_srun_offers_it(cluster, images):
    wd = cluster.workdir("container-mpitype")
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    from slurm_charlie.files import write_file
    try:  # atomic rewrites: a prolog may read the config at any moment
        write_file(conf, saved + 'default_mpi = "pmi9"\n', 0o644)  # in [container]
        p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={images['bb']}", "-o",
                                       "job.out", "--wrap", 'echo "TYPE=${SLURM_MPI_TYPE:-unset}"'])
    finally:
        write_file(conf, saved, 0o644)
    assert p.returncode == 0
    assert "TYPE=unset" in open(os.path.join(wd, "job.out")).read()
    assert f"job {jobid}: warning: container.default_mpi pmi9: not offered by `srun --mpi=list`" \
        in _charlie_log(cluster, "node1")


def test_open_mpi_archive_gets_pmix(cluster, images):
    """An archive's content is only seen when the node unpacks it: an Open MPI
    one gets pmix there, with no warning (this Slurm has PMIx)."""
    wd = cluster.workdir("container-ompi-archive")
    src = os.path.join(wd, "src")
    shutil.copytree(images["bb"], src, symlinks=True)
    os.makedirs(os.path.join(src, "usr/lib/x86_64-linux-gnu"), exist_ok=True)
    open(os.path.join(src, "usr/lib/x86_64-linux-gnu/libmpi.so.40"), "w").close()
    with open(os.path.join(src, "unique"), "w") as f:
        f.write(f"{time.time_ns()}\n")
    tgz = os.path.join(wd, "ompi.tar.gz")
    subprocess.run(["tar", "-C", src, "-czf", tgz, "."], check=True)
    os.chmod(tgz, 0o644)
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={tgz}", "-o", "job.out",
                                   "--wrap", 'srun sh -c "cat /MARKER; echo TYPE=$SLURM_MPI_TYPE"'])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    assert "warning" not in out and "inside-the-image" in out and "TYPE=pmix" in out, out


@pytest.fixture(scope="module")
def debian_image(cluster):
    """A stock Debian directory image (debootstrap minbase + Open MPI + MPICH
    + the test programs, built by `make guest` as .cache/vm/debian.sqfs),
    unpacked, with no /ch at all."""
    path = os.path.join(cluster.home, "charlie-tests", "images", "debian")
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["unsquashfs", "-q", "-d", path,
                    os.path.join(cluster.sb.guest_dir, "debian.sqfs")],
                   check=True, capture_output=True)
    shutil.rmtree(os.path.join(path, "ch"))
    subprocess.run(["chmod", "-R", "a+rX", path], check=True)
    return path


#: 20 on the host (the flake this test caught showed 1 run in 20-100);
#: the Debian 13 lane runs fewer (tests/trixie/lane.py): under software
#: emulation one run of 6 ranks takes ~30 s, and the lane proves that Open
#: MPI 5 works over Slurm 24.11's PMIx, not the odds of a rare race
OMPI_RUNS = int(os.environ.get("CHARLIE_TEST_OMPI_RUNS", "20"))


def test_open_mpi_over_pmix_in_containers(cluster, debian_image):
    """Open MPI (Debian's, PMIx only) in a stock Debian image under srun
    --mpi=pmix: 3 nodes x 2 ranks, every run correct; the image unchanged."""
    wd = cluster.workdir("container-pmix")
    before = _tree_digest(debian_image)
    cluster.write(os.path.join(wd, "job.sh"), f"""#!/bin/sh
ok=0
for i in $(seq {OMPI_RUNS}); do
    if timeout 60 srun --mpi=pmix /usr/local/bin/mpi_allreduce > run.$i 2>&1 \\
        && [ "$(grep -c ' of 6 on node. sum 6$' run.$i)" = 6 ]; then ok=$((ok + 1))
    else echo "RUN $i FAILED"; cat run.$i; fi
done
echo "OMPI-OK $ok"
""")
    p, job = cluster.sbatch(wd, ["-N3", "--ntasks-per-node=2", f"--charlie-image={debian_image}",
                                 "-o", "out", "job.sh"], timeout=OMPI_RUNS * 60)
    out = open(os.path.join(wd, "out")).read()
    assert f"OMPI-OK {OMPI_RUNS}" in out, out
    assert "PMIX ERROR" not in out, out
    assert _tree_digest(debian_image) == before


def _scancel_while_running(cluster, wd, image, running_ok=None):
    """A 2-node job of the image cancelled while its step runs: afterwards
    no process of the user and no job directory (running_ok() is checked
    once both tasks run)."""
    q = cluster.as_user(["sbatch", "--parsable", "-N2", f"--charlie-image={image}", "-o",
                         "cancel.out", "--wrap", "srun sleep 300"], wd)
    assert q.returncode == 0, q.stderr
    job = q.stdout.strip()
    try:
        _wait_for_sleeps(cluster, 2)
        if running_ok is not None:
            assert running_ok()
    finally:  # a failure here must not leave the nodes busy for later tests
        cluster.run(["scancel", job], check=True)
    cluster.wait_done(job, timeout=120)
    end = time.monotonic() + 30
    while time.monotonic() < end and (cluster.user_processes() or cluster.job_dirs()):
        time.sleep(0.2)
    assert cluster.user_processes() == []
    assert cluster.job_dirs() == []


def test_squashfs_is_mounted_not_unpacked(cluster, archives, images):
    """A squashfs image is mounted by ch-run (FUSE, as the user, in the
    holder's namespace): nothing is unpacked on the nodes, the tasks see it
    as their root, and it goes away with the job -- also after scancel."""
    wd = cluster.workdir("squashfs-mount")
    sqfs = archives["sqfs"]
    p, jobid = cluster.sbatch(wd, ["-N3", f"--charlie-image={sqfs}", "-o", "job.out", "--wrap",
                                   "srun -N3 sh -c 'cat /MARKER; "
                                   "awk \"\\$2 == \\\"/\\\" {print \\\"ROOT\\\", \\$3}\" "
                                   "/proc/self/mounts'"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    assert out.count("inside-the-image") == 3, out
    assert out.count("ROOT fuse") == 3, out  # the image file itself, mounted
    for node in ("node1", "node2", "node3"):
        lines = [l for l in _charlie_log(cluster, node).splitlines()
                 if f"job {jobid}:" in l and f"image {sqfs}:" in l]
        assert len(lines) == 1 and "mounted by ch-run" in lines[0], lines
    # after scancel of a running job: no process, no mount, no job directory
    _scancel_while_running(cluster, wd, sqfs)
    assert sqfs not in open("/proc/self/mountinfo").read()


def test_stock_squashfs_gets_mount_points_from_an_overlay(cluster, images):
    """A squashfs image without /ch (nor the node's TmpFS path): squashfuse
    mounts it as the user, an overlay in the holder's namespace adds the
    mount points; nothing unpacked, the file unchanged, and squashfuse goes
    with the job -- also after scancel."""
    wd = cluster.workdir("squashfs-stock")
    sqfs = os.path.join(wd, "nomounts.sqfs")
    subprocess.run(["mksquashfs", images["nomounts"], sqfs, "-quiet", "-no-progress"],
                   check=True, capture_output=True)
    os.chmod(sqfs, 0o644)
    before = hashlib.sha256(open(sqfs, "rb").read()).hexdigest()
    tmpfs = os.path.join(cluster.sb.state, "tmp")
    cluster.write(os.path.join(wd, "job.sh"), f"""#!/bin/sh
srun -N3 sh -c 'cat /MARKER; ls -d /ch/meta /ch/data1 {tmpfs}/$(hostname) \\
    && touch /ch/data1/w.$SLURM_NODEID {tmpfs}/$(hostname)/probe.$SLURM_JOB_ID \\
    && awk "\\$2 == \\"/\\" {{print \\"ROOT\\", \\$3}}" /proc/self/mounts'
""")
    p, jobid = cluster.sbatch(wd, ["-N3", f"--charlie-image={sqfs}", "--charlie-dir=.",
                                   "-o", "job.out", "job.sh"])
    out = open(os.path.join(wd, "job.out")).read()
    assert p.returncode == 0, out
    assert out.count("inside-the-image") == 3 and out.count("/ch/data1") == 3, out
    assert out.count("ROOT overlay") == 3, out
    assert sorted(f for f in os.listdir(wd) if f.startswith("w.")) == ["w.0", "w.1", "w.2"]
    for n in ("node1", "node2", "node3"):  # the node's TmpFS itself is bound there
        assert os.path.exists(os.path.join(tmpfs, n, f"probe.{jobid}"))
    for node in ("node1", "node2", "node3"):
        lines = [l for l in _charlie_log(cluster, node).splitlines()
                 if f"job {jobid}:" in l and f"image {sqfs}" in l]
        assert any("mounted by squashfuse" in l for l in lines), lines
        assert not any("unpacked into" in l for l in lines), lines
    assert hashlib.sha256(open(sqfs, "rb").read()).hexdigest() == before
    assert cluster.user_processes() == []  # squashfuse included
    # scancel while it runs: no squashfuse, no process, no job directory
    def two_squashfuse():  # one per node of the 2-node job, nothing else
        found = cluster.run(["pgrep", "-a", "-x", "squashfuse"], check=False).stdout
        assert len(found.splitlines()) == 2, (found, cluster.user_processes(timeout=0))
        return True
    _scancel_while_running(cluster, wd, sqfs, two_squashfuse)
    assert set(cluster.wait_nodes_idle().values()) == {"idle"}


@pytest.fixture(scope="module")
def registry_images(cluster):
    """The sandbox registry's busybox seed image (`make sandbox-up` pushes
    both; pushing again costs a HEAD request per blob)."""
    return _seeded(cluster, ("busybox",))


@pytest.fixture(scope="module")
def registry_debian(cluster):
    """The debian-mpi seed image too: 350 MB, built into the layout the
    first time (under software emulation, the Debian 13 lane, minutes)."""
    return _seeded(cluster, ("busybox", "debian-mpi"))


def _seeded(cluster, tags):
    from helpers.registry import seed
    from slurm_charlie.sandbox import REGISTRY
    cache = os.path.join(os.path.dirname(cluster.sb.guest_dir), "images")
    return {**seed(REGISTRY, cache, os.path.join(cluster.sb.guest_dir, "debian.sqfs"), tags),
            "registry": REGISTRY}


def _registry_log(cluster) -> str:
    return os.path.join(cluster.sb.state, "log", "registry.log")


def _blob_gets(cluster, since: int) -> list[str]:
    """Digests of the blobs the registry served since byte `since` of its log."""
    with open(_registry_log(cluster)) as f:
        f.seek(since)
        text = f.read()
    return re.findall(r'"GET /v2/charlie/busybox/blobs/(sha256:[0-9a-f]+) [^"]*" 200', text)


def test_registry_image_pulled_once_for_the_job(cluster, registry_images):
    """docker://REGISTRY/NAME:TAG: pinned to its digest at submit, pulled
    once (by the job's first node) for a 3-node job, run everywhere; a
    second job finds it in the cache and pulls nothing."""
    wd = cluster.workdir("container-registry")
    ref = f"docker://{registry_images['busybox']}"
    cache = os.path.join(cluster.home, ".cache", "slurm-charlie", "images")
    shutil.rmtree(cache, ignore_errors=True)
    since = os.path.getsize(_registry_log(cluster))
    p, jobid = cluster.sbatch(wd, ["-N3", f"--charlie-image={ref}", "-o", "job.out", "-e",
                                   "job.err", "--wrap", "srun -N3 sh -c 'cat /MARKER; ls -d /ch/meta'"])
    out, err = open(os.path.join(wd, "job.out")).read(), open(os.path.join(wd, "job.err")).read()
    assert p.returncode == 0, (out, err)
    assert out.count("inside-the-image") == 3 and out.count("/ch/meta") == 3, out
    assert "pulled once for the job by node1" in err, err
    served = _blob_gets(cluster, since)
    # one pull: the config and the layer, each once, for three nodes
    assert len(served) == 2 and len(set(served)) == 2, served
    assert len([f for f in os.listdir(cache) if f.endswith(".sqfs")]) == 1
    since = os.path.getsize(_registry_log(cluster))
    p, _ = cluster.sbatch(wd, ["-N2", f"--charlie-image={ref}", "-o", "job2.out", "--wrap",
                               "srun cat /MARKER"])
    assert p.returncode == 0
    assert "inside-the-image" in open(os.path.join(wd, "job2.out")).read()
    assert _blob_gets(cluster, since) == []  # from the cache, by digest


def test_registry_mpi_image_runs_mpich_and_open_mpi(cluster, registry_debian):
    """The registry's stock Debian MPI image (no /ch; Open MPI and MPICH):
    pulled once by the job's first node, then MPICH allreduce over srun
    --mpi=pmi2 and Open MPI allreduce over srun --mpi=pmix on 3 nodes x 2
    ranks in it."""
    wd = cluster.workdir("container-registry-mpi")
    ref = f"docker://{registry_debian['debian-mpi']}"
    cache = os.path.join(cluster.home, ".cache", "slurm-charlie", "images")
    shutil.rmtree(cache, ignore_errors=True)
    cluster.write(os.path.join(wd, "job.sh"), """#!/bin/sh
srun --mpi=pmi2 /usr/local/bin/mpi_allreduce.mpich | sed 's/^/MPICH /'
srun --mpi=pmix /usr/local/bin/mpi_allreduce | sed 's/^/OMPI /'
""")
    p, _ = cluster.sbatch(wd, ["-N3", "--ntasks-per-node=2", f"--charlie-image={ref}",
                               "-o", "job.out", "-e", "job.err", "job.sh"], timeout=600)
    out, err = open(os.path.join(wd, "job.out")).read(), open(os.path.join(wd, "job.err")).read()
    assert p.returncode == 0, (out, err)
    for mpi in ("MPICH", "OMPI"):
        ranks = re.findall(rf"^{mpi} rank (\d) of 6 on node\d sum 6$", out, re.M)
        assert sorted(ranks) == [str(r) for r in range(6)], out
    assert re.search(r"pulled once for the job by node1 in [\d.]+ s \(\d+ MB fetched; "
                     r"fetch [\d.]+ s, unpack [\d.]+ s, squashfs [\d.]+ s\)", err), err


def test_unreachable_registry_refused_at_submit(cluster, registry_images):
    """Nothing listens on the port: the submit fails at once with skopeo's
    reason and the hint."""
    wd = cluster.workdir("container-registry-bad")
    host = registry_images["registry"].split(":")[0]
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image=docker://{host}:5999/charlie/"
                         "busybox:latest", "--wrap", "true"], wd)
    assert p.returncode != 0 and "Submitted" not in p.stdout
    assert "--charlie-image: cannot find the image in its registry" in p.stderr, p.stderr
    assert "connection refused" in p.stderr, p.stderr


PASSWORD = "pw-Zq81-never-logged"


@pytest.fixture
def private_registry(cluster, registry_images, tmp_path):
    """A second registry on the sandbox bridge (port 5001) that wants a
    login (htpasswd, as a site's private registry), serving the same images."""
    host = registry_images["registry"].split(":")[0]
    subprocess.run(["htpasswd", "-Bbc", str(tmp_path / "htpasswd"), "chuser", PASSWORD],
                   check=True, capture_output=True)
    conf = tmp_path / "registry.yml"
    conf.write_text("version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {os.path.join(cluster.sb.state, 'registry')}\n"
                    f"auth:\n  htpasswd:\n    realm: charlie\n    path: {tmp_path}/htpasswd\n"
                    f"http:\n  addr: {host}:5001\n")
    log = open(tmp_path / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    import urllib.error
    import urllib.request
    end = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{host}:5001/v2/", timeout=1)
        except urllib.error.HTTPError as e:
            if e.code == 401:
                break
        except OSError:
            pass
        assert time.monotonic() < end and proc.poll() is None, "private registry did not start"
        time.sleep(0.2)
    auth = os.path.join(cluster.home, ".config", "containers", "auth.json")
    yield {"registry": f"{host}:5001", "auth": auth, "log": str(tmp_path / "registry.log")}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    if os.path.exists(auth):
        os.unlink(auth)


def test_private_registry_credentials(cluster, private_registry):
    """A registry that wants a login: without credentials, and with a wrong
    password, the submit fails with the registry's reason and the way to
    log in; after `skopeo login` (the user's usual auth file) the job's
    first node pulls with the same credentials.  The password appears in no
    log and no job output."""
    wd = cluster.workdir("container-registry-private")
    reg, auth = private_registry["registry"], private_registry["auth"]
    ref = f"docker://{reg}/charlie/busybox:latest"
    cache = os.path.join(cluster.home, ".cache", "slurm-charlie", "images")
    shutil.rmtree(cache, ignore_errors=True)
    if os.path.exists(auth):
        os.unlink(auth)
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={ref}", "--wrap", "true"], wd)
    assert p.returncode != 0 and "Submitted" not in p.stdout
    # skopeo's own word for it differs by release ("unauthorized" on Debian
    # 12, "authentication required" on 13): the message is ours, quoted once
    assert f"--charlie-image: the registry {reg} wants a login (skopeo: " in p.stderr, p.stderr
    assert ("hint: log in as yourself where the nodes can read it: skopeo login --authfile "
            f"~/.config/containers/auth.json {reg}") in p.stderr, p.stderr
    assert '\\"' not in p.stderr, p.stderr
    login = ["skopeo", "login", "--tls-verify=false", "--authfile", auth, "-u", "chuser",
             "--password-stdin", reg]
    cluster.as_user(["mkdir", "-p", os.path.dirname(auth)], wd)
    bad = subprocess.run(["runuser", "-u", "chuser", "--", *login], input="wrong\n",
                         capture_output=True, text=True, cwd=wd)
    assert bad.returncode != 0  # skopeo checks the password at login
    # a wrong password already in the auth file (changed on the registry since)
    token = __import__("base64").b64encode(b"chuser:wrong").decode()
    cluster.write(auth, '{"auths": {"%s": {"auth": "%s"}}}' % (reg, token), 0o600)
    cluster.run(["chown", "chuser:", auth], check=True)
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={ref}", "--wrap", "true"], wd)
    assert p.returncode != 0 and f"the registry {reg} wants a login" in p.stderr, p.stderr
    good = subprocess.run(["runuser", "-u", "chuser", "--", *login], input=PASSWORD + "\n",
                          capture_output=True, text=True, cwd=wd)
    assert good.returncode == 0, good.stderr
    p, jobid = cluster.sbatch(wd, ["-N3", f"--charlie-image={ref}", "-o", "job.out", "-e",
                                   "job.err", "--wrap", "srun -N3 cat /MARKER"])
    out, err = open(os.path.join(wd, "job.out")).read(), open(os.path.join(wd, "job.err")).read()
    assert p.returncode == 0, (out, err)
    assert out.count("inside-the-image") == 3 and "pulled once for the job" in err, (out, err)
    served = open(private_registry["log"]).read()
    assert re.search(r'"GET /v2/charlie/busybox/blobs/sha256:[0-9a-f]+ [^"]*" 200', served)
    logs = [open(os.path.join(cluster.sb.state, "log", f)).read()
            for f in os.listdir(os.path.join(cluster.sb.state, "log"))]
    for text in (out, err, p.stdout, p.stderr, *logs):
        assert PASSWORD not in text and token not in text


@pytest.mark.parametrize("ref,message", [
    ("docker://{reg}/charlie/busybox:no-such-tag", "cannot find the image in its registry"),
    ("docker://{reg}/charlie/nothing-here:latest", "cannot find the image in its registry"),
    ("docker://{reg}/Bad Name", "not a registry image reference"),
])
def test_bad_registry_references_refused_at_submit(cluster, registry_images, ref, message):
    wd = cluster.workdir("container-registry-bad")
    ref = ref.format(reg=registry_images["registry"])
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={ref}", "--wrap", "true"], wd)
    assert p.returncode != 0 and "Submitted" not in p.stdout
    assert f"--charlie-image: {message}" in p.stderr, p.stderr
