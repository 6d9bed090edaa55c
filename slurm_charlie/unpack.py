"""Container archives → an image directory in a per-user, node-local cache.

    <cache_dir>/<uid>/<sha256>/           the unpacked image
    <cache_dir>/<uid>/<sha256>.size       bytes, written after a good unpack;
                                          its mtime is the last use (LRU)
    <cache_dir>/<uid>/<sha256>.jobs/<id>  jobs on this node using it
    <cache_dir>/<uid>/<sha256>.lock       one producer at a time (filelock)
    <cache_dir>/<uid>/index/<key>         archive (dev, inode, size, mtime) →
                                          sha256, so an unchanged archive is
                                          hashed once

Everything here runs as the job user; the cache is per user, so no user can
change an image another user's job runs.  Tarball members are checked before
anything is written: no absolute paths, no '..', no member below a symlink,
no hard link or symlink that leaves the image.  Device files are skipped
(a user cannot make them, and ch-run binds the host's /dev).  A tarball
whose members all sit below one top-level directory (`tar czf x.tgz myimg/`)
is unpacked from inside that directory (docs/faq.rst, "My tarball has
everything under one directory").
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile

import filelock

from . import images, options
from .errors import UserError
from .files import read_small, tree_size, write_file
from .meta import MOUNT_POINTS
from .proc import run



def make_dirs_in(root: str, rel: str, mode: int = 0o755) -> None:
    """mkdir -p of rel inside the tree at root (an image being prepared),
    each component made or opened relative to its parent with O_NOFOLLOW, so
    that a symbolic link the image's author put on the way (``ch ->
    /home/someone``) is never followed: it raises OSError (ELOOP, or
    ENOTDIR for another non-directory) naming the component.  The last
    directory gets mode (fchmod on its own descriptor), the ones made on
    the way mode as well."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        done = root
        for part in rel.strip("/").split("/"):
            done = os.path.join(done, part)
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, done) from None
            os.close(fd)
            fd = nfd
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def mount_points_in(root: str, image: str) -> None:
    """Make /ch/meta and /ch/dataN in an unpacked image (archive, squashfs,
    registry) as the user, never through a link of the image: its author is
    not the user, and a `ch` or `ch/data1` that is a symbolic link to, say,
    the user's ~/.ssh would otherwise have the user's own step create in it
    or open it up (chmod 0755)."""
    for m in MOUNT_POINTS:
        try:
            make_dirs_in(root, m, 0o755)
        except OSError as e:
            where = "/" + os.path.relpath(e.filename or os.path.join(root, m), root)
            raise UserError("--charlie-image", f"the image's {where} is a symbolic link or "
                            "not a directory (the mount points /ch/meta and /ch/data1-4 "
                            "must be real directories or absent)", image,
                            hint=f"rebuild the image without {where}, or with real "
                            "directories there") from None


def check_members(members: list[tarfile.TarInfo], archive: str) -> str:
    """Refuse unsafe members; return the prefix to strip ('' or 'top/')."""
    def bad(problem: str, member: str) -> UserError:
        return UserError("--charlie-image", f"unsafe tarball: {problem}", f"{archive}: {member}",
                         hint="repack the image with paths relative to its root, "
                         "e.g. `tar -C IMAGE_DIR -czf image.tgz .`")
    links: set[str] = set()
    seen: dict[str, bool] = {}   # name -> is a directory
    names: list[str] = []
    for m in members:
        if m.name.startswith("/"):
            raise bad("absolute member path", m.name)
        norm = posixpath.normpath(m.name)
        if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
            raise bad("member path with '..'", m.name)
        if not (m.isdir() or m.isreg() or m.issym() or m.islnk() or m.isfifo()
                or m.ischr() or m.isblk()):
            raise bad("unknown member type", m.name)
        if norm in seen and not (seen[norm] and m.isdir()):
            raise bad("member given twice (a later one could replace or write "
                      "through the first)", m.name)
        seen[norm] = m.isdir()
        parts = norm.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise bad("member below a symbolic link", m.name)
        if m.issym():
            # absolute targets resolve inside the container; relative ones
            # must not climb out of the image
            target = posixpath.normpath(posixpath.join(posixpath.dirname(norm), m.linkname))
            if not m.linkname.startswith("/") and (target == ".." or target.startswith("../")):
                raise bad("symbolic link pointing outside the image",
                          f"{m.name} -> {m.linkname}")
            links.add(norm)
        if m.islnk():
            t = posixpath.normpath(m.linkname)
            if m.linkname.startswith("/") or t == ".." or t.startswith("../"):
                raise bad("hard link pointing outside the image", f"{m.name} -> {m.linkname}")
            tparts = t.split("/")
            if t in links or any("/".join(tparts[:i]) in links for i in range(1, len(tparts))):
                raise bad("hard link to or through a symbolic link", f"{m.name} -> {m.linkname}")
            if t not in seen or seen[t]:
                raise bad("hard link to a file not earlier in the archive",
                          f"{m.name} -> {m.linkname}")
        if norm != ".":
            names.append(norm)
    tops = {n.split("/")[0] for n in names}
    if len(tops) == 1:
        top = next(iter(tops))
        below = [n for n in names if n != top]
        if below and "bin" not in tops and all(n.startswith(top + "/") for n in below):
            return top + "/"
    return ""


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Python's own member filter where it has one (3.12, 3.11.4): tar_filter,
#: not data_filter, because images carry absolute symlinks (bin/sh ->
#: /bin/busybox) that resolve inside the container
_FILTER = getattr(tarfile, "tar_filter", None)


def _parent(rootfd: int, rel: str) -> tuple[int, str]:
    """An fd of rel's parent directory below rootfd, created as needed and
    walked with O_NOFOLLOW (a link on the way is an error), and rel's last
    component.  The caller closes the fd."""
    parts = rel.split("/")
    fd = os.dup(rootfd)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: str) -> None:
    """Create every member below dest relative to directory fds: never
    through a link, never over an existing entry (O_EXCL), no device files,
    no set-id bits, no ownership changes.  Directory modes are set last
    (deepest first) and always let the owner in, so the cache can be
    cleaned."""
    rootfd = os.open(dest, _DIR)
    dirs: list[tuple[str, int, float]] = []
    try:
        for m in members:
            rel = posixpath.normpath(m.name)
            if rel == ".":
                dirs.append((".", m.mode, m.mtime))
                continue
            if m.ischr() or m.isblk():
                continue  # images built as root carry /dev nodes: skipped
            if _FILTER is not None:
                _FILTER(m, dest)  # raises tarfile.FilterError
            mode = m.mode & 0o1777
            pfd, name = _parent(rootfd, rel)
            try:
                if m.isdir():
                    try:
                        os.mkdir(name, 0o700, dir_fd=pfd)
                    except FileExistsError:
                        if not stat.S_ISDIR(os.lstat(name, dir_fd=pfd).st_mode):
                            raise
                    dirs.append((rel, mode, m.mtime))
                    continue
                if m.issym():
                    os.symlink(m.linkname, name, dir_fd=pfd)
                elif m.islnk():
                    src = posixpath.normpath(m.linkname)
                    sfd, sname = _parent(rootfd, src)
                    try:
                        os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd,
                                follow_symlinks=False)
                    finally:
                        os.close(sfd)
                    continue
                elif m.isfifo():
                    os.mkfifo(name, mode, dir_fd=pfd)
                else:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=pfd)
                    try:
                        src_f = tar.extractfile(m)
                        if src_f is not None:
                            while chunk := src_f.read(1 << 20):
                                os.write(fd, chunk)
                        os.fchmod(fd, mode)
                    finally:
                        os.close(fd)
                os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
        for rel, mode, mtime in sorted(dirs, key=lambda d: -d[0].count("/")):
            fd = os.open(rel, _DIR, dir_fd=rootfd) if rel != "." else os.dup(rootfd)
            try:
                os.fchmod(fd, (mode & 0o1777) | 0o700)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    finally:
        os.close(rootfd)


def _extract_tar(archive: str, dest: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            strip = check_members(members, archive)
            keep = []
            for m in members:
                norm = posixpath.normpath(m.name)
                if strip:
                    if norm + "/" == strip or norm == strip.rstrip("/"):
                        continue
                    m.name = norm[len(strip):]
                    if m.islnk():
                        m.linkname = posixpath.normpath(m.linkname)[len(strip):]
                keep.append(m)
            _write_members(tar, keep, dest)
    except UserError:
        raise
    except Exception as e:  # corrupt, truncated, refused by the filter, disk full
        raise UserError("--charlie-image", f"cannot unpack: {type(e).__name__}: {e}",
                        archive, hint="check that the archive is complete and not "
                        "corrupt, and was made with plain tar") from None


def _extract_squashfs(archive: str, dest: str, timeout: float) -> None:
    os.rmdir(dest)
    p = run(["unsquashfs", "-no-xattrs", "-quiet", "-no-progress", "-d", dest, archive],
            timeout=timeout, check=False)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines() or ["?"]
        raise UserError("--charlie-image", "cannot unpack squashfs", err[-1])


def archive_key(archive: str, index_dir: str, claimed: str | None = None
                ) -> tuple[str, str]:
    """(sha256 of the archive, where it came from: "submit", "index" or
    "hashed").  The digest the validator made at submit (``claimed``) is
    taken while the file's identity is what it was then; else the node's
    index per (dev, inode, size, mtime); else the file is read here.  A
    false claim only names an entry in the user's own cache."""
    st = os.stat(archive)
    key = f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
    os.makedirs(index_dir, mode=0o700, exist_ok=True)
    path = os.path.join(index_dir, key)
    if claimed is not None:
        sha, identity = options.parse_image_digest(claimed)
        if identity == options.file_identity(st):
            if read_small(path, 128) is None:
                write_file(path, sha + "\n", 0o600)
            return sha, "submit"
    known = read_small(path, 128)
    if known is not None and len(known.strip()) == 64:
        return known.strip(), "index"
    digest = images.sha256_file(archive)
    # jobs of the user on this node may hash the same archive at once
    write_file(path, digest + "\n", 0o600)
    return digest, "hashed"


def unpack(archive: str, fmt: str, user_cache: str, job_id: str,
           lock_timeout: float, claimed: str | None = None) -> dict:
    """As the user: make sure the archive is unpacked in user_cache and mark
    job_id as a user of it.  Returns {"image": dir, "sha": …, "unpacked":
    bool, "digest_from": archive_key()'s second answer}."""
    os.makedirs(user_cache, mode=0o700, exist_ok=True)
    sha, digest_from = archive_key(archive, os.path.join(user_cache, "index"), claimed)
    image = os.path.join(user_cache, sha)
    jobs = image + ".jobs"
    unpacked = False
    lock = filelock.FileLock(image + ".lock", timeout=lock_timeout)
    try:
        with lock:
            os.makedirs(jobs, mode=0o700, exist_ok=True)
            open(os.path.join(jobs, job_id), "w").close()
            if read_small(image + ".size", 64) is None:
                tmp = f"{image}.tmp.{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(image, ignore_errors=True)
                os.makedirs(tmp, mode=0o700)
                try:
                    if fmt == "squashfs":
                        _extract_squashfs(archive, tmp, lock_timeout)
                    else:
                        _extract_tar(archive, tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                mount_points_in(tmp, archive)
                os.rename(tmp, image)
                with open(image + ".size", "w") as f:
                    f.write(f"{tree_size(image)}\n")
                unpacked = True
            os.utime(image + ".size")
    except filelock.Timeout:
        raise UserError("--charlie-image", "another job is still unpacking this "
                        f"image after {lock_timeout} s", archive,
                        hint="try again later; huge images unpack slowly") from None
    except UserError:
        try:
            os.unlink(os.path.join(jobs, job_id))
        except OSError:
            pass
        raise
    return {"image": image, "sha": sha, "unpacked": unpacked, "digest_from": digest_from}


def release(user_cache: str, sha: str, job_id: str) -> None:
    try:
        os.unlink(os.path.join(user_cache, sha + ".jobs", job_id))
    except OSError:
        pass


def evict(user_cache: str, max_bytes: int, running_jobs: set[str]) -> list[str]:
    """Remove least recently used images until the cache fits max_bytes.
    An image with a job marker of a job still running here is never removed.
    Returns the removed sha256s."""
    entries = []
    try:
        names = os.listdir(user_cache)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".size"):
            continue
        sha = name[:-5]
        path = os.path.join(user_cache, name)
        try:
            size = int((read_small(path, 64) or "").strip())
            mtime = os.lstat(path).st_mtime
        except (OSError, ValueError):
            continue
        try:
            users = set(os.listdir(os.path.join(user_cache, sha + ".jobs")))
        except FileNotFoundError:
            users = set()
        entries.append((mtime, sha, size, users & running_jobs))
    total = sum(e[2] for e in entries)
    removed = []
    for mtime, sha, size, users in sorted(entries):
        if total <= max_bytes:
            break
        if users:
            continue
        lock = filelock.FileLock(os.path.join(user_cache, sha + ".lock"), timeout=0)
        try:
            with lock:
                os.unlink(os.path.join(user_cache, sha + ".size"))
                shutil.rmtree(os.path.join(user_cache, sha), ignore_errors=True)
                shutil.rmtree(os.path.join(user_cache, sha + ".jobs"), ignore_errors=True)
        except filelock.Timeout:
            continue
        total -= size
        removed.append(sha)
    return removed
