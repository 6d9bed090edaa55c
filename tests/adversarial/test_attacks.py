"""A hostile user against the root side, through real jobs on the sandbox.

Each test is one attack class of the trust-boundary issue (see
docs/security.rst), run as the unprivileged sandbox user with only sbatch,
a shell in their own job and files they own.  Every one ends with: the
victim untouched, the job failed (or succeeded) with a clear message, no
node drained, no job directory, record or process left behind."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from helpers.cluster import USER, build_busybox_image, holder_job, holder_sh_image, make_cluster


@pytest.fixture(scope="module")
def cluster():
    return make_cluster()


def settled(cluster):
    """Nothing left: nodes in service, no job directory, no record of root's,
    no process of the user."""
    states = cluster.wait_nodes_idle(60)
    assert all(s == "idle" for s in states.values()), states
    assert cluster.job_dirs() == []
    root = os.path.join(cluster.sb.state, "runtime")
    records = [os.path.join(root, n, ".root", f) for n in os.listdir(root)
               if os.path.isdir(os.path.join(root, n, ".root"))
               for f in os.listdir(os.path.join(root, n, ".root"))]
    assert records == []
    assert cluster.user_processes() == []


@pytest.fixture
def victim():
    """A root-owned process in the place of slurmd, sshd or munged."""
    p = subprocess.Popen(["sleep", "600"])
    time.sleep(0.1)
    start = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[19]
    yield p.pid, int(start)
    p.kill()
    p.wait()


def test_state_json_cannot_make_root_kill(cluster, victim):
    """Class 1: the job rewrites state.json to name a root process as its
    QEMU (start time is public) and as its holder; the epilog acts on root's
    own record only."""
    pid, start = victim
    wd = cluster.workdir("adv-kill")
    cluster.write(os.path.join(wd, "job.sh"), f"""#!/bin/sh
cat > "$CH_JOB_DIR/state.json" <<EOF
{{"version": 1, "type": "vm", "phase": "started", "guest_id": 0,
 "backend": {{"qemu_pid": {pid}, "qemu_start": {start}, "guest": 0,
             "holder_pid": {pid}, "holder_start": {start}, "commit": true,
             "image": "/etc/shadow", "work_dir": "/root"}}}}
EOF
echo rewritten
""")
    p, jobid = cluster.sbatch(wd, ["-N1", "--charlie-type=none", "-o", "out",
                                   "job.sh"])
    assert p.returncode == 0, p.stderr
    assert "rewritten" in open(os.path.join(wd, "out")).read()
    cluster.wait_done(jobid)
    time.sleep(1)
    assert os.path.exists(f"/proc/{pid}"), "the epilog killed a root process"
    assert not os.path.exists("/root/charlie-" + jobid)
    settled(cluster)


def test_deep_tree_in_job_dir_does_not_drain(cluster):
    """Class 2: a directory tree thousands of levels deep in the job
    directory (deeper than Python's recursion limit and PATH_MAX)."""
    wd = cluster.workdir("adv-deep")
    cluster.write(os.path.join(wd, "job.sh"), """#!/bin/sh
python3 - <<'EOF'
import os
os.chdir(os.environ["CH_JOB_DIR"] + "/run")
for i in range(4000):
    os.mkdir("d")
    os.symlink("/", "up")
    os.mkfifo("p")
    os.chdir("d")
print("deep")
EOF
""")
    p, jobid = cluster.sbatch(wd, ["-N2", "--charlie-type=none", "-o", "out", "job.sh"])
    assert p.returncode == 0, p.stderr
    assert "deep" in open(os.path.join(wd, "out")).read()
    cluster.wait_done(jobid)
    settled(cluster)


def _private_conf(cluster, wd, validator_lines):
    from helpers.cluster import private_conf
    return private_conf(cluster, wd, validator_lines)


@pytest.mark.parametrize("lines,message", [
    # what the submit gate can see it refuses at submit (test_submit_paths.py);
    # these pass it and meet the prolog
    (["CHARLIE=1", "CHARLIE_TYPE=container", "CHARLIE_IMAGE=relative"],
     "not an absolute path on the node"),
    (["CHARLIE=1", "CHARLIE_TYPE=vm", "CHARLIE_IMAGE=/x.qcow2", "CHARLIE_CPUS=0"],
     "--charlie-cpus: not a positive whole number: '0'"),
    # the submit-time digest of an archive is parsed by root: a huge or
    # malformed one, or one without an image, fails the job
    (["CHARLIE=1", "CHARLIE_TYPE=none",
      "CHARLIE_IMAGE_DIGEST=sha256:" + "a" * 64 + "@1:2:3:" + "9" * 4000],
     "CHARLIE_IMAGE_DIGEST: not an image digest"),
    (["CHARLIE=1", "CHARLIE_TYPE=none",
      "CHARLIE_IMAGE_DIGEST=sha256:" + "a" * 64 + "@1:2:3:4"],
     "CHARLIE_IMAGE_DIGEST: given without an image"),
])
def test_own_validator_cannot_drain(cluster, lines, message):
    """Class 2: nothing the submit side checked is trusted by the prolog."""
    wd = cluster.workdir("adv-validator")
    conf = _private_conf(cluster, wd, lines)
    p, job = cluster.sbatch(wd, ["-N1", "-o", "out", "--charlie-type=none", "--wrap",
                                 "echo ran"], env={"SLURM_CONF": conf})
    assert job, p.stdout + p.stderr
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode != 0 and "ran" not in out, out
    assert message in out, out
    cluster.wait_done(job)
    settled(cluster)


def _tar(path, members):
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
    shutil.chown(path, USER, USER)
    return path


def test_tarball_cannot_write_outside_its_image(cluster):
    """Class 4: a symlink member, then a regular file of the same name; a
    symlink, then a directory over it (would chmod the target)."""
    wd = cluster.workdir("adv-tar")
    target = cluster.write(os.path.join(wd, "target"), "precious\n", 0o644)
    os.chmod(wd, 0o755)
    base = build_busybox_image(os.path.join(wd, "base"), owner=USER)
    members = []
    for root, dirs, files in os.walk(base):
        for d in dirs:
            rel = os.path.relpath(os.path.join(root, d), base)
            p = os.path.join(root, d)
            members.append((rel, "sym" if os.path.islink(p) else "dir", os.readlink(p)
                            if os.path.islink(p) else None))
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, base)
            members.append((rel, "sym", os.readlink(p)) if os.path.islink(p)
                           else (rel, "file", open(p, "rb").read()))
    for name, attack in (("write", [("evil", "sym", target), ("evil", "file", b"owned\n")]),
                         ("chmod", [("evil", "sym", wd), ("evil", "dir", None)])):
        tgz = _tar(os.path.join(wd, f"{name}.tgz"), members + attack)
        mode = os.stat(wd).st_mode
        p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={tgz}", "-o", "out",
                                       "--wrap", "echo ran"])
        out = open(os.path.join(wd, "out")).read()
        assert p.returncode != 0 and "ran" not in out, out
        assert "unsafe tarball: member given twice" in out, out
        assert open(target).read() == "precious\n"
        assert os.stat(wd).st_mode == mode
        cluster.wait_done(jobid)
        settled(cluster)


def test_names_from_an_image_forge_no_log_line(cluster):
    """Trust round 2, class 4: a member name inside an archive image (the
    image's author wrote it) reaches root's node log and the job's message
    through the error that names it.  With a newline that starts a forged
    log line, a terminal escape and a bidi override, root's log keeps one
    line per event and both show the name escaped."""
    wd = cluster.workdir("adv-logline")
    forged = ("../x\n2026-12-06T00:00:00 slurm-charlie[1]: job 1: info: prolog done"
              "\x1b[2J\u202e")
    tgz = _tar(os.path.join(wd, "evil.tgz"), [("bin", "dir", None), (forged, "file", b"x")])
    p, jobid = cluster.sbatch(wd, ["-N1", "-w", "node1", f"--charlie-image={tgz}", "-o", "out",
                                   "--wrap", "echo ran"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode != 0 and "ran" not in out.split(), out
    assert "unsafe tarball: member path with '..'" in out, out
    assert "../x\\n2026-12-06T00:00:00 slurm-charlie[1]: job 1: info: prolog done" \
        "\\x1b[2J\\u202e" in out, out
    assert "\x1b" not in out and "\u202e" not in out
    cluster.wait_done(jobid)
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node1.log")).read()
    mine = [line for line in log.splitlines() if f"job {jobid}:" in line]
    assert any("member path with '..'" in line and "\\x1b[2J\\u202e" in line
               for line in mine), mine
    assert not any(line.startswith("2026-12-06T00:00:00 ") for line in log.splitlines())
    assert "\x1b" not in log and "\u202e" not in log
    settled(cluster)


def test_an_images_link_cannot_reach_the_users_files(cluster):
    """Trust round 2, class 5: the image's author is not the user.  A
    published tarball whose /ch is an absolute symbolic link (allowed in an
    image: it resolves inside the container) to a private directory of
    whoever runs it: the preparation, as that user, made the mount points
    through the link in the user's own directory.  Now the job fails naming
    the link, and the directory is as it was."""
    wd = cluster.workdir("adv-image-link")
    private = os.path.join(cluster.home, "charlie-tests", "private-of-the-runner")
    shutil.rmtree(private, ignore_errors=True)
    os.makedirs(private)
    cluster.write(os.path.join(private, "key"), "secret\n", 0o600)
    os.chmod(private, 0o700)
    subprocess.run(["chown", "-R", f"{USER}:", private], check=True)
    base = build_busybox_image(os.path.join(wd, "base"), owner=USER)
    members = [("bin", "dir", None), ("ch", "sym", private)]
    for name in os.listdir(os.path.join(base, "bin")):
        p = os.path.join(base, "bin", name)
        members.append((f"bin/{name}", "sym", os.readlink(p)) if os.path.islink(p)
                       else (f"bin/{name}", "file", open(p, "rb").read()))
    tgz = _tar(os.path.join(wd, "published.tgz"), members)
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={tgz}", "-o", "out",
                                   "--wrap", "echo ran"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode != 0 and "ran" not in out.split(), out
    assert "the image's /ch is a symbolic link or not a directory" in out, out
    assert sorted(os.listdir(private)) == ["key"]
    assert os.stat(private).st_mode & 0o777 == 0o700
    cluster.wait_done(jobid)
    settled(cluster)


@pytest.mark.parametrize("kind", ["directory", "squashfs"])
@pytest.mark.parametrize("where", ["ch", "ch/data1"])
def test_an_images_link_at_a_mount_point_is_refused(cluster, kind, where):
    """Class 5 for the images ch-run reads in place: a directory (unpacked
    by the user from someone's image) and a squashfs file, whose /ch or
    /ch/data1 is a link to a private directory of the runner.  ch-run would
    bind onto the path it is given, through the link; the preparation now
    looks at every component without following links and refuses, naming
    the link, before ch-run starts.  The directory is as it was."""
    wd = cluster.workdir("adv-image-link-" + kind)
    private = os.path.join(cluster.home, "charlie-tests", "private-of-the-runner")
    shutil.rmtree(private, ignore_errors=True)
    os.makedirs(os.path.join(private, "data1"))
    cluster.write(os.path.join(private, "key"), "secret\n", 0o600)
    os.chmod(private, 0o700)
    subprocess.run(["chown", "-R", f"{USER}:", private], check=True)
    img = build_busybox_image(os.path.join(wd, "img"), owner=USER)
    shutil.rmtree(os.path.join(img, where))
    os.symlink(private if where == "ch" else os.path.join(private, "data1"),
               os.path.join(img, where))
    os.lchown(os.path.join(img, where), *_ids(USER))
    if kind == "squashfs":
        sqfs = os.path.join(wd, "img.sqfs")
        subprocess.run(["mksquashfs", img, sqfs, "-quiet", "-no-progress"], check=True,
                       capture_output=True)
        shutil.chown(sqfs, USER, USER)
        img = sqfs
    data = os.path.join(wd, "data")
    os.mkdir(data)
    shutil.chown(data, USER, USER)
    before = sorted(os.listdir(private)), os.listdir(os.path.join(private, "data1"))
    p, jobid = cluster.sbatch(wd, ["-N1", f"--charlie-image={img}", f"--charlie-dir={data}",
                                   "-o", "out", "--wrap", "echo ran"])
    out = open(os.path.join(wd, "out")).read() if os.path.exists(
        os.path.join(wd, "out")) else p.stderr
    assert "ran" not in out.split(), out
    assert f"the image's /{where} is a symbolic link or not a directory" in out + p.stderr, \
        out + p.stderr
    assert (sorted(os.listdir(private)), os.listdir(os.path.join(private, "data1"))) == before
    assert os.stat(private).st_mode & 0o777 == 0o700
    if jobid:
        cluster.wait_done(jobid)
    settled(cluster)


@pytest.mark.parametrize("plant", ["a link to root's directory", "a FIFO"])
def test_what_the_user_plants_at_run_overlay_is_not_followed(cluster, plant):
    """run/overlay is the stock image's overlay, mounted in the holder's
    namespace only; on the node it is an empty directory of the user's.
    While the job runs the user puts there a link to a directory of root's,
    or a FIFO.  The epilog removes the job directory without following the
    link or opening the FIFO (it would block): the directory is intact, the
    epilog ends, the node stays in service, nothing is left."""
    wd = cluster.workdir("adv-overlay-plant")
    img = build_busybox_image(os.path.join(wd, "img"), mount_points=False, owner=USER)
    victim = os.path.join(cluster.sb.state, "victim-of-overlay")
    shutil.rmtree(victim, ignore_errors=True)
    os.makedirs(os.path.join(victim, "keep"))
    open(os.path.join(victim, "keep", "file"), "w").write("root's\n")
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-w", "node1",
                         f"--charlie-image={img}", "-o", "out", "--wrap",
                         "srun sh -c 'sleep 300'"], wd)
    jobid = p.stdout.strip()
    assert jobid.isdigit(), p.stderr
    try:
        run = os.path.join(cluster.sb.state, "runtime", "node1", jobid, "run")
        end = time.monotonic() + 240
        while time.monotonic() < end and not [
                c for c in cluster.user_processes(timeout=0) if "sleep 300" in c]:
            time.sleep(0.2)
        assert os.path.isdir(os.path.join(run, "overlay"))
        make = (f"ln -s {victim} {run}/overlay" if plant.startswith("a link")
                else f"mkfifo {run}/overlay")
        q = cluster.as_user(["sh", "-c", f"rmdir {run}/overlay && {make}"], wd)
        assert q.returncode == 0, q.stderr
    finally:
        cluster.run(["scancel", jobid])
    cluster.wait_done(jobid)
    assert open(os.path.join(victim, "keep", "file")).read() == "root's\n"
    shutil.rmtree(victim)
    settled(cluster)


def _ids(user):
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def test_corrupt_xz_image_fails_the_job_only(cluster):
    wd = cluster.workdir("adv-xz")
    """Class 2: a decompression error (lzma's own, not tarfile's)."""
    import io
    import tarfile
    img = os.path.join(wd, "img.tar.xz")
    with tarfile.open(img, "w:xz") as tar:
        text = b"compressible text " * 20000
        info = tarfile.TarInfo("big")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    data = bytearray(open(img, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(16)
    open(img, "wb").write(bytes(data))
    shutil.chown(img, USER, USER)
    p, jobid = cluster.sbatch(wd, ["-N2", f"--charlie-image={img}", "-o", "out",
                                   "--wrap", "echo ran"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode != 0 and "cannot unpack: LZMAError" in out, out
    cluster.wait_done(jobid)
    settled(cluster)


@pytest.mark.parametrize("args,message", [
    (["-c1", "--charlie-cpus=2"], "--charlie-cpus: 2 guest CPUs, but the job has 1 CPUs"),
    (["--mem=256M", "--charlie-mem=10T"], "exceed the job's memory"),
    # the job's DefMemPerCPU share where Slurm allocates memory, else the node's
    (["--charlie-mem=10T"], "10485760 MiB guest memory + 256 MiB for QEMU exceed the"),
])
def test_vm_cannot_escape_its_allocation(cluster, args, message):
    """Class 5: guest CPUs and memory are bounded by the job's allocation on
    the node; the job fails before any guest boots."""
    wd = cluster.workdir("adv-vm-bounds")
    img = os.path.join(wd, "image.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    shutil.chown(img, USER, USER)
    p, jobid = cluster.sbatch(wd, ["-N1", *args, f"--charlie-image={img}",
                                   "--charlie-interactive", "-o", "out",
                                   "--wrap", "echo ran"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode != 0 and message in out, out
    assert "hint:" in out
    cluster.wait_done(jobid)
    settled(cluster)


def test_a_path_shaped_like_a_slurm_field_sizes_no_guest(cluster):
    """Trust round 2, class 3: root read the job's memory from `scontrol -o
    show job`, one line that also carries what the user names (job name,
    comment, output path).  An output file named "o MinMemoryNode=4096M"
    gave a job granted 300 MiB a 3840 MiB guest, and root raised the job's
    memory limit to 4096 MiB to match.  Slurm's JSON is read field by name
    now: the job's own 300 MiB bound the guest, so this one fails before any
    guest boots, with the real figure in its message."""
    wd = cluster.workdir("adv-forged-field")
    img = os.path.join(wd, "image.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    shutil.chown(img, USER, USER)
    forged = "o MinMemoryNode=4096M MinMemoryCPU=4096M"
    p, jobid = cluster.sbatch(wd, ["-N1", "-w", "node1", "--mem=300M", "-J", forged,
                                   f"--comment={forged}",
                                   "-o", forged, f"--charlie-image={img}",
                                   "--charlie-interactive", "--wrap", "echo ran"])
    out = open(os.path.join(wd, forged)).read()
    assert p.returncode != 0, out
    assert "128 MiB guest memory + 256 MiB for QEMU exceed the job's memory on " \
        "node1 (300 MiB)" in out, out
    assert "ran" not in out.split()
    cluster.wait_done(jobid)
    settled(cluster)


def test_a_process_that_leaves_the_container_ends_with_the_job(cluster):
    """Trust round 2, class 1: the image's /bin/sh (its author's, run by the
    holder) starts a process in a session, user and mount namespace of its
    own -- out of reach of everything that ends the holder.  It outlived the
    job and the epilog drained the node ("processes left in the job's
    cgroup").  The epilog now ends it by the cgroup root placed the holder
    in, which it cannot leave, says so, and the node stays in service."""
    wd = cluster.workdir("adv-escape")
    img = holder_sh_image(os.path.join(wd, "img"), "/bin/busybox setsid /bin/busybox "
                          "unshare -r -m /bin/busybox sleep 4242")
    jobid, log = holder_job(cluster, wd, img)
    assert re.search(rf"job {jobid}: warning: ended \d+ process\(es\) of the job that had "
                     r"left its container but not its cgroup: \d+", log), log[-3000:]
    assert not [c for c in cluster.user_processes() if "sleep 4242" in c]
    settled(cluster)


def test_shm_of_a_plain_job_survives_a_charlie_jobs_end(cluster):
    """/dev/shm: the epilog of a charlie job never deletes what another
    (non-charlie) job of the same user made on the node, even when nothing
    holds it open at that moment; names with blanks included."""
    wd = cluster.workdir("adv-shm")
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    plain = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "-o", "plain.out",
                             "--wrap", "touch '/dev/shm/plain job seg' /dev/shm/plain2; "
                             "sleep 40"], wd)
    pj = plain.stdout.strip()
    assert pj.isdigit(), plain.stderr
    for _ in range(100):
        if os.path.exists("/dev/shm/plain2"):
            break
        time.sleep(0.1)
    time.sleep(1.5)  # older than the epilog's one-second grace
    p, jobid = cluster.sbatch(wd, ["-N1", "-w", "node1", "--charlie-type=none", "-o", "out",
                                   "--wrap", "touch /dev/shm/charlie-own-leak"])
    assert p.returncode == 0, p.stderr
    cluster.wait_done(jobid)
    try:
        assert os.path.exists("/dev/shm/plain job seg") and os.path.exists("/dev/shm/plain2")
    finally:
        cluster.run(["scancel", pj])
        cluster.wait_done(pj)
        for f in os.listdir("/dev/shm"):
            if os.lstat(f"/dev/shm/{f}").st_uid == uid:
                os.unlink(f"/dev/shm/{f}")
    settled(cluster)


def test_planted_output_directory_is_not_followed(cluster):
    """Class 6: job ids are predictable; someone makes <workdir>/charlie-<job>
    in advance, full of symlinks to the victim's files.  The guest outputs
    go to charlie-<job>.1 and nothing is written through the links."""
    guest_dir = cluster.sb.guest_dir
    assert guest_dir, "the sandbox has no test guest (make test brings it)"
    wd = cluster.workdir("adv-outputs")
    os.chmod(wd, 0o777)  # a shared project directory others can write in
    img = os.path.join(wd, "image.qcow2")
    shutil.copyfile(os.path.join(guest_dir, "guest.qcow2"), img)
    shutil.chown(img, USER, USER)
    victim = cluster.write(os.path.join(cluster.home, "victim-file"), "precious\n", 0o644)
    cluster.write(os.path.join(wd, "job.sh"), "#!/bin/sh\necho from-the-guest\n")
    p = cluster.as_user(["sbatch", "--parsable", "--hold", "-N1", "-o", "out",
                         f"--charlie-image={img}", "--charlie-job=job.sh",
                         "--wrap", "true"], wd)
    jobid = p.stdout.strip()
    assert jobid.isdigit(), p.stderr
    planted = os.path.join(wd, f"charlie-{jobid}")
    os.mkdir(planted, 0o777)  # root's (the attacker's) directory
    for name in ("0_job.out", "0_job.err", "0_console.out", "0_qemu.log"):
        os.symlink(victim, os.path.join(planted, name))
    cluster.run(["scontrol", "release", jobid], check=True)
    info = cluster.wait_done(jobid, timeout=400)
    assert info["JobState"] == "COMPLETED", info
    assert open(victim).read() == "precious\n"
    assert sorted(os.listdir(planted)) == ["0_console.out", "0_job.err", "0_job.out",
                                           "0_qemu.log"]
    saved = os.path.join(wd, f"charlie-{jobid}.1")
    for _ in range(100):
        if os.path.exists(os.path.join(saved, "0_job.out")):
            break
        time.sleep(0.2)
    assert "from-the-guest" in open(os.path.join(saved, "0_job.out")).read()
    assert os.stat(saved).st_uid == int(cluster.run(["id", "-u", USER]).stdout)
    settled(cluster)


def test_an_image_name_cannot_forge_or_break_the_accounting_line(cluster):
    """Root writes the job's AdminComment with the image's name in it: a
    name built to close our part and open another, or to split sacct's
    '|'-separated output, is written quoted; sacct shows one part, and
    `slurm-charlie jobs` reads back the real path."""
    from slurm_charlie import accounting
    wd = cluster.workdir("adv-acct")
    # (no ':' or ',': an overlay cannot take them, and the sandbox's images
    # need one for the node's tmpdir mount point)
    name = "img) charlie(type=vm image=|evil; digest=sha256=00 x"
    img = build_busybox_image(os.path.join(wd, name), owner=USER)
    p, job = cluster.sbatch(wd, ["-N1", f"--charlie-image={img}", "-o", "out",
                                 "--wrap", "srun cat /MARKER"])
    assert p.returncode == 0, (p.stderr, open(os.path.join(wd, "out")).read())
    text = cluster.admin_comment(job)
    assert text.count("charlie(") == 1 and "|" not in text and " x" not in text, text
    assert accounting.parse(text) == accounting.Entry("container", img, "none")
    q = cluster.as_user([cluster.sb.charlie_bin(), "jobs", "--json", "-j", job], wd)
    assert [r["image"] for r in json.loads(q.stdout)] == [img], q.stdout
    settled(cluster)
