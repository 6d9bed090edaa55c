"""The warm hook server's program (asroot/warm.py has the mechanism and its
contract): what it imports before it listens, what a forked child runs, and
whether the site wants it (``hooks.warm``).

Started by a prolog that found no server (``start_if_wanted``) as
``python -I -c 'from slurm_charlie.warm_main import main' NODE BASE IDLE``.
"""

from __future__ import annotations

import os
import sys

from . import asroot, config
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .jobenv import Environ

#: what a child would import on its first job; imported before listening
PRELOAD = (
    "slurm_charlie.hooks", "slurm_charlie.lifecycle", "slurm_charlie.cleanup",
    "slurm_charlie.options", "slurm_charlie.asuser", "slurm_charlie.validate",
    "slurm_charlie.meta", "slurm_charlie.render", "slurm_charlie.files",
    "slurm_charlie.state", "slurm_charlie.shm", "slurm_charlie.images",
    "slurm_charlie.unpack", "slurm_charlie.backends", "slurm_charlie.backends.container",
    "slurm_charlie.backends.vm", "slurm_charlie.procfs", "slurm_charlie.proc",
    "logging.handlers", "filelock", "jinja2", "ctypes",
)


def preload() -> None:
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in asroot.OPERATIONS:  # asroot's rooms are imported when first used
        getattr(asroot, name)


def wanted(env: Environ) -> bool:
    """Does the site want the warm server (read afresh, as every hook does)?"""
    try:
        return bool(config.load(env)["hooks.warm"])
    except Exception:
        return True  # a broken config fails the job in the hook itself


def run_hook(kind: bytes) -> int:
    """In a child the server forked, its environment now the hook's: the
    prolog (in the background) or the epilog, as the hook would run it."""
    from . import hooks, lifecycle
    from . import log as logmod
    from .jobenv import ids
    lifecycle.STARTED = "forked warm"
    if not wanted(os.environ):  # the site turned it off: the server goes
        try:
            asroot.stop_warm(ids(os.environ)[1])
        except OSError:
            pass
    try:
        if kind == b"prolog":
            return hooks.prolog_main(os.environ, background=True)
        return hooks.epilog_main(os.environ)
    finally:
        logmod.flush()


def start_if_wanted(env: Environ, node: str) -> None:
    """After a prolog that found no warm server: start one when the site
    wants it.  Never fails a job."""
    try:
        cfg = config.load(env)
        if cfg["hooks.warm"] and asroot.warm_running(node) is None:
            # what it says before it can serve (a traceback) goes to the node's log
            errors = config.expand_node(cfg["log_file"], node) if cfg["log_file"] else None
            asroot.start_warm(node, cfg["hooks.warm_idle"], errors=errors)
    except Exception as e:  # the job is prepared; the server is only speed
        log.warning("prolog: cannot start the warm hook server: %s", e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    node, base, idle = argv[0], argv[1], float(argv[2])
    return asroot.serve_warm(node, run_hook, base, idle, preload)
