"""The prolog hook's entry point (prolog.d/50-charlie runs it straight from
the package, ``python -I -c``): it leaves the node's preparation to a
background child when it can (asroot.background) and returns.

Up to the fork it imports only this module, asroot.background and jobenv
(tests/unit/test_house.py checks it): srun's first poll for a finished
prolog comes 0.1 s after the allocation (docs/admin.rst).
"""

from __future__ import annotations

import os

from . import asroot


def main() -> int:
    """The prolog hook: leave the prolog to a child when the lock file can
    be made; else run it here."""
    from .jobenv import ids
    env = os.environ
    job_id, node = ids(env)
    in_step = launched_by_slurmstepd()
    pid = asroot.detach_prolog(node, job_id or "")
    if pid == 0:  # the child: the whole prolog, then it ends here
        code = 1
        try:
            from . import hooks
            code = hooks.prolog_main(env, background=True, in_step=in_step)
        finally:
            try:
                from . import log
                log.flush()
            finally:
                os._exit(code)
    if isinstance(pid, int):
        return 0
    from . import hooks
    return hooks.prolog_main(env, foreground_why=pid, in_step=in_step)


def launched_by_slurmstepd(pid: int | None = None) -> bool:
    """Is the nearest Slurm daemon above this process slurmstepd (the
    prolog runs in the extern step: PrologFlags=RunInJob, Slurm 24.05+)
    rather than slurmd?  Plain reads of /proc, nothing imported."""
    pid = os.getppid() if pid is None else pid
    for _ in range(32):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        comm = stat[stat.find(b"(") + 1:stat.rfind(b")")]
        if comm in (b"slurmstepd", b"slurmd"):
            return comm == b"slurmstepd"
        fields = stat[stat.rfind(b")") + 2:].split()
        pid = int(fields[1]) if len(fields) > 1 else 0
        if pid <= 1:
            return False
    return False
