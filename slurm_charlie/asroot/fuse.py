"""Root's way out of a FUSE file system that stops answering.

A process waiting on a FUSE request that the file system's server has read
but not answered sleeps uninterruptibly: SIGKILL does nothing until the
server answers or its connection ends (the kernel's fuse/dev.c,
request_wait_answer).  Any user can run such a server (fusermount3, or a
mount in a user namespace of their own), and so make a process of the job
unkillable, an epilog wait for ever, or a cgroup impossible to remove.  The
kernel lets root end a connection: writing to its ``abort`` file under
the fusectl file system (Documentation/filesystems/fuse.rst, "Aborting a
filesystem connection"); every waiter then gets an error, and a killed one
dies.

Root aborts only a connection that (1) is seen by one of the processes it
is ending (their mount namespaces), (2) is the job user's: mounted by them
(``user_id=UID``), or made in a namespace of theirs (absent from root's own
mount table, ``user_id=0`` being the user as root of their user
namespace), and (3) has requests waiting.  A root or site FUSE mount
(lxcfs, a site's sshfs) shows ``user_id=0`` in root's own table and is
never touched.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from ..log import log
from ..procfs import mounts
from ..proc import run, system_tool

CONNECTIONS = "/sys/fs/fuse/connections"


def _fuse(m: dict[str, str]) -> bool:
    return m["fstype"] == "fuse" or m["fstype"].startswith("fuse.")


def _user_id(options: str) -> int | None:
    for opt in options.split(","):
        if opt.startswith("user_id="):
            try:
                return int(opt[8:])
            except ValueError:
                return None
    return None


def _connection(dev: str) -> int | None:
    """fusectl's directory name of a FUSE mount's device: its minor (FUSE
    devices are anonymous, major 0)."""
    major, _, minor = dev.partition(":")
    if major != "0" or not minor.isdigit():
        return None
    return int(minor)


def users_connections(uid: int, pids: list[int]) -> list[int]:
    """The FUSE connections of uid that these processes see (see the module
    text for whose a connection is)."""
    if uid <= 0:
        return []
    roots = {m["dev"]: _user_id(m["options"]) for m in mounts() if _fuse(m)}
    found = set()
    for pid in pids:
        for m in mounts(pid):
            if not _fuse(m):
                continue
            owner = _user_id(m["options"])
            if m["dev"] in roots:
                mine = roots[m["dev"]] == uid
            else:  # made in a namespace root does not share
                mine = owner in (uid, 0)
            conn = _connection(m["dev"])
            if mine and conn is not None:
                found.add(conn)
    return sorted(found)


def _control() -> str | None:
    """fusectl's mount point, mounted when missing (systemd does it at boot;
    nodes without systemd may not); None when the kernel has no FUSE."""
    if any(m["fstype"] == "fusectl" and m["mountpoint"] == CONNECTIONS for m in mounts()):
        return CONNECTIONS
    if not os.path.isdir(CONNECTIONS):
        return None
    tool = system_tool("mount")
    if tool is None:
        return None
    p = run([tool, "-t", "fusectl", "fusectl", CONNECTIONS], check=False, timeout=10)
    if p.returncode != 0:
        log.warning("cannot mount fusectl at %s: %s", CONNECTIONS, p.stderr.strip())
        return None
    return CONNECTIONS


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def abort_stalled(uid: int, pids: list[int]) -> list[int]:
    """Abort each FUSE connection of uid that these (stuck) processes see
    and that has requests waiting; log each.  The connections aborted."""
    conns = users_connections(uid, pids)
    if not conns:
        return []
    ctl = _control()
    if ctl is None:
        log.warning("processes %s may wait on a FUSE file system of uid %d, but "
                    "fusectl is not available: cannot abort it",
                    " ".join(map(str, pids[:10])), uid)
        return []
    aborted = []
    for conn in conns:
        d = os.path.join(ctl, str(conn))
        waiting = _read_int(os.path.join(d, "waiting"))
        if waiting <= 0:
            continue
        try:
            fd = os.open(os.path.join(d, "abort"), os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not abort FUSE connection %d: %s", conn, e.strerror)
            continue
        aborted.append(conn)
        log.warning("aborted FUSE connection %d of uid %d: %d request(s) had waited "
                    "unanswered while processes %s could not end", conn, uid, waiting,
                    " ".join(map(str, pids[:10])))
    return aborted


def wait_or_abort(uid: int, alive: Callable[[], list[int]], wait: float) -> list[int]:
    """Wait up to `wait` seconds for alive() (the pids root killed that
    still live) to become empty; when some are left, abort the stalled
    FUSE connections of uid they see and wait as long again.  The second
    wait is taken whatever was aborted here: another hook (the job's epilog
    on another sandbox node, another job of the user's on this one) may
    have aborted the same connection a moment before, and the processes
    are then dying -- one that is exiting no longer even shows its mounts.
    The pids left."""
    left = _wait_empty(alive, wait)
    if left:
        abort_stalled(uid, left)
        left = _wait_empty(alive, wait)
    return left


def _wait_empty(alive: Callable[[], list[int]], wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = alive()
    return left
