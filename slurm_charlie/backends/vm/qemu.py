"""QEMU's command line for a job's guest, and the names of the guest's
files in run/ and its network (pure: inputs -> argv)."""

from __future__ import annotations

import ipaddress
import os

from ... import config, layout
from ...meta import guest_mac
from ..base import Context
from .probe import cpu_model

GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "guest")
TASKS_SOCKET = layout.SHIM_FILES["guest_tasks"]  # the shim relays tasks when it exists
AGENT_PORT = "org.slurm-charlie.tasks"  # the virtio-serial port's name (guest/agent.py)
#: the guest's second NIC: QEMU user-mode networking, restricted (no way
#: out), only for the ssh port forward from the node's loopback
HOST_NIC_MAC = "52:56:00:00:00:02"


def ssh_port(cfg: config.Config, job_id: str) -> int:
    """The loopback port forward to guest:22 -- multicast network only; on
    the job network ssh goes through a unix socket (the relay)."""
    if cfg["vm.network"] != "multicast" or not cfg["vm.ssh_port_base"]:
        return 0
    return cfg["vm.ssh_port_base"] + int(job_id) % 20000


def mcast(cfg: config.Config, job_id: str) -> tuple[str, int]:
    net = ipaddress.IPv4Network(cfg["vm.mcast_group"])
    group = net.network_address + int(job_id) % net.num_addresses
    return str(group), cfg["vm.mcast_port"] + int(job_id) % 10000


def guest_paths(ctx: Context) -> dict[str, str]:
    r, n = ctx.paths.run, ctx.guest_id
    return {"overlay": f"{r}/{n}.overlay.qcow2", "tmp": f"{r}/{n}.tmp.qcow2",
            "qmp": f"{r}/{n}.qmp", "console": f"{r}/{n}.console",
            "record": f"{r}/{n}.qemu", "qemu_log": f"{ctx.paths.out}/{n}_qemu.log",
            "console_log": f"{ctx.paths.out}/{n}_console.out",
            "ready": f"{ctx.paths.meta}/sync/{n}.ready",
            "agent": f"{r}/{n}.agent", "agent_status": f"{ctx.paths.meta}/sync/{n}.agent",
            "tasks": f"{r}/{TASKS_SOCKET}",
            "down": f"{ctx.paths.meta}/sync/{n}.down"}


def argv(ctx: Context, cache: str, fmt: str,
         net: tuple[int, int | None, int] | None = None, gpus: tuple = ()) -> list[str]:
    """QEMU's command line.  net: (TAP fd, vhost-net fd or None, MTU) of
    the root-built job network (vm.network = "vxlan"); None: the
    multicast network.  gpus: the job's devices bound to vfio-pci
    (asroot.VfioDevice), the guest's ones handed to it."""
    cfg, p, n = ctx.cfg, guest_paths(ctx), ctx.guest_id
    cpus = ctx.opts.cpus or ctx.cpus
    mem = ctx.mem_mib or ctx.opts.mem or cfg["vm.memory_mib"]
    nic = f"virtio-net-pci,netdev=net0,mac={guest_mac(ctx.job_id, n)}"
    if net is not None:
        tap_fd, vhost_fd, mtu = net
        netdev = f"tap,id=net0,fd={tap_fd}" + (
            f",vhost=on,vhostfd={vhost_fd}" if vhost_fd is not None else "")
        nic += f",host_mtu={mtu}"  # the guest driver takes the segment's MTU
    else:
        group, port = mcast(cfg, ctx.job_id)
        netdev = f"socket,id=net0,mcast={group}:{port}"
        if cfg["vm.mcast_localaddr"]:
            netdev += f",localaddr={cfg['vm.mcast_localaddr']}"
    argv = [cfg["vm.qemu"], "-name", f"charlie-{ctx.job_id}-chgu{n},process="
            f"charlie-{ctx.job_id}-chgu{n}", "-nodefaults", "-no-user-config",
            "-display", "none", "-accel", cfg["vm.accel"], "-cpu", cpu_model(cfg),
            "-smp", str(cpus), "-m", f"{mem}M",
            *_boot(cfg, n), *_gpus(gpus),
            "-drive", f"file={p['overlay']},format=qcow2,if=virtio,cache={cache},"
            "discard=unmap",
            "-drive", f"file={p['tmp']},format=qcow2,if=virtio,cache={cache},"
            "discard=unmap",
            "-netdev", netdev,
            "-device", nic,
            *_host_nic(ctx),
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


def mmio_window_gib(gpus: tuple) -> int:
    """The guest's 64-bit PCI window: twice the GPUs' 64-bit BARs, a power
    of two, at least 64 GiB (large GPUs' BARs do not fit QEMU's default)."""
    need = 2 * sum(d.bar64 for d in gpus if d.guest)
    gib = 64
    while gib << 30 < need:
        gib *= 2
    return gib


def _gpus(gpus: tuple) -> list[str]:
    """q35 (PCIe) with a 64-bit MMIO window the GPUs fit in, and each of
    the job's GPUs by its PCI address."""
    if not gpus:
        return []
    argv = ["-machine", "q35", "-global", f"q35-pcihost.pci-hole64-size={mmio_window_gib(gpus)}G"]
    for i, d in enumerate(d for d in gpus if d.guest):
        argv += ["-device", f"vfio-pci,host={d.pci},id=gpu{i}"]
    return argv


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


def _host_nic(ctx: Context) -> list[str]:
    port = ssh_port(ctx.cfg, ctx.job_id)
    if not port:
        return []
    return ["-netdev", f"user,id=net1,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"virtio-net-pci,netdev=net1,mac={HOST_NIC_MAC}"]
