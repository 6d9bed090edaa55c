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

_ESCAPES: dict[int, str] = {}


def _escapes() -> dict[int, str]:
    """What must not reach a log line or a person's terminal as it is: C0
    and C1 controls and DEL (newlines forge log lines, escapes drive
    terminals), Unicode's line and paragraph separators, the bidirectional
    overrides that make text read other than it is, and lone surrogates
    (bytes that were not UTF-8, which a log file could not even encode).
    Built on first use: the prolog hook imports this module before it forks
    and must stay light (tests/unit/test_house.py)."""
    if not _ESCAPES:
        codes = [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, *range(0x202a, 0x202f),
                 *range(0x2066, 0x206a), *range(0xd800, 0xe000)]
        _ESCAPES.update({c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in codes})
        _ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    return _ESCAPES


def printable(text: str, limit: int = 2000) -> str:
    """text as one line a person can read: every character of _escapes()
    escaped (\\n, \\x1b, \\u202e), at most limit characters, and the cut
    said.  For everything that may carry what a user, an image or a tool
    wrote: root's log lines, the job's error messages."""
    text = text.translate(_escapes())
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


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
    plus a ``hint:`` line when the error has one: two lines at most,
    whatever the value holds (printable())."""
    pid = os.getpid() if pid is None else pid
    head = f"{PROG}[{pid}]: "
    if jobid is not None:
        head += f"job {jobid}: "
    text = f"{head}{level}: {printable(err.line())}"
    if err.hint:
        text += f"\n{head}hint: {printable(err.hint)}"
    return text
