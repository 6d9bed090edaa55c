"""No-follow file helpers: the one atomic writer and the readers that never
follow a final link, never block on a FIFO and read a bounded amount.

Used on both sides of the privilege line: as the job user (through
proc.call_as) for files in the job directory, and by root where root only
looks (lstat_in_job, read_bytes of root's own records).  Nothing here
changes an owner or a mode other than the file it writes.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layout import JobPaths


def write_file(path: str, data: bytes | str, mode: int = 0o644,
               dir_fd: int | None = None, sync: bool = False) -> None:
    """Replace path (relative to dir_fd when given) atomically with data: a
    temporary file per process (jobs may write the same file at once), never
    following a link, with exactly this mode whatever the umask; with sync,
    on disk before it replaces the old file.  The one atomic file writer."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data.encode() if isinstance(data, str) else data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

def _open_regular(path: str, dir_fd: int | None = None) -> int | None:
    """An fd of path (relative to dir_fd when given) if it is a regular
    file: never through a final link, never blocking on a FIFO or device.
    None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd

def read_bytes(path: str, limit: int = 4096, dir_fd: int | None = None) -> bytes | None:
    """At most limit bytes of a regular file; None when it is missing, a
    link, a FIFO or anything else that is not a regular file."""
    fd = _open_regular(path, dir_fd)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)

def tree_size(path: str) -> int:
    """Bytes in the files below path (links not followed; entries that
    vanish meanwhile do not count)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total

def read_small(path: str, limit: int = 4096) -> str | None:
    """read_bytes() as text."""
    data = read_bytes(path, limit)
    return None if data is None else data.decode(errors="replace")

def read_tail(path: str, lines: int) -> str:
    """The last lines of a (log) file, "" when it cannot be read (or is not
    a regular file: a FIFO planted there must not block the reader)."""
    fd = _open_regular(path)
    if fd is None:
        return ""
    try:
        size = os.fstat(fd).st_size
        text = os.pread(fd, 8192, max(0, size - 8192)).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    return "\n".join(text.replace("\r", "").strip().splitlines()[-lines:])

def lstat_in_job(paths: "JobPaths", *parts: str) -> os.stat_result | None:
    """lstat of <job_dir>/<parts…> as root, walking every directory with
    O_NOFOLLOW from the job directory, so no link the user planted is
    followed; None when anything on the way is missing or not a directory."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(paths.job_dir, flags)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            nfd = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.lstat(parts[-1], dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)

