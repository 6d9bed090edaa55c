"""Prolog and epilog on this machine's filesystem, as root, for a job of the
unprivileged user nobody.  No Slurm here: the environment is what slurmd
hands the hooks; draining is recorded instead of calling scontrol.  The same
paths run for real in tests/cluster."""

import errno
import os
import shutil
import stat
import tempfile
import time

import pytest

from slurm_charlie import asuser, hooks, options, state
from slurm_charlie import shm as shm_mod
from slurm_charlie.options import Options

pytestmark = pytest.mark.root  # runs the hooks as root, job user nobody

NOBODY = 65534


@pytest.fixture
def site(monkeypatch):
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-hooks-")
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    os.mkdir(data)
    conf = os.path.join(base, "charlie.toml")
    with open(conf, "w") as f:
        f.write(f'runtime_root = "{base}/rt/%n"\nsyslog = false\n')
    drained = []
    monkeypatch.setattr(hooks, "drain", lambda node, err: drained.append((node, err.line())))
    yield {"base": base, "data": data, "conf": conf, "drained": drained,
           "jobdir": os.path.join(base, "rt", "node2", "77")}
    shutil.rmtree(base)


def job_env(site, opts=Options(type="none"), node="node2", **extra):
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_UID": str(NOBODY),
           "SLURM_JOB_GID": str(NOBODY), "SLURM_JOB_USER": "nobody",
           "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_CPUS_PER_NODE": "2,1(x2)",
           "SLURMD_NODENAME": node, "SLURM_CHARLIE_CONF": site["conf"]}
    if opts is not None:
        env.update({"SPANK_" + k: v for k, v in options.to_env(opts)})
    env.update(extra)
    return env


def read(path):
    with open(path) as f:
        return f.read()


def test_not_a_charlie_job(site):
    assert hooks.prolog_main(job_env(site, opts=None)) == 0
    assert hooks.epilog_main(job_env(site, opts=None)) == 0
    assert not os.path.exists(os.path.join(site["base"], "rt"))


def test_prolog_builds_job_dir(site):
    env = job_env(site, Options(type="none", dir=(site["data"],)))
    assert hooks.prolog_main(env) == 0
    jd = site["jobdir"]
    st = os.stat(jd)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
    for sub in ("meta", "run", "out", "meta/sync"):
        assert os.stat(os.path.join(jd, sub)).st_uid == NOBODY
    assert read(f"{jd}/meta/hostfile") == "node1:2\nnode2:1\nnode3:1\n"
    assert read(f"{jd}/meta/guest-count") == "3\n"
    task_env = dict(l.split("=", 1) for l in read(f"{jd}/run/task.env").splitlines())
    assert task_env["CH_GUEST_ID"] == "1" and task_env["CH_GUEST_COUNT"] == "3"
    assert task_env["CH_META"] == f"{jd}/meta" and task_env["CH_DATA1"] == site["data"]
    assert state.read(f"{jd}/state.json")["phase"] == "started"
    assert "prolog done" in read(f"{jd}/out/charlie.log")
    assert site["drained"] == []


def test_prolog_twice_then_epilog_twice(site):
    env = job_env(site)
    assert hooks.prolog_main(env) == 0
    first = read(f"{site['jobdir']}/meta/hosts")
    assert hooks.prolog_main(env) == 0
    assert read(f"{site['jobdir']}/meta/hosts") == first
    assert hooks.epilog_main(env) == 0
    assert not os.path.exists(site["jobdir"])
    assert hooks.epilog_main(env) == 0
    assert site["drained"] == []


def test_epilog_after_half_done_prolog(site):
    os.makedirs(site["jobdir"] + "/meta")  # prolog died before state.json
    assert hooks.epilog_main(job_env(site)) == 0
    assert not os.path.exists(site["jobdir"])


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"version": 99}', b"[1,2]"])
def test_epilog_with_corrupt_state(site, content):
    assert hooks.prolog_main(job_env(site)) == 0
    with open(site["jobdir"] + "/state.json", "wb") as f:
        f.write(content)
    assert hooks.epilog_main(job_env(site)) == 0
    assert not os.path.exists(site["jobdir"])


def test_epilog_does_not_follow_planted_links(site):
    victim = os.path.join(site["base"], "victim")
    os.mkdir(victim)
    open(victim + "/keep", "w").close()
    assert hooks.prolog_main(job_env(site)) == 0
    os.unlink(site["jobdir"] + "/state.json")
    os.symlink("/etc/shadow", site["jobdir"] + "/state.json")
    os.symlink(victim, site["jobdir"] + "/out/link")
    assert hooks.epilog_main(job_env(site)) == 0
    assert not os.path.exists(site["jobdir"])
    assert os.path.exists(victim + "/keep")


def test_prolog_replaces_planted_symlink_job_dir(site):
    victim = os.path.join(site["base"], "victim")
    os.mkdir(victim)
    os.makedirs(os.path.dirname(site["jobdir"]))
    os.symlink(victim, site["jobdir"])
    assert hooks.prolog_main(job_env(site)) == 0
    assert not os.path.islink(site["jobdir"]) and os.path.isdir(site["jobdir"] + "/meta")
    assert os.listdir(victim) == [] and os.stat(victim).st_uid == 0


def test_user_error_on_node_fails_job_not_node(site):
    gone = os.path.join(site["base"], "gone")
    env = job_env(site, Options(type="none", dir=(gone,)))
    assert hooks.prolog_main(env) == 0
    error = read(site["jobdir"] + "/run/error")
    assert "job 77: error: --charlie-dir: cannot access: No such file or directory: " + gone in error
    assert "hint:" in error
    assert not os.path.exists(site["jobdir"] + "/run/task.env")
    assert site["drained"] == []
    assert hooks.epilog_main(env) == 0 and not os.path.exists(site["jobdir"])


def test_commit_beyond_node_count_on_node(site, tmp_path):
    qcow = os.path.join(site["base"], "disk.qcow2")
    with open(qcow, "wb") as f:
        f.write(b"QFI\xfb" + b"\0" * 508)
    os.chmod(qcow, 0o644)
    env = job_env(site, Options(type="vm", image=qcow, commit=5))
    assert hooks.prolog_main(env) == 0
    assert "guest 5 does not exist in a job of 3 node(s)" in read(site["jobdir"] + "/run/error")


def test_node_fault_runtime_root_is_a_file(site):
    os.makedirs(os.path.join(site["base"], "rt"))
    open(os.path.join(site["base"], "rt", "node2"), "w").close()
    assert hooks.prolog_main(job_env(site)) == 1
    assert site["drained"] == [("node2", "runtime_root: not a directory: "
                                + os.path.join(site["base"], "rt", "node2"))]


def test_node_fault_runtime_root_user_writable(site):
    with open(site["conf"], "w") as f:
        f.write('runtime_root = "/tmp/charlie-rt/%n"\nsyslog = false\n')
    assert hooks.prolog_main(job_env(site)) == 1
    assert "inside a path an ordinary user can write: /tmp" in site["drained"][0][1]


def test_node_fault_bad_site_config(site):
    with open(site["conf"], "w") as f:
        f.write("runtime_rot = '/x'\n")
    assert hooks.prolog_main(job_env(site)) == 1
    assert "unknown key: runtime_rot" in site["drained"][0][1]


def test_node_fault_node_not_in_list(site):
    assert hooks.prolog_main(job_env(site, node="node9")) == 1
    assert "node name: not in the job's node list" in site["drained"][0][1]


def test_jobscript_link_and_copy_fallback(site, monkeypatch):
    src = os.path.join(site["base"], "job.sh")
    with open(src, "w") as f:
        f.write("#!/bin/sh\n")
    dst = os.path.join(site["base"], "jobscript")
    assert asuser.link_jobscript(src, dst) is None
    assert os.stat(dst).st_ino == os.stat(src).st_ino

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    monkeypatch.setattr(os, "link", no_link)
    warning = asuser.link_jobscript(src, dst)
    assert "hard link failed (Invalid cross-device link), copied instead" in warning
    assert os.stat(dst).st_ino != os.stat(src).st_ino and read(dst) == "#!/bin/sh\n"


def test_shm_cleanup_keeps_what_is_in_use():
    """Entries some live process of the user has mapped or open stay (names
    with blanks too), and so do very young ones."""
    import subprocess
    import sys
    from slurm_charlie.proc import User, call_as
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-shm-")
    os.chmod(base, 0o755)
    shm = os.path.join(base, "shm")
    os.mkdir(shm)
    os.chmod(shm, 0o1777)
    for name in ("left-behind", "mapped x", "open y", "fresh"):
        with open(os.path.join(shm, name), "wb") as f:
            f.write(b"x" * 4096)
        os.chown(os.path.join(shm, name), NOBODY, NOBODY)
        if name != "fresh":  # "fresh" may sit between shm_open and mmap
            os.utime(os.path.join(shm, name), (time.time() - 60,) * 2)
    open(os.path.join(shm, "roots"), "w").close()
    # a live process of the user (exec'd, as job tasks are) holding two entries
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap, sys, time\n"
         f"f = open({os.path.join(shm, 'mapped x')!r}, 'r+b')\n"
         "m = mmap.mmap(f.fileno(), 4096)\nf.close()\n"
         f"g = open({os.path.join(shm, 'open y')!r}, 'rb')\n"
         "print('ready', flush=True)\ntime.sleep(30)\n"],
        user=NOBODY, group=NOBODY, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        removed = call_as(User.lookup(NOBODY), shm_mod.clean_as_user, shm)
        assert removed == ["left-behind"]
        assert sorted(os.listdir(shm)) == ["fresh", "mapped x", "open y", "roots"]
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(base)


def test_runtime_root_full_fails_the_job_not_the_node(site):
    """A full runtime root (a user can fill it from their job): the next
    job fails with the reason, the node stays in service, the epilog cleans."""
    import subprocess
    rt = os.path.join(site["base"], "rt", "node2")
    os.makedirs(rt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "tmpfs", rt],
                   check=True)
    try:
        with open(os.path.join(rt, "filler"), "wb") as f:
            try:
                f.write(b"x" * (1 << 20))
            except OSError:
                pass
        env = job_env(site)
        assert hooks.prolog_main(env) == 0
        assert site["drained"] == []
        assert hooks.epilog_main(env) == 0
        assert site["drained"] == [] and not os.path.exists(site["jobdir"])
    finally:
        subprocess.run(["umount", "-l", rt])


def test_a_process_on_its_way_out_counts_as_gone(monkeypatch):
    """Ranks killed by scancel may still be in the kernel's exit path when
    the epilog looks (seen in the sandbox: state D, PF_EXITING in the flags,
    cgroup already the root one), so the /dev/shm sweep must not take them
    for a session of the user's.  A real zombie and a reaped child count as
    gone; this process does not; the exit path itself is the /proc line the
    sandbox showed (no way to hold a process there on purpose)."""
    from slurm_charlie import procfs as proc
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    while proc.proc_stat(pid)[0] != "Z":
        time.sleep(0.01)
    assert proc.is_exiting(pid)
    os.waitpid(pid, 0)
    assert proc.is_exiting(pid)
    assert not proc.is_exiting(os.getpid())
    seen = "1 (sh) D 1 21635 21635 0 -1 {} 185 0 0 0 0 0 0 0 20 0 1 0 1930260 0 0"
    for flags, leaving in ((0x40050C, True), (0x400100, False)):
        line = seen.format(flags).split(")", 1)[1].split()
        monkeypatch.setattr(proc, "proc_stat", lambda _pid, line=line: line)
        assert proc.is_exiting(1) is leaving


def test_the_slurmd_a_helper_runs_under():
    """On a host with several slurmd (the sandbox), a hook helper of another
    node's slurmd is not this node's business: found by its parents."""
    import subprocess
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-slurmd-")
    try:
        fake = os.path.join(base, "slurmd")
        shutil.copy("/bin/sh", fake)
        parent = subprocess.Popen([fake, "-c", "sleep 30 & echo $!; wait"],
                                  stdout=subprocess.PIPE, text=True)
        child = int(parent.stdout.readline())
        try:
            while shm_mod.comm_of(child) != "sleep":  # forked, exec'd soon
                time.sleep(0.01)
            assert shm_mod._slurmd_of(child) == parent.pid
            assert shm_mod._slurmd_of(parent.pid) == parent.pid
            assert shm_mod._slurmd_of(os.getpid()) is None
        finally:
            os.kill(child, 9)
            parent.wait()
    finally:
        shutil.rmtree(base)
