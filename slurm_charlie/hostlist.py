"""Slurm hostlist and CPU-count expressions, expanded the way Slurm does.

    expand("n[01-03,7],gpu[1-2]-ib")  -> n01 n02 n03 n7 gpu1-ib gpu2-ib
    expand_counts("2(x3),1")          -> [2, 2, 2, 1]
"""

from __future__ import annotations

import itertools
import re

from .errors import UserError


class HostlistError(UserError):
    pass


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            if depth:
                raise HostlistError("hostlist", "nested '['", text)
            depth = 1
        elif ch == "]":
            if not depth:
                raise HostlistError("hostlist", "']' without '['", text)
            depth = 0
        if ch == "," and not depth:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise HostlistError("hostlist", "unclosed '['", text)
    parts.append("".join(cur))
    return [p for p in parts if p]


def _range(body: str, text: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise HostlistError("hostlist", "bad range", text)
        if not dash:
            out.append(lo)
            continue
        width = len(lo)  # Slurm pads to the width of the low bound
        a, b = int(lo), int(hi)
        if b < a:
            raise HostlistError("hostlist", "range goes backwards", text)
        out.extend(str(i).zfill(width) for i in range(a, b + 1))
    return out


_PIECE = re.compile(r"\[([^\]]*)\]")


def expand(text: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in order."""
    hosts: list[str] = []
    for part in _split_top(text.strip()):
        pieces: list[list[str]] = []
        pos = 0
        for m in _PIECE.finditer(part):
            pieces.append([part[pos:m.start()]])
            pieces.append(_range(m.group(1), text))
            pos = m.end()
        pieces.append([part[pos:]])
        hosts.extend("".join(p) for p in itertools.product(*pieces))
    return hosts


_COUNT = re.compile(r"^([0-9]+)(?:\(x([0-9]+)\))?$")


def expand_counts(text: str) -> list[int]:
    """Expand SLURM_JOB_CPUS_PER_NODE-style counts: '2(x3),1' -> [2,2,2,1]."""
    out: list[int] = []
    for item in text.strip().split(","):
        m = _COUNT.match(item)
        if not m:
            raise HostlistError("cpu counts", "cannot parse", text)
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out
