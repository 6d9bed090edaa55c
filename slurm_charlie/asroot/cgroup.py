"""The job's cgroups: QEMU, the holder and its FUSE server in Slurm's job
tree, their usage, and removal of what slurm-charlie added there."""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .. import layout
from ..errors import NodeFault, UserError
from ..log import log
from ..procfs import is_zombie
from .procs import _pidfd, matches
from .records import ProcRecord

CGROUP_FS = "/sys/fs/cgroup"
#: cgroup v1 controllers Slurm's job tree lives in and that QEMU/the holder
#: join: memory (the job's limit, usage) and cpuacct (CPU time)
CGROUP_CONTROLLERS = ("memory", "cpuacct")
#: where QEMU/the holder sit inside the job's cgroup: the extern step's task
#: cgroup (task_<node index>), made before Slurm's extern step exists.  With
#: PrologFlags=Contain slurmstepd adopts the directories for the extern step
#: and jobacct_gather/cgroup reports their totals as ``J.extern`` (sstat,
#: sacct); Slurm's signals reach only its freezer cgroup, so QEMU is still
#: powered off by the epilog.  Without Contain they are plain directories.
CGROUP_STEP = "step_extern"


def _leaf(job_cg: str, index: int) -> str:
    return os.path.join(job_cg, CGROUP_STEP, f"task_{int(index)}")


def _slurm_cgroup_root(controller: str, node: str) -> str | None:
    """Slurm's cgroup v1 root for this node: slurm_<node> (a build for
    several slurmd per host, as the sandbox) or slurm; None when Slurm
    keeps no cgroups there."""
    for name in (f"slurm_{node}", "slurm"):
        path = os.path.join(CGROUP_FS, controller, name)
        if os.path.isdir(path):
            return path
    return None


def job_cgroups(node: str, uid: int, job_id: str) -> list[str]:
    """The job's cgroup directories (<ctrl>/<slurm root>/uid_U/job_J) of the
    controllers Slurm uses here; [] without Slurm cgroups (v1)."""
    layout.check_job_id(job_id)
    out = []
    for ctrl in CGROUP_CONTROLLERS:
        root = _slurm_cgroup_root(ctrl, node)
        if root is not None:
            out.append(os.path.join(root, f"uid_{int(uid)}", f"job_{job_id}"))
    return out


def _locked(root: str) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # Slurm locks its cgroup root the same way
    return fd


def join_job_cgroup(node: str, rec: ProcRecord, job_id: str, index: int,
                    memory_limit_mib: int | None = None) -> list[str]:
    """Move the recorded process into <job cgroup>/step_extern/task_<index>
    (index: the node's place in the job, Slurm's node id) in every controller
    Slurm uses (the directories are made before the extern step exists;
    Slurm adopts them).  With memory_limit_mib, the job's memory limit
    is set as Slurm sets it, so that it holds before the first step too.
    Returns the cgroups joined; [] where Slurm uses no cgroups."""
    joined = []
    for job_cg in job_cgroups(node, rec.uid, job_id):
        root = os.path.dirname(os.path.dirname(job_cg))
        lock = _locked(root)
        try:
            leaf = _leaf(job_cg, index)
            os.makedirs(leaf, exist_ok=True)
            if memory_limit_mib and "/memory/" in job_cg:
                with open(os.path.join(job_cg, "memory.limit_in_bytes"), "w") as f:
                    f.write(str(memory_limit_mib << 20))
            pidfd = _pidfd(rec.pid)
            # just spawned, it may still be the gate (/bin/sh): pid, start, owner
            if pidfd is None or not matches(rec, same_program=False):
                raise UserError(rec.role, "ended before it could join the job's "
                                "cgroup", rec.pid)
            try:
                with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                    f.write(str(rec.pid))
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
            joined.append(leaf)
        except OSError as e:
            if e.errno == errno.ESRCH:  # it ended (or was killed) meanwhile
                raise UserError(rec.role, "ended before it could join the job's "
                                "cgroup", rec.pid) from None
            raise NodeFault("cgroup", f"cannot place the {rec.role} in the job's cgroup: "
                            f"{e.strerror}", job_cg, hint="check Slurm's cgroup setup "
                            "(slurm-charlie doctor)") from None
        finally:
            os.close(lock)
    return joined


def stale_job_cgroups(node: str, running: set[str]) -> list[tuple[int, str]]:
    """(uid, job id) of every <job cgroup>/step_extern of a job not in running."""
    found = set()
    for ctrl in CGROUP_CONTROLLERS:
        root = _slurm_cgroup_root(ctrl, node)
        if root is None:
            continue
        for u in os.listdir(root):
            if not u.startswith("uid_") or not u[4:].isdigit():
                continue
            try:
                jobs = os.listdir(os.path.join(root, u))
            except OSError:
                continue
            for j in jobs:
                jid = j[4:]
                if (j.startswith("job_") and jid.isascii() and jid.isdigit()
                        and jid not in running
                        and os.path.isdir(os.path.join(root, u, j, CGROUP_STEP))):
                    found.add((int(u[4:]), jid))
    return sorted(found)


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def cgroup_usage(node: str, uid: int, job_id: str) -> dict[str, int]:
    """CPU time (ns) and peak memory (bytes) of the job's extern step cgroup,
    where slurm-charlie placed QEMU or the holder."""
    out = {}
    for job_cg in job_cgroups(node, uid, job_id):
        leaf = os.path.join(job_cg, CGROUP_STEP)
        for key, name in (("cpu_ns", "cpuacct.usage"),
                          ("memory_peak", "memory.max_usage_in_bytes")):
            try:
                with open(os.path.join(leaf, name)) as f:
                    out[key] = int(f.read().strip())
            except (OSError, ValueError):
                continue
    return out


def leave_job_cgroup(node: str, uid: int, job_id: str) -> None:
    """Remove <job cgroup>/step_extern (its task_* first) once its processes
    are gone, then the job's (and the user's) cgroup when empty: Slurm could
    not remove them while ours were inside.  An rmdir that finds a cgroup
    still in use (another job of the user, a step) just leaves it."""
    for job_cg in job_cgroups(node, uid, job_id):
        root = os.path.dirname(os.path.dirname(job_cg))
        lock = _locked(root)
        try:
            step = os.path.join(job_cg, CGROUP_STEP)
            try:
                tasks = [os.path.join(step, t) for t in os.listdir(step)
                         if t.startswith("task_") and t[5:].isascii() and t[5:].isdigit()]
            except OSError:
                tasks = []
            deadline = time.monotonic() + 5  # killed processes take a moment to go
            for leaf in (*tasks, step):
                while os.path.isdir(leaf) and time.monotonic() < deadline:
                    try:
                        os.rmdir(leaf)
                    except OSError:
                        time.sleep(0.05)
            for path in (*tasks, step, job_cg, os.path.dirname(job_cg)):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno == errno.EBUSY and (path == step or path in tasks):
                        live = [p for p in _cgroup_pids(path) if not is_zombie(p)]
                        if live:
                            raise NodeFault("cgroup", "processes left in the job's "
                                            "cgroup", f"{path}: {live}",
                                            hint="look for processes in D state") from None
                        # only zombies nobody reaped yet: reconcile removes it later
                        log.info("%s: held by exited processes not reaped yet; "
                                 "left for reconcile", path)
                    break
        finally:
            os.close(lock)
