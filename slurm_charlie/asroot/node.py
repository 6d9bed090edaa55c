"""Node actions: taking the node out of service; the job's line in
Slurm's accounting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CharlieError
from ..log import log
from ..proc import Started, finish, run, slurm_tool, start

if TYPE_CHECKING:
    from .. import accounting

def drain(node: str, err: CharlieError) -> None:
    """Take the node out of service with a reason that says what to fix."""
    reason = f"slurm-charlie: {err.line()}"[:200]
    try:
        run([slurm_tool("scontrol"), "update", f"NodeName={node}", "State=DRAIN",
             f"Reason={reason}"], timeout=30)
    except CharlieError as e:
        log.error("could not drain %s: %s", node, e.line())


class Noting:
    """The accounting line on its way: the current AdminComment asked for
    (squeue --json, started by note_job_begin) while the prolog goes on."""

    def __init__(self, job_id: str, entry: "accounting.Entry") -> None:
        self.job_id, self.entry = job_id, entry
        self.reading: Started | None = None
        try:
            self.reading = start([slurm_tool("squeue"), "--json", "-j", job_id], timeout=10)
        except CharlieError as e:
            log.warning("could not note job %s in accounting: %s", job_id, e.line())


def note_job_begin(job_id: str, entry: "accounting.Entry") -> Noting | None:
    """Start adding the job's charlie line to its AdminComment
    (accounting.merge): one read and one write to slurmctld per job, from
    the job's first node only; note_job_end() finishes it.  The read runs
    beside the container's or guest's start, off the job's start path."""
    return Noting(job_id, entry) if job_id.isdigit() else None


def note_job_end(noting: Noting | None) -> None:
    """Read what squeue said, write the merged line (scontrol update).  A
    failure is logged; the job goes on (accounting is not worth a job)."""
    import json
    from .. import accounting
    if noting is None or noting.reading is None:
        return
    job_id = noting.job_id
    try:
        p = finish(noting.reading)
        jobs = json.loads(p.stdout or b"{}").get("jobs") or []
        old = next((j.get("admin_comment") for j in jobs
                    if str(j.get("job_id")) == job_id), None)
        text = accounting.merge(old if isinstance(old, str) else None, noting.entry)
        if text != old:
            run([slurm_tool("scontrol"), "update", f"JobId={job_id}",
                 f"AdminComment={text}"], timeout=10)
    except (CharlieError, ValueError, AttributeError) as e:
        log.warning("could not note job %s in accounting: %s", job_id,
                    e.line() if isinstance(e, CharlieError) else e)
