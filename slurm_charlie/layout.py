"""Names only: the node-local job directory's paths (contract in
docs/admin.rst), job ids, and the names of the files in run/.

    <runtime_root>/<jobid>/         owned by the job user, 0700
        meta/  run/  out/  state.json
    <runtime_root>/.root/           root's records (asroot.records)

Root creates and removes the directory (asroot.jobdir); everything inside
is written as the job user (files.write_file through proc.call_as).
"""

from __future__ import annotations

import dataclasses
import os

from .errors import NodeFault


@dataclasses.dataclass(frozen=True)
class JobPaths:
    root: str
    job_id: str

    @property
    def job_dir(self) -> str:
        return os.path.join(self.root, self.job_id)

    def __getattr__(self, name: str) -> str:
        sub = _SUBPATHS.get(name)
        if sub is None:
            raise AttributeError(name)
        return os.path.join(self.root, self.job_id, sub)


#: attribute -> path inside the job directory
RUN_DIR = "run"
#: files in run/ that the C shim reads too: spank/charlie_options.h gets
#: their names from this table (CHARLIE_RUN_<KEY>), so both sides agree
SHIM_FILES = {
    "task_env": "task.env",     # CH_* (and back end) variables for tasks
    "error": "error",           # why the job failed: every task prints it
    "notice": "notice",         # warnings for the batch script's stderr
    "guest_wait": "guest-wait", # VM batch job: the batch step waits for guest 0
    "guest_tasks": "guest-tasks",  # VM job: the task multiplexer's socket
    "holder": "holder",         # container job: "PID STARTTIME MNTNS" of the holder
}

#: in run/: a VM guest's ssh relay socket on the job network (vmtools)
SSH_SOCKET = "{guest}.sshd"

#: in <runtime_root>: root's records of its jobs (root's, 0700)
RECORD_DIR = ".root"

#: in a task's environment, =1: a VM job's task stays on the host (the shim
#: does not relay it into the guest)
ON_HOST_VAR = "CHARLIE_ON_HOST"

_SUBPATHS = {
    "meta": "meta",
    "run": RUN_DIR,
    "out": "out",
    "state": "state.json",
    **{k: f"{RUN_DIR}/{v}" for k, v in SHIM_FILES.items()},
    "log": "out/charlie.log",
}


def check_job_id(job_id: str) -> None:
    if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 20):
        raise NodeFault("job id", "not a number", repr(job_id))


def list_job_dirs(root: str) -> list[str]:
    """Job ids that have a directory under root."""
    try:
        return sorted((e for e in os.listdir(root) if e.isascii() and e.isdigit()),
                      key=int)
    except FileNotFoundError:
        return []
