"""VM jobs on the real sandbox: QEMU (tcg) guests booted by the prolog from
the test guest `make guest` builds (Debian kernel, slurm-charlie initrd,
debootstrap root with MPICH and OpenSSH).  A test that cannot run fails."""

import hashlib
import os
import re
import shutil
import subprocess
import time

import pytest

from helpers.cluster import USER
from helpers.vm import (BOOT_TIMEOUT, assert_clean, image_copy, job_network,  # noqa: F401
                        qemu_pids, wait_for)


def saved(wd, job, name, timeout=120):
    """A file the epilog copies into <workdir>/charlie-<job>/."""
    path = os.path.join(wd, f"charlie-{job}", name)
    wait_for(lambda: os.path.exists(path), path, timeout)
    time.sleep(0.2)
    return open(path, errors="replace").read()


GUEST_JOB = r"""#!/bin/sh
echo "GUEST $CH_GUEST_ID $(hostname) $(id -un) $(id -u) $(id -G)"
for f in guest-count guests hosts hostfile nodes env guest-macs user; do
    echo "SUM $f $(sha256sum /ch/meta/$f | cut -c1-16)"
done
for m in /ch/meta /ch/meta/sync /ch/opt /ch/data1 /ch/tmp; do
    mountpoint -q $m && echo "MOUNT $m"
done
echo "DATA $(cat /ch/data1/input)"
touch /ch/tmp/probe && echo TMP-WRITABLE
touch /ch/meta/probe 2>/dev/null || echo META-READONLY
[ -e "$HOME/.ssh/id_ed25519" ] || echo NO-KEY-IN-HOME
if [ "$CH_GUEST_ID" = 0 ]; then
    for g in $(cat /ch/meta/guests); do echo "SSH $(ssh $g hostname)"; done
    ping -c 1 -W 5 chgu2 >/dev/null && echo PING-OK
    mpirun.openmpi -hostfile /ch/meta/hostfile.openmpi -np "$CH_GUEST_COUNT" /usr/local/bin/mpi_allreduce
    echo "guest 0 stderr" >&2
fi
"""


def test_batch_job_three_guests(cluster, guest):
    wd = cluster.workdir("vm-batch")
    img = image_copy(cluster, guest, wd)
    os.mkdir(os.path.join(wd, "data"))
    cluster.write(os.path.join(wd, "data", "input"), "forty-two\n", 0o644)
    shutil.chown(os.path.join(wd, "data"), USER, USER)
    cluster.write(os.path.join(wd, "job.sh"), GUEST_JOB)
    p, job = cluster.sbatch(wd, ["-N3", "-o", "out", "-e", "err",
                                 f"--charlie-image={img}", "--charlie-job=job.sh",
                                 "--charlie-dir=data", "--wrap", "echo not run"])
    assert job, p.stderr
    out, err = open(os.path.join(wd, "out")).read(), open(os.path.join(wd, "err")).read()
    assert p.returncode == 0, (out, err)
    assert "not run" not in out
    assert "guest 0 stderr" in err
    # guest 0 reached every guest by name over ssh, and ran MPI across them
    assert re.findall(r"^SSH (\S+)$", out, re.M) == ["chgu0", "chgu1", "chgu2"], out
    assert "PING-OK" in out
    assert "NO-KEY-IN-HOME" in out  # a commit would save it into the image
    ranks = re.findall(r"^rank (\d) of 3 on (chgu\d) sum 3$", out, re.M)
    assert sorted(ranks) == [("0", "chgu0"), ("1", "chgu1"), ("2", "chgu2")], (out, err)
    uid = subprocess.run(["id", "-u", USER], capture_output=True, text=True).stdout.strip()
    groups = subprocess.run(["id", "-G", USER], capture_output=True, text=True).stdout.split()
    outs = [out] + [saved(wd, job, f"{g}_job.out") for g in (1, 2)]
    sums = []
    for g, text in enumerate(outs):
        m = re.search(r"^GUEST (\d) (\S+) (\S+) (\d+) (.*)$", text, re.M)
        assert m and m.groups()[:4] == (str(g), f"chgu{g}", USER, uid), text
        assert sorted(m.group(5).split()) == sorted(groups), text
        assert re.findall(r"^MOUNT (\S+)$", text, re.M) == [
            "/ch/meta", "/ch/meta/sync", "/ch/opt", "/ch/data1", "/ch/tmp"], text
        assert "DATA forty-two" in text and "TMP-WRITABLE" in text
        assert "META-READONLY" in text
        sums.append(re.findall(r"^SUM .*$", text, re.M))
    assert len(sums[0]) == 8 and sums[0] == sums[1] == sums[2], sums
    for g in range(3):
        assert f"charlie: guest {g} ready" in saved(wd, job, f"{g}_console.out")
    # its one accounting line (docs/portals.rst, "Accounting")
    assert cluster.admin_comment(job) == f"charlie(type=vm image={img} digest=none)"
    assert_clean(cluster, job)


def test_exit_code_is_guest_zeros(cluster, guest):
    """Guest 0's exit code is the job's.  The job asks --mem=700M: the guest
    gets 700 MiB less vm.memory_overhead_mib (256) for QEMU (the
    --charlie-mem case is in test_vm_steps.py)."""
    wd = cluster.workdir("vm-exit")
    img = image_copy(cluster, guest, wd)
    cluster.write(os.path.join(wd, "job.sh"),
                  "#!/bin/sh\necho about to fail\necho bad >&2\n"
                  "awk '/MemTotal/ {print \"MEM\", $2}' /proc/meminfo >&2\nexit 7\n")
    p, job = cluster.sbatch(wd, ["-N1", "-w", "node2", "-o", "out", "-e", "err", "--mem=700M",
                                 f"--charlie-image={img}", "--charlie-job=job.sh",
                                 "--wrap", "true"])
    assert job, p.stderr
    assert p.returncode == 7, p.stderr
    assert open(os.path.join(wd, "out")).read().strip() == "about to fail"
    err = open(os.path.join(wd, "err")).read()
    assert "bad" in err
    assert cluster.job(job)["ExitCode"] == "7:0"
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node2.log")).read()
    seen = re.findall(rf"job {job}: info: guest 0 memory: (\d+) MiB \(([^)]*)\)", log)
    assert seen == [("444", "the job's 700 MiB minus vm.memory_overhead_mib")]
    kib = int(re.search(r"MEM (\d+)", err).group(1))
    assert kib * 1024 <= 444 << 20, (kib, seen)
    assert_clean(cluster, job)


def test_batch_job_fails_when_another_node_cannot_be_prepared(cluster, guest):
    """The prologs return before the guests are up, so the batch step's
    start barrier is its own: an srun over the job's nodes, whose task on a
    node that could not be prepared (here a node fault: node3's
    runtime_root is a file) fails with that node's message.  The job fails
    at once instead of running guest 0 without its peers; node3 is drained
    for the fault, the other nodes are cleaned up."""
    wd = cluster.workdir("vm-barrier")
    img = image_copy(cluster, guest, wd)
    cluster.write(os.path.join(wd, "job.sh"), "#!/bin/sh\necho GUEST-JOB-RAN\n")
    blocker = os.path.join(cluster.sb.state, "runtime", "node3")
    shutil.rmtree(blocker, ignore_errors=True)
    open(blocker, "w").close()
    try:
        p, job = cluster.sbatch(wd, ["-N3", "-w", "node[1-3]", "-o", "out", "-e", "err",
                                     f"--charlie-image={img}", "--charlie-job=job.sh",
                                     "--wrap", "true"], timeout=600)
        assert job, p.stderr
        out, err = open(os.path.join(wd, "out")).read(), open(os.path.join(wd, "err")).read()
        assert p.returncode != 0 and "GUEST-JOB-RAN" not in out, (out, err)
        assert "error: a node of the job could not be prepared (above); the guests' " \
               "job does not start" in err, err
        assert "this node was not prepared for the job" in err, err
        reasons = cluster.run(["sinfo", "-h", "-R", "-o", "%N|%E"]).stdout
        assert f"node3|slurm-charlie: runtime_root: not a directory: {blocker}" in reasons
    finally:
        os.unlink(blocker)
        cluster.resume_until_stable("node3")
    assert_clean(cluster, job)


def test_interactive_salloc_and_console(cluster, guest):
    wd = cluster.workdir("vm-interactive")
    img = image_copy(cluster, guest, wd)
    sc = cluster.sb.charlie_bin()
    p = cluster.as_user(["salloc", "-N2", f"--charlie-image={img}",
                         "--charlie-interactive", "sh", "-c",
                         f'echo "echo CONSOLE-\\$(hostname)-\\$(id -u)" | {sc} console 1; '
                         f'{sc} ssh 1 echo SSH-\\$\\(hostname\\)-\\$\\(id -un\\) </dev/null; '
                         f'{sc} ssh 0 ssh chgu1 hostname </dev/null | sed s/^/HOP-/; '
                         'echo "JOB=$SLURM_JOB_ID"'],
                        wd, timeout=BOOT_TIMEOUT)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "CONSOLE-chgu1-0" in p.stdout, (p.stdout, p.stderr)
    # ssh from the guest's node as the user, and on from guest to guest
    assert f"SSH-chgu1-{USER}" in p.stdout, (p.stdout, p.stderr)
    assert "HOP-chgu1" in p.stdout, (p.stdout, p.stderr)
    job = re.search(r"JOB=(\d+)", p.stdout).group(1)
    assert_clean(cluster, job)
    # the console outside an allocation says what to do
    q = cluster.as_user([sc, "console", "0"], wd)
    assert q.returncode == 1 and "not inside a job's allocation" in q.stderr


def test_commit_waits_for_other_users_of_the_image(cluster, guest):
    wd = cluster.workdir("vm-commit")
    img = image_copy(cluster, guest, wd)
    # job B uses the image (no commit) and holds it until the test lets go
    b = cluster.as_user(["sbatch", "--no-requeue", "-N1", "-w", "node2", "-o", "b.out",
                         f"--charlie-image={img}", "--charlie-interactive", "--wrap",
                         "while [ ! -e release-b ]; do sleep 0.2; done"], wd)
    job_b = re.search(r"Submitted batch job (\d+)", b.stdout).group(1)
    # B's QEMU holds the image from its start: A boots meanwhile
    wait_for(lambda: qemu_pids(job_b), "job B's QEMU")
    cluster.write(os.path.join(wd, "job.sh"),
                  "#!/bin/sh\necho kept-by-commit > $HOME/marker\nsync\n")
    log1 = os.path.join(cluster.sb.state, "log", "charlie-node1.log")
    a = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-w", "node1",
                         "-o", "a.out", f"--charlie-image={img}", "--charlie-job=job.sh",
                         "--charlie-commit", "--wrap", "true"], wd)
    assert a.returncode == 0, a.stderr
    job_a = a.stdout.strip()
    try:  # A's epilog tries to commit, and tries again, while B holds the image
        wait_for(lambda: len(re.findall(rf"job {job_a}: .*qemu-img commit",
                                        open(log1).read())) >= 2,
                 "job A's commit to wait for job B")
    finally:
        cluster.write(os.path.join(wd, "release-b"), "")
    a_end = cluster.wait_done(job_a, timeout=300)
    assert a_end["ExitCode"] == "0:0", (a_end, open(os.path.join(wd, "a.out")).read())
    note = saved(wd, job_a, "0_commit.txt", timeout=180)
    assert note.startswith(f"guest 0: changes committed into {img}"), note
    b_end = cluster.wait_done(job_b, timeout=120)
    assert b_end["JobState"] == "COMPLETED"
    # the commit waited for B's guest to let go of the image
    committed_at = os.stat(os.path.join(wd, f"charlie-{job_a}", "0_commit.txt")).st_mtime
    b_ended = time.mktime(time.strptime(b_end["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert committed_at >= b_ended, (committed_at, b_end["EndTime"])
    assert not qemu_pids(job_b)
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", img],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the next job sees the change
    cluster.write(os.path.join(wd, "job2.sh"), "#!/bin/sh\ncat $HOME/marker\n")
    p, job_c = cluster.sbatch(wd, ["-N1", "-o", "c.out", f"--charlie-image={img}",
                                   "--charlie-job=job2.sh", "--wrap", "true"])
    assert p.returncode == 0
    assert open(os.path.join(wd, "c.out")).read().strip() == "kept-by-commit"
    log = open(os.path.join(cluster.sb.state, "log", "charlie-node1.log")).read()
    waited = re.findall(rf"job {job_a}: .*qemu-img commit", log)
    assert len(waited) >= 2, "the commit did not have to wait for job B"
    for j in (job_a, job_b, job_c):
        assert_clean(cluster, j)


def test_killed_guest_is_not_committed_and_kept(cluster, guest):
    wd = cluster.workdir("vm-killed")
    img = image_copy(cluster, guest, wd)
    before = hashlib.sha256(open(img, "rb").read()).hexdigest()
    cluster.write(os.path.join(wd, "job.sh"),
                  "#!/bin/sh\necho written > $HOME/marker\nsync\necho WROTE\nsleep 300\n")
    b = cluster.as_user(["sbatch", "--no-requeue", "-N1", "-o", "out", "-e", "err",
                         f"--charlie-image={img}", "--charlie-job=job.sh",
                         "--charlie-commit", "--wrap", "true"], wd)
    job = re.search(r"Submitted batch job (\d+)", b.stdout).group(1)
    wait_for(lambda: "WROTE" in open(os.path.join(wd, "out")).read()
             if os.path.exists(os.path.join(wd, "out")) else False, "the job to write")
    for pid in qemu_pids(job):
        os.kill(pid, 9)
    info = cluster.wait_done(job, timeout=120)
    assert info["JobState"] == "FAILED", info
    assert "stopped before its job finished" in open(os.path.join(wd, "err")).read()
    note = saved(wd, job, "0_commit.txt")
    m = re.search(r"NOT committed into (\S+) \(the guest did not shut down cleanly\); "
                  r"its changes are kept in (\S+) on node1", note)
    assert m and m.group(1) == img, note
    kept = m.group(2)
    assert os.path.exists(kept)
    assert hashlib.sha256(open(img, "rb").read()).hexdigest() == before
    # committed later, by hand
    p = cluster.as_user([cluster.sb.charlie_bin(), "commit", kept], wd)
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(kept)
    assert hashlib.sha256(open(img, "rb").read()).hexdigest() != before
    assert_clean(cluster, job)


@pytest.fixture(scope="module")
def bad_images(cluster, guest):
    wd = cluster.workdir("vm-bad")
    q = lambda *a: subprocess.run(["qemu-img", *a], check=True, capture_output=True)  # noqa
    q("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow",
      os.path.join(wd, "shadow.qcow2"), "1G")
    q("create", "-q", "-f", "qcow2", os.path.join(wd, "zero.qcow2"), "0")
    with open(os.path.join(wd, "garbage.qcow2"), "wb") as f:
        f.write(b"QFI\xfb" + os.urandom(8192))
    with open(os.path.join(wd, "garbage.bin"), "wb") as f:
        f.write(os.urandom(8192))
    shutil.copyfile(guest, os.path.join(wd, "readonly.qcow2"))
    shutil.copyfile(guest, os.path.join(wd, "mine.qcow2"))
    for n in os.listdir(wd):
        os.chmod(os.path.join(wd, n), 0o644)
    shutil.chown(os.path.join(wd, "mine.qcow2"), USER, USER)
    return wd


@pytest.mark.parametrize("args,message", [
    (["--charlie-image=shadow.qcow2"], r"has a backing file \(/etc/shadow\); refused"),
    (["--charlie-image=zero.qcow2"], "virtual size is 0"),
    (["--charlie-image=garbage.qcow2"], "qemu-img cannot read it as qcow2"),
    (["--charlie-image=garbage.bin"], "not a recognised image"),
    (["--charlie-image=readonly.qcow2", "--charlie-commit"], "image not writable by you"),
])
def test_bad_inputs_refused_at_submit(cluster, bad_images, args, message):
    before = cluster.run(["squeue", "-h", "-o", "%i"]).stdout
    p = cluster.as_user(["sbatch", *args, "--charlie-job=/bin/true", "--wrap", "true"],
                        bad_images)
    assert p.returncode != 0
    assert re.search(message, p.stderr), p.stderr
    assert "Submitted" not in p.stdout
    assert cluster.run(["squeue", "-h", "-o", "%i"]).stdout == before


def test_commit_of_a_guest_the_job_does_not_have(cluster, bad_images):
    """sbatch does not tell the shim the node count, so this is found by the
    prolog: the job fails with the message, no guest boots, nodes stay up."""
    p, job = cluster.sbatch(bad_images, ["-N3", "-o", "out", "-e", "err",
                                         "--charlie-image=mine.qcow2", "--charlie-commit=5",
                                         "--charlie-job=/bin/true", "--wrap", "true"])
    assert job and p.returncode != 0
    err = open(os.path.join(bad_images, "err")).read()
    assert "--charlie-commit: guest 5 does not exist in a job of 3 node(s)" in err, err
    assert "hint: guests are numbered 0 .. 2" in err
    assert_clean(cluster, job)
    assert not any("drain" in s for s in cluster.sb.node_states().values())


def test_scancel_during_boot_and_during_job(cluster, guest):
    wd = cluster.workdir("vm-cancel")
    img = image_copy(cluster, guest, wd)
    for phase in ("boot", "job"):
        b = cluster.as_user(["sbatch", "--no-requeue", "-N2", "-o", f"{phase}.out",
                             f"--charlie-image={img}", "--charlie-interactive",
                             "--wrap", "sleep 300"], wd)
        job = re.search(r"Submitted batch job (\d+)", b.stdout).group(1)
        if phase == "boot":
            wait_for(lambda: qemu_pids(job), "QEMU to start")
            assert not any(os.path.exists(f"{d}/meta/sync/0.ready")
                           for d in cluster.job_dirs() if d.endswith(f"/{job}"))
        else:
            wait_for(lambda: cluster.job(job).get("JobState") == "RUNNING"
                     and os.path.exists(os.path.join(wd, f"{phase}.out")), "the job")
            def both_ready():
                dirs = sorted(d for d in cluster.job_dirs() if d.endswith(f"/{job}"))
                return len(dirs) == 2 and all(os.path.exists(f"{d}/meta/sync/{i}.ready")
                                              for i, d in enumerate(dirs))
            wait_for(both_ready, "both guests")
        cluster.run(["scancel", job], check=True)
        assert_clean(cluster, job)
        overlays = subprocess.run(["find", cluster.sb.state, "-name", "*.qcow2"],
                                  capture_output=True, text=True).stdout.split()
        assert [o for o in overlays if f"job{job}-" in o or f"/{job}/" in o] == []
        for node in ("node1", "node2"):
            assert "drain" not in cluster.sb.node_states()[node]


def test_guest_that_cannot_boot_fails_the_job_with_its_console(cluster, bad_images):
    """A disk without a file system (raw, valid for qemu-img): the initrd
    cannot mount it, the job fails at start with the console's last lines."""
    wd = bad_images
    blank = os.path.join(wd, "blank.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", blank, "64M"], check=True)
    shutil.chown(blank, USER, USER)
    p, job = cluster.sbatch(wd, ["-N1", "-o", "blank.out", "-e", "blank.err",
                                 "--charlie-image=blank.raw", "--charlie-job=/bin/true",
                                 "--wrap", "true"])
    assert job and p.returncode != 0
    err = open(os.path.join(wd, "blank.err")).read()
    assert "error: guest 0: QEMU exited with 0 before the guest was ready" in err, err
    assert "console tail:" in err and "FATAL: cannot mount /dev/vda" in err, err
    assert_clean(cluster, job)
    assert not any("drain" in s for s in cluster.sb.node_states().values())


def test_cpu_model_the_node_cannot_run_drains_it(cluster, guest):
    """The first VM job on a node probes the site's accel and CPU model (the
    guest kernel boots to a panic); -cpu host without KVM cannot start, so
    the node is drained with a reason that names the setting (docs/faq.rst, "The probe guest does not boot")."""
    wd = cluster.workdir("vm-probe")
    img = image_copy(cluster, guest, wd)
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    assert "[vm]\n" in saved
    probe_record = os.path.join(cluster.sb.state, "runtime", "node3", ".vm-probe")
    try:
        with open(conf, "w") as f:
            f.write(saved.replace("[vm]\n", '[vm]\ncpu_model = "host"\n', 1))
        p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N1", "-w", "node3",
                             "-o", "job.out", f"--charlie-image={img}",
                             "--charlie-job=/bin/true", "--wrap", "true"], wd)
        assert p.returncode == 0, p.stderr
        info = cluster.wait_done(p.stdout.strip(), timeout=180)
        assert info["JobState"] in ("CANCELLED", "FAILED", "NODE_FAIL"), info
        reasons = cluster.run(["sinfo", "-h", "-R", "-o", "%N|%E"]).stdout
        assert re.search(r"node3\|slurm-charlie: vm.accel/vm.cpu_model: QEMU cannot run "
                         r"-accel tcg -cpu host here", reasons), reasons
        assert not qemu_pids(p.stdout.strip())
    finally:
        with open(conf, "w") as f:
            f.write(saved)
        cluster.resume_until_stable("node3")
    # with the site's setting back, the probe passes and is remembered
    p, job = cluster.sbatch(wd, ["-N1", "-w", "node3", "-o", "ok.out",
                                 f"--charlie-image={img}", "--charlie-job=/bin/true",
                                 "--wrap", "true"])
    assert p.returncode == 0, p.stderr
    assert len(open(probe_record).read().strip()) == 32
    assert_clean(cluster, job)


def test_direct_boot_takes_the_kernel_compressed_or_not(cluster, guest):
    """The sandbox boots its guests from the uncompressed kernel `make
    guest` writes with `slurm-charlie vm-kernel` (QEMU's PVH entry); the
    distribution's bzImage still boots directly as well: both reach the
    probe's kernel panic under the sandbox's QEMU, as `nobody`."""
    from slurm_charlie import config, vmbuild
    from slurm_charlie.backends.vm.probe import probe_boot
    cfg = config.load(path=cluster.sb.charlie_conf)
    assert vmbuild.kernel_is_compressed(cfg["vm.kernel"]) is False, cfg["vm.kernel"]
    assert vmbuild.has_pvh_entry(open(cfg["vm.kernel"], "rb").read())
    bz = os.path.join(cluster.sb.state, "vm", "vmlinuz-compressed")  # nobody reads it
    shutil.copyfile(os.path.join(os.path.dirname(guest), "vmlinuz"), bz)
    try:
        os.chmod(bz, 0o644)
        assert vmbuild.kernel_is_compressed(bz) is True
        for kernel in (bz, cfg["vm.kernel"]):
            probe_boot(config.parse(f'[vm]\naccel = "tcg"\nkernel = "{kernel}"\n'),
                       shutil.which("qemu-system-x86_64"))
    finally:
        os.unlink(bz)


def test_doctor_passes_on_the_sandbox_and_names_a_slow_kernel(cluster, guest):
    """`slurm-charlie doctor` on a sandbox node: every check passes,
    including the real probe boot; a compressed kernel under tcg is a
    warning whose fix is `slurm-charlie vm-kernel`."""
    cmd = [cluster.sb.charlie_bin(), "doctor", "--node", "node1"]
    p = cluster.run(cmd, timeout=300)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "0 checks failed" in p.stdout, p.stdout
    assert re.search(r"^ok    guest kernel: .* is uncompressed \(PVH boot\)$", p.stdout, re.M)
    assert re.search(r"^ok    accel/CPU probe: the guest kernel boots with -accel tcg$",
                     p.stdout, re.M), p.stdout
    conf = os.path.join(cluster.sb.state, "etc", "charlie-doctor-test.toml")
    bz = os.path.join(os.path.dirname(guest), "vmlinuz")
    text = re.sub(r'(?m)^kernel = .*$', f'kernel = "{bz}"', open(cluster.sb.charlie_conf).read())
    assert bz in text
    with open(conf, "w") as f:
        f.write(text)
    try:
        p = cluster.run(cmd, timeout=300, env={**cluster.env, "SLURM_CHARLIE_CONF": conf})
    finally:
        os.unlink(conf)
    assert re.search(rf"^warn  guest kernel: vm.kernel {re.escape(bz)} is compressed: "
                     r"under tcg every guest spends seconds decompressing it\n"
                     rf"      fix: slurm-charlie vm-kernel {re.escape(bz)} --out ", p.stdout,
                     re.M), p.stdout


def test_image_boot_loader_when_the_site_sets_no_kernel(cluster, guest):
    """vm.kernel unset: QEMU boots the image's own boot loader (extlinux in
    guest-boot.qcow2, with a kernel and slurm-charlie's initrd inside); each
    guest learns its index from its MAC, not from the kernel command line."""
    boot_img = os.path.join(os.path.dirname(guest), "guest-boot.qcow2")
    assert os.path.exists(boot_img), "make guest builds guest-boot.qcow2"
    wd = cluster.workdir("vm-bootloader")
    img = image_copy(cluster, boot_img, wd)
    cluster.write(os.path.join(wd, "job.sh"),
                  '#!/bin/sh\necho "BOOTED $(hostname) $CH_GUEST_ID $(cat /proc/cmdline)"\n')
    conf = cluster.sb.charlie_conf
    saved_conf = open(conf).read()
    lines = [l for l in saved_conf.splitlines(True) if not l.startswith(("kernel =", "initrd ="))]
    assert len(lines) == len(saved_conf.splitlines(True)) - 2
    try:
        with open(conf, "w") as f:
            f.write("".join(lines))
        p, job = cluster.sbatch(wd, ["-N2", "-o", "out", f"--charlie-image={img}",
                                     "--charlie-job=job.sh", "--wrap", "true"])
    finally:
        with open(conf, "w") as f:
            f.write(saved_conf)
    assert p.returncode == 0, (p.stderr, open(os.path.join(wd, "out")).read())
    out = open(os.path.join(wd, "out")).read()
    assert re.search(r"^BOOTED chgu0 0 .*root=/dev/vda", out, re.M), out
    assert "charlie.guest=" not in out
    guest1 = saved(wd, job, "1_job.out")
    assert re.search(r"^BOOTED chgu1 1 ", guest1, re.M), guest1
    assert_clean(cluster, job)
