"""/dev/shm after a job: what the user's killed MPI ranks left there is
removed (as the user), never what another job or session of theirs uses."""

from __future__ import annotations

import os
import shutil
import stat
import time

from . import asroot, layout
from .procfs import comm_of, fd_targets, is_exiting, pids_of, proc_stat


SHM_DIR = "/dev/shm"


def user_has_other_jobs(root: str, job_id: str, uid: int) -> str | None:
    """Another charlie job of uid on this node (its id), if any."""
    for other in layout.list_job_dirs(root):
        if other == job_id:
            continue
        try:
            if os.lstat(os.path.join(root, other)).st_uid == uid:
                return other
        except OSError:
            pass
    return None


def user_busy_elsewhere(root: str, job_id: str, uid: int, node: str) -> str | None:
    """Might the user have something else on this node that uses /dev/shm?
    Returns why (for the log), None when not.  Another charlie job here; or,
    where Slurm keeps cgroups, any live process of the user outside this
    job's cgroups (a plain job of theirs, a login session).  A process in
    another slurmd's tree (its cgroups in another node's Slurm tree, or its
    parents lead to another slurmd: several slurmd on one host, as in the
    sandbox) is not this node's, and a process already exiting (killed
    ranks; their cgroup may read as the root one) holds nothing for long.
    Without Slurm cgroups only the first can be told."""
    other = user_has_other_jobs(root, job_id, uid)
    if other:
        return f"job {other} of the user runs here too"
    if not asroot.job_cgroups(node, uid, job_id):
        return None
    mark = f"/job_{job_id}/"
    ours = _slurmd_of(os.getpid())
    for pid in pids_of(uid):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cg = f.read().replace("\n", "/\n")
        except OSError:
            continue
        paths = [line.split(":", 2)[2] for line in cg.splitlines() if line.count(":") >= 2]
        trees = {asroot.cgroup_tree_of(node, p) for p in paths} - {None}
        if trees and node not in trees:
            continue  # another slurmd's process on this host
        if mark not in cg and not is_exiting(pid) and _slurmd_of(pid) in (None, ours):
            where = " ".join(sorted({p.rstrip("/") or "/" for p in paths}))
            return f"process {pid} ({comm_of(pid)}) of the user runs outside the job (cgroup {where})"
    return None


def _slurmd_of(pid: int) -> int | None:
    """The slurmd pid is a descendant of (a hook's helper), None if none."""
    seen = 0
    while pid > 1 and seen < 64:
        if comm_of(pid) == "slurmd":
            return pid
        fields = proc_stat(pid)
        if fields is None:
            return None
        pid, seen = int(fields[1]), seen + 1
    return None


def _shm_name(rest: str) -> str:
    """The /dev/shm entry a path below it names: its first component, with
    blanks kept (names may have them) and the kernel's " (deleted)" cut."""
    return rest.removesuffix(" (deleted)").split("/")[0]


def _shm_in_use(uid: int, shm_dir: str) -> set[str]:
    """Names in shm_dir that a live process of uid has open or mapped."""
    used: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for pid in pids_of(uid):
        if is_exiting(pid):
            continue  # killed: what it maps goes with it
        for target in fd_targets(pid):
            if target.startswith(prefix):
                used.add(_shm_name(target[len(prefix):]))
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(_shm_name(line[at + len(prefix):].rstrip("\n")))
        except OSError:
            continue
    return used


SHM_MIN_AGE = 1.0  # seconds; younger entries may be between shm_open and mmap


def clean_as_user(shm_dir: str = SHM_DIR, min_age: float = SHM_MIN_AGE) -> list[str]:
    """As the job user: remove what the user left in /dev/shm (MPI segments
    of killed ranks).  Other jobs of the user may run here, so an entry stays
    when a live process of the user has it open or mapped, or when it is
    younger than min_age (it may be between shm_open and mmap).  The listing
    is taken before the process scan, so nothing created meanwhile is seen.
    Entries are unlinked, never followed."""
    removed = []
    uid = os.getuid()
    fd = os.open(shm_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        now = time.time()
        candidates = []
        for name in os.listdir(fd):
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if st.st_uid == uid and now - st.st_mtime >= min_age:
                candidates.append(name)
        in_use = _shm_in_use(uid, shm_dir)
        for name in candidates:
            try:
                if name in in_use:
                    continue
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
                removed.append(name)
            except OSError:
                pass
    finally:
        os.close(fd)
    return removed
