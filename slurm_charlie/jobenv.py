"""Every SLURM_* / SPANK_* variable the hooks read, in one table."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from .errors import NodeFault

#: JobEnv field -> (environment variable, required in prolog/epilog)
VARIABLES: dict[str, tuple[str, bool]] = {
    "job_id": ("SLURM_JOB_ID", True),
    "uid": ("SLURM_JOB_UID", True),
    "gid": ("SLURM_JOB_GID", False),
    "user": ("SLURM_JOB_USER", False),
    "nodelist": ("SLURM_JOB_NODELIST", False),
    "nodelist_old": ("SLURM_NODELIST", False),
    "cpus_per_node": ("SLURM_JOB_CPUS_PER_NODE", False),
    "num_nodes": ("SLURM_JOB_NUM_NODES", False),
    "node_name": ("SLURMD_NODENAME", True),
    "work_dir": ("SLURM_JOB_WORK_DIR", False),
    "partition": ("SLURM_JOB_PARTITION", False),
    "context": ("SLURM_SCRIPT_CONTEXT", False),
}


@dataclasses.dataclass(frozen=True)
class JobEnv:
    job_id: str
    uid: int
    gid: int | None
    user: str | None
    nodelist: str
    cpus_per_node: str
    num_nodes: int | None
    node_name: str
    work_dir: str | None
    partition: str | None
    context: str | None


def from_environ(environ: Mapping[str, str]) -> JobEnv:
    raw: dict[str, str | None] = {}
    for field, (name, required) in VARIABLES.items():
        value = environ.get(name)
        if required and not value:
            raise NodeFault("environment", f"{name} is not set", hint=(
                "run this as Slurm's Prolog/Epilog with PrologFlags=Alloc"))
        raw[field] = value
    nodelist = raw.pop("nodelist") or raw.pop("nodelist_old") or raw["node_name"]
    raw.pop("nodelist_old", None)
    try:
        uid = int(raw.pop("uid") or "")
        gid_text, num_text = raw.pop("gid"), raw.pop("num_nodes")
        gid = int(gid_text) if gid_text else None
        num = int(num_text) if num_text else None
    except ValueError as e:
        raise NodeFault("environment", "bad number from Slurm", str(e)) from None
    return JobEnv(uid=uid, gid=gid, num_nodes=num, nodelist=nodelist or "",
                  cpus_per_node=raw.pop("cpus_per_node") or "", **raw)  # type: ignore[arg-type]
