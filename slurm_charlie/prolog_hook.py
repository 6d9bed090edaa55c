"""The hooks' entry points (prolog.d/50-charlie and epilog.d/50-charlie run
them straight from the package, ``python -I -c``).  The prolog leaves the
node's preparation to a background child when it can (asroot.background),
forked by the node's warm server when one runs (asroot.warm), and returns;
the epilog asks the warm server and runs itself when there is none.

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
    # the node's warm server forks the preparation when it runs (not in a
    # job's step: the server would live in the job's cgroup)
    ask = None if in_step else (lambda fd: asroot.warm_prolog(node, fd))
    pid = asroot.detach_prolog(node, job_id or "", ask=ask)
    if pid == 0:  # the child: the whole prolog, then it ends here
        code = 1
        try:
            from . import hooks
            code = hooks.prolog_main(env, background=True, in_step=in_step)
            if not in_step:
                from . import warm_main
                warm_main.start_if_wanted(env, node)
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


def epilog() -> int:
    """The epilog hook: the node's warm server runs it when it can (its
    exit code is ours); else it runs here."""
    from .jobenv import ids
    env = os.environ
    if env.get("SPANK_CHARLIE") is not None and not launched_by_slurmstepd():
        code = asroot.warm_epilog(ids(env)[1])
        if code is not None:
            return code
    from . import hooks
    return hooks.epilog_main(env)
