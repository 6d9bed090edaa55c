"""The node-local job directory (contract in docs/admin.rst):

    <runtime_root>/<jobid>/         owned by the job user, 0700
        meta/  run/  out/  state.json

Root creates and removes it; everything inside is written as the job user.
Root never follows a path the user controls: creation and removal work
relative to a file descriptor of the root-owned runtime_root, with
O_NOFOLLOW, and removal is privileged.remove_tree (iterative, fd-based).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from .config import check_root_safe
from .errors import NodeFault, UserError


@dataclasses.dataclass(frozen=True)
class JobPaths:
    root: str
    job_id: str

    @property
    def job_dir(self) -> str:
        return os.path.join(self.root, self.job_id)

    def __getattr__(self, name: str) -> str:
        sub = _SUBPATHS.get(name)
        if sub is None:
            raise AttributeError(name)
        return os.path.join(self.root, self.job_id, sub)


#: attribute -> path inside the job directory
RUN_DIR = "run"
#: files in run/ that the C shim reads too: spank/charlie_options.h gets
#: their names from this table (CHARLIE_RUN_<KEY>), so both sides agree
SHIM_FILES = {
    "task_env": "task.env",     # CH_* (and back end) variables for tasks
    "error": "error",           # why the job failed: every task prints it
    "notice": "notice",         # warnings for the batch script's stderr
    "guest_wait": "guest-wait", # VM batch job: the batch step waits for guest 0
    "guest_tasks": "guest-tasks",  # VM job: the task multiplexer's socket
}

#: in a task's environment, =1: a VM job's task stays on the host (the shim
#: does not relay it into the guest)
ON_HOST_VAR = "CHARLIE_ON_HOST"

_SUBPATHS = {
    "meta": "meta",
    "run": RUN_DIR,
    "out": "out",
    "state": "state.json",
    **{k: f"{RUN_DIR}/{v}" for k, v in SHIM_FILES.items()},
    "log": "out/charlie.log",
}


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


def lstat_in_job(paths: JobPaths, *parts: str) -> os.stat_result | None:
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


def check_job_id(job_id: str) -> None:
    if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 20):
        raise NodeFault("job id", "not a number", repr(job_id))


def _open_root(root: str, what: str = "runtime_root") -> int:
    """Create a root-managed directory (runtime_root, the image cache) if
    needed (root-owned, 0755) and open it safely."""
    check_root_safe(root, what)
    try:
        os.makedirs(root, mode=0o755, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise NodeFault(what, f"cannot create or open: {e.strerror}",
                        root, hint=f"check {what} in the site config and "
                        "the node's local disk") from None
    check_root_safe(root, what)  # again, now that it exists
    return fd


def _owned_dir(base: str, name: str, uid: int, gid: int, subject: str,
               base_key: str) -> str:
    """Make <base>/<name> a directory owned by uid:gid, mode 0700, below the
    root-managed base.  Safe to repeat: a directory of that owner is kept,
    anything else there is removed first (without following links)."""
    rootfd = _open_root(base, base_key)
    path = os.path.join(base, name)
    try:
        try:
            st = os.lstat(name, dir_fd=rootfd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                _remove_entry(rootfd, name)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(name, 0o700, dir_fd=rootfd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=rootfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a job can fill it
            raise UserError(base_key, "full: the job cannot be set up on this node",
                            path, hint="tell the site's admins (slurm-charlie "
                            "doctor shows the free space)") from None
        raise NodeFault(subject, f"cannot create: {e.strerror}", path,
                        hint=f"check free space and permissions of {base_key}") from None
    finally:
        os.close(rootfd)
    return path


def create_job_dir(paths: JobPaths, uid: int, gid: int) -> None:
    """<runtime_root>/<jobid>, owned by the job user, 0700."""
    check_job_id(paths.job_id)
    _owned_dir(paths.root, paths.job_id, uid, gid, "job directory", "runtime_root")


def create_user_dir(base: str, uid: int, gid: int) -> str:
    """<base>/<uid>, owned by the user, 0700: the user's image cache."""
    return _owned_dir(base, str(uid), uid, gid, "image cache", "container.cache_dir")


def _remove_entry(rootfd: int, name: str) -> None:
    from .privileged import remove_tree  # iterative, never follows links
    remove_tree(rootfd, name)


def list_job_dirs(root: str) -> list[str]:
    """Job ids that have a directory under root."""
    try:
        return sorted((e for e in os.listdir(root) if e.isascii() and e.isdigit()),
                      key=int)
    except FileNotFoundError:
        return []


def open_log_as_root(paths: JobPaths, uid: int) -> int | None:
    return open_out_as_root(paths, uid, "charlie.log")


def open_out_as_root(paths: JobPaths, uid: int, name: str) -> int | None:
    """Open out/NAME for appending without following links the user may
    have planted; None if out/ does not exist yet or the file is suspect."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        jfd = os.open(paths.job_dir, flags)
    except OSError:
        return None
    try:
        ofd = os.open("out", flags, dir_fd=jfd)
    except OSError:
        os.close(jfd)
        return None
    try:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                     dir_fd=ofd)
    except OSError:
        return None
    finally:
        os.close(ofd)
        os.close(jfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (0, uid):
        os.close(fd)
        return None
    if st.st_uid == 0:
        try:
            os.fchown(fd, uid, -1)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
    return fd
