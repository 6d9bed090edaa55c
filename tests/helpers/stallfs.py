"""A hostile user's FUSE file system, for the adversarial tests: an empty
directory that answers everything but a lookup of the name ``stall``, which
it reads and never answers.  A process that looks that name up then sleeps
uninterruptibly (SIGKILL does not end it) until the connection ends: the
kernel's fuse/dev.c, request_wait_answer.

Run as the user: ``python3 stallfs.py MOUNTPOINT``.  It mounts through
fusermount3 (setuid, as on any cluster with FUSE), prints ``MOUNTED`` and
serves until killed or unmounted.  The FUSE protocol by hand, a few
operations of it (include/uapi/linux/fuse.h): the test needs a server
that misbehaves in one precise way, which no library offers."""

import os
import socket
import struct
import subprocess
import sys

IN_HEADER = struct.Struct("<IIQQIIII")   # len, opcode, unique, nodeid, uid, gid, pid, pad
OUT_HEADER = struct.Struct("<IiQ")       # len, error, unique
LOOKUP, FORGET, GETATTR, OPENDIR, READDIR, RELEASEDIR, INIT = 1, 2, 3, 27, 28, 29, 26
INTERRUPT, BATCH_FORGET, DESTROY = 36, 42, 38
ENOENT, ENOSYS = 2, 38
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}


def mount(mountpoint: str) -> int:
    """/dev/fuse opened and mounted by fusermount3, handed over on a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
    subprocess.run(["fusermount3", "-o", "fsname=stallfs,subtype=stallfs", "--", mountpoint],
                   env=env, pass_fds=(theirs.fileno(),), check=True)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    ours.close()
    return fds[0]


def attr(uid: int, gid: int) -> bytes:
    # fuse_attr: ino size blocks atime mtime ctime (u64) atimensec mtimensec
    # ctimensec mode nlink uid gid rdev blksize flags (u32)
    return struct.pack("<QQQQQQIIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2,
                       uid, gid, 0, 4096, 0)


def serve(fd: int) -> None:
    uid, gid = os.getuid(), os.getgid()
    while True:
        try:
            req = os.read(fd, 1 << 20 | 4096)
        except OSError:  # unmounted, or the connection was aborted
            return
        if len(req) < IN_HEADER.size:
            continue
        _, opcode, unique, _, _, _, _, _ = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size:]
        if opcode in NO_REPLY:
            continue
        err, out = 0, b""
        if opcode == INIT:
            major, minor, readahead, _ = struct.unpack_from("<IIII", body)
            # fuse_init_out: major minor max_readahead flags max_background
            # congestion_threshold max_write time_gran max_pages
            # map_alignment flags2 unused[7]
            out = struct.pack("<IIIIHHIIHHI7I", 7, 31, readahead, 0, 16, 12, 4096, 1,
                              0, 0, 0, *([0] * 7))
        elif opcode == GETATTR:
            out = struct.pack("<QII", 1, 0, 0) + attr(uid, gid)
        elif opcode == LOOKUP:
            if body.rstrip(b"\0") == b"stall":
                continue  # read, never answered
            err = -ENOENT
        elif opcode == OPENDIR:
            out = struct.pack("<QII", 0, 0, 0)
        elif opcode in (READDIR, RELEASEDIR):
            out = b""
        else:
            err = -ENOSYS
        reply = OUT_HEADER.pack(OUT_HEADER.size + len(out), err, unique) + out
        try:
            os.write(fd, reply)
        except OSError:
            pass


def start(mountpoint: str, user: str) -> subprocess.Popen:
    """Run this server as user on mountpoint (a directory of theirs) from a
    test, as root; returns once it has mounted."""
    import pwd
    pw = pwd.getpwnam(user)
    server = subprocess.Popen(["/usr/bin/python3", __file__, mountpoint], user=pw.pw_uid,
                              group=pw.pw_gid, extra_groups=[], cwd="/",
                              env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    if server.stdout.readline().strip() != "MOUNTED":
        server.kill()
        raise RuntimeError(f"stallfs did not mount {mountpoint}: {server.stderr.read()}")
    return server


def main() -> int:
    fd = mount(sys.argv[1])
    print("MOUNTED", flush=True)
    serve(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
