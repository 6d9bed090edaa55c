"""asroot.wait_until_ready, the one wait of every process root starts for
a job (QEMU, the holder, the task multiplexer, the ssh relay), with real
processes: each outcome, and the process always reaped unless ready."""

import os
import signal
import subprocess
import sys
import time

from slurm_charlie import asroot


def _child(code="import time; time.sleep(60)"):
    return subprocess.Popen([sys.executable, "-c", code])


def _gone(proc):
    return proc.returncode is not None


def test_ready_leaves_the_process_running(tmp_path):
    mark = tmp_path / "ready"
    proc = _child(f"import time; open({str(mark)!r}, 'w').close(); time.sleep(60)")
    try:
        assert asroot.wait_until_ready(proc, mark.exists, 30, poll=0.01) == asroot.READY
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_ends_by_itself_is_exited():
    proc = _child("raise SystemExit(3)")
    assert asroot.wait_until_ready(proc, lambda: False, 30, poll=0.01) == asroot.EXITED
    assert proc.returncode == 3


def test_not_ready_in_time_is_killed_and_reaped():
    proc = _child()
    t0 = time.monotonic()
    assert asroot.wait_until_ready(proc, lambda: False, 0.3, poll=0.01) == asroot.TIMED_OUT
    assert _gone(proc) and proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 20


def test_a_stopped_process_is_killed_after_the_grace():
    proc = _child()
    os.kill(proc.pid, signal.SIGSTOP)
    out = asroot.wait_until_ready(proc, lambda: False, 60, poll=0.01, grace=0.3)
    assert out == asroot.STOPPED
    assert _gone(proc) and proc.returncode == -signal.SIGKILL


def test_a_stopped_helper_named_by_also_counts_too():
    """The holder's squashfuse: not the spawned process, found later."""
    proc, helper = _child(), _child()
    try:
        seen = []

        def also():
            seen.append(1)
            return helper.pid if len(seen) > 3 else None
        os.kill(helper.pid, signal.SIGSTOP)
        out = asroot.wait_until_ready(proc, lambda: False, 60, poll=0.01, also=also,
                                      grace=0.3)
        assert out == asroot.STOPPED and _gone(proc)
    finally:
        helper.kill()
        helper.wait()


def test_a_briefly_stopped_process_is_not_killed(tmp_path):
    """SIGSTOP then SIGCONT within the grace: still waited for."""
    mark = tmp_path / "ready"
    proc = _child()
    os.kill(proc.pid, signal.SIGSTOP)
    calls = []

    def ready():
        calls.append(1)
        if len(calls) == 10:
            os.kill(proc.pid, signal.SIGCONT)
        if len(calls) == 60:
            mark.touch()
        return mark.exists()
    try:
        out = asroot.wait_until_ready(proc, ready, 60, poll=0.01, grace=5)
        assert out == asroot.READY and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_outcomes_are_distinct():
    assert len({asroot.READY, asroot.EXITED, asroot.STOPPED, asroot.TIMED_OUT}) == 4
