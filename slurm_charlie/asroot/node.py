"""Node actions: taking the node out of service; the job's line in
Slurm's accounting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CharlieError
from ..log import log
from ..proc import run, slurm_tool

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


def note_job(job_id: str, entry: "accounting.Entry") -> None:
    """Add the job's charlie line to its AdminComment (accounting.merge):
    one read and one write to slurmctld, from the job's first node only.
    A failure is logged; the job goes on (accounting is not worth a job)."""
    import json
    from .. import accounting
    if not job_id.isdigit():
        return
    try:
        p = run([slurm_tool("squeue"), "--json", "-j", job_id], timeout=10)
        jobs = json.loads(p.stdout or b"{}").get("jobs") or []
        old = next((j.get("admin_comment") for j in jobs
                    if str(j.get("job_id")) == job_id), None)
        text = accounting.merge(old if isinstance(old, str) else None, entry)
        if text != old:
            run([slurm_tool("scontrol"), "update", f"JobId={job_id}",
                 f"AdminComment={text}"], timeout=10)
    except (CharlieError, ValueError) as e:
        log.warning("could not note job %s in accounting: %s", job_id,
                    e.line() if isinstance(e, CharlieError) else e)
