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
    #: what the user's first step already looked at for the back end
    #: (Backend.look_as_user), as untrusted as any answer from the user's side
    look: dict[str, Any] | None = None
    #: the job's GPUs on this node (gpus.Gpu), from what Slurm allotted
    gpus: tuple[Any, ...] = ()
    #: root's bookkeeping: called with each ProcRecord as soon as it exists
    on_spawn: Callable[[Any], None] | None = None
    #: root's bookkeeping: facts the epilog needs, recorded before the
    #: change they describe (the epilog undoes it after a prolog that died)
    on_facts: Callable[[dict], None] | None = None

    def spawned(self, rec: Any) -> None:
        if self.on_spawn is not None:
            self.on_spawn(rec)

    def noted(self, facts: dict) -> None:
        if self.on_facts is not None:
            self.on_facts(facts)

    def spawned_in_job(self, joined: list[str],
                       memory_limit_mib: int | None = None) -> Callable[[Any], None]:
        """A record callback for asroot.spawn: record the process, then move
        it into the job's cgroup while it still waits at the spawn gate, so
        that everything it runs is charged there from its first page (cgroup
        v2 never moves a charge; its children, the FUSE servers, inherit
        the place).  joined gets the cgroups it entered."""
        def record(rec: Any) -> None:
            from .. import asroot
            self.spawned(rec)
            joined[:] = asroot.join_job_cgroup(self.node, rec, self.job_id,
                                               self.guest_id, memory_limit_mib)
        return record


class Backend:
    name = "?"

    def check(self, opts: Options, cfg: Config) -> None:
        pass

    def look_as_user(self, ctx: Context, opts: Options) -> dict[str, Any] | None:
        """Run as the job user inside the prolog's first step (which must
        fork anyway): a first look at the user's input that start() would
        otherwise fork another step as the user for.  start() uses it only
        when it matches what start() would have asked."""
        return None

    def start(self, ctx: Context) -> dict[str, Any]:
        """Start the job's guest on this node.  The answer is root's record
        of it (facts); under "user_files" it may list (name in run/, text)
        pairs that the prolog's last step as the user writes."""
        return {}

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        return []

    def stop(self, ctx: Context, record: Any) -> None:
        pass
