"""Find and remove what jobs left on a node after faults: a node reboot, an
epilog that failed or never ran, a slurmd restart.

    leftover job   a job directory or a root record under runtime_root
                   whose job Slurm no longer runs here (and which is older
                   than reconcile.min_age): what root recorded is stopped
                   (pidfd-checked), the directory removed, the record dropped
    kept overlay   <kept_dir>/<uid>/*.overlay.qcow2 older than
                   reconcile.kept_max_days

Run by an admin as `slurm-charlie reconcile`, and by a prolog at most once
per reconcile.interval per node.  It acts only where Slurm's own list of
the node's jobs could be read: when in doubt, nothing is removed.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time

from . import asroot, config, files, layout
from .errors import CharlieError, NodeFault
from .proc import User, log, run, slurm_tool

STAMP = ".reconciled"


@dataclasses.dataclass
class Report:
    jobs: list[str] = dataclasses.field(default_factory=list)       # cleaned
    kept_removed: list[str] = dataclasses.field(default_factory=list)
    cgroups: list[str] = dataclasses.field(default_factory=list)    # job ids
    networks: list[str] = dataclasses.field(default_factory=list)   # job ids
    skipped: list[str] = dataclasses.field(default_factory=list)    # too young / running
    faults: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"leftover job {j}: cleaned" for j in self.jobs]
        out += [f"job cgroup of job {j}: removed" for j in self.cgroups]
        out += [f"job network of job {j}: removed" for j in self.networks]
        out += [f"kept overlay removed (older than reconcile.kept_max_days): {k}"
                for k in self.kept_removed]
        out += [f"error: {f}" for f in self.faults]
        return out


#: states after which every node's epilog of the job has run
FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT"}


def jobs_on_node(node: str) -> set[str] | None:
    """Ids of the jobs Slurm has on this node and has not finished with
    (running, completing: an epilog may still be due, suspended, …).  None
    when Slurm cannot be asked."""
    squeue = slurm_tool("squeue")
    try:
        p = run([squeue, "-h", "-w", node, "-t", "all", "-o", "%A %T"], timeout=30,
                check=False)
    except CharlieError as e:
        log.warning("reconcile: squeue: %s", e.line())
        return None
    if p.returncode != 0:
        log.warning("reconcile: squeue failed: %s",
                    p.stderr.decode(errors="replace").strip()[-200:])
        return None
    out = set()
    for line in p.stdout.decode(errors="replace").splitlines():
        words = line.split()
        if (len(words) == 2 and words[0].isascii() and words[0].isdigit()
                and words[1] not in FINAL):
            out.add(words[0])
    return out


def _age(path: str, now: float) -> float | None:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return None


def candidates(cfg: config.Config, node: str, running: set[str], min_age: float,
               now: float) -> tuple[list[str], list[str]]:
    """(job ids to clean, job ids left alone) under this node's runtime root."""
    root = cfg.runtime_root(node)
    records = asroot.Records(root)
    ids = set(records.job_ids()) | set(layout.list_job_dirs(root))
    clean, skip = [], []
    for jid in sorted(ids, key=int):
        ages = [a for a in (_age(os.path.join(root, jid), now),
                            _age(os.path.join(root, layout.RECORD_DIR, f"{jid}.json"), now))
                if a is not None]
        if jid in running or not ages or min(ages) < min_age:
            skip.append(jid)
        else:
            clean.append(jid)
    return clean, skip


def _dir_owner(paths: layout.JobPaths) -> User | None:
    st = files.lstat_in_job(paths, ".")
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
        return None
    try:
        return User.lookup(st.st_uid)
    except NodeFault:
        return None


def reconcile(cfg: config.Config, node: str, running: set[str], *,
              min_age: float | None = None, dry_run: bool = False,
              now: float | None = None) -> Report:
    from .cleanup import stop_background, undo
    now = time.time() if now is None else now
    min_age = cfg["reconcile.min_age"] if min_age is None else min_age
    report = Report()
    root = cfg.runtime_root(node)
    records = asroot.Records(root)
    clean, report.skipped = candidates(cfg, node, running, min_age, now)
    for jid in clean:
        if dry_run:
            report.jobs.append(jid)
            continue
        paths = layout.JobPaths(root, jid)
        stuck = stop_background(cfg, node, jid)
        if stuck:
            report.faults += [f"job {jid}: {f.line()}" for f in stuck]
            continue
        rec = records.read(jid)
        user = None if rec is not None else _dir_owner(paths)
        log.info("reconcile: job %s is not running here; cleaning what it left", jid)
        faults = undo(cfg, paths, rec, node, user)
        if faults:
            report.faults += [f"job {jid}: {f.line()}" for f in faults]
            continue
        records.remove(jid)
        report.jobs.append(jid)
    # lock files of background prologs whose job left nothing else
    for jid in asroot.prolog_locks(node):
        age = _age(asroot.prolog_lock_path(node, jid), now)
        if jid in running or jid in report.skipped or jid in clean or dry_run \
                or age is None or age < min_age:
            continue
        stop_background(cfg, node, jid)
    for uid, jid in asroot.stale_job_cgroups(node, running | set(report.skipped)):
        if dry_run:
            report.cgroups.append(jid)
            continue
        try:
            pids = asroot.kill_in_job_cgroup(node, uid, jid)
            if pids:
                log.warning("reconcile: job %s: ended %d process(es) left in its cgroup: %s",
                            jid, len(pids), " ".join(map(str, pids[:20])))
            asroot.leave_job_cgroup(node, uid, jid)
            report.cgroups.append(jid)
        except CharlieError as e:
            report.faults.append(f"job {jid}: {e.line()}")
    for jid in sorted(asroot.jobs_with_network(node) - running - set(report.skipped)):
        if dry_run:
            report.networks.append(jid)
            continue
        try:
            asroot.remove_job_network(jid, node)
            report.networks.append(jid)
        except CharlieError as e:
            report.faults.append(f"job {jid}: {e.line()}")
    report.kept_removed = _old_kept(cfg, node, now, dry_run)
    return report


def _old_kept(cfg: config.Config, node: str, now: float, dry_run: bool) -> list[str]:
    days = cfg["reconcile.kept_max_days"]
    if days <= 0:
        return []
    return asroot.remove_old_kept(cfg.kept_dir(node), days * 86400, now, dry_run)


def due(cfg: config.Config, node: str, now: float | None = None) -> bool:
    """A prolog's sweep is due: reconcile.interval passed since the last."""
    interval = cfg["reconcile.interval"]
    if interval <= 0:
        return False
    age = _age(os.path.join(cfg.runtime_root(node), STAMP),
               time.time() if now is None else now)
    return age is None or age >= interval


def mark(cfg: config.Config, node: str) -> None:
    files.write_file(os.path.join(cfg.runtime_root(node), STAMP),
                      f"{int(time.time())}\n", 0o644)


def from_prolog(cfg: config.Config, node: str) -> None:
    """The prolog's cheap sweep: at most once per reconcile.interval, only
    when Slurm's job list for the node can be read; never fails the job."""
    try:
        if not due(cfg, node):
            return
        mark(cfg, node)
        running = jobs_on_node(node)
        if running is None:
            return
        report = reconcile(cfg, node, running)
        for line in report.lines():
            log.warning("reconcile: %s", line)
    except Exception as e:  # a sweep must never take the job down with it
        log.warning("reconcile from the prolog: %s: %s", type(e).__name__, e)
