"""The root side against hostile input, at unit level (real files, real
processes, no Slurm): options from the prolog environment, steps as the
user that die, stop or block, root's records, removal of a hostile tree,
signalling only what root started.  The same attacks through real jobs are
in tests/adversarial/."""

import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from hypothesis import given, settings, strategies as st

from slurm_charlie import options, asroot, layout, procfs

from slurm_charlie.asroot import jobdir as asroot_jobdir
from slurm_charlie.errors import NodeFault, UserError
from slurm_charlie.proc import User, call_as

needs_root = pytest.mark.root  # drops to nobody, root-owned dirs in /run


# --- options from the prolog's environment -------------------------------------

NAMES = sorted(options._known_names()) + ["CHARLIE_DIR5", "CHARLIE_BOGUS"]
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["²", "٣", "1" * 5000, "9" * 13, "-1", " 1", "1 ", "0", "(null)",
                     "/abs/path", "rel/path", "4G", "1T", "10", "", "\u00b9\u00b2",
                     "sha256:" + "a" * 64 + "@1:2:3:4", "sha256:" + "a" * 64 + "@1:2:3:-4"]))


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=8))
def test_from_env_fuzz_only_user_errors(env):
    """Whatever a user's own validator put there: Options, None or a
    UserError, never another exception."""
    spank = {"SPANK_" + k: v for k, v in env.items()}
    spank["SPANK_CHARLIE"] = "1"
    try:
        got = options.from_env(spank)
    except UserError:
        return
    assert isinstance(got, options.Options)


@pytest.mark.parametrize("name,value,problem", [
    ("CHARLIE_CPUS", "²", "not a positive whole number"),
    ("CHARLIE_COMMIT", "٣", "not a guest number"),
    ("CHARLIE_MEM", "1" * 5000, "not a size in MiB"),
    ("CHARLIE_UID", "¹", "not a numeric id"),
    ("CHARLIE_DIR5", "/x", "not a variable slurm-charlie sets"),
    ("CHARLIE_IMAGE", "relative.sqfs", "not an absolute path on the node"),
    ("CHARLIE_IMAGE", "/" + "a" * 5000, "value longer than 4096 characters"),
    ("CHARLIE_WRITE", "maybe", "takes no value"),
])
def test_from_env_refuses(name, value, problem):
    with pytest.raises(UserError) as e:
        options.from_env({"SPANK_CHARLIE": "1", "SPANK_" + name: value})
    assert problem in e.value.line()


VALID = {
    "image": ["/images/a.sqfs", "/x y/with space.qcow2"],
    "type": list(options.TYPES),
    "dir": [("/d1",), ("/d1", "/d2", "/d3", "/d4")],
    "job": ["/home/u/job.sh"],
    "interactive": [True],
    "commit": [0, 7],
    "write": [True],
    "uid": [0, 4294967294],
    "gid": [0, 1000],
    "cpus": [1, 64],
    "mem": [1, 4096, 1 << 30],
    "tmp_size": [1, 2048],
}


def test_every_option_is_covered():
    assert set(VALID) == {o.field for o in options.OPTIONS}


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in VALID.items() for v in vs])
def test_round_trip_every_option(field, value):
    """Options -> env pairs -> prolog: unchanged, for every option in the
    table (a new option that to_env forgets fails here)."""
    opts = options.Options(**{field: value})
    assert options.from_pairs(options.to_env(opts)) == opts


def test_argv_to_prolog_round_trip():
    argv = ["--charlie-image=/i.qcow2", "--charlie-type=vm", "--charlie-dir=/a",
            "--charlie-dir=/b", "--charlie-job=/j.sh", "--charlie-commit=2",
            "--charlie-cpus=3", "--charlie-mem=2G", "--charlie-tmp-size=512",
            "--charlie-uid=0", "--charlie-gid=5", "--charlie-write",
            "--charlie-interactive"]
    opts = options.build(options.parse_argv(argv))
    assert options.from_pairs(options.to_env(opts)) == opts
    assert opts.mem == 2048 and opts.dir == ("/a", "/b")


# --- steps as the user ----------------------------------------------------------

@pytest.fixture
def nobody():
    return User.lookup(pwd.getpwnam("nobody").pw_uid)


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _stop_self():
    os.kill(os.getpid(), signal.SIGSTOP)
    return "resumed"


def _read_fifo(path):
    with open(path) as f:
        return f.read()


def _raise_node_fault():
    raise NodeFault("qemu-img", "program not found")


def _raise_bug():
    raise RecursionError("deep")


@needs_root
@pytest.mark.parametrize("fn,problem", [
    (_kill_self, "a step run as the user died: killed by signal 9"),
    (_raise_node_fault, "program not found"),
    (_raise_bug, "RecursionError: deep"),
])
def test_user_step_failures_are_user_errors(nobody, fn, problem):
    with pytest.raises(UserError) as e:
        call_as(nobody, fn, limit=20)
    assert problem in e.value.line()


@needs_root
def test_stopped_user_step_fails_at_once(nobody):
    """A stopped step is not waited for until its (long) deadline."""
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        call_as(nobody, _stop_self, limit=600)
    assert "was stopped (SIGSTOP)" in e.value.line()
    assert time.monotonic() - t0 < 10  # bounded, not hung


def _stop_grandchild():
    subprocess.run(["sh", "-c", "kill -STOP $$; echo resumed"])
    return "resumed"


@needs_root
def test_stopped_grandchild_of_a_user_step(nobody):
    """unsquashfs or qemu-img stopped under the step: the same."""
    with pytest.raises(UserError, match="was stopped"):
        call_as(nobody, _stop_grandchild, limit=600)


@pytest.fixture
def run_dir():
    """A directory below /run (root-safe parents, unlike /tmp), 0755."""
    path = tempfile.mkdtemp(dir="/run", prefix="charlie-trust-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_fifo_cannot_hang_a_user_step(nobody, run_dir):
    fifo = run_dir / "poweroff"
    os.mkfifo(fifo, 0o666)
    with pytest.raises(UserError) as e:
        call_as(nobody, _read_fifo, str(fifo), limit=1)
    assert "did not finish" in e.value.line()


def test_readers_do_not_block_on_fifos(tmp_path):
    from slurm_charlie import files
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert files.read_small(str(fifo)) is None
    assert files.read_tail(str(fifo), 3) == ""
    os.symlink("/etc/passwd", tmp_path / "l")
    assert files.read_small(str(tmp_path / "l")) is None


# --- removal of a hostile tree --------------------------------------------------

@pytest.mark.parametrize("depth", [5, 3000])
def test_remove_tree_deep_and_hostile(tmp_path, depth):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    victim = tmp_path / "job"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("job", dir_fd=fd)
    cur = os.open("job", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    for i in range(depth):  # deeper than PATH_MAX and the recursion limit
        os.mkdir("d", dir_fd=cur)
        os.symlink(str(outside), "link", dir_fd=cur)
        os.mkfifo("fifo", dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    try:
        assert asroot_jobdir.remove_tree(fd, "job") is True
        assert not os.path.lexists(victim)
        assert (outside / "keep").read_text() == "precious"
        assert asroot_jobdir.remove_tree(fd, "job") is False  # twice is fine
    finally:
        os.close(fd)


def test_remove_tree_wide(tmp_path):
    root = tmp_path / "job"
    for i in range(50):
        d = root / f"d{i}" / "x"
        d.mkdir(parents=True)
        for j in range(20):
            (d / f"f{j}").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert asroot_jobdir.remove_tree(fd, "job")
    finally:
        os.close(fd)
    assert not root.exists()


# --- root's records and signals -----------------------------------------------------

@needs_root
def test_record_round_trip_and_bad_records(run_dir):
    tmp_path = run_dir
    recs = asroot.Records(str(tmp_path / "rt"))
    assert recs.read("5") is None
    p = asroot.ProcRecord("qemu", 1234, 99, 1000, "/usr/bin/qemu", 0)
    rec = asroot.JobRecord("5", 1000, 1000, "vm", 2, "started", (p,), {"guest": 2})
    recs.write(rec)
    assert recs.read("5") == rec and recs.job_ids() == ["5"]
    st = os.stat(tmp_path / "rt" / layout.RECORD_DIR)
    assert st.st_mode & 0o777 == 0o700
    for bad in (b"[]", b"{}", b'{"version": 1, "job_id": "5", "uid": "0", "gid": 0}',
                b'{"version": 1, "job_id": "5", "uid": 1, "gid": 1, "procs": [{"pid": 1}]}',
                b"\xff" * 10):
        with open(tmp_path / "rt" / layout.RECORD_DIR / "5.json", "wb") as f:
            f.write(bad)
        assert recs.read("5") is None
    recs.remove("5")
    assert recs.job_ids() == []


def _spawn_sleep(user=None):
    kw = {} if user is None else {"user": user.uid, "group": user.gid}
    return subprocess.Popen(["sleep", "60"], **kw)


@needs_root
def test_signal_only_what_matches(nobody):
    root_proc = _spawn_sleep()               # stands for slurmd, sshd, …
    mine = _spawn_sleep(nobody)
    try:
        time.sleep(0.1)
        exe = os.readlink(f"/proc/{mine.pid}/exe")
        start = procfs.starttime(mine.pid)
        # a record that names a root process as the user's: refused
        forged = asroot.ProcRecord("qemu", root_proc.pid,
                                       procfs.starttime(root_proc.pid), nobody.uid, exe)
        assert asroot.signal_process(forged, signal.SIGKILL) is False
        # the right pid with a wrong start time (reused pid): refused
        stale = asroot.ProcRecord("qemu", mine.pid, start + 1, nobody.uid, exe)
        assert asroot.signal_process(stale, signal.SIGKILL) is False
        # another program under the recorded pid: refused
        other = asroot.ProcRecord("qemu", mine.pid, start, nobody.uid, "/usr/bin/qemu")
        assert asroot.signal_process(other, signal.SIGKILL) is False
        assert root_proc.poll() is None and mine.poll() is None
        good = asroot.ProcRecord("qemu", mine.pid, start, nobody.uid, exe)
        assert asroot.signal_process(good, signal.SIGKILL) is True
        assert mine.wait(5) == -signal.SIGKILL
    finally:
        for p in (root_proc, mine):
            p.kill()
            p.wait()


@needs_root
def test_kill_user_processes_spares_others(nobody):
    root_proc = _spawn_sleep()
    mine = _spawn_sleep(nobody)
    try:
        pids = {root_proc.pid, mine.pid}
        n = asroot.kill_user_processes(nobody.uid, lambda pid: pid in pids, 5, "t")
        assert n == 1 and mine.wait(5) == -signal.SIGKILL
        assert root_proc.poll() is None
        with pytest.raises(NodeFault):
            asroot.kill_user_processes(0, lambda pid: True, 1, "t")
    finally:
        for p in (root_proc, mine):
            p.kill()
            p.wait()


def _step_of_a_dying_prolog(user, pid_file):
    """A root process (the background prolog) whose step as the user writes
    its pid and sleeps; the test kills the root process."""
    def step():
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    try:
        call_as(user, step, limit=600)
    finally:
        os._exit(0)


@needs_root
def test_a_step_dies_with_the_root_process_that_started_it(nobody, run_dir):
    """The epilog SIGKILLs a background prolog that still runs; its step as
    the user -- stopped by the user, or waiting -- must not live on (it
    held the job's files open and outlived the job; seen in the churn)."""
    os.chmod(run_dir, 0o777)
    pid_file = str(run_dir / "step.pid")
    step = 0
    root = os.fork()
    if root == 0:
        _step_of_a_dying_prolog(nobody, pid_file)
    try:
        end = time.monotonic() + 30
        while not os.path.exists(pid_file) and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.1)
        step = int(open(pid_file).read())
        os.kill(step, signal.SIGSTOP)  # the user's part of the attack
        os.kill(root, signal.SIGKILL)  # the epilog's stop of the prolog
        os.waitpid(root, 0)
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{step}") and time.monotonic() < end:
            state = open(f"/proc/{step}/stat").read().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.05)
        gone = not os.path.exists(f"/proc/{step}") or \
            open(f"/proc/{step}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        assert gone, f"step {step} outlived the root process that started it"
    finally:
        for pid in (root, step):
            try:
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
