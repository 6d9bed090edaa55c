"""Every SLURM_* variable the hooks read, in one table: the only reader of
Slurm's environment (the SPANK_CHARLIE_* options are read by ``options``)."""

from __future__ import annotations

# imported by the prolog hook before it forks (prolog_hook.py): nothing
# here may cost an import (typing, dataclasses: ~12 ms)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping

    #: the environment Slurm gives a prolog or epilog
    Environ = Mapping[str, str]

from .errors import NodeFault

#: JobEnv field -> (environment variable, required in prolog/epilog)
VARIABLES: dict[str, tuple[str, bool]] = {
    "job_id": ("SLURM_JOB_ID", True),
    "uid": ("SLURM_JOB_UID", True),
    "gid": ("SLURM_JOB_GID", False),
    "nodelist": ("SLURM_JOB_NODELIST", False),
    "nodelist_old": ("SLURM_NODELIST", False),
    "cpus_per_node": ("SLURM_JOB_CPUS_PER_NODE", False),
    "node_name": ("SLURMD_NODENAME", True),
    "work_dir": ("SLURM_JOB_WORK_DIR", False),
    #: the job's GPUs on this node: Slurm's gres indices ("0,2"), in
    #: gres.conf's order for the node (gpus.py maps them to devices)
    "gpus": ("SLURM_JOB_GPUS", False),
    #: what Slurm's GPU plugin says of the same GPUs to the prolog: indices,
    #: or UUIDs (MIG-… for MIG devices) in the same order
    "cuda_visible": ("CUDA_VISIBLE_DEVICES", False),
}


class JobEnv:
    """What Slurm says about the job (read only)."""
    __slots__ = ("job_id", "uid", "gid", "nodelist", "cpus_per_node", "node_name", "work_dir",
                 "gpus", "cuda_visible")
    job_id: str
    uid: int
    gid: int | None
    nodelist: str
    cpus_per_node: str
    node_name: str
    work_dir: str | None
    gpus: str
    cuda_visible: str

    def __init__(self, *, job_id: str, uid: int, gid: int | None, nodelist: str,
                 cpus_per_node: str, node_name: str, work_dir: str | None,
                 gpus: str = "", cuda_visible: str = "") -> None:
        for name, value in (("job_id", job_id), ("uid", uid), ("gid", gid),
                            ("nodelist", nodelist), ("cpus_per_node", cpus_per_node),
                            ("node_name", node_name), ("work_dir", work_dir),
                            ("gpus", gpus), ("cuda_visible", cuda_visible)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"JobEnv is read only: {name}")

    def __repr__(self) -> str:
        return "JobEnv(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def ids(environ: Environ) -> tuple[str | None, str]:
    """(job id, node name) as far as Slurm gave them, for reporting a failure
    before (or while) from_environ checks the rest; "?" for an unknown node."""
    job_id = environ.get(VARIABLES["job_id"][0]) or None
    return job_id, environ.get(VARIABLES["node_name"][0]) or "?"


def allocation(environ: Environ) -> tuple[str | None, str | None]:
    """(job id, node list) of the allocation a user's command runs in
    (salloc, sbatch, srun), or Nones outside one."""
    nodes = (environ.get(VARIABLES["nodelist"][0])
             or environ.get(VARIABLES["nodelist_old"][0]) or None)
    return environ.get(VARIABLES["job_id"][0]) or None, nodes


def from_environ(environ: Environ) -> JobEnv:
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
        gid_text = raw.pop("gid")
        gid = int(gid_text) if gid_text else None
    except ValueError as e:
        raise NodeFault("environment", "bad number from Slurm", str(e)) from None
    return JobEnv(uid=uid, gid=gid, nodelist=nodelist or "",
                  cpus_per_node=raw.pop("cpus_per_node") or "", gpus=raw.pop("gpus") or "",
                  cuda_visible=raw.pop("cuda_visible") or "",
                  **raw)  # type: ignore[arg-type]
