"""Node actions: taking the node out of service."""

from __future__ import annotations

from ..errors import CharlieError
from ..log import log
from ..proc import run, slurm_tool

def drain(node: str, err: CharlieError) -> None:
    """Take the node out of service with a reason that says what to fix."""
    reason = f"slurm-charlie: {err.line()}"[:200]
    try:
        run([slurm_tool("scontrol"), "update", f"NodeName={node}", "State=DRAIN",
             f"Reason={reason}"], timeout=30)
    except CharlieError as e:
        log.error("could not drain %s: %s", node, e.line())
