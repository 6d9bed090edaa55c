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
Network: the multicast group of the job (QEMU's socket netdev, no
privileges) or the root-built job network (asroot: VXLAN, bridge, TAP).

Rooms: disks (as the user: checks, overlay, commit, keep), probe (can the
node run the site's accel), sizing (guest memory and bounds), qemu (the
command line), helpers (task multiplexer, ssh relay), jobend (power-off,
commit, outputs).  This module only puts them in order.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

from ... import asroot, config, images, layout
from ...errors import NodeFault, UserError
from ...files import lstat_in_job, read_tail, write_file
from ...log import log
from ...meta import addresses, guest_mac
from ...options import Options
from ...procfs import comm_of
from ...proc import call_as
from ..base import Backend, Context
from . import disks, helpers, jobend, qemu, sizing
from .probe import probe

WAIT_MARKER = layout.SHIM_FILES["guest_wait"]


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
        disks.check_image(qemu_img, opts.image, fmt, opts.commit is not None)

    def task_env(self, ctx: Context) -> list[tuple[str, str]]:
        env = [("CH_META", ctx.paths.meta)]
        env += [(f"CH_DATA{i}", d) for i, d in enumerate(ctx.opts.dir, start=1)]
        return env

    def start(self, ctx: Context) -> dict[str, Any]:
        cfg, p, n = ctx.cfg, qemu.guest_paths(ctx), ctx.guest_id
        _, fmt = call_as(ctx.user, images.detect, ctx.opts.image)
        qemu_img = shutil.which(cfg["vm.qemu_img"])
        qemu_bin = shutil.which(cfg["vm.qemu"])
        for key, found in (("vm.qemu_img", qemu_img), ("vm.qemu", qemu_bin)):
            if found is None:
                raise NodeFault(key, "not found on this node", cfg[key],
                                hint="install qemu-system-x86 and qemu-utils")
        if cfg["vm.kernel"]:  # the probe boots the site's kernel
            probe(ctx, qemu_bin)
        # the image itself was checked as the user by validate.resolve (the
        # prolog's prepare step calls this back end's check())
        tmp_mib = ctx.opts.tmp_size or cfg["vm.tmp_size_mib"]
        mem, source, job_mib = sizing.guest_memory(ctx)
        sizing.check_bounds(ctx, mem, job_mib, tmp_mib)
        cache, vsize = call_as(ctx.user, disks.make_disks, qemu_img, ctx.opts.image, fmt,
                               p["overlay"], p["tmp"], tmp_mib)
        sizing.check_disk_space(ctx, tmp_mib, vsize)
        warnings = []
        if cache != "none":
            warnings.append(f"node {ctx.node}: the runtime directory has no O_DIRECT; "
                            "guest disks use the host page cache (cache=writeback)")
        call_as(ctx.user, disks.remove_files, *(p[k] for k in ("qmp", "console", "ready",
                                                                 "down")))
        log.info("guest %d memory: %d MiB (%s)", n, mem, source)
        ctx = dataclasses.replace(ctx, mem_mib=mem)
        net, net_fds, net_facts = None, [], {}
        if cfg["vm.network"] == "vxlan":
            guest_ips, host_ips, prefix = addresses(cfg["vm.subnet"], len(ctx.nodes))
            net_facts = asroot.create_job_network(
                ctx.job_id, n, ctx.nodes, cfg["vm.vxlan_port"], cfg["vm.node_addresses"],
                relay=(f"{host_ips[n]}/{prefix}", guest_ips[n], guest_mac(ctx.job_id, n)))
            net_fds.append(asroot.open_tap(ctx.job_id))
            vhost = asroot.open_vhost()
            if vhost is not None:
                net_fds.append(vhost)
            net = (net_fds[0], vhost, int(net_facts["mtu"]))
        gpus = self._take_gpus(ctx)
        argv = qemu.argv(ctx, cache, fmt, net, tuple(gpus))
        log.info("starting guest %d as %s: %s", n, ctx.user, " ".join(argv))
        fd = asroot.open_out_as_root(ctx.paths, ctx.user.uid, f"{n}_qemu.log")
        try:
            if fd is None:
                raise UserError("job directory", "cannot open", p["qemu_log"],
                                hint="was out/ changed while the job started?")
            joined: list[str] = []
            memlock = ((mem + 1024) << 20) if gpus else 0
            locked: list[int] = []
            in_job = ctx.spawned_in_job(joined, job_mib)

            def record(rec: Any) -> None:
                in_job(rec)
                if memlock:  # before QEMU runs (it waits at the spawn gate)
                    locked.append(asroot.vfio_set_memlock(rec.pid, memlock))
            proc, rec = asroot.spawn(ctx.user, argv, fd, "qemu", record, pass_fds=net_fds)
        finally:
            for f in ([fd] if fd is not None else []) + net_fds:
                os.close(f)  # QEMU holds the TAP now: it goes away with QEMU
        if joined:
            log.info("guest %d: QEMU in the job's cgroups %s", n, " ".join(joined))
        short = ""
        if locked and locked[0] < memlock:
            short = (f"QEMU may lock only {locked[0] >> 20} MiB here and VFIO pins all of "
                     f"the guest's memory ({memlock >> 20} MiB with QEMU's own): its GPU "
                     "cannot be mapped. The node needs slurmd started with "
                     "LimitMEMLOCK=infinity, or root with CAP_SYS_RESOURCE")
            log.warning("guest %d: %s", n, short)
            warnings.append(short)
        elif locked:
            log.info("guest %d: QEMU may lock %d MiB (VFIO pins guest memory)", n,
                     locked[0] >> 20)
        info = {**net_facts, **self._gpu_facts, "guest": n, "image": ctx.opts.image,
                "format": fmt,
                "commit": ctx.opts.commit == n, "work_dir": ctx.work_dir,
                "batch": bool(ctx.opts.job) and not ctx.opts.interactive}
        call_as(ctx.user, write_file, p["record"], f"{proc.pid} {rec.start}\n", 0o600)
        port = qemu.ssh_port(cfg, ctx.job_id)
        if port:
            call_as(ctx.user, write_file, f"{ctx.paths.run}/{n}.ssh", f"{port}\n", 0o600)
        outcome = asroot.wait_until_ready(
            proc, lambda: lstat_in_job(ctx.paths, "meta", "sync", f"{n}.ready") is not None,
            cfg["timeouts.boot"], poll=0.1)
        if outcome == asroot.STOPPED:
            raise UserError(f"guest {n}", "QEMU was stopped (SIGSTOP) while the "
                            "guest booted", hint="the job fails, the node stays "
                            "in service")
        if outcome == asroot.EXITED:
            qlog = call_as(ctx.user, read_tail, p["qemu_log"], 5, limit=30)
            con = call_as(ctx.user, read_tail, p["console_log"], 10, limit=30)
            raise UserError(f"guest {n}", f"QEMU exited with {proc.returncode} "
                            "before the guest was ready",
                            (qlog or con).strip().splitlines()[-1] if (qlog or con)
                            else None,
                            hint=(f"{short}\n" if short else "")
                            + f"console tail:\n{con}\n(check vm.accel and "
                            "vm.cpu_model in the site config if QEMU itself failed)")
        if outcome == asroot.TIMED_OUT:
            con = call_as(ctx.user, read_tail, p["console_log"], 15, limit=30)
            raise UserError(f"guest {n}", "not ready after "
                            f"{cfg['timeouts.boot']} s (timeouts.boot)",
                            hint=f"console tail:\n{con}")
        if net_facts.get("relay_netns"):
            helpers.start_relay(ctx, str(net_facts["relay_netns"]), guest_ips[n])
        if not info["batch"]:
            helpers.start_mux(ctx)
        if info["batch"] and n == 0:
            call_as(ctx.user, write_file, os.path.join(ctx.paths.run, WAIT_MARKER), "0\n",
                    0o600)
        log.info("guest %d ready", n)
        info["warnings"] = warnings
        return info

    def _take_gpus(self, ctx: Context) -> list:
        """The job's GPUs on this node, taken from the host's driver for the
        guest (asroot.vfio_*), recorded first so that the epilog gives them
        back whatever happens next."""
        self._gpu_facts: dict[str, Any] = {}
        if not ctx.gpus:
            return []
        mig = [g.mig for g in ctx.gpus if g.mig]
        if mig:
            raise UserError("VM with GPUs", f"MIG device {mig[0]} cannot be given to a "
                            "guest: a guest takes whole PCI devices",
                            hint="ask for whole GPUs (a gres type without MIG) for VM jobs")
        root = config.expand_node(ctx.cfg["gpu.vfio_root"], ctx.node)
        devices = asroot.vfio_plan(root, [g.pci for g in ctx.gpus])
        held = asroot.vfio_busy([g.device for g in ctx.gpus])
        if held:
            dev, pids = next(iter(held.items()))
            # the job fails, the node stays: with ConstrainDevices off a user's
            # process could hold it, and no user may drain a node
            raise UserError(f"GPU {dev}", "in use: a guest cannot take it",
                            f"pid {' '.join(map(str, pids))} ({comm_of(pids[0], 'gone')})",
                            hint="nothing on a node that gives GPUs to VM jobs may hold "
                            "them open: no persistence daemon (nvidia-persistenced), no "
                            "monitoring agent (docs/admin.rst \"GPUs in VMs\")")
        self._gpu_facts = {"vfio_root": root, "vfio": [d.to_dict() for d in devices]}
        ctx.noted(self._gpu_facts)
        asroot.vfio_take(root, devices, ctx.user.uid)
        return devices

    # -- epilog ---------------------------------------------------------------
    def stop(self, ctx: Context, record: Any) -> None:
        """The guest ended (jobend), then its GPUs given back to the host's
        driver, even when the guest would not end (the node fault of the
        first comes first)."""
        fault = None
        try:
            jobend.end_guest(ctx, record)
        except NodeFault as e:
            fault = e
        facts = record.facts if record is not None else {}
        if facts.get("vfio"):
            devices = [asroot.VfioDevice.from_dict(d) for d in facts["vfio"]]
            try:
                asroot.vfio_give_back(str(facts["vfio_root"]), devices)
            except NodeFault as e:
                fault = fault or e
        if fault is not None:
            raise fault

