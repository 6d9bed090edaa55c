"""The warm hook server (slurm_charlie/asroot/warm.py) with real processes:
the real server program started as a prolog starts it, in a directory of
the test's own instead of /run/slurm-charlie.  Whatever goes wrong with the
server, a hook either hands its work to exactly one forked child or does
it itself: never both, never neither."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from helpers.procs import state

from slurm_charlie.asroot import background, warm

pytestmark = pytest.mark.root  # root's directories, a socket only root may use

NODE = "warmtest1"
#: the checkout (what PYTHONPATH needs)
PKG = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(warm.__file__))))


@pytest.fixture
def base():
    """A root directory like /run/slurm-charlie (others may look in, as there)."""
    top = tempfile.mkdtemp(prefix="charlie-warm-", dir="/tmp")
    os.chmod(top, 0o755)
    b = os.path.join(top, "setup")
    yield b
    try:
        warm.stop(NODE, b)
    except OSError:
        pass
    shutil.rmtree(top, ignore_errors=True)


def start(base, idle=300):
    warm.start(NODE, idle, base)
    sock = warm.paths(NODE, base)[0]
    for _ in range(500):
        if os.path.exists(sock) and warm.running(NODE, base):
            return warm.running(NODE, base)[0]
        time.sleep(0.02)
    raise AssertionError("the warm server did not start")


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None




def children(pid):
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and ppid(int(d)) == pid]


def hook_env(**extra):
    env = {"PATH": os.environ["PATH"], "SLURMD_NODENAME": NODE, "SLURM_JOB_ID": "4242",
           "PYTHONPATH": PKG}
    env.update(extra)
    return env


EPILOG = ("import sys; from slurm_charlie.asroot import warm; "
          "r = warm.epilog({node!r}, {base!r}); print('RC', r); sys.exit(0)")
COLD = "import os; from slurm_charlie import hooks; print('RC', hooks.epilog_main(os.environ))"


def run_epilog(base, env, warm_path=True):
    code = EPILOG.format(node=NODE, base=base) if warm_path else COLD
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_epilog_is_done_by_a_child_with_the_hooks_environment_and_exit_code(base, tmp_path):
    server = start(base)
    # not a charlie job: 0, as the hook itself says
    p = run_epilog(base, hook_env())
    assert p.stdout.split() == ["RC", "0"], p.stderr
    # a charlie job without SLURM_JOB_UID: the same failure, warm or cold (the
    # drain it asks for goes to a stand-in scontrol: no Slurm is meant here)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/sh\necho no slurmctld here >&2\nexit 1\n")
    (bin_ / "scontrol").chmod(0o755)
    bad = hook_env(SPANK_CHARLIE="1", PATH=f"{bin_}:{os.environ['PATH']}")
    warm_run = run_epilog(base, bad)
    cold_run = run_epilog(base, bad, warm_path=False)
    assert warm_run.stdout.split() == cold_run.stdout.split() == ["RC", "1"], \
        (warm_run.stdout, warm_run.stderr, cold_run.stdout)
    # what the child logs goes to the hook's own standard error, as Slurm collects it
    assert "SLURM_JOB_UID is not set" in warm_run.stderr
    assert "SLURM_JOB_UID is not set" in cold_run.stderr
    assert warm.running(NODE, base)[0] == server  # one server served both


def test_a_forked_child_is_the_servers_and_does_nothing_without_go(base):
    server = start(base)
    asked = warm.ask("epilog", NODE, [0, 1, 2], base)
    assert asked is not None
    assert ppid(asked.pid) == server
    asked.close()  # the hook went its own way
    for _ in range(500):
        if state(asked.pid) in (None, "Z"):
            break
        time.sleep(0.01)
    assert state(asked.pid) in (None, "Z"), "the child went on without go"


def test_the_prolog_is_handed_over_with_the_jobs_lock_file(base):
    start(base)
    pid = background.detach(NODE, "4242", base,
                            ask=lambda fd: warm.prolog(NODE, fd, base))
    assert isinstance(pid, int) and pid > 0
    with pytest.raises(ChildProcessError):  # forked by the server, not by this process
        os.waitpid(pid, os.WNOHANG)
    lock = background.path(NODE, "4242", base)
    assert open(lock).read().split()[0] == str(pid)
    fd = os.open(lock, os.O_RDONLY)
    try:  # the child held the lock while it lived (this is no charlie job: it ends at once)
        for _ in range(500):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            raise AssertionError("the warm prolog child never let the job's lock go")
    finally:
        os.close(fd)


def test_a_user_cannot_reach_the_server(base):
    start(base)
    sock = warm.paths(NODE, base)[0]
    assert os.stat(sock).st_mode & 0o077 == 0 and os.stat(sock).st_uid == 0
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES')\n"
            "    sys.exit()\n"
            "s.settimeout(5)\n"
            "try:\n"
            "    s.send(b'charlie-warm/1\\0epilog\\0022\\0/')\n"
            "    print('REPLY', repr(s.recv(64)))\n"
            "except (ConnectionResetError, BrokenPipeError):\n    print('RESET')\n")
    as_nobody = dict(user="nobody", group="nogroup", extra_groups=[], capture_output=True,
                     text=True, timeout=30)
    p = subprocess.run([sys.executable, "-I", "-c", code, sock], **as_nobody)
    assert p.stdout.strip() == "EACCES", p.stdout + p.stderr
    # were the socket ever opened to others, the server still answers only root
    os.chmod(sock, 0o666)
    os.chmod(os.path.dirname(sock), 0o755)
    p = subprocess.run([sys.executable, "-I", "-c", code, sock], **as_nobody)
    assert p.stdout.strip() in ("REPLY b''", "RESET"), p.stdout + p.stderr  # closed unanswered


def test_stale_code_is_refused_and_the_server_leaves(base, tmp_path):
    """An upgrade changes the package on disk: the server refuses and goes.
    It runs from a copy here, which the test then changes (the checkout may
    be read-only, as in the Debian 13 lane)."""
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(PKG, "slurm_charlie"), copy / "slurm_charlie",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from slurm_charlie.warm_main import main; sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(copy), NODE, base, "300"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(500):
        if os.path.exists(warm.paths(NODE, base)[0]) and warm.running(NODE, base):
            break
        time.sleep(0.02)
    server = warm.running(NODE, base)[0]
    assert server == proc.pid
    asked = warm.ask("epilog", NODE, [0, 1, 2], base)  # current: it serves
    assert asked is not None
    asked.close()
    victim = copy / "slurm_charlie" / "warm_main.py"
    victim.write_text(victim.read_text() + "\n# upgraded\n")
    assert warm.ask("epilog", NODE, [0, 1, 2], base) is None
    assert proc.wait(timeout=30) == 0
    assert warm.running(NODE, base) is None
    assert not os.path.exists(warm.paths(NODE, base)[0])


def test_a_stopped_server_makes_the_hook_fall_back_and_never_run_twice(base):
    server = start(base)
    os.kill(server, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert warm.ask("epilog", NODE, [0, 1, 2], base, timeout=0.5) is None
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(server, signal.SIGCONT)
    # it now forks the request it had queued; the child finds no hook and ends
    time.sleep(1)
    for _ in range(500):
        if not [c for c in children(server) if state(c) not in (None, "Z")]:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("a child of the stopped server still runs")
    assert warm.ask("epilog", NODE, [0, 1, 2], base) is not None  # and serves again


def test_a_server_in_another_network_namespace_is_not_used(base):
    start(base)
    code = (f"from slurm_charlie.asroot import warm; "
            f"print(warm.ask('epilog', {NODE!r}, [0, 1, 2], {base!r}))")
    p = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=30, env={**os.environ, "PYTHONPATH": PKG})
    assert p.stdout.strip() == "None", p.stdout + p.stderr


def test_one_server_per_node_stop_and_idle(base):
    server = start(base)
    warm.start(NODE, 60, base)  # a second one finds the lock held and leaves
    time.sleep(1.5)
    assert warm.running(NODE, base)[0] == server
    assert warm.stop(NODE, base) is True
    assert warm.running(NODE, base) is None
    assert not os.path.exists(warm.paths(NODE, base)[0])
    assert warm.ask("epilog", NODE, [0, 1, 2], base) is None  # nothing there: the hook runs itself
    start(base, idle=1)
    for _ in range(1000):
        if warm.running(NODE, base) is None:
            break
        time.sleep(0.02)
    assert warm.running(NODE, base) is None, "the idle server did not leave"
    assert not os.path.exists(warm.paths(NODE, base)[0])
