"""Backends: what runs on each node of a charlie job.

A backend has four steps, each safe to repeat and to run after a crash:

    check(opts, cfg)            submit time and prolog, as the job user
    start(ctx) -> dict          prolog, after meta is rendered; returns what
                                goes into state.json
    task_env(ctx) -> pairs      CH_* variables for every task on this node
    stop(ctx, state)            epilog; state may be None (lost or corrupt)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config
from ..errors import UserError
from ..layout import JobPaths
from ..options import Options
from ..proc import User


@dataclasses.dataclass(frozen=True)
class Context:
    opts: Options
    cfg: Config
    paths: JobPaths
    user: User
    job_id: str
    node: str
    guest_id: int
    nodes: tuple[str, ...]
    cpus: int = 1                  # CPUs of the job on this node
    work_dir: str | None = None    # the job's working directory (user path)
    mem_mib: int | None = None     # VM: guest memory chosen by the prolog


class Backend:
    name = "?"

    def check(self, opts: Options, cfg: Config) -> None:
        pass

    def start(self, ctx: Context) -> dict[str, Any]:
        return {}

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        return []

    def stop(self, ctx: Context, state: dict[str, Any] | None) -> None:
        pass


class NoneBackend(Backend):
    """Meta only: the job runs on the host and gets meta/ and CH_*."""

    name = "none"

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        env = [("CH_META", ctx.paths.meta)]
        env += [(f"CH_DATA{i}", d) for i, d in enumerate(ctx.opts.dir, start=1)]
        return env


class Unavailable(Backend):
    def __init__(self, name: str) -> None:
        self.name = name

    def check(self, opts: Options, cfg: Config) -> None:
        raise UserError(f"--charlie-type={self.name}", "not available in this "
                        "version of slurm-charlie", opts.image,
                        hint="use --charlie-type=none (meta only) for now")


def _container() -> Backend:
    from .container import ContainerBackend
    return ContainerBackend()


def _vm() -> Backend:
    from .vm import VMBackend
    return VMBackend()


_REGISTRY: dict[str, Backend] = {"none": NoneBackend(),
                                 "container": _container(),
                                 "vm": _vm()}


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError("--charlie-type", "unknown type", name) from None
