"""One way to fail: a CharlieError carries subject, problem, value and hint.

The edges (hooks.py, cli.py) catch it once and decide what it means:

* UserError  -- the user got something wrong; at submit the job is refused,
                on a node the job fails and the node stays in service.
* NodeFault  -- the node cannot do its part (missing program, runtime dir
                unusable, process that will not die); the node is drained.
* ConfigError -- the site configuration is wrong; a NodeFault on a node.
"""

from __future__ import annotations

import os

from . import PROG


class CharlieError(Exception):
    """Base of every error slurm-charlie reports to a person."""

    kind = "error"

    def __init__(self, subject: str, problem: str, value: object = None,
                 hint: str | None = None) -> None:
        self.subject = subject
        self.problem = problem
        self.value = value
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.subject}: {self.problem}"
        if self.value is not None:
            text += f": {self.value}"
        return text

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, "subject": self.subject,
                "problem": self.problem,
                "value": None if self.value is None else str(self.value),
                "hint": self.hint}

    @classmethod
    def from_dict(cls, data: dict) -> "CharlieError":
        kinds = {c.__name__: c for c in (CharlieError, UserError, NodeFault,
                                         ConfigError)}
        klass = kinds.get(data.get("kind", ""), CharlieError)
        return klass(data.get("subject", "?"), data.get("problem", "?"),
                     data.get("value"), data.get("hint"))


class UserError(CharlieError):
    """Bad input from the job's user: refuse at submit, fail the job on a node."""


class NodeFault(CharlieError):
    """The node cannot serve charlie jobs until an admin fixes something."""


class ConfigError(NodeFault):
    """The site configuration is invalid."""


def format_message(err: CharlieError, jobid: str | int | None = None,
                   level: str = "error", pid: int | None = None) -> str:
    """Render ``slurm-charlie[pid]: job N: error: subject: problem: value``
    plus a ``hint:`` line when the error has one."""
    pid = os.getpid() if pid is None else pid
    head = f"{PROG}[{pid}]: "
    if jobid is not None:
        head += f"job {jobid}: "
    text = f"{head}{level}: {err.line()}"
    if err.hint:
        text += f"\n{head}hint: {err.hint}"
    return text
