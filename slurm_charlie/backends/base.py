"""What every back end is: the Context of one job on one node, and the
Backend steps (see slurm_charlie/backends/__init__.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..config import Config
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
    #: root's bookkeeping: called with each ProcRecord as soon as it exists
    on_spawn: Callable[[Any], None] | None = None

    def spawned(self, rec: Any) -> None:
        if self.on_spawn is not None:
            self.on_spawn(rec)


class Backend:
    name = "?"

    def check(self, opts: Options, cfg: Config) -> None:
        pass

    def start(self, ctx: Context) -> dict[str, Any]:
        return {}

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        return []

    def stop(self, ctx: Context, record: Any) -> None:
        pass
