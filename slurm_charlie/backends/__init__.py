"""Backends: what runs on each node of a charlie job.

A backend has four steps, each safe to repeat and to run after a crash:

    check(opts, cfg)            submit time and prolog, as the job user
    start(ctx) -> dict          prolog (root), after meta is rendered; starts
                                processes through asroot.spawn and hands
                                each record to ctx.on_spawn at once; returns
                                the facts root keeps in its job record
    task_env(ctx) -> pairs      CH_* variables for every task on this node
    stop(ctx, record)           epilog (root): undo start() from root's own
                                record; record None means the prolog died
                                before it wrote one: then only the job user's
                                processes that carry this job's marks are hit
"""

from __future__ import annotations

from typing import Callable

from ..errors import UserError
from .base import Backend, Context

__all__ = ["Backend", "Context", "NAMES", "get"]


class NoneBackend(Backend):
    """Meta only: the job runs on the host and gets meta/ and CH_*."""

    name = "none"

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        env = [("CH_META", ctx.paths.meta)]
        env += [(f"CH_DATA{i}", d) for i, d in enumerate(ctx.opts.dir, start=1)]
        return env


def _container() -> Backend:
    from .container import ContainerBackend
    return ContainerBackend()


def _vm() -> Backend:
    from .vm import VMBackend
    return VMBackend()


#: type -> how to make its back end; imported when the type is first used
_MAKERS: dict[str, Callable[[], Backend]] = {"none": NoneBackend,
                                             "container": _container, "vm": _vm}
NAMES = tuple(_MAKERS)
_MADE: dict[str, Backend] = {}


def get(name: str) -> Backend:
    if name not in _MADE:
        try:
            _MADE[name] = _MAKERS[name]()
        except KeyError:
            raise UserError("--charlie-type", "unknown type", name) from None
    return _MADE[name]
