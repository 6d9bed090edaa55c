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
    pid = asroot.detach_prolog(node, job_id or "")
    if pid == 0:  # the child: the whole prolog, then it ends here
        code = 1
        try:
            from . import hooks
            code = hooks.prolog_main(env, background=True)
        finally:
            try:
                from . import log
                log.flush()
            finally:
                os._exit(code)
    if isinstance(pid, int):
        return 0
    from . import hooks
    return hooks.prolog_main(env, foreground_why=pid)
