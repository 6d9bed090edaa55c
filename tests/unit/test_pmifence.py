"""The PMI fence release (slurm_charlie/guest/pmifence.py): pure logic of the
byte streams between a rank and Slurm's PMI server.  The real thing runs in
tests/vm (MPICH over srun --mpi=pmi2 in guests, 20 runs)."""

import time

from slurm_charlie.guest import pmifence


def frame(body: bytes) -> bytes:
    return b"%6d" % len(body) + body


def test_split_both_wire_formats():
    init = b"cmd=init pmi_version=2 pmi_subversion=0\n"
    f = frame(b"cmd=kvs-put;key=a;value=b;")
    msgs, rest = pmifence.split(init + f + f[:7])
    assert msgs == [init, f] and rest == f[:7]
    msgs, rest = pmifence.split(rest + f[7:])
    assert msgs == [f] and rest == b""
    spawn = b"mcmd=spawn\nnprocs=1\nendcmd\n"
    assert pmifence.split(spawn + b"cmd=barrier_in\n") == ([spawn, b"cmd=barrier_in\n"], b"")


class Pair:
    def __init__(self, release):
        self.task, self.server, self.failures = [], [], []
        self.f = pmifence.FenceRelease(self.task.append, self.server.append, release,
                                       self.failures.append)


def test_fence_answered_in_time_passes_through():
    p = Pair(release=5)
    fence = frame(b"cmd=kvs-fence;")
    p.f.from_task(fence)
    assert p.server == [fence]
    answer = frame(b"cmd=kvs-fence-response;rc=0;")
    p.f.from_server(answer)
    assert p.task == [answer]
    get = frame(b"cmd=kvs-get;key=a;")
    p.f.from_task(get)
    assert p.server == [fence, get]


def test_a_fence_that_does_not_end_releases_the_rank_but_holds_its_reads():
    p = Pair(release=0.05)
    fence = frame(b"cmd=kvs-fence;")
    p.f.from_task(fence)
    end = time.monotonic() + 5
    while not p.task and time.monotonic() < end:
        time.sleep(0.01)
    assert p.task == [frame(b"cmd=kvs-fence-response;rc=0;")]  # released early
    get, fin = frame(b"cmd=kvs-get;key=a;"), frame(b"cmd=finalize;")
    p.f.from_task(get + fin)
    assert p.server == [fence]  # held: the fence is not complete everywhere yet
    p.f.from_server(frame(b"cmd=kvs-fence-response;rc=0;"))
    assert p.server == [fence, get, fin]  # now, in order
    assert len(p.task) == 1  # the real answer is swallowed
    assert p.failures == []


def test_pmi1_barrier_and_a_failed_fence():
    p = Pair(release=0.05)
    p.f.from_task(b"cmd=barrier_in\n")
    end = time.monotonic() + 5
    while not p.task and time.monotonic() < end:
        time.sleep(0.01)
    assert p.task == [b"cmd=barrier_out rc=0\n"]
    p.f.from_server(b"cmd=barrier_out rc=1 msg=lost\n")
    assert p.failures == [b"cmd=barrier_out rc=1 msg=lost\n"]


def test_held_fence_waits_anew_and_zero_turns_it_off():
    p = Pair(release=0.05)
    f1, f2 = frame(b"cmd=kvs-fence;"), frame(b"cmd=kvs-fence;")
    p.f.from_task(f1)
    time.sleep(0.2)
    p.f.from_task(f2)  # held behind the first
    assert p.server == [f1]
    p.f.from_server(frame(b"cmd=kvs-fence-response;rc=0;"))
    assert p.server == [f1, f2]
    off = Pair(release=0)
    off.f.from_task(f1)
    time.sleep(0.1)
    assert off.task == []
