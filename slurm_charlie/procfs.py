"""Readers of /proc: a process's state, start time, owner, program, open
files and namespaces.  They only read; a process that is gone reads as
None (or False, or []), never as an error."""

from __future__ import annotations

import os


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] is the state
    (field 3), [6] the kernel's flags (field 9), [19] the start time (field 22).  None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def starttime(pid: int | str) -> int | None:
    """Start time of pid (field 22 of /proc/PID/stat), None when gone."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_age(pid: int | str = "self") -> float | None:
    """Seconds since pid started (Python's own start included), from its
    start time in clock ticks and the system's uptime."""
    fields = proc_stat(pid)
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return up - int(fields[19]) / os.sysconf("SC_CLK_TCK") if fields else None
    except (OSError, ValueError, IndexError):
        return None


def is_zombie(pid: int | str) -> bool:
    """Gone, or a zombie nobody has reaped yet."""
    fields = proc_stat(pid)
    return fields is None or fields[0] == "Z"


PF_EXITING = 0x4  # include/linux/sched.h: the process is in do_exit()


def is_exiting(pid: int | str) -> bool:
    """Gone, a zombie, or already on its way out (killed, its memory and
    files being released): it will not start using anything again.  Its
    cgroup may already read as the root one, so it cannot be placed."""
    fields = proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X") or int(fields[6]) & PF_EXITING != 0


def is_stopped(fields: list[str] | None) -> bool:
    """The proc_stat() fields are of a stopped process (SIGSTOP, traced)."""
    return bool(fields) and fields[0] in ("T", "t")


def pids_of(uid: int) -> list[int]:
    """Live processes owned by uid."""
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid:
                out.append(int(d))
        except OSError:
            pass
    return out


def fd_targets(pid: int | str) -> list[str]:
    """Where pid's open file descriptors point ([] when unreadable; a
    descriptor closed meanwhile is left out, not the others with it)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def _status_uids(pid: int) -> tuple[int, ...] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return tuple(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def comm_of(pid: int, missing: str = "?") -> str:
    """pid's command name, for the log (missing when it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return missing


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def is_users(pid: int, uid: int) -> bool:
    """Every uid of pid (real, effective, saved, fs) is the job user's: a
    setuid program the user started is not the user's to have killed."""
    uids = _status_uids(pid)
    return bool(uids) and all(u == uid for u in uids)


def ns_inode(pid: int | str, ns: str) -> int | None:
    """Inode of pid's namespace ns ("mnt", "user", ...), None when gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{ns}").st_ino
    except OSError:
        return None


def children(pid: int | str) -> list[int]:
    """pid's children (its main thread's), [] when gone or unreadable."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        return []


def _unescape(field: str) -> str:
    """A mountinfo path: the kernel writes space, tab, newline and backslash
    as \\ooo octal escapes."""
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(pid: int | str = "self") -> list[dict[str, str]]:
    """The mounts pid sees (/proc/PID/mountinfo); [] when gone."""
    return read_mountinfo(f"/proc/{pid}/mountinfo")


def owner(pid: int | str) -> int | None:
    """The uid that owns /proc/PID (the process's real owner), None when gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def read_mountinfo(path: str) -> list[dict[str, str]]:
    """A mountinfo file's mounts: device ("major:minor"), mount point, file
    system type and super block options; [] when unreadable.  Fields the
    user can name (paths, sources) are escaped by the kernel, so a line
    always splits the same way."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if not sep or len(a) < 5 or len(b) < 3:
            continue
        out.append({"dev": a[2], "mountpoint": _unescape(a[4]), "fstype": b[0],
                    "options": b[2]})
    return out
