"""state.json: what the epilog needs to undo the prolog.

Written atomically (temp file, fsync, rename) by the job user inside the job
directory.  The epilog treats its content as hints from an untrusted source:
it re-checks every pid (owner and start time) before acting on it and never
takes a path from it.  A missing or corrupt file means "undo everything that
can be found".
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from . import files

VERSION = 1


def write(path: str, data: dict[str, Any]) -> None:
    body = json.dumps({"version": VERSION, **data}, indent=1, sort_keys=True)
    files.write_file(path, body + "\n", 0o600, sync=True)


def read(path: str) -> dict[str, Any] | None:
    """The state, or None when missing, unreadable or corrupt."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    return data


def update(path: str, **changes: Any) -> dict[str, Any]:
    data = read(path) or {}
    data.pop("version", None)
    data.update(changes)
    write(path, data)
    return data
