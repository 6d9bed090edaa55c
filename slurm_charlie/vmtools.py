"""Commands users run around VM jobs (as themselves):

guest-wait   the batch step of a VM batch job: streams guest 0's job output
             to the job's stdout/stderr, exits with its exit code
console      attaches to a guest's serial console from inside the allocation
commit       commits an overlay a job kept (when the job-end commit was unsafe)
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import sys
import time

from . import PROG, config, hostlist, jobenv, layout
from .errors import CharlieError, UserError
from .files import read_tail, write_file
from .proc import run, run_attached, slurm_tool
from .procfs import is_zombie, starttime

POLL = 0.2


def _alive(record: str) -> bool:
    """QEMU of run/N.qemu ("PID STARTTIME") still runs."""
    try:
        pid, start = open(record).read().split()
    except (OSError, ValueError):
        return False
    return str(starttime(pid)) == start and not is_zombie(pid)


class _Follower:
    def __init__(self, path: str, out) -> None:
        self.path, self.out, self.pos = path, out, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if data:
            self.pos += len(data)
            self.out.buffer.write(data)
            self.out.flush()


GO = "go"


ON_HOST = layout.ON_HOST_VAR


def _this_program() -> str:
    """The slurm-charlie command running now (the path the shim or the user
    started), for the commands it starts on the job's nodes."""
    return sys.argv[0] if os.path.isabs(sys.argv[0]) else (shutil.which(PROG) or PROG)


def release_guests() -> bool | str:
    """Start every guest's job script together.  The barrier: a first srun
    over the job's nodes, whose tasks start only once their node has been
    prepared (the shim's task_init waits for the background prolog, which
    ends with its guest ready); then a second leaves meta/sync/go in every
    node's job directory (Slurm fans both out: O(N) in total).  True when
    the guests were told; False (and a warning) if the second srun failed:
    the guests then start on their own after a while; the first srun's
    error text when a node could not be prepared (the job cannot run)."""
    job, nodes = jobenv.allocation(os.environ)
    count = len(hostlist.expand(nodes)) if nodes else 0
    if not job or not count:
        return False
    srun = [slurm_tool("srun"), "--overlap", f"-N{count}", f"-n{count}",
            "--ntasks-per-node=1", "--quiet", "--mpi=none", f"--export=ALL,{ON_HOST}=1"]
    try:
        ready = run(srun + ["true"], timeout=None, check=False)
    except CharlieError as e:
        ready = None
        print(f"{PROG}: warning: cannot wait for the job's nodes: {e.line()}",
              file=sys.stderr)
    if ready is not None and ready.returncode != 0:
        return ready.stderr.decode(errors="replace").strip()[-2000:] or \
            f"srun exited with {ready.returncode}"
    try:
        p = run(srun + [_this_program(), "guest-go"], timeout=120, check=False)
    except CharlieError as e:
        print(f"{PROG}: warning: cannot start the guests' jobs together: {e.line()}",
              file=sys.stderr)
        return False
    if p.returncode != 0:
        print(f"{PROG}: warning: cannot start the guests' jobs together (srun exited "
              f"with {p.returncode}): {p.stderr.decode(errors='replace').strip()[-300:]}",
              file=sys.stderr)
        return False
    return True


def guest_go(job_dir: str | None) -> int:
    """In an srun task on a node of a VM batch job: let its guest start."""
    if not job_dir:
        print(f"{PROG}: error: guest-go: no CH_JOB_DIR (not a charlie VM job step)",
              file=sys.stderr)
        return 1
    write_file(os.path.join(job_dir, "meta", "sync", GO), "go\n", 0o644)
    return 0


def guest_wait(job_dir: str, guest: int = 0) -> int:
    released = release_guests()
    if isinstance(released, str):
        print(released, file=sys.stderr)
        print(f"{PROG}: error: a node of the job could not be prepared (above); "
              "the guests' job does not start", file=sys.stderr)
        return 1
    out = os.path.join(job_dir, "out")
    done = os.path.join(job_dir, "meta", "sync", f"{guest}.jobdone")
    record = os.path.join(job_dir, "run", f"{guest}.qemu")
    followers = [_Follower(os.path.join(out, f"{guest}_job.out"), sys.stdout),
                 _Follower(os.path.join(out, f"{guest}_job.err"), sys.stderr)]
    while True:
        for f in followers:
            f.pump()
        if os.path.exists(done):
            time.sleep(POLL)  # the guest closes its outputs before the marker
            for f in followers:
                f.pump()
            text = open(done).read().strip()
            try:
                return int(text) & 255
            except ValueError:
                print(f"{PROG}: error: guest {guest}: bad exit status {text!r}",
                      file=sys.stderr)
                return 1
        if not _alive(record):
            print(f"{PROG}: error: guest {guest} stopped before its job finished; "
                  f"console tail:\n{read_tail(os.path.join(out, f'{guest}_console.out'), 15)}",
                  file=sys.stderr)
            return 1
        time.sleep(POLL)


# --- console ------------------------------------------------------------------

def console(guest: int, job_dir: str | None) -> int:
    """Without job_dir: hop to the guest's node with srun, whose task gets
    the node's job directory as CH_JOB_DIR (the shim sets it)."""
    if job_dir is None:
        return _console_via_srun(guest)
    job_dir = _step_job_dir(job_dir, "console")
    sock_path = os.path.join(job_dir, "run", f"{guest}.console")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError as e:
        raise UserError("console", f"cannot connect: {e.strerror}", sock_path,
                        hint="the guest runs on another node, or is not running") from None
    tty = os.isatty(0)
    saved = None
    if tty:
        import termios
        import tty as ttymod
        saved = termios.tcgetattr(0)
        ttymod.setraw(0)
        os.write(1, f"[{PROG}: console of guest {guest}; Ctrl-] quits]\r\n".encode())
    try:
        eof_in = False
        while True:
            fds = [s] + ([] if eof_in else [0])
            ready, _, _ = select.select(fds, [], [])
            if s in ready:
                data = s.recv(65536)
                if not data:
                    return 0
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 4096)
                if not data:
                    eof_in = True  # keep showing output until the guest closes
                    if not tty:
                        _drain(s)
                        return 0
                    continue
                if tty and b"\x1d" in data:
                    return 0
                s.sendall(data)
    finally:
        if saved is not None:
            import termios
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        s.close()


def _drain(s: socket.socket, quiet: float = 3.0) -> None:
    """After stdin ends (non-interactive use): show output until it is quiet."""
    while True:
        ready, _, _ = select.select([s], [], [], quiet)
        if not ready:
            return
        data = s.recv(65536)
        if not data:
            return
        os.write(1, data)




def ssh(guest: int, command: list[str], job_dir: str | None) -> int:
    """ssh into guest N as yourself: through the unix socket of its relay in
    the 0700 job directory (job network), else the port forward on the
    node's loopback (multicast network)."""
    if job_dir is None:
        return _console_via_srun(guest, "ssh", command)
    job_dir = _step_job_dir(job_dir, "ssh")
    key = os.path.join(job_dir, "meta", "ssh", "id_ed25519")
    known = os.path.join(job_dir, "meta", "ssh", "known_hosts")
    argv = ["ssh", "-q", "-i", key, "-o", f"UserKnownHostsFile={known}",
            "-o", f"HostKeyAlias=chgu{guest}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    sock = os.path.join(job_dir, "run", layout.SSH_SOCKET.format(guest=guest))
    if os.path.exists(sock):
        argv += ["-o", f"ProxyCommand={_this_program()} ssh-proxy {sock}"]
        host = f"chgu{guest}"
    else:
        try:
            port = open(os.path.join(job_dir, "run", f"{guest}.ssh")).read().strip()
        except OSError:
            raise UserError("ssh", f"guest {guest} cannot be reached from here",
                            hint="the guest runs on another node, or the site turned "
                            "ssh off (vm.ssh_port_base = 0 on a multicast network)") from None
        argv += ["-p", port]
        host = "127.0.0.1"
    if os.isatty(0) and not command:
        argv.append("-t")
    argv += [host, *command]
    os.execvp("ssh", argv)
    return 1


def ssh_proxy(sock_path: str) -> int:
    """ssh's ProxyCommand: stdin/stdout <-> the relay's unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError as e:
        print(f"{PROG}: error: {sock_path}: {e.strerror}", file=sys.stderr)
        return 1
    _pump(s, 0, 1)
    return 0


def _pump(s: socket.socket, rfd: int, wfd: int) -> None:
    """Copy rfd -> s and s -> wfd until both directions are closed."""
    sel = {rfd: True, s.fileno(): True}
    while any(sel.values()):
        ready, _, _ = select.select([f for f, on in sel.items() if on], [], [])
        for f in ready:
            data = os.read(f, 65536) if f == rfd else s.recv(65536)
            if not data:
                sel[f] = False
                if f == rfd:
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                else:
                    return  # the guest side closed: ssh is done
                continue
            if f == rfd:
                s.sendall(data)
            else:
                _write_all(wfd, data)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def ssh_relay(sock_path: str, address: str, port: int = 22) -> int:
    """As the job user, in the job network's relay namespace (started by the
    prolog): accept on a unix socket in the 0700 job directory, connect each
    client to the guest's sshd over the job network.  No TCP port anywhere
    on the node."""
    import threading
    old = os.umask(0o077)
    try:
        if os.path.lexists(sock_path):
            os.unlink(sock_path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock_path)
    finally:
        os.umask(old)
    srv.listen(16)

    def serve(client: socket.socket) -> None:
        try:
            with client, socket.create_connection((address, port), timeout=30) as up:
                up.settimeout(None)
                _splice(client, up)
        except OSError:
            pass

    while True:
        client, _ = srv.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways between two sockets until both sides have closed."""
    open_ = {a: b, b: a}
    while open_:
        ready, _, _ = select.select(list(open_), [], [])
        for src in ready:
            data = src.recv(65536)
            dst = open_[src]
            if not data:
                del open_[src]
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            dst.sendall(data)


def _step_job_dir(job_dir: str, what: str) -> str:
    """"-": this node's job directory, which the shim gives every task of the
    job as CH_JOB_DIR (the srun hop lands here)."""
    if job_dir != "-":
        return job_dir
    found = os.environ.get("CH_JOB_DIR")
    if not found:
        raise UserError(what, "no CH_JOB_DIR in this step",
                        hint="the job is not a charlie VM job")
    return found


def _console_via_srun(guest: int, what: str = "console",
                      command: list[str] | None = None) -> int:
    job, nodes = jobenv.allocation(os.environ)
    if not job or not nodes:
        raise UserError("console", "not inside a job's allocation",
                        hint="run it in salloc, or: srun --jobid=JOB --overlap "
                        f"{PROG} console N")
    names = hostlist.expand(nodes)
    if not 0 <= guest < len(names):
        raise UserError("console", f"no guest {guest} in this job",
                        hint=f"guests are 0 .. {len(names) - 1}")
    node = names[guest]
    argv = [slurm_tool("srun"), "--overlap", "-N1", "-n1", "-w", node,
            "--quiet", f"--export=ALL,{ON_HOST}=1"]
    if os.isatty(0):
        argv.append("--pty")
    argv += [_this_program(), what, "--job-dir", "-", str(guest), *(command or [])]
    return run_attached(argv)


# --- commit a kept overlay ------------------------------------------------------

def commit_kept(overlay: str, cfg: config.Config) -> int:
    from .backends.vm.disks import check_image, commit, image_info
    qemu_img = shutil.which(cfg["vm.qemu_img"]) or cfg["vm.qemu_img"]
    try:
        info = image_info(qemu_img, overlay, "qcow2")
    except UserError as e:
        raise UserError("commit", "not a qcow2 overlay", overlay, hint=e.hint) from None
    base = info.get("full-backing-filename") or info.get("backing-filename")
    fmt = info.get("backing-filename-format")
    if not base or fmt not in ("qcow2", "raw"):
        raise UserError("commit", "the overlay has no usable backing image", overlay)
    check_image(qemu_img, base, fmt, commit=True)
    ok, why = commit(qemu_img, overlay, cfg["timeouts.commit"])
    if not ok:
        raise UserError("commit", why, overlay,
                        hint="another job may be using the image; try again later")
    os.unlink(overlay)
    print(f"{PROG}: committed {overlay} into {base}", file=sys.stderr)
    return 0
