"""The job directory and root's other directories, made and removed as root.

    <runtime_root>/<job>        owned by the job user, 0700, always new
    <kept_dir>/<uid>            the user's kept overlays / image cache, 0700

Root never follows a path the user controls: everything works relative to a
file descriptor of a root-owned directory, with O_NOFOLLOW, and removal is
iterative and fd-based (remove_tree).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from .. import files, layout
from ..config import check_root_safe
from ..errors import NodeFault, UserError
from ..proc import User

def create_job_dir(paths: layout.JobPaths, user: User) -> None:
    """<runtime_root>/<job>, owned by the user, 0700, always new: whatever a
    job of the same id left there is removed first (a reused id inherits
    nothing)."""
    layout.check_job_id(paths.job_id)
    rootfd = open_root(paths.root)
    try:
        remove_tree(rootfd, paths.job_id)
    finally:
        os.close(rootfd)
    _owned_dir(paths.root, paths.job_id, user.uid, user.gid, "job directory",
               "runtime_root")


def remove_job_dir(paths: layout.JobPaths) -> bool:
    """Remove the job directory; True when something was there."""
    layout.check_job_id(paths.job_id)
    try:
        rootfd = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise NodeFault("runtime_root", f"cannot open: {e.strerror}", paths.root) from None
    try:
        return remove_tree(rootfd, paths.job_id)
    finally:
        os.close(rootfd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: directory fds held at once while removing; deeper levels are reopened
MAX_HELD = 64


def remove_tree(parent_fd: int, name: str) -> bool:
    """Remove parent_fd/name and everything below it, iteratively.

    Never follows a symbolic link (entries are unlinked, directories opened
    with O_NOFOLLOW|O_DIRECTORY relative to their parent's fd), opens nothing
    but directories (so a FIFO cannot block it), and needs neither recursion
    nor one fd per level: at most MAX_HELD directory fds are held, and a
    level whose fd was let go is reopened from its parent by name and checked
    by (device, inode).  If someone changes the tree under it, it starts
    again from the top.  True when something was removed; NodeFault when the
    tree cannot be removed (a mount inside, EBUSY, a disk error)."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return True
    for _attempt in range(100):
        try:
            if _remove_tree_once(parent_fd, name):
                return True
        except FileNotFoundError:
            pass
        try:
            os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return True
    raise NodeFault("job directory", "cannot remove: it keeps changing under removal",
                    name, hint="a process outside the job writes into it; stop it")


def _remove_tree_once(parent_fd: int, name: str) -> bool:
    # stack entries: [name in parent, fd or -1, (dev, ino)]
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    st = os.fstat(top)
    stack: list[list[Any]] = [[name, top, (st.st_dev, st.st_ino)]]
    try:
        while stack:
            fd = _level_fd(parent_fd, stack)
            if fd is None:
                return False  # changed under us: start again
            child = None
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                child = entry.name
                                break
                            os.unlink(entry.name, dir_fd=fd)
                        except (FileNotFoundError, IsADirectoryError):
                            continue
            except OSError as e:
                raise NodeFault("job directory", f"cannot list: {e.strerror}",
                                "/".join(s[0] for s in stack)) from None
            if child is not None:
                try:
                    cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped
                        continue
                    raise
                cst = os.fstat(cfd)
                stack.append([child, cfd, (cst.st_dev, cst.st_ino)])
                if len(stack) > MAX_HELD:  # let go of a level; reopened later
                    held = stack[-MAX_HELD - 1]
                    if held[1] >= 0 and len(stack) - MAX_HELD - 1 > 0:
                        os.close(held[1])
                        held[1] = -1
                continue
            # empty: remove it from its parent
            done = stack.pop()
            os.close(done[1])
            if stack:
                pfd = _level_fd(parent_fd, stack)
                if pfd is None:
                    return False
                try:
                    os.rmdir(done[0], dir_fd=pfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY:  # something was added; again
                        continue
                    raise NodeFault("job directory", f"cannot remove: {e.strerror}",
                                    done[0], hint="look for mounts below it and "
                                    "processes using it (fuser -vm)") from None
            else:
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY:
                        return False
                    if e.errno != errno.ENOENT:
                        raise NodeFault("job directory", f"cannot remove: {e.strerror}",
                                        name, hint="look for mounts below it and "
                                        "processes using it (fuser -vm)") from None
                return True
        return True
    finally:
        for entry in stack:
            if entry[1] >= 0:
                os.close(entry[1])


def _level_fd(parent_fd: int, stack: list[list[Any]]) -> int | None:
    """The fd of the deepest level, reopening let-go levels top-down from
    the nearest held one; None when a level is no longer what it was."""
    if stack[-1][1] >= 0:
        return stack[-1][1]
    i = len(stack) - 1
    while stack[i][1] < 0:
        i -= 1
    for j in range(i + 1, len(stack)):
        try:
            fd = os.open(stack[j][0], _DIR_FLAGS, dir_fd=stack[j - 1][1])
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != stack[j][2]:
            os.close(fd)
            return None
        stack[j][1] = fd
    # keep at most MAX_HELD open: let go of the levels above the window again
    for j in range(1, max(1, len(stack) - MAX_HELD)):
        if stack[j][1] >= 0:
            os.close(stack[j][1])
            stack[j][1] = -1
    return stack[-1][1]


def open_root(root: str, what: str = "runtime_root") -> int:
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
    rootfd = open_root(base, base_key)
    path = os.path.join(base, name)
    try:
        try:
            st = os.lstat(name, dir_fd=rootfd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                remove_tree(rootfd, name)
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


def create_user_dir(base: str, user: User) -> str:
    """<base>/<uid>, owned by the user, 0700: the user's image cache."""
    return _owned_dir(base, str(user.uid), user.uid, user.gid, "image cache",
                      "container.cache_dir")


def open_log_as_root(paths: layout.JobPaths, uid: int) -> int | None:
    return open_out_as_root(paths, uid, "charlie.log")


def open_out_as_root(paths: layout.JobPaths, uid: int, name: str) -> int | None:
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


def remove_old_kept(kept: str, max_age: float, now: float, dry_run: bool) -> list[str]:
    """Remove the kept overlays (<kept>/<uid>/*.overlay.qcow2, regular files
    only, no link followed) older than max_age seconds; with dry_run only
    list them.  Returns their paths."""
    removed = []
    try:
        kfd = os.open(kept, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        for uid in os.listdir(kfd):
            try:
                ufd = os.open(uid, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=kfd)
            except OSError:
                continue
            try:
                for name in os.listdir(ufd):
                    st = os.lstat(name, dir_fd=ufd)
                    if (stat.S_ISREG(st.st_mode) and name.endswith(".overlay.qcow2")
                            and now - st.st_mtime > max_age):
                        if not dry_run:
                            os.unlink(name, dir_fd=ufd)
                        removed.append(os.path.join(kept, uid, name))
            finally:
                os.close(ufd)
    finally:
        os.close(kfd)
    return removed


def keep_node_file(root: str, sub: str, name: str, data: str) -> str:
    """Write <root>/<sub>/<name> (root's, 0644) in one step: a file root
    keeps for the node, such as the CDI spec gpu.generate makes.  <sub> is
    made root's, 0755; anything else found there (not a directory of
    root's) is a node fault, never followed."""
    rootfd = open_root(root)
    try:
        try:
            os.mkdir(sub, 0o755, dir_fd=rootfd)
        except FileExistsError:
            pass
        fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=rootfd)
    except OSError as e:
        os.close(rootfd)
        raise NodeFault("runtime_root", f"cannot make {sub}: {e.strerror}", root) from None
    os.close(rootfd)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise NodeFault("runtime_root", f"{sub} is not root's alone", root,
                            hint=f"remove {os.path.join(root, sub)}")
        files.write_file(name, data, 0o644, dir_fd=fd)
    finally:
        os.close(fd)
    return os.path.join(root, sub, name)
