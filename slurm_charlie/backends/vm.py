"""VM back end: one QEMU guest per node, started by the prolog as the job user.

Per node (guest N = the node's index in the job's node list), in run/:
    N.overlay.qcow2   the guest's root disk: qcow2 overlay on the image
                      (explicit backing format, never probed)
    N.tmp.qcow2       /ch/tmp
    N.qmp, N.console  QMP and serial console sockets
    N.qemu            "PID STARTTIME" of QEMU
    guest-wait        batch mode: the shim runs `slurm-charlie guest-wait`
                      as the batch step (guest 0's output and exit code)
Shares (9p, QEMU as the user, security_model=none): meta (read-only),
meta/sync and out (read-write), opt (slurm_charlie/guest), data1-4.
Network: every guest of a job joins one UDP multicast group (QEMU's socket
netdev, no privileges, no host devices); group and port come from the job id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import stat
import sys
import time
from typing import Any

from .. import config, images, jobnet, layout, privileged
from ..errors import NodeFault, UserError
from ..layout import read_small, read_tail, write_file
from ..meta import addresses, guest_mac
from ..options import Options, parse_size_mib
from ..proc import User, call_as, is_zombie, log, pids_of, run, starttime
from . import Backend, Context

GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guest")
WAIT_MARKER = layout.SHIM_FILES["guest_wait"]
TASKS_SOCKET = layout.SHIM_FILES["guest_tasks"]  # the shim relays tasks when it exists
AGENT_PORT = "org.slurm-charlie.tasks"  # the virtio-serial port's name (guest/agent.py)
#: the guest's second NIC: QEMU user-mode networking, restricted (no way
#: out), only for the ssh port forward from the node's loopback
HOST_NIC_MAC = "52:56:00:00:00:02"


# --- image checks (as the user) --------------------------------------------

def image_info(qemu_img: str, image: str, fmt: str) -> dict[str, Any]:
    p = run([qemu_img, "info", "--output=json", "-f", fmt, image], timeout=60, check=False)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        raise UserError("--charlie-image", f"qemu-img cannot read it as {fmt}",
                        image, hint=(err[-1] if err else "check the file"))
    return json.loads(p.stdout)


def check_image(qemu_img: str, image: str, fmt: str, commit: bool) -> dict[str, Any]:
    """Refuse images QEMU must not open for us (docs/faq.rst, "No bootable
    device"; docs/security.rst)."""
    info = image_info(qemu_img, image, fmt)
    if not info.get("virtual-size"):
        raise UserError("--charlie-image", "virtual size is 0 (empty disk: the "
                        "guest would find no bootable device)", image)
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("corrupt"):
        raise UserError("--charlie-image", "qcow2 image is marked corrupt", image,
                        hint=f"qemu-img check -r all {image} (on a copy first)")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UserError("--charlie-image", "has a backing file ("
                        f"{info.get('backing-filename')}); refused because a "
                        "backing file can point at any file", image,
                        hint=f"flatten it: qemu-img convert -O qcow2 {image} NEW.qcow2")
    if data.get("data-file"):
        raise UserError("--charlie-image", f"has an external data file "
                        f"({data['data-file']}); refused", image,
                        hint=f"flatten it: qemu-img convert -O qcow2 {image} NEW.qcow2")
    if commit and not os.access(image, os.W_OK):
        raise UserError("--charlie-commit", "image not writable by you", image,
                        hint="commit needs write access to the image; drop "
                        "--charlie-commit or use your own copy")
    return info


# --- prolog steps as the user -----------------------------------------------

def _qcow2_size_mib(path: str) -> int:
    """Virtual size of a qcow2 file from its header (bytes 24-31)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        head = os.pread(fd, 32, 0)
    finally:
        os.close(fd)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        raise UserError("vm disks", "overlay is not a qcow2 file", path)
    return -(-int.from_bytes(head[24:32], "big") // (1 << 20))


def _make_disks(qemu_img: str, image: str, fmt: str, overlay: str, tmp: str,
                tmp_mib: int) -> tuple[str, int]:
    """Overlay and tmp disk (recreated: a rerun prolog starts fresh).
    Returns the cache mode (none, i.e. O_DIRECT, where the file system has
    it) and the overlay's virtual size in MiB (the image's)."""
    _remove(overlay, tmp)
    for argv in ([qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt, "-b", image, overlay],
                 [qemu_img, "create", "-q", "-f", "qcow2", tmp, f"{tmp_mib}M"]):
        p = run(argv, timeout=60, check=False)
        if p.returncode != 0:
            raise UserError("vm disks", "qemu-img create failed",
                            p.stderr.decode(errors="replace").strip())
    size = _qcow2_size_mib(overlay)
    try:
        fd = os.open(overlay, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        return "none", size
    except OSError:
        return "writeback", size


def _qmp(sock_path: str, command: str, timeout: float = 5.0) -> bool:
    """Send one QMP command; True when QEMU acknowledged it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline() or b"{}")
                    if "event" not in reply:
                        break
                if "error" in reply or not reply:
                    return False
            return True
    except (OSError, ValueError):
        return False


def _poweroff_as_user(sync_dir: str, qmp: str) -> bool:
    """Ask the guest to power off: a marker it polls, then the ACPI button."""
    try:  # never through a link, never blocking on a FIFO planted there
        fd = os.open(os.path.join(sync_dir, "poweroff"), os.O_WRONLY | os.O_CREAT
                     | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, b"epilog\n")
        finally:
            os.close(fd)
    except OSError:
        pass
    return _qmp(qmp, "system_powerdown")


def _commit(qemu_img: str, overlay: str, timeout: int) -> tuple[bool, str]:
    """qemu-img commit, retried while another process holds the image
    (QEMU's image locks: a running guest of any job keeps the base locked)."""
    deadline = time.monotonic() + timeout
    while True:
        p = run([qemu_img, "commit", "-f", "qcow2", "-d", overlay],
                timeout=max(60, timeout), check=False)
        err = p.stderr.decode(errors="replace").strip()
        if p.returncode == 0:
            return True, ""
        if "lock" not in err or time.monotonic() > deadline:
            return False, err.splitlines()[-1] if err else f"exit {p.returncode}"
        time.sleep(1)


def _keep(overlay: str, kept_dir: str, name: str) -> str:
    """Move the overlay into kept_dir under name, or name.1, .2 … when a
    job of a reused id kept one there before: nothing kept is overwritten."""
    base, ext = name.removesuffix(".overlay.qcow2"), ".overlay.qcow2"
    for i in range(1000):
        dst = os.path.join(kept_dir, f"{base}{'' if i == 0 else f'.{i}'}{ext}")
        try:
            os.link(overlay, dst)  # fails on an existing name, unlike rename
        except FileExistsError:
            continue
        os.unlink(overlay)
        return dst
    raise UserError("vm", "too many kept overlays of this job id", kept_dir)


def _save_outputs(out_dir: str, work_dir: str, name: str, guest: int,
                  extra: str | None) -> str | None:
    """As the user: copy this guest's outputs into <work_dir>/<name> (the job
    directory goes at job end).  The directory is the user's own (created
    here, or made by another node of the job): one that is someone else's,
    not a directory, or writable by others is left alone and
    <name>.1, .2 … is used instead.  Files are created afresh, never
    through a link.  Returns the directory or None."""
    try:
        wfd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        log.warning("cannot save guest outputs to %s: %s", work_dir, e.strerror)
        return None
    try:
        for attempt in range(100):
            dest = name if attempt == 0 else f"{name}.{attempt}"
            try:
                os.mkdir(dest, 0o755, dir_fd=wfd)
            except FileExistsError:
                pass
            except OSError as e:
                log.warning("cannot save guest outputs in %s: %s", work_dir, e.strerror)
                return None
            try:
                dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=wfd)
            except OSError:
                continue
            st = os.fstat(dfd)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                os.close(dfd)
                continue
            try:
                _copy_outputs(out_dir, dfd, guest, extra)
            finally:
                os.close(dfd)
            return os.path.join(work_dir, dest)
        return None
    except OSError as e:
        log.warning("cannot save guest outputs to %s: %s", work_dir, e.strerror)
        return None
    finally:
        os.close(wfd)


def _copy_outputs(out_dir: str, dfd: int, guest: int, extra: str | None) -> None:
    def create(fname: str) -> int:
        try:  # a link or file of that name in our own directory: replaced
            os.unlink(fname, dir_fd=dfd)
        except FileNotFoundError:
            pass
        return os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                       0o644, dir_fd=dfd)

    ofd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for fname in sorted(os.listdir(ofd)):
            if not fname.startswith(f"{guest}_"):
                continue
            try:
                src = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                              dir_fd=ofd)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(src).st_mode):
                    continue
                dst = create(fname)
                try:
                    while chunk := os.read(src, 1 << 20):
                        os.write(dst, chunk)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
    finally:
        os.close(ofd)
    if extra:
        dst = create(f"{guest}_commit.txt")
        try:
            os.write(dst, (extra + "\n").encode())
        finally:
            os.close(dst)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- the back end -------------------------------------------------------------

PROBE_FILE = ".vm-probe"


def _cpu_model(cfg: config.Config) -> str:
    return cfg["vm.cpu_model"] or ("host" if cfg["vm.accel"] == "kvm" else "max")


def _probe_key(qemu: str, accel: str, cpu: str, kernel: str) -> str:
    parts = [accel, cpu]
    for path in (qemu, kernel):
        try:
            st = os.stat(path)
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:missing")
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:32]


def probe_user() -> User:
    """Whom node checks run as: `nobody`, no job user's."""
    import pwd
    try:
        return User.lookup(pwd.getpwnam("nobody").pw_uid)
    except KeyError:
        return User.lookup(65534)


def probe_boot(cfg: config.Config, qemu: str) -> None:
    """Boot the site's kernel with the site's accel and CPU model as
    `nobody` until it panics; NodeFault (with the fix) when QEMU cannot."""
    accel, cpu = cfg["vm.accel"], _cpu_model(cfg)
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", accel, "-cpu", cpu, "-smp", "1", "-m", "256M",
            "-kernel", cfg["vm.kernel"], "-append", "console=ttyS0 panic=-1",
            "-serial", "stdio"]
    hint = ("set vm.accel and vm.cpu_model in the site config to what this node "
            "runs (tcg and max always work; -cpu host needs a working KVM)")
    try:
        p = run(argv, as_user=probe_user(), timeout=cfg["timeouts.probe"], check=False)
    except NodeFault:
        raise NodeFault("vm.accel/vm.cpu_model", f"a test guest with -accel {accel} "
                        f"-cpu {cpu} did not finish booting within "
                        f"{cfg['timeouts.probe']} s", cfg["vm.kernel"], hint=hint) from None
    out = p.stdout.decode(errors="replace")
    if p.returncode == -9 and "Kernel panic" not in out:  # killed from outside
        raise UserError("vm probe", f"the node's QEMU check was killed by signal "
                        f"{-p.returncode} before it finished", cfg["vm.kernel"],
                        hint="the job fails; the next VM job here checks again")
    if p.returncode != 0 or "Kernel panic" not in out:
        err = (p.stderr.decode(errors="replace").strip() or out.strip()).splitlines()
        raise NodeFault("vm.accel/vm.cpu_model", f"QEMU cannot run -accel {accel} "
                        f"-cpu {cpu} here (exit {p.returncode})",
                        err[-1] if err else None, hint=hint)


def probe(ctx: Context, qemu: str) -> None:
    """Can this node run the site's accel and CPU model?  Boots the guest
    kernel with no root file system until it panics (QEMU then exits, thanks
    to -no-reboot) -- once per node and setting; the result is kept in
    <runtime_root>/.vm-probe.  A node that cannot is a node fault
    (docs/faq.rst, "The probe guest does not boot": a CPU model or
    accelerator the host lacks; here KVM hangs and -cpu host aborts).  It
    runs as the unprivileged `nobody`, not as the job user, who
    could otherwise kill it and make the node look broken; a probe killed
    from outside (SIGKILL: the OOM killer, an admin) proves nothing and fails
    only this job.  QEMU aborting by itself (-cpu host on a host without it)
    is the node's fault."""
    cfg = ctx.cfg
    accel, cpu = cfg["vm.accel"], _cpu_model(cfg)
    record = os.path.join(ctx.paths.root, PROBE_FILE)
    key = _probe_key(qemu, accel, cpu, cfg["vm.kernel"])
    if (read_small(record) or "").strip() == key:
        return
    probe_boot(cfg, qemu)
    write_file(record, key + "\n")
    log.info("probe: -accel %s -cpu %s works here", accel, cpu)


def parse_job_memory(scontrol_line: str, cpus: int) -> int | None:
    """MiB per node the job asked for, from `scontrol -o show job`
    (MinMemoryNode, or MinMemoryCPU x this node's CPUs); None when not set.
    Sizes are read by the same parser as the options' (options.parse_size_mib)."""
    fields = dict(kv.split("=", 1) for kv in scontrol_line.split() if "=" in kv)
    for key, factor in (("MinMemoryNode", 1), ("MinMemoryCPU", cpus)):
        value = fields.get(key, "")
        if not value:
            continue
        try:
            return parse_size_mib(key, value) * factor
        except UserError:  # 0 (not set) or something Slurm did not mean as a size
            continue
    return None


def job_memory(ctx: Context) -> int | None:
    """MiB the job has on this node (its --mem/--mem-per-cpu), None when it
    asked for none."""
    scontrol = shutil.which("scontrol") or "/usr/bin/scontrol"
    try:
        p = run([scontrol, "-o", "show", "job", ctx.job_id], timeout=30, check=False)
    except NodeFault:
        return None
    return parse_job_memory(p.stdout.decode(errors="replace"), ctx.cpus) \
        if p.returncode == 0 else None


def guest_memory(ctx: Context) -> tuple[int, str, int | None]:
    """(MiB, where from, the job's MiB on the node or None): --charlie-mem,
    else the job's memory request minus vm.memory_overhead_mib, else
    vm.memory_mib."""
    cfg = ctx.cfg
    asked = job_memory(ctx)
    if ctx.opts.mem:
        return ctx.opts.mem, "--charlie-mem", asked
    if asked:
        return max(128, asked - cfg["vm.memory_overhead_mib"]), \
            f"the job's {asked} MiB minus vm.memory_overhead_mib", asked
    return cfg["vm.memory_mib"], "vm.memory_mib", None


def _node_memory_mib() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def check_bounds(ctx: Context, mem: int, job_mib: int | None, tmp_mib: int) -> None:
    """The guest stays inside the job's allocation on this node: CPUs <= the
    job's CPUs here, memory + QEMU's share <= the job's memory here (or the
    node's memory when the job asked for none), tmp disk <= the site bound."""
    cfg = ctx.cfg
    cpus = ctx.opts.cpus or ctx.cpus
    if cpus > ctx.cpus:
        raise UserError("--charlie-cpus", f"{cpus} guest CPUs, but the job has "
                        f"{ctx.cpus} CPUs on {ctx.node}", cpus,
                        hint="ask Slurm for more (-c/--cpus-per-task, --ntasks-per-node) "
                        "or give a smaller --charlie-cpus")
    need = mem + cfg["vm.memory_overhead_mib"]
    have, what = (job_mib, "the job's memory") if job_mib else \
        (_node_memory_mib(), "the node's memory")
    if need > have:
        raise UserError("--charlie-mem" if ctx.opts.mem else "guest memory",
                        f"{mem} MiB guest memory + {cfg['vm.memory_overhead_mib']} MiB "
                        f"for QEMU exceed {what} on {ctx.node} ({have} MiB)", mem,
                        hint="ask Slurm for more memory (--mem) or give a smaller "
                        "--charlie-mem")
    limit = cfg["vm.disk_max_mib"]
    if limit and tmp_mib > limit:
        raise UserError("--charlie-tmp-size", f"{tmp_mib} MiB is more than this site "
                        f"allows ({limit} MiB, vm.disk_max_mib)", tmp_mib,
                        hint="give a smaller --charlie-tmp-size")


def check_disk_space(ctx: Context, tmp_mib: int, image_mib: int) -> None:
    """The guest's disks can grow to tmp + the image's virtual size: that
    must fit the site bound and the free space of the runtime root."""
    limit = ctx.cfg["vm.disk_max_mib"]
    total = tmp_mib + image_mib
    if limit and total > limit:
        raise UserError("vm disks", f"/ch/tmp ({tmp_mib} MiB) and the image's virtual "
                        f"size ({image_mib} MiB) exceed this site's bound "
                        f"({limit} MiB, vm.disk_max_mib)", ctx.opts.image,
                        hint="give a smaller --charlie-tmp-size or use a smaller image")
    fd = os.open(ctx.paths.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    free = st.f_bavail * st.f_frsize >> 20
    if total > free:
        raise UserError("vm disks", f"/ch/tmp ({tmp_mib} MiB) and the image's virtual "
                        f"size ({image_mib} MiB) could outgrow the {free} MiB free on "
                        f"{ctx.node}", ctx.opts.image,
                        hint="give a smaller --charlie-tmp-size, or ask the site for "
                        "nodes with more local disk")


def ssh_port(cfg: config.Config, job_id: str) -> int:
    """The loopback port forward to guest:22 -- multicast network only; on
    the job network ssh goes through a unix socket (the relay)."""
    if cfg["vm.network"] != "multicast" or not cfg["vm.ssh_port_base"]:
        return 0
    return cfg["vm.ssh_port_base"] + int(job_id) % 20000


def _mcast(cfg: config.Config, job_id: str) -> tuple[str, int]:
    net = ipaddress.IPv4Network(cfg["vm.mcast_group"])
    group = net.network_address + int(job_id) % net.num_addresses
    return str(group), cfg["vm.mcast_port"] + int(job_id) % 10000


def _sweep(ctx: Context, role: str, needles: tuple[bytes, ...]
           ) -> privileged.ProcRecord | None:
    """No record (the prolog died before writing it): the job user's live
    process whose command line holds every needle (they name the job)."""
    for pid in pids_of(ctx.user.uid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read(1 << 16)
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        start = starttime(pid)
        if all(n in cmd for n in needles) and start and not is_zombie(pid):
            return privileged.ProcRecord(role, pid, start, ctx.user.uid, exe)
    return None


class VMBackend(Backend):
    name = "vm"

    def check(self, opts: Options, cfg: config.Config) -> None:
        if not opts.image:
            return
        _, fmt = images.detect(opts.image)
        qemu_img = shutil.which(cfg["vm.qemu_img"])
        if qemu_img is None:  # a login node without QEMU: the prolog checks
            log.debug("%s not found here; image checked on the nodes", cfg["vm.qemu_img"])
            return
        check_image(qemu_img, opts.image, fmt, opts.commit is not None)

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        env = [("CH_META", ctx.paths.meta)]
        env += [(f"CH_DATA{i}", d) for i, d in enumerate(ctx.opts.dir, start=1)]
        return env

    def _paths(self, ctx: Context) -> dict[str, str]:
        r, n = ctx.paths.run, ctx.guest_id
        return {"overlay": f"{r}/{n}.overlay.qcow2", "tmp": f"{r}/{n}.tmp.qcow2",
                "qmp": f"{r}/{n}.qmp", "console": f"{r}/{n}.console",
                "record": f"{r}/{n}.qemu", "qemu_log": f"{ctx.paths.out}/{n}_qemu.log",
                "console_log": f"{ctx.paths.out}/{n}_console.out",
                "ready": f"{ctx.paths.meta}/sync/{n}.ready",
                "agent": f"{r}/{n}.agent", "agent_status": f"{ctx.paths.meta}/sync/{n}.agent",
                "tasks": f"{r}/{TASKS_SOCKET}",
                "down": f"{ctx.paths.meta}/sync/{n}.down"}

    def argv(self, ctx: Context, cache: str, fmt: str,
             net: tuple[int, int | None, int] | None = None) -> list[str]:
        """QEMU's command line.  net: (TAP fd, vhost-net fd or None, MTU) of
        the root-built job network (vm.network = "vxlan"); None: the
        multicast network."""
        cfg, p, n = ctx.cfg, self._paths(ctx), ctx.guest_id
        cpus = ctx.opts.cpus or ctx.cpus
        mem = ctx.mem_mib or ctx.opts.mem or cfg["vm.memory_mib"]
        nic = f"virtio-net-pci,netdev=net0,mac={guest_mac(ctx.job_id, n)}"
        if net is not None:
            tap_fd, vhost_fd, mtu = net
            netdev = f"tap,id=net0,fd={tap_fd}" + (
                f",vhost=on,vhostfd={vhost_fd}" if vhost_fd is not None else "")
            nic += f",host_mtu={mtu}"  # the guest driver takes the segment's MTU
        else:
            group, port = _mcast(cfg, ctx.job_id)
            netdev = f"socket,id=net0,mcast={group}:{port}"
            if cfg["vm.mcast_localaddr"]:
                netdev += f",localaddr={cfg['vm.mcast_localaddr']}"
        argv = [cfg["vm.qemu"], "-name", f"charlie-{ctx.job_id}-chgu{n},process="
                f"charlie-{ctx.job_id}-chgu{n}", "-nodefaults", "-no-user-config",
                "-display", "none", "-accel", cfg["vm.accel"], "-cpu", _cpu_model(cfg),
                "-smp", str(cpus), "-m", f"{mem}M",
                *self._boot(cfg, n),
                "-drive", f"file={p['overlay']},format=qcow2,if=virtio,cache={cache},"
                "discard=unmap",
                "-drive", f"file={p['tmp']},format=qcow2,if=virtio,cache={cache},"
                "discard=unmap",
                "-netdev", netdev,
                "-device", nic,
                *self._host_nic(ctx),
                "-chardev", f"socket,id=con0,path={p['console']},server=on,wait=off,"
                f"logfile={p['console_log']},logappend=on",
                "-serial", "chardev:con0",
                # srun tasks: the guest's agent on a virtio-serial port, the
                # node's task multiplexer on QEMU's unix socket for it
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=tasks,path={p['agent']},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=tasks,name={AGENT_PORT}",
                "-qmp", f"unix:{p['qmp']},server=on,wait=off"]
        shares = [("meta", ctx.paths.meta, True), ("sync", f"{ctx.paths.meta}/sync", False),
                  ("out", ctx.paths.out, False), ("opt", GUEST_DIR, True)]
        shares += [(f"data{i}", d, False) for i, d in enumerate(ctx.opts.dir, start=1)]
        for tag, path, ro in shares:
            argv += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none"
                     + (",readonly=on" if ro else "")]
        return argv

    @staticmethod
    def _boot(cfg: config.Config, n: int) -> list[str]:
        """Direct kernel boot with the site's kernel and initrd, or (vm.kernel
        empty) the image's own boot loader from the first disk."""
        if not cfg["vm.kernel"]:
            return ["-boot", "order=c"]
        argv = ["-kernel", cfg["vm.kernel"],
                "-append", f"{cfg['vm.cmdline']} charlie.guest={n}"]
        if cfg["vm.initrd"]:
            argv += ["-initrd", cfg["vm.initrd"]]
        return argv

    @staticmethod
    def _host_nic(ctx: Context) -> list[str]:
        port = ssh_port(ctx.cfg, ctx.job_id)
        if not port:
            return []
        return ["-netdev", f"user,id=net1,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", f"virtio-net-pci,netdev=net1,mac={HOST_NIC_MAC}"]

    def start(self, ctx: Context) -> dict[str, Any]:
        cfg, p, n = ctx.cfg, self._paths(ctx), ctx.guest_id
        _, fmt = call_as(ctx.user, images.detect, ctx.opts.image)
        qemu_img = shutil.which(cfg["vm.qemu_img"])
        qemu = shutil.which(cfg["vm.qemu"])
        for key, found in (("vm.qemu_img", qemu_img), ("vm.qemu", qemu)):
            if found is None:
                raise NodeFault(key, "not found on this node", cfg[key],
                                hint="install qemu-system-x86 and qemu-utils")
        if cfg["vm.kernel"]:  # the probe boots the site's kernel
            probe(ctx, qemu)
        # the image itself was checked as the user by validate.resolve (the
        # prolog's prepare step calls this back end's check())
        tmp_mib = ctx.opts.tmp_size or cfg["vm.tmp_size_mib"]
        mem, source, job_mib = guest_memory(ctx)
        check_bounds(ctx, mem, job_mib, tmp_mib)
        cache, vsize = call_as(ctx.user, _make_disks, qemu_img, ctx.opts.image, fmt,
                               p["overlay"], p["tmp"], tmp_mib)
        check_disk_space(ctx, tmp_mib, vsize)
        warnings = []
        if cache != "none":
            warnings.append(f"node {ctx.node}: the runtime directory has no O_DIRECT; "
                            "guest disks use the host page cache (cache=writeback)")
        call_as(ctx.user, _remove, *(p[k] for k in ("qmp", "console", "ready", "down")))
        log.info("guest %d memory: %d MiB (%s)", n, mem, source)
        ctx = dataclasses.replace(ctx, mem_mib=mem)
        net, net_fds, net_facts = None, [], {}
        if cfg["vm.network"] == "vxlan":
            guest_ips, host_ips, prefix = addresses(cfg["vm.subnet"], len(ctx.nodes))
            net_facts = jobnet.create(ctx.job_id, n, ctx.nodes, cfg["vm.vxlan_port"],
                                      cfg["vm.node_addresses"],
                                      relay=(f"{host_ips[n]}/{prefix}", guest_ips[n],
                                             guest_mac(ctx.job_id, n)))
            net_fds.append(jobnet.open_tap(ctx.job_id))
            vhost = jobnet.open_vhost()
            if vhost is not None:
                net_fds.append(vhost)
            net = (net_fds[0], vhost, int(net_facts["mtu"]))
        argv = self.argv(ctx, cache, fmt, net)
        log.info("starting guest %d as %s: %s", n, ctx.user, " ".join(argv))
        fd = layout.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_qemu.log")
        try:
            if fd is None:
                raise UserError("job directory", "cannot open", p["qemu_log"],
                                hint="was out/ changed while the job started?")
            proc, rec = privileged.spawn(ctx.user, argv, fd, "qemu", ctx.spawned,
                                         pass_fds=net_fds)
        finally:
            for f in ([fd] if fd is not None else []) + net_fds:
                os.close(f)  # QEMU holds the TAP now: it goes away with QEMU
        joined = privileged.join_job_cgroup(ctx.node, rec, ctx.job_id, ctx.guest_id, job_mib)
        if joined:
            log.info("guest %d: QEMU in the job's cgroups %s", n, " ".join(joined))
        info = {**net_facts, "guest": n, "image": ctx.opts.image, "format": fmt,
                "commit": ctx.opts.commit == n, "work_dir": ctx.work_dir,
                "batch": bool(ctx.opts.job) and not ctx.opts.interactive}
        call_as(ctx.user, write_file, p["record"], f"{proc.pid} {rec.start}\n", 0o600)
        port = ssh_port(cfg, ctx.job_id)
        if port:
            call_as(ctx.user, write_file, f"{ctx.paths.run}/{n}.ssh", f"{port}\n", 0o600)
        deadline = time.monotonic() + cfg["timeouts.boot"]
        watch = privileged.StopWatch(proc.pid)
        while layout.lstat_in_job(ctx.paths, "meta", "sync", f"{n}.ready") is None:
            if watch.expired():
                proc.kill()  # our own child, not yet reaped: the pid is still it
                proc.wait()
                raise UserError(f"guest {n}", "QEMU was stopped (SIGSTOP) while the "
                                "guest booted", hint="the job fails, the node stays "
                                "in service")
            if proc.poll() is not None:
                qlog = call_as(ctx.user, read_tail, p["qemu_log"], 5, limit=30)
                con = call_as(ctx.user, read_tail, p["console_log"], 10, limit=30)
                raise UserError(f"guest {n}", f"QEMU exited with {proc.returncode} "
                                "before the guest was ready",
                                (qlog or con).strip().splitlines()[-1] if (qlog or con)
                                else None,
                                hint=f"console tail:\n{con}\n(check vm.accel and "
                                "vm.cpu_model in the site config if QEMU itself failed)")
            if time.monotonic() > deadline:
                proc.kill()  # our own child, not yet reaped: the pid is still it
                proc.wait()
                con = call_as(ctx.user, read_tail, p["console_log"], 15, limit=30)
                raise UserError(f"guest {n}", "not ready after "
                                f"{cfg['timeouts.boot']} s (timeouts.boot)",
                                hint=f"console tail:\n{con}")
            time.sleep(0.1)
        if net_facts.get("relay_netns"):
            self._start_relay(ctx, str(net_facts["relay_netns"]), guest_ips[n])
        if not info["batch"]:
            self._start_mux(ctx)
        if info["batch"] and n == 0:
            call_as(ctx.user, write_file, os.path.join(ctx.paths.run, WAIT_MARKER), "0\n",
                    0o600)
        log.info("guest %d ready", n)
        info["warnings"] = warnings
        return info

    def _start_relay(self, ctx: Context, netns: str, guest_ip: str) -> None:
        """The job user's ssh relay in its namespace on the job network: a
        unix socket in run/ to the guest's sshd.  ssh is a convenience: if
        the relay does not come up the job runs without it (logged)."""
        from ..vmtools import SSH_SOCKET
        n = ctx.guest_id
        name = SSH_SOCKET.format(guest=n)
        argv = [sys.executable, "-m", "slurm_charlie.cli", "ssh-relay",
                os.path.join(ctx.paths.run, name), guest_ip]
        fd = layout.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_relay.log")
        if fd is None:
            log.warning("guest %d: no ssh relay (cannot open its log)", n)
            return
        try:
            proc = privileged.spawn_in_netns(ctx.user, netns, argv, fd, "relay",
                                             ctx.spawned)
        finally:
            os.close(fd)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if layout.lstat_in_job(ctx.paths, "run", name) is not None:
                log.info("guest %d: ssh through %s/%s (relay in %s)", n,
                         ctx.paths.run, name, netns)
                return
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()  # our own child, not yet reaped: the pid is still it
        proc.wait()
        log.warning("guest %d: the ssh relay did not start (see out/%d_relay.log); "
                    "slurm-charlie ssh will not reach this guest", n, n)

    def _start_mux(self, ctx: Context) -> None:
        """The node's task multiplexer (as the user): srun tasks reach the
        guest's agent through it.  Without it no step could run, so a
        multiplexer that does not come up fails the job."""
        n, p = ctx.guest_id, self._paths(ctx)
        argv = [sys.executable, "-m", "slurm_charlie.cli", "task-mux", p["agent"], p["tasks"],
                p["agent_status"]]
        fd = layout.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_mux.log")
        if fd is None:
            raise UserError("job directory", "cannot open", f"{ctx.paths.out}/{n}_mux.log",
                            hint="was out/ changed while the job started?")
        try:
            proc, rec = privileged.spawn(ctx.user, argv, fd, "mux", ctx.spawned)
        finally:
            os.close(fd)
        deadline = time.monotonic() + 20
        watch = privileged.StopWatch(proc.pid)
        stopped = False
        while time.monotonic() < deadline and proc.poll() is None:
            # its socket (lstat only: a file or link the user put there is
            # not it, and the multiplexer must still be running)
            st = layout.lstat_in_job(ctx.paths, "run", TASKS_SOCKET)
            if st is not None and stat.S_ISSOCK(st.st_mode) and proc.poll() is None:
                log.info("guest %d: srun tasks through %s", n, p["tasks"])
                return
            if watch.expired():
                stopped = True
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()  # our own child, not yet reaped: the pid is still it
        proc.wait()
        if stopped:
            raise UserError(f"guest {n}", "the task multiplexer was stopped (SIGSTOP) "
                            "before it was ready", hint="the job fails, the node stays "
                            "in service")
        log_tail = call_as(ctx.user, read_tail, f"{ctx.paths.out}/{n}_mux.log", 5, limit=30)
        raise UserError(f"guest {n}", "the task multiplexer did not start",
                        log_tail.strip().splitlines()[-1] if log_tail.strip() else None,
                        hint=f"see out/{n}_mux.log in the job directory")

    @staticmethod
    def _stop_helper(ctx: Context, record: Any, role: str, command: str) -> None:
        """Stop the user's ssh relay ("relay", ssh-relay) or task multiplexer
        ("mux", task-mux): root's record, or without one the user's process
        whose command line names this job's run directory."""
        proc = record.proc(role) if record is not None else None
        if proc is None:
            proc = _sweep(ctx, role, (f"{command}\0{ctx.paths.run}/".encode(),))
        if proc is not None and privileged.alive(proc):
            privileged.stop_process(proc, 2, ctx.cfg["timeouts.kill"])

    # -- epilog ---------------------------------------------------------------
    def _sweep_qemu(self, ctx: Context) -> privileged.ProcRecord | None:
        """No record (the prolog died before writing it): the job user's
        QEMU whose command line names this job and its run directory."""
        return _sweep(ctx, "qemu", (f"charlie-{ctx.job_id}-chgu".encode(),
                                    ctx.paths.run.encode()))

    def stop(self, ctx: Context, record: Any) -> None:
        cfg = ctx.cfg
        self._stop_helper(ctx, record, "relay", "ssh-relay")
        self._stop_helper(ctx, record, "mux", "task-mux")
        facts = record.facts if record is not None else {}
        qemu = record.proc("qemu") if record is not None else self._sweep_qemu(ctx)
        n = facts.get("guest") if type(facts.get("guest")) is int else ctx.guest_id
        ctx = dataclasses.replace(ctx, guest_id=n)
        p = self._paths(ctx)
        clean = False
        if qemu is not None and privileged.alive(qemu):
            try:
                acked = call_as(ctx.user, _poweroff_as_user, f"{ctx.paths.meta}/sync",
                                p["qmp"], limit=30)
            except UserError as e:
                log.warning("guest %d: power-off request: %s", n, e.line())
                acked = False
            log.info("guest %d: power-off requested (ACPI %s)", n,
                     "acknowledged" if acked else "not acknowledged")
            if privileged.stop_process(qemu, cfg["timeouts.shutdown"], cfg["timeouts.kill"],
                                       first=None):
                down = call_as(ctx.user, read_small, p["down"], limit=30)
                clean = (down or "").startswith("clean")
            else:
                log.warning("guest %d: no clean power-off in %d s; QEMU killed",
                            n, cfg["timeouts.shutdown"])
        note = None
        if facts.get("commit") is True and isinstance(facts.get("image"), str):
            note = self._commit_or_keep(ctx, facts, p, clean)
        work_dir = facts.get("work_dir")
        if isinstance(work_dir, str) and work_dir.startswith("/"):
            saved = call_as(ctx.user, _save_outputs, ctx.paths.out, work_dir,
                            f"charlie-{ctx.job_id}", n, note, limit=120)
            if saved:
                log.info("guest %d outputs saved in %s", n, saved)

    def _commit_or_keep(self, ctx: Context, facts: dict[str, Any],
                        p: dict[str, str], clean: bool) -> str:
        cfg, n = ctx.cfg, ctx.guest_id
        qemu_img = shutil.which(cfg["vm.qemu_img"]) or cfg["vm.qemu_img"]
        image = facts.get("image")
        if clean:
            ok, why = call_as(ctx.user, _commit, qemu_img, p["overlay"],
                              cfg["timeouts.commit"], limit=2 * cfg["timeouts.commit"] + 120)
            if ok:
                msg = f"guest {n}: changes committed into {image}"
                log.info("%s", msg)
                return msg
        else:
            why = "the guest did not shut down cleanly"
        kept = layout.create_user_dir(cfg.kept_dir(ctx.node), ctx.user.uid, ctx.user.gid)
        dst = call_as(ctx.user, _keep, p["overlay"], kept,
                      f"job{ctx.job_id}-chgu{n}.overlay.qcow2", limit=60)
        msg = (f"guest {n}: NOT committed into {image} ({why}); its changes are "
               f"kept in {dst} on {ctx.node}; commit later with: "
               f"slurm-charlie commit {dst}")
        log.warning("%s", msg)
        return msg

