"""The job's cgroups: QEMU, the holder and its FUSE server in Slurm's job
tree, their usage, and removal of what slurm-charlie added there.

One interface, two layouts (`CgroupV1`, `CgroupV2`); `layout(node)` says
which one Slurm uses on this node, from Slurm's own configuration
(cgroup.conf next to $SLURM_CONF: CgroupPlugin, CgroupMountpoint) and the
file system mounted there.  The rest of the code calls the module-level
functions and does not know which layout it is on (docs/admin.rst, "cgroup
v1 and v2").

Where root's processes go, and why:

- v1 (and hybrid: v1 controllers, an empty cgroup2 beside them):
  ``<ctrl>/slurm[_<node>]/uid_U/job_J/step_extern/task_<node index>`` in
  the memory and cpuacct controllers, made before the extern step exists.
  With PrologFlags=Contain slurmstepd adopts them: jobacct_gather/cgroup
  reports them as ``J.extern`` (sstat, sacct), and Slurm's signals reach
  only its freezer cgroup, so QEMU is still powered off by the epilog.
- v2: ``<scope>/job_J/charlie``, a leaf beside Slurm's ``step_*``
  directories (``<scope>`` is ``system.slice/[<node>_]slurmstepd.scope``).
  Not in ``step_extern``: on v2 the extern stepd SIGKILLs every process in
  its task cgroups when it ends, which is before the epilog, and the guest
  must be powered off and committed first.  Below ``job_J`` the job's
  ``memory.max``, ``cpuset.cpus`` and ``cpu.max`` bound it; a process joins
  while it still waits at the spawn gate, so its pages after exec are
  charged there from the first one (v2 never moves a charge).  Slurm's
  accounting reads only its steps' cgroups, so sstat/sacct do not show
  these processes on v2; the epilog logs them and `slurm-charlie status`
  shows them (`usage`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from typing import Callable

from .. import layout as names
from ..errors import NodeFault, UserError
from ..log import log
from ..proc import slurm_conf_keys
from . import fuse
from ..procfs import is_users, is_zombie, owner, read_mountinfo, starttime
from .procs import _pidfd, _send
from .records import ProcRecord

CGROUP_FS = "/sys/fs/cgroup"
#: cgroup v1 controllers Slurm's job tree lives in and that QEMU/the holder
#: join: memory (the job's limit, usage) and cpuacct (CPU time)
CGROUP_CONTROLLERS = ("memory", "cpuacct")
#: v1: where root's processes sit inside the job's cgroup
CGROUP_STEP = "step_extern"
#: v2: root's leaf beside Slurm's step directories in job_J
CGROUP_LEAF = "charlie"
#: v2 controllers enabled below job_J for the leaf (those the scope offers)
V2_CONTROLLERS = ("cpuset", "cpu", "memory", "pids")


# -- what Slurm says -----------------------------------------------------------

def slurm_cgroup_conf(environ=None) -> dict[str, str]:
    """cgroup.conf beside $SLURM_CONF, keys lower-cased; {} without."""
    return slurm_conf_keys("cgroup.conf", environ)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """{mount point: file system type} of this mount namespace."""
    return {m["mountpoint"]: m["fstype"] for m in read_mountinfo(mountinfo)}


def filesystem(mountpoint: str = CGROUP_FS, mounted: dict[str, str] | None = None) -> str:
    """"v2" (cgroup2 at the mount point), "hybrid" (v1 controllers and a
    cgroup2 at <mnt>/unified), "v1" (v1 controllers), or "none"."""
    mounted = mounts() if mounted is None else mounted
    mnt = mountpoint.rstrip("/") or "/"
    if mounted.get(mnt) == "cgroup2":
        return "v2"
    if mounted.get(f"{mnt}/memory") != "cgroup":
        return "none"
    return "hybrid" if mounted.get(f"{mnt}/unified") == "cgroup2" else "v1"


# -- the two layouts -----------------------------------------------------------

def _locked(root: str) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # Slurm locks its cgroup root the same way
    return fd


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _move(rec: ProcRecord, leaf: str) -> None:
    """Write the recorded process into leaf/cgroup.procs, if it still is
    the process recorded: pid and start time.  Not its owner: just spawned
    and waiting at its gate, it is root's own unreaped child (its pid cannot
    be another's), and one started in a network namespace is still root's
    `ip netns exec` or setpriv until it reaches the gate as the user."""
    pidfd = _pidfd(rec.pid)
    if pidfd is None or starttime(rec.pid) != rec.start:
        raise UserError(rec.role, "ended before it could join the job's cgroup", rec.pid)
    try:
        _write(os.path.join(leaf, "cgroup.procs"), str(rec.pid))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _rmdir_when_empty(paths: list[str], timeout: float = 5) -> None:
    """rmdir each path (leaves first), waiting up to timeout for killed
    processes to leave them."""
    deadline = time.monotonic() + timeout
    for leaf in paths:
        while os.path.isdir(leaf) and time.monotonic() < deadline:
            try:
                os.rmdir(leaf)
            except OSError:
                time.sleep(0.05)


def _kill_users(paths: list[str], uid: int, timeout: float = 5) -> list[int]:
    """SIGKILL, through a pidfd, every live process of uid in these
    cgroups until none is left (forks racing) or timeout; a process of
    another owner is left alone (and _busy names it).  The pids killed."""
    killed: list[int] = []

    def live() -> list[int]:
        return [p for path in paths for p in _cgroup_pids(path)
                if not is_zombie(p) and is_users(p, uid)]
    _kill_until(live, uid, killed, timeout)
    left = live()
    # a process waiting on the user's stalled FUSE server ignores SIGKILL
    # until root aborts the connection (fuse.py)
    if left and fuse.abort_stalled(uid, left):
        _kill_until(live, uid, killed, timeout)
    return killed


def _kill_until(live: Callable[[], list[int]], uid: int, killed: list[int],
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = live()
        if not pids:
            break
        for pid in pids:
            fd = _pidfd(pid)
            if fd is None:
                continue
            try:
                if is_users(pid, uid):  # still the user's, now pinned by the pidfd
                    _send(pid, fd, signal.SIGKILL)
                    if pid not in killed:
                        killed.append(pid)
            except ProcessLookupError:
                pass
            finally:
                if fd >= 0:
                    os.close(fd)
        time.sleep(0.05)


def _busy(path: str) -> None:
    """An rmdir found path busy: a node fault when live processes are in it;
    only zombies nobody reaped yet: reconcile removes it later."""
    live = [p for p in _cgroup_pids(path) if not is_zombie(p)]
    if live:
        raise NodeFault("cgroup", "processes left in the job's cgroup", f"{path}: {live}",
                        hint="look for processes in D state") from None
    log.info("%s: held by exited processes not reaped yet; left for reconcile", path)


class CgroupV1:
    """Slurm's cgroup/v1 tree (v1 or hybrid mounts)."""
    name = "v1"

    def __init__(self, node: str, mountpoint: str = CGROUP_FS) -> None:
        self.node, self.mnt = node, mountpoint

    def _root(self, controller: str) -> str | None:
        """slurm_<node> (a build for several slurmd per host, as the
        sandbox) or slurm; None when Slurm keeps no cgroups there."""
        for name in (f"slurm_{self.node}", "slurm"):
            path = os.path.join(self.mnt, controller, name)
            if os.path.isdir(path):
                return path
        return None

    def roots(self) -> list[str]:
        return [r for r in (self._root(c) for c in CGROUP_CONTROLLERS) if r]

    def job_cgroups(self, uid: int, job_id: str) -> list[str]:
        return [os.path.join(root, f"uid_{int(uid)}", f"job_{job_id}")
                for root in self.roots()]

    def tree_of(self, cgroup_path: str) -> str | None:
        """The node whose Slurm tree a /proc/PID/cgroup path is in."""
        first = cgroup_path.lstrip("/").split("/", 1)[0]
        if first == "slurm":
            return self.node
        return first[6:] if first.startswith("slurm_") else None

    def join(self, rec: ProcRecord, job_id: str, index: int,
             memory_limit_mib: int | None) -> list[str]:
        joined = []
        for job_cg in self.job_cgroups(rec.uid, job_id):
            root = os.path.dirname(os.path.dirname(job_cg))
            lock = _locked(root)
            try:
                leaf = os.path.join(job_cg, CGROUP_STEP, f"task_{int(index)}")
                os.makedirs(leaf, exist_ok=True)
                if memory_limit_mib and "/memory/" in job_cg:
                    _write(os.path.join(job_cg, "memory.limit_in_bytes"),
                           str(memory_limit_mib << 20))
                _move(rec, leaf)
                joined.append(leaf)
            finally:
                os.close(lock)
        return joined

    def usage(self, uid: int, job_id: str) -> dict[str, int]:
        out = {}
        for job_cg in self.job_cgroups(uid, job_id):
            leaf = os.path.join(job_cg, CGROUP_STEP)
            for key, name in (("cpu_ns", "cpuacct.usage"),
                              ("memory_peak", "memory.max_usage_in_bytes")):
                try:
                    with open(os.path.join(leaf, name)) as f:
                        out[key] = int(f.read().strip())
                except (OSError, ValueError):
                    continue
        return out

    @staticmethod
    def _tasks(job_cg: str) -> list[str]:
        """The task_N cgroups under the job's step_extern ([] when none)."""
        step = os.path.join(job_cg, CGROUP_STEP)
        try:
            return [os.path.join(step, t) for t in sorted(os.listdir(step))
                    if t.startswith("task_") and t[5:].isascii() and t[5:].isdigit()]
        except OSError:
            return []

    def leaves(self, uid: int, job_id: str) -> list[str]:
        """The cgroups root placed the job's processes in: step_extern/task_N."""
        return [t for job_cg in self.job_cgroups(uid, job_id) for t in self._tasks(job_cg)]

    def kill(self, uid: int, job_id: str) -> list[int]:
        return _kill_users(self.leaves(uid, job_id), uid)

    def leave(self, uid: int, job_id: str) -> None:
        for job_cg in self.job_cgroups(uid, job_id):
            root = os.path.dirname(os.path.dirname(job_cg))
            lock = _locked(root)
            try:
                step = os.path.join(job_cg, CGROUP_STEP)
                tasks = self._tasks(job_cg)
                _rmdir_when_empty([*tasks, step])
                for path in (*tasks, step, job_cg, os.path.dirname(job_cg)):
                    try:
                        os.rmdir(path)
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        if e.errno == errno.EBUSY and (path == step or path in tasks):
                            _busy(path)
                        break
            finally:
                os.close(lock)

    def stale(self, running: set[str]) -> list[tuple[int, str]]:
        found = set()
        for root in self.roots():
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


class CgroupV2:
    """Slurm's cgroup/v2 tree: system.slice/[<node>_]slurmstepd.scope."""
    name = "v2"
    leaf = CGROUP_LEAF

    def __init__(self, node: str, mountpoint: str = CGROUP_FS) -> None:
        self.node, self.mnt = node, mountpoint

    def _init_path(self) -> str:
        """Where Slurm puts system.slice: the cgroup of PID 1, or its
        parent when PID 1 is not at the mount's root (Slurm's own rule)."""
        try:
            with open("/proc/1/cgroup") as f:
                rel = next((line.split(":", 2)[2].strip() for line in f
                            if line.startswith("0::")), "/")
        except OSError:
            rel = "/"
        rel = rel.strip("/")
        return os.path.dirname(os.path.join(self.mnt, rel)) if rel else self.mnt

    def scope(self) -> str | None:
        """<node>_slurmstepd.scope (Debian builds for several slurmd per
        host) or slurmstepd.scope, as slurmd made it; None without."""
        base = os.path.join(self._init_path(), "system.slice")
        for name in (f"{self.node}_slurmstepd.scope", "slurmstepd.scope"):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                return path
        return None

    def roots(self) -> list[str]:
        s = self.scope()
        return [s] if s else []

    def job_cgroups(self, uid: int, job_id: str) -> list[str]:
        return [os.path.join(s, f"job_{job_id}") for s in self.roots()]

    def tree_of(self, cgroup_path: str) -> str | None:
        for part in cgroup_path.strip("/").split("/"):
            if part == "slurmstepd.scope":
                return self.node
            if part.endswith("_slurmstepd.scope"):
                return part[:-len("_slurmstepd.scope")]
        return None

    def join(self, rec: ProcRecord, job_id: str, index: int,
             memory_limit_mib: int | None) -> list[str]:
        scope = self.scope()
        if scope is None:
            return []
        lock = _locked(scope)
        try:
            job_cg = os.path.join(scope, f"job_{job_id}")
            leaf = os.path.join(job_cg, CGROUP_LEAF)
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(job_cg, "cgroup.controllers")) as f:
                offered = f.read().split()
            want = [c for c in V2_CONTROLLERS if c in offered]
            if want:
                _write(os.path.join(job_cg, "cgroup.subtree_control"),
                       " ".join(f"+{c}" for c in want))
            if memory_limit_mib and "memory" in offered:
                _write(os.path.join(job_cg, "memory.max"), str(memory_limit_mib << 20))
            _move(rec, leaf)
            return [leaf]
        finally:
            os.close(lock)

    def usage(self, uid: int, job_id: str) -> dict[str, int]:
        out = {}
        for job_cg in self.job_cgroups(uid, job_id):
            leaf = os.path.join(job_cg, CGROUP_LEAF)
            try:
                with open(os.path.join(leaf, "cpu.stat")) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "usage_usec":
                            out["cpu_ns"] = int(value) * 1000
            except (OSError, ValueError):
                pass
            for name in ("memory.peak", "memory.current"):  # peak: kernel 5.19+
                try:
                    with open(os.path.join(leaf, name)) as f:
                        out["memory_peak"] = int(f.read().strip())
                    break
                except (OSError, ValueError):
                    continue
        return out

    def leave(self, uid: int, job_id: str) -> None:
        scope = self.scope()
        if scope is None:
            return
        lock = _locked(scope)
        try:
            job_cg = os.path.join(scope, f"job_{job_id}")
            leaf = os.path.join(job_cg, CGROUP_LEAF)
            _rmdir_when_empty([leaf])
            for path in (leaf, job_cg):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno == errno.EBUSY and path == leaf:
                        _busy(path)
                    break  # job_J: Slurm's steps are still in it
        finally:
            os.close(lock)

    def kill(self, uid: int, job_id: str) -> list[int]:
        """cgroup.kill of job_J/charlie (Linux 5.14): every process in it at
        once, forks racing included; else one by one as on v1."""
        scope = self.scope()
        if scope is None:
            return []
        leaf = os.path.join(scope, f"job_{job_id}", CGROUP_LEAF)
        pids = [p for p in _cgroup_pids(leaf) if not is_zombie(p)]
        if not pids:
            return []
        user = uid
        if user <= 0:  # reconcile's sweep: v2 has no uid level; the job's
            # processes are one user's (root placed none of another's there)
            owners = {owner(p) for p in pids} - {None, 0}
            user = owners.pop() if len(owners) == 1 else -1
        try:
            _write(os.path.join(leaf, "cgroup.kill"), "1")
        except FileNotFoundError:  # Linux < 5.14
            return _kill_users([leaf], user) if user > 0 else []

        def live() -> list[int]:
            return [p for p in _cgroup_pids(leaf) if not is_zombie(p)]
        # a process waiting on the user's stalled FUSE server ignores
        # SIGKILL until root aborts the connection (fuse.py)
        fuse.wait_or_abort(user, live, 5)
        return pids

    def stale(self, running: set[str]) -> list[tuple[int, str]]:
        found = []
        for scope in self.roots():
            for j in os.listdir(scope):
                jid = j[4:]
                if (j.startswith("job_") and jid.isascii() and jid.isdigit()
                        and jid not in running
                        and os.path.isdir(os.path.join(scope, j, CGROUP_LEAF))):
                    found.append((-1, jid))  # v2 has no uid level
        return sorted(found)


class NoCgroups:
    """Slurm keeps no cgroups here (or not in a layout it can run)."""
    name = "none"

    def __init__(self, node: str, why: str, mountpoint: str = CGROUP_FS) -> None:
        self.node, self.why, self.mnt = node, why, mountpoint

    def roots(self) -> list[str]:
        return []

    def job_cgroups(self, uid: int, job_id: str) -> list[str]:
        return []

    def tree_of(self, cgroup_path: str) -> str | None:
        return None

    def join(self, rec, job_id, index, memory_limit_mib) -> list[str]:
        return []

    def usage(self, uid: int, job_id: str) -> dict[str, int]:
        return {}

    def kill(self, uid: int, job_id: str) -> list[int]:
        return []

    def leave(self, uid: int, job_id: str) -> None:
        return None

    def stale(self, running: set[str]) -> list[tuple[int, str]]:
        return []


def layout(node: str, environ=None) -> CgroupV1 | CgroupV2 | NoCgroups:
    """The layout Slurm uses on this node: its CgroupPlugin (autodetect:
    cgroup2 at the mount point is v2, anything else v1, as Slurm decides)
    and the mount there."""
    conf = slurm_cgroup_conf(environ)
    mnt = conf.get("cgroupmountpoint") or CGROUP_FS
    plugin = (conf.get("cgroupplugin") or "autodetect").lower()
    fs = filesystem(mnt)
    if plugin == "autodetect":
        plugin = "cgroup/v2" if fs == "v2" else "cgroup/v1"
    if plugin == "cgroup/v2":
        if fs != "v2":
            return NoCgroups(node, f"CgroupPlugin=cgroup/v2 but {mnt} is {fs}", mnt)
        return CgroupV2(node, mnt)
    if plugin == "cgroup/v1":
        if fs not in ("v1", "hybrid"):
            return NoCgroups(node, f"CgroupPlugin=cgroup/v1 but {mnt} is {fs}", mnt)
        return CgroupV1(node, mnt)
    return NoCgroups(node, f"CgroupPlugin={plugin}", mnt)


# -- root's operations (asroot.OPERATIONS) ---------------------------------------

def job_cgroups(node: str, uid: int, job_id: str) -> list[str]:
    """The job's cgroup directories in the controllers Slurm uses here (they
    may not exist yet); [] where Slurm keeps no cgroups."""
    names.check_job_id(job_id)
    return layout(node).job_cgroups(uid, job_id)


def cgroup_tree_of(node: str, cgroup_path: str) -> str | None:
    """The node whose Slurm tree a /proc/PID/cgroup path is in (several
    slurmd on one host), None when in none."""
    return layout(node).tree_of(cgroup_path)


def join_job_cgroup(node: str, rec: ProcRecord, job_id: str, index: int,
                    memory_limit_mib: int | None = None) -> list[str]:
    """Move the recorded process into the job's cgroup (v1:
    step_extern/task_<index>, index the node's place in the job; v2: the
    job's charlie leaf) under Slurm's lock on its tree.  With
    memory_limit_mib the job's memory limit is set as Slurm sets it, so
    that it holds before the first step too.  Returns the cgroups joined;
    [] where Slurm uses no cgroups."""
    names.check_job_id(job_id)
    lay = layout(node)
    try:
        return lay.join(rec, job_id, index, memory_limit_mib)
    except OSError as e:
        if e.errno == errno.ESRCH:  # it ended (or was killed) meanwhile
            raise UserError(rec.role, "ended before it could join the job's cgroup",
                            rec.pid) from None
        if e.errno == errno.ENOENT:
            # Slurm removes the job's cgroup when the job ends: cancelled (or
            # ended) while root placed the process -- the job's business, not
            # the node's (seen in the churn run as a drain)
            raise UserError(rec.role, "the job's cgroup went away while root placed it: "
                            "the job ended during its preparation (cancelled?)",
                            e.filename or job_id) from None
        raise NodeFault("cgroup", f"cannot place the {rec.role} in the job's cgroup "
                        f"({lay.name}): {e.strerror}", e.filename or job_id,
                        hint="check Slurm's cgroup setup (slurm-charlie doctor)") from None


def cgroup_usage(node: str, uid: int, job_id: str) -> dict[str, int]:
    """CPU time (cpu_ns) and peak memory (memory_peak, bytes) of what root
    placed in the job's cgroup."""
    names.check_job_id(job_id)
    return layout(node).usage(uid, job_id)


def kill_in_job_cgroup(node: str, uid: int, job_id: str) -> list[int]:
    """End what is left of the job in the cgroups root placed its processes
    in, after the back end stopped them: a process that left the holder's
    session, process group and namespaces (a double fork, its own user
    namespace) cannot leave the cgroup.  v2: cgroup.kill; v1: SIGKILL to
    each of the job user's processes there.  The pids it ended."""
    names.check_job_id(job_id)
    return layout(node).kill(uid, job_id)


def leave_job_cgroup(node: str, uid: int, job_id: str) -> None:
    """Remove the cgroups root made for the job once its processes are gone,
    then the job's (v1: and the user's) when empty: Slurm could not remove
    them while ours were inside.  An rmdir that finds a cgroup still in use
    (another job of the user, a step) just leaves it."""
    names.check_job_id(job_id)
    layout(node).leave(uid, job_id)


def stale_job_cgroups(node: str, running: set[str]) -> list[tuple[int, str]]:
    """(uid, job id) of every job cgroup root made for a job not in running
    (uid -1 on v2, whose tree has no user level)."""
    return layout(node).stale(running)
