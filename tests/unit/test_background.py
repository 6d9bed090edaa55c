"""slurm_charlie.background on this machine's processes: the lock file, the
fork, and stop() -- which root runs on what the file names, so it must
kill nothing but the background prolog it recorded.  Needs root (as the
hooks run); fakes nothing."""

import fcntl
import os
import signal
import stat
import subprocess
import time

import pytest

from helpers.procs import state as _state

from slurm_charlie.asroot import background

pytestmark = pytest.mark.root  # the hooks run as root: a failure in CI, never a skip


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "setup"
    return str(d)


def _held(path):
    """Someone holds an exclusive lock on path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _start(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _detached(base, seconds):
    """detach() whose child sleeps `seconds` and ends; returns its pid."""
    pid = background.detach("nodeA", "42", base)
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    assert isinstance(pid, int) and pid > 0, pid
    return pid


def test_detach_records_the_child_which_holds_the_lock_until_it_ends(base):
    pid = _detached(base, 0.5)
    path = background.path("nodeA", "42", base)
    assert open(path).read() == f"{pid} {_start(pid)}\n"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(os.path.join(base, "nodeA")).st_mode) == 0o755
    assert _held(path)
    os.waitpid(pid, 0)
    assert not _held(path)  # however it ended, the lock went with it
    assert background.stop("nodeA", "42", 5, base) is False


def test_stop_kills_a_running_child_and_waits_for_it(base):
    pid = _detached(base, 60)
    t0 = time.monotonic()
    assert background.stop("nodeA", "42", 5, base) is True
    assert time.monotonic() - t0 < 5
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    background.remove("nodeA", "42", base)
    assert background.job_ids("nodeA", base) == []


def test_stop_also_ends_a_step_as_the_user_stopped_before_it_could_die_with_it(base):
    """A step as the user (proc.call_as) is the user's from the moment it
    drops root, but sets its death signal only after that (a change of
    credentials clears it).  The 200-job churn SIGSTOPped one in between;
    the epilog then killed the background prolog, and the stopped step was
    left for ever, holding the job's files.  stop() now freezes the prolog,
    then kills it and every child it had, with the child's process group."""
    r, w = os.pipe()
    pid = background.detach("nodeA", "42", base)
    if pid == 0:  # the background prolog
        os.close(r)
        step = os.fork()
        if step == 0:  # its step as the user, stopped before its death signal
            os.setsid()
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            if os.fork() == 0:  # something the step started, in its group
                os.kill(os.getpid(), signal.SIGSTOP)
                os._exit(0)
            os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(0)
        os.write(w, f"{step}\n".encode())
        time.sleep(60)
        os._exit(0)
    os.close(w)
    step = int(os.read(r, 64))
    os.close(r)
    group = []
    for _ in range(500):
        group = [int(p) for p in os.listdir("/proc") if p.isdigit()
                 and _state(int(p)) == "T" and os.getpgid(int(p)) == step]
        if len(group) == 2:
            break
        time.sleep(0.01)
    try:
        assert len(group) == 2, group
        assert background.stop("nodeA", "42", 5, base) is True
        assert os.waitpid(pid, 0)[1] == signal.SIGKILL
        for _ in range(500):  # orphans: this machine's PID 1 may never reap them
            if all(_state(p) in (None, "Z") for p in group):
                break
            time.sleep(0.01)
        assert [p for p in group if _state(p) not in (None, "Z")] == []
    finally:  # whatever failed, nothing stopped stays (it would hold the test's output)
        for p in group:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_detach_of_the_same_job_stops_the_first(base):
    first = _detached(base, 60)
    second = _detached(base, 0.2)
    assert os.waitpid(first, 0)[1] == signal.SIGKILL
    path = background.path("nodeA", "42", base)
    assert open(path).read().split()[0] == str(second)
    os.waitpid(second, 0)


@pytest.fixture
def lock_naming(base):
    """Write the job's file as if it named (pid, start) and hold its lock
    like a live background prolog; yields the writer."""
    os.makedirs(os.path.join(base, "nodeA"), mode=0o755)
    path = background.path("nodeA", "42", base)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def name(pid, start):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid} {start}\n".encode(), 0)
    yield name
    os.close(fd)


@pytest.fixture
def other_users_process():
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "sleep", "60"])
    time.sleep(0.2)
    yield p.pid
    p.kill()
    p.wait()


def test_stop_never_kills_a_process_that_is_not_roots(lock_naming, other_users_process, base):
    pid = other_users_process
    lock_naming(pid, _start(pid))
    assert background.stop("nodeA", "42", 1, base) is False
    assert _alive(pid)


def test_stop_never_kills_a_process_whose_start_time_differs(lock_naming, base):
    p = subprocess.Popen(["sleep", "60"])  # root's, as a reused pid would be
    try:
        time.sleep(0.1)
        lock_naming(p.pid, _start(p.pid) + 1)
        assert background.stop("nodeA", "42", 1, base) is False
        assert _alive(p.pid)
        lock_naming(os.getpid(), _start(os.getpid()))  # nor itself
        assert background.stop("nodeA", "42", 1, base) is False
        lock_naming("x", "y")  # nor on a record that does not parse
        assert background.stop("nodeA", "42", 1, base) is False
    finally:
        p.kill()
        p.wait()


def test_stop_without_a_lock_holder_kills_nothing(base):
    p = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        os.makedirs(os.path.join(base, "nodeA"), mode=0o755)
        with open(background.path("nodeA", "42", base), "w") as f:
            f.write(f"{p.pid} {_start(p.pid)}\n")
        assert background.stop("nodeA", "42", 1, base) is False
        assert _alive(p.pid)
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("make", ["symlink", "writable", "file"])
def test_detach_refuses_a_lock_directory_that_is_not_roots_alone(base, tmp_path, make):
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.makedirs(base, mode=0o755)
    node_dir = os.path.join(base, "nodeA")
    if make == "symlink":
        os.symlink(target, node_dir)
    elif make == "writable":
        os.mkdir(node_dir)
        os.chmod(node_dir, 0o777)
    else:
        open(node_dir, "w").close()
    why = background.detach("nodeA", "42", base)
    assert isinstance(why, str) and "nodeA" in why, why
    assert os.listdir(target) == []


@pytest.mark.parametrize("node,job", [("", "1"), ("..", "1"), ("a/b", "1"), ("n", "1x"),
                                      ("n", "")])
def test_detach_and_stop_refuse_odd_names(base, node, job):
    assert isinstance(background.detach(node, job, base), str)
    assert background.stop(node, job, 1, base) is False
    assert not os.path.exists(base) or os.listdir(base) == []


def test_unusable_says_why_the_prolog_would_stay_in_the_foreground(base, tmp_path):
    assert background.unusable("nodeA", base) is None  # made by the first prolog
    os.makedirs(os.path.join(base, "nodeA"), mode=0o755)
    os.chmod(base, 0o755)
    assert background.unusable("nodeA", base) is None
    os.chmod(os.path.join(base, "nodeA"), 0o777)
    assert background.unusable("nodeA", base) == \
        f"{base}/nodeA is not root's directory (mode 0755)"
    os.chmod(os.path.join(base, "nodeA"), 0o700)  # the job user's shim could not read
    assert "is not root's directory" in background.unusable("nodeA", base)
    pid = background.detach("nodeA", "7", base)
    if pid == 0:
        os._exit(0)
    assert isinstance(pid, str) and "is not root's directory" in pid


# --- what the background prolog starts runs only once it is recorded --------

def _nobody():
    from slurm_charlie.proc import User
    return User.lookup(65534)


@pytest.fixture
def shared_dir():
    """A directory nobody can write in (pytest's tmp_path is root's, 0700)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="charlie-spawn-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d)


def test_spawn_records_before_the_program_runs(shared_dir):
    from slurm_charlie import asroot
    mark = os.path.join(shared_dir, "ran")
    seen = []

    def record(rec):
        time.sleep(0.2)  # the program would have run by now, were it not gated
        seen.append((rec.pid, rec.exe, os.path.exists(mark)))
    proc, rec = asroot.spawn(_nobody(), ["/bin/sh", "-c", f"touch {mark}"],
                                 os.open(os.devnull, os.O_WRONLY), "test", record)
    assert proc.wait(timeout=10) == 0
    assert seen == [(proc.pid, os.path.realpath("/bin/sh"), False)]
    assert os.path.exists(mark)


def test_spawn_whose_record_fails_never_runs_the_program(shared_dir):
    """The background prolog killed (or its record not written) between
    the start and the record: the process ends without running argv."""
    from slurm_charlie import asroot
    mark = os.path.join(shared_dir, "ran")

    def record(rec):
        raise OSError("record not written")
    with pytest.raises(OSError):
        asroot.spawn(_nobody(), ["/bin/sh", "-c", f"touch {mark}"],
                         os.open(os.devnull, os.O_WRONLY), "test", record)
    time.sleep(0.2)
    assert not os.path.exists(mark)


def test_the_user_killing_the_gate_before_it_opens_fails_only_the_job(shared_dir):
    """The gate runs as the job user, who can kill it (the churn's kill -9
    of the user's processes did) before root writes its line: root's write
    then meets a closed pipe.  That is the job's failure (UserError), never
    an internal error that drains the node; the program never runs."""
    import signal
    from slurm_charlie import asroot
    from slurm_charlie.errors import UserError
    mark = os.path.join(shared_dir, "ran")

    def record(rec):  # the user's kill -9, between the start and root's line
        os.kill(rec.pid, signal.SIGKILL)
        while open(f"/proc/{rec.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    with pytest.raises(UserError, match="ended before it could start"):
        asroot.spawn(_nobody(), ["/bin/sh", "-c", f"touch {mark}"],
                     os.open(os.devnull, os.O_WRONLY), "test", record)
    assert not os.path.exists(mark)


def test_a_stopped_gate_does_not_hang_a_failed_record(shared_dir):
    """The user stops their gate, then root's record fails: root kills its
    own child instead of waiting for a process that never ends."""
    import signal
    from slurm_charlie import asroot

    def record(rec):
        os.kill(rec.pid, signal.SIGSTOP)
        raise OSError("record not written")
    t0 = time.monotonic()
    with pytest.raises(OSError, match="record not written"):
        asroot.spawn(_nobody(), ["/bin/sleep", "60"], os.open(os.devnull, os.O_WRONLY),
                     "test", record)
    assert time.monotonic() - t0 < 30


def test_spawn_of_a_missing_program_is_a_node_fault():
    from slurm_charlie import asroot
    from slurm_charlie.errors import NodeFault
    with pytest.raises(NodeFault, match="program not found"):
        asroot.spawn(_nobody(), ["no-such-program-here"], 2, "test", lambda rec: None)


def test_a_users_shared_lock_only_sends_the_prolog_to_the_foreground(shared_dir):
    """Any user can open a job's lock file (the job user's shim must) and
    hold a shared lock on it: the prolog then cannot take its own, kills
    nothing (no exclusive holder) and prepares the node itself."""
    base = os.path.join(shared_dir, "setup")  # pytest's tmp_path: root's only
    os.makedirs(os.path.join(base, "nodeA"), mode=0o755)
    os.chmod(base, 0o755)
    path = background.path("nodeA", "42", base)
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {_start(os.getpid())}\n")
    os.chmod(path, 0o644)
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "flock", "-s", path, "sleep", "30"])
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not _shared_held(path):
            time.sleep(0.05)
        assert _shared_held(path)
        why = background.detach("nodeA", "42", base)
        if why == 0:
            os._exit(0)
        assert isinstance(why, str) and why.startswith(f"cannot lock {path}"), why
        assert holder.poll() is None  # the user's process is left alone
    finally:
        holder.kill()
        holder.wait()


def _shared_held(path):
    """Someone holds a lock on path that excludes an exclusive one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
