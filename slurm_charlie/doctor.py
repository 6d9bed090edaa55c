"""`slurm-charlie doctor`: run as root on a node, check what the hooks rely
on, and print the fix for each failure (with the FAQ entry where one
applies).  Each check returns (ok, what was seen, fix or None)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import Callable

from . import asroot, config, layout, reconcile
from .errors import CharlieError, NodeFault
from .proc import User, run, slurm_conf_keys, slurm_tool
from .procfs import fd_targets

Result = tuple[str, str, str | None]   # status (ok|warn|FAIL), seen, fix


def _runtime_root(cfg: config.Config, node: str) -> Result:
    root = cfg.runtime_root(node)
    try:
        config.check_root_safe(root)
        fd = asroot.open_root(root)
    except CharlieError as e:
        return "FAIL", e.line(), e.hint
    try:
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    free = st.f_bavail * st.f_frsize >> 20
    if free < 1024:
        return "warn", f"{root}: only {free} MiB free", \
            "VM overlays and tmp disks live here: give runtime_root a bigger local disk"
    return "ok", f"{root}: root-owned, not writable by others, {free} MiB free", None


def _records(cfg: config.Config, node: str) -> Result:
    path = os.path.join(cfg.runtime_root(node), layout.RECORD_DIR)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "ok", f"{path}: not made yet (the first prolog makes it)", None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        return "FAIL", f"{path}: not a root-only directory", f"rm -rf {path} " \
            "(the next prolog recreates it, mode 0700)"
    return "ok", f"{path}: root's records, mode 0700", None


def _background(node: str) -> Result:
    where = os.path.join(asroot.SETUP_DIR, node)
    why = asroot.prolog_lock_unusable(node)
    if why:
        return "warn", f"{why}: prologs prepare this node in the foreground", \
            f"rm -rf {where} (the next prolog makes it, root's, mode 0755); meanwhile " \
            "every charlie job's srun waits 0.2 s more (docs: 'The prolog returns at once')"
    return "ok", f"{where}: the background prologs' lock files (root's, mode 0755)", None


def _warm(cfg: config.Config, node: str) -> Result:
    if not cfg["hooks.warm"]:
        return "ok", "off (hooks.warm = false): every hook starts Python itself", None
    got = asroot.warm_running(node)
    if got is None:
        return "ok", "not running: the next charlie job's prolog starts it (or it ended " \
            f"after {cfg['hooks.warm_idle']} s without a job)", None
    return "ok", f"pid {got[0]}: forks each prolog and epilog " \
        f"({asroot.SETUP_DIR}/{node}/warm.sock)", None


def _pidfd() -> Result:
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError) as e:
        return "warn", f"pidfd_open: {e}", "Linux >= 5.3 and Python >= 3.9 let " \
            "the epilog signal processes through pidfds (else: checked kill())"
    os.close(fd)
    return "ok", "pidfd_open and pidfd_send_signal work", None


def _cgroups(node: str) -> Result:
    """The layout Slurm uses here, what its configuration says, and what is
    missing for root's processes to be bounded by the job's limits."""
    conf = asroot.slurm_cgroup_conf()
    lay = asroot.cgroup_layout(node)
    fs = asroot.cgroup_filesystem(conf.get("cgroupmountpoint") or lay.mnt)
    slurm = _slurm_config()
    plugins = " ".join(f"{k}={slurm.get(k, '?')}" for k in
                       ("ProctrackType", "TaskPlugin", "JobAcctGatherType"))
    said = f"mounts: {fs}; cgroup.conf: CgroupPlugin={conf.get('cgroupplugin', 'autodetect')}"
    flags = slurm.get("PrologFlags", "")
    if "runinjob" in flags.lower():
        return "FAIL", f"PrologFlags={flags}: the prolog runs inside the extern step, " \
            "whose end kills what it starts before the epilog can power guests off and " \
            "commit", "remove RunInJob from PrologFlags (Alloc,Contain is what " \
            "slurm-charlie expects; admin guide, \"cgroup v1 and v2\")"
    if lay.name == "none":
        if "cgroup" not in slurm.get("ProctrackType", "") and fs != "none":
            return "warn", f"{said}; Slurm keeps no cgroups: {plugins}", \
                "use proctrack/cgroup, task/cgroup and jobacct_gather/cgroup so that " \
                "Slurm confines and accounts every job (see the admin guide)"
        return "FAIL" if "cgroup" in slurm.get("ProctrackType", "") else "warn", \
            f"{said}; no usable layout ({lay.why})", \
            "set CgroupPlugin in cgroup.conf to what the node mounts (cgroup/v2 on a " \
            "cgroup2-only node, cgroup/v1 on a v1 or hybrid one)"
    roots = lay.roots()
    if not roots:
        return "warn", f"{said}; layout {lay.name}, but Slurm's tree is not there yet " \
            f"({plugins})", "start slurmd (it makes the tree) with proctrack/cgroup; " \
            "then run doctor again"
    if lay.name == "v2":
        missing = []
        try:
            with open(os.path.join(roots[0], "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError:
            enabled = []
        missing = [c for c in ("memory", "cpu", "cpuset") if c not in enabled]
        if missing:
            return "warn", f"{said}; v2 scope {roots[0]} does not enable " + \
                ", ".join(missing) + " below the jobs (their limits do not hold)", \
                "EnableControllers=yes in cgroup.conf (Slurm 24.11), or enable them in " \
                "every parent's cgroup.subtree_control, then restart slurmd"
        return "ok", f"{said}; layout v2, scope {roots[0]} (root's processes go to " \
            f"job_J/{lay.leaf}); {plugins}", None
    return "ok", f"{said}; layout v1, Slurm's tree {' '.join(roots)}; {plugins}", None


def _slurm_config() -> dict[str, str]:
    scontrol = slurm_tool("scontrol")
    try:
        p = run([scontrol, "show", "config"], timeout=30, check=False)
    except CharlieError:
        return {}
    out = {}
    for line in p.stdout.decode(errors="replace").splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out[key.strip()] = value.strip()
    return out


def _program(cfg: config.Config, key: str, package: str) -> Result:
    found = shutil.which(cfg[key])
    if found is None:
        return "FAIL", f"{key} = {cfg[key]}: not found", f"apt-get install {package}, " \
            f"or set {key} in the site config"
    return "ok", f"{key}: {found}", None


def _userns(cfg: config.Config) -> Result:
    try:
        nobody = User.lookup(65534)
        p = run(["unshare", "--user", "--map-root-user", "true"], as_user=nobody,
                timeout=30, check=False)
    except CharlieError as e:
        return "warn", e.line(), None
    if p.returncode != 0:
        return "FAIL", "an ordinary user cannot make a user namespace: " + \
            p.stderr.decode(errors="replace").strip()[-120:], \
            "sysctl kernel.unprivileged_userns_clone=1 (Debian) and " \
            "user.max_user_namespaces > 0; ch-run needs them (FAQ: containers)"
    return "ok", "unprivileged user namespaces work (ch-run needs them)", None


def _fuse() -> Result:
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        return "warn", "/dev/fuse missing", "modprobe fuse (squashfs images are " \
            "mounted with FUSE as the user)"
    if st.st_mode & 0o006 != 0o006:
        return "warn", f"/dev/fuse is {stat.filemode(st.st_mode)}", \
            "chmod 0666 /dev/fuse (its usual mode) so users can mount squashfs images"
    return "ok", "/dev/fuse usable by users", None


def _image_tools() -> Result:
    """squashfuse (stock squashfs images), skopeo and umoci (registry images)."""
    missing = [(prog, pkg) for prog, pkg in (("squashfuse", "squashfuse"),
                                             ("skopeo", "skopeo"), ("umoci", "umoci"),
                                             ("mksquashfs", "squashfs-tools"))
               if not shutil.which(prog)]
    if missing:
        return "warn", "missing " + ", ".join(p for p, _ in missing) + \
            " (squashfs images without /ch are unpacked; docker:// images need skopeo, " \
            "umoci and mksquashfs)", "apt-get install " + " ".join(k for _, k in missing)
    return "ok", "squashfuse, skopeo, umoci, mksquashfs found", None


def _kvm(cfg: config.Config) -> Result:
    if cfg["vm.accel"] != "kvm":
        return "ok", f"vm.accel = {cfg['vm.accel']} (no /dev/kvm needed)", None
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return "FAIL", "vm.accel = kvm but /dev/kvm is missing", \
            "load kvm_intel/kvm_amd, or set vm.accel = \"tcg\" (FAQ: /dev/kvm)"
    if st.st_mode & 0o006 != 0o006:
        return "warn", f"/dev/kvm is {stat.filemode(st.st_mode)}", \
            "users must open /dev/kvm: mode 0666 or every job user in group " \
            f"{st.st_gid} (FAQ: /dev/kvm)"
    return "ok", "/dev/kvm usable by users", None


def _vm_kernel(cfg: config.Config) -> Result:
    """Under tcg a compressed kernel costs seconds of every boot."""
    kernel = cfg["vm.kernel"]
    if not kernel:
        return "ok", "vm.kernel empty: guests boot their own boot loader", None
    from .vmbuild import kernel_is_compressed
    compressed = kernel_is_compressed(kernel)
    if compressed is None:
        return "FAIL", f"vm.kernel {kernel} is neither a bzImage nor an ELF kernel " \
            "(or unreadable)", "point vm.kernel at the guest's vmlinuz or vmlinux"
    if compressed and cfg["vm.accel"] == "tcg":
        return "warn", f"vm.kernel {kernel} is compressed: under tcg every guest " \
            "spends seconds decompressing it", \
            f"slurm-charlie vm-kernel {kernel} --out <dir>/vmlinux, then set " \
            "vm.kernel to it (docs/vm.rst, \"Boot time\")"
    return "ok", f"vm.kernel {kernel} is " + (
        "compressed (decompression is quick with KVM)" if compressed
        else "uncompressed (PVH boot)"), None


def _probe(cfg: config.Config, node: str) -> Result:
    if not cfg["vm.kernel"]:
        return "ok", "vm.kernel empty: guests boot their own boot loader (no probe)", None
    qemu = shutil.which(cfg["vm.qemu"])
    if qemu is None:
        return "FAIL", "no QEMU to probe with", None
    from .backends.vm.probe import probe_boot
    try:
        probe_boot(cfg, qemu)
    except CharlieError as e:
        return "FAIL", e.line(), (e.hint or "") + " (FAQ: the probe guest does not boot)"
    return "ok", f"the guest kernel boots with -accel {cfg['vm.accel']}", None


def _mpi(cfg: config.Config) -> Result:
    from .backends.container import mpi_plugins
    offered = mpi_plugins()
    if offered is None:
        return "warn", "srun --mpi=list failed", None
    want = cfg["container.default_mpi"]
    if want == "auto":
        missing = [w for w in ("pmi2", "pmix") if w not in offered]
        if missing:
            return "warn", "srun --mpi=list does not offer " + ", ".join(missing), \
                "install Slurm's MPI plugins (slurm-wlm-mpi / PMIx); container jobs " \
                "use pmi2 for MPICH images and pmix for Open MPI ones"
    elif want and want not in offered:
        return "warn", f"srun --mpi=list does not offer {want}", \
            "install Slurm's MPI plugins or change container.default_mpi (FAQ: MPI " \
            "ranks all say \"rank 0 of 1\")"
    if "pmix" in offered:
        fence = slurm_conf_keys("mpi.conf").get("pmixcollfence", "mixed (the default)")
        if fence.lower() != "ring":
            return "warn", f"PMIx: PMIxCollFence={fence}", \
                "PMIxCollFence=ring in mpi.conf beside slurm.conf, then restart slurmd: " \
                "with the mixed fence one node can leave Open MPI's MPI_Init barrier " \
                "while others are still in its data fence, and about 1 run in 20-100 " \
                "segfaults (admin guide, \"MPI\")"
    return "ok", "srun --mpi=list offers " + ", ".join(dict.fromkeys(
        w for w in offered if w in ("pmi2", "pmix", "pmix_v4", "pmix_v5"))), None


def _leftovers(cfg: config.Config, node: str) -> Result:
    running = reconcile.jobs_on_node(node)
    if running is None:
        return "warn", "cannot ask Slurm which jobs run here (squeue)", None
    clean, _ = reconcile.candidates(cfg, node, running, cfg["reconcile.min_age"],
                                    time.time())
    if clean:
        return "warn", "leftovers of jobs no longer running here: " + " ".join(clean), \
            f"slurm-charlie reconcile --node {node} (FAQ: leftovers after a reboot)"
    return "ok", "no leftovers of finished jobs", None


def deleted_open(root: str) -> list[str]:
    """PID:PATH of every deleted file below root that a process still holds."""
    root = root.rstrip("/") + "/"
    return [f"{pid}:{t}" for pid in (d for d in os.listdir("/proc") if d.isdigit())
            for t in fd_targets(pid) if t.startswith(root) and t.endswith(" (deleted)")]


def _deleted_open(cfg: config.Config, node: str) -> Result:
    held = deleted_open(cfg.runtime_root(node))
    if held:
        return "warn", "deleted files under runtime_root still open: " + \
            " ".join(held[:5]), "df counts them until these processes end (FAQ: du and df disagree)"
    return "ok", "no deleted-but-open files under runtime_root", None


def _job_network(cfg: config.Config, node: str) -> Result:
    if cfg["vm.network"] != "vxlan":
        return "warn", "vm.network = multicast: VM job networks are not isolated", \
            "set vm.network = \"vxlan\" (root-built, filtered) unless the nodes' " \
            "network is trusted (docs/vm.rst)"
    missing = asroot.job_network_tools_missing()
    if missing:
        return "FAIL", "missing: " + " ".join(missing), \
            "apt-get install iproute2 nftables"
    if not os.path.exists("/dev/net/tun"):
        return "FAIL", "no /dev/net/tun", "modprobe tun"
    try:
        addr = asroot.node_addresses((node,), cfg["vm.node_addresses"])[0]
    except CharlieError as e:
        return "FAIL", e.line(), e.hint
    return "ok", f"VXLAN job networks from {addr}, UDP {cfg['vm.vxlan_port']}", None


def _gpus(cfg: config.Config, node: str, environ=None) -> Result:
    """The node's GPUs as slurm-charlie will see them: gres.conf's device
    files, the driver's table, Slurm's device confinement and the CDI specs."""
    from . import cdi, gpus
    environ = os.environ if environ is None else environ
    gres, text = gpus.read_gres(environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    if text is None:
        return "ok", f"no {gres}: no GPUs here", None
    if not gpus.gres_entries(text, node, gres):
        return "ok", f"{gres} gives this node no GPUs", None
    table = config.expand_node(cfg["gpu.driver_table"], node)
    found = gpus.node_gpus(text, node, table, gres)
    seen = f"{len(found)} GPU(s): " + "; ".join(f"{g.device} {g.uuid}" for g in found)
    if slurm_conf_keys("cgroup.conf", environ).get("constraindevices", "no").lower() != "yes":
        return "warn", f"{seen}; ConstrainDevices is not on: a job can open every GPU " \
            "of the node, not only its own", "ConstrainDevices=yes in cgroup.conf, then " \
            "restart slurmd (admin guide, \"GPUs\")"
    dirs = [config.expand_node(d, node) for d in cfg["gpu.cdi_dirs"]]
    generated = ""
    if cfg["gpu.generate"]:
        from . import gpuspec
        try:
            spec, _ = gpuspec.generate(cfg["gpu.cdi_kind"], [(g.uuid, g.device) for g in found],
                                       cfg["gpu.driver_root"], table)
        except NodeFault as e:
            return "FAIL", f"{seen}; gpu.generate cannot make a spec: {e.line()}", e.hint
        generated = f"; gpu.generate makes a spec ({len(spec['containerEdits']['mounts'])} " \
            "mount(s))"
        if not dirs:
            return "ok", f"{seen}; confined by Slurm{generated}", None
    if not dirs:
        return "warn", f"{seen}; gpu.cdi_dirs is empty: containers get no driver " \
            "libraries", "list the CDI spec directories in gpu.cdi_dirs"
    reg = cdi.load_dirs(dirs)
    if reg.broken:
        return "FAIL", f"{seen}; {reg.broken[0].line()}", reg.broken[0].hint
    names = gpus.cdi_names(found, cfg["gpu.cdi_kind"])
    missing = [n for n in names if n not in reg.devices]
    if missing and generated:
        return "ok", f"{seen}; confined by Slurm{generated}", None
    if missing:
        return "FAIL", f"{seen}; the CDI specs in {' '.join(dirs)} have no device " \
            f"{missing[0]}", "generate a spec for the node's GPUs (named by UUID) into " \
            "one of gpu.cdi_dirs, or set gpu.cdi_kind"
    return "ok", f"{seen}; confined by Slurm; CDI devices {cfg['gpu.cdi_kind']} found", None


def checks(cfg: config.Config, node: str) -> list[tuple[str, Callable[[], Result]]]:
    return [
        ("runtime_root", lambda: _runtime_root(cfg, node)),
        ("root's records", lambda: _records(cfg, node)),
        ("background prolog", lambda: _background(node)),
        ("warm hook server", lambda: _warm(cfg, node)),
        ("pidfd", _pidfd),
        ("cgroups", lambda: _cgroups(node)),
        ("ch-run", lambda: _program(cfg, "container.runtime", "charliecloud-runtime")),
        ("user namespaces", lambda: _userns(cfg)),
        ("/dev/fuse", _fuse),
        ("image tools", _image_tools),
        ("qemu", lambda: _program(cfg, "vm.qemu", "qemu-system-x86")),
        ("qemu-img", lambda: _program(cfg, "vm.qemu_img", "qemu-utils")),
        ("/dev/kvm", lambda: _kvm(cfg)),
        ("job network", lambda: _job_network(cfg, node)),
        ("guest kernel", lambda: _vm_kernel(cfg)),
        ("accel/CPU probe", lambda: _probe(cfg, node)),
        ("MPI plugins", lambda: _mpi(cfg)),
        ("GPUs", lambda: _gpus(cfg, node)),
        ("leftovers", lambda: _leftovers(cfg, node)),
        ("deleted-open files", lambda: _deleted_open(cfg, node)),
    ]


def main(cfg: config.Config, node: str, out: Callable[[str], None] = print) -> int:
    """Print one line per check (and its fix); 1 when any check failed."""
    failed = 0
    for name, check in checks(cfg, node):
        try:
            status, seen, fix = check()
        except (CharlieError, OSError) as e:
            status, seen, fix = "FAIL", f"{type(e).__name__}: {e}", None
        out(f"{status:4}  {name}: {seen}")
        if fix and status != "ok":
            out(f"      fix: {fix}")
        failed += status == "FAIL"
    out(f"{failed} check{'s' if failed != 1 else ''} failed")
    return 1 if failed else 0
