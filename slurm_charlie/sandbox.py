"""A real multi-node Slurm on one machine: munged, slurmctld and N slurmd,
each slurmd in its own network namespace, with slurm-charlie installed.

    slurm-charlie sandbox up [--nodes N] | down | status | env

Recipe and its reasons: docs/sandbox.rst.  Everything lives under the state
directory (default /run/slurm-charlie-sandbox): configs, spool, logs, pid
files, the runtime root.  `up` is idempotent; `down` removes every daemon,
namespace, link and file it made.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

from . import PROG
from .errors import NodeFault
from .procfs import is_zombie
from .sandboxdb import _run, _spawn  # the daemons' helpers, shared with the DB and REST ones

DEFAULT_DIR = "/run/slurm-charlie-sandbox"
BRIDGE = "chsbx0"
NET = "10.211.77"          # private /24 that only the sandbox uses
CTL_ADDR = f"{NET}.1"
REGISTRY = f"{CTL_ADDR}:5000"  # a local image registry (docker-registry), no TLS
CTL_NAME = "chsbx-ctl"
USER = "chuser"            # unprivileged user jobs run as
CTL_PORT, SLURMD_PORT = 6817, 6818
#: fake GPUs per node where Slurm can confine devices here (cgroup v1):
#: character devices with NVIDIA's numbers (major 195, minor = index) and
#: no driver behind them, so opening one says ENXIO where the job may and
#: EPERM where Slurm's device cgroup forbids it (docs/sandbox.rst, "GPUs")
FAKE_GPUS = 2
GPU_MAJOR = 195
NEEDED = ("slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare",
          "scontrol", "sinfo", "runuser")


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    addr: str
    netns: str
    veth: str


def nodes_for(n: int) -> list[Node]:
    return [Node(f"node{i}", f"{NET}.{10 + i}", f"chsbx-node{i}", f"chsbx{i}h")
            for i in range(1, n + 1)]


def _alive(pidfile: str) -> int | None:
    """The pid in pidfile if that process runs (a zombie does not: daemons
    outlive the `sandbox up` that started them, and nobody may reap them)."""
    try:
        pid = int(open(pidfile).read().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return None if is_zombie(pid) else pid


def _daemon(argv: list[str], log: str) -> None:
    with open(log, "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True)


def slurm_version() -> tuple[int, int]:
    """(major, minor) of the installed Slurm, e.g. (24, 11); (0, 0) when
    there is none (the gate's lookup: slurmctld, slurmd, scontrol -V)."""
    from .gate import slurm_version as installed
    try:
        return installed()
    except NodeFault:
        return (0, 0)


class Sandbox:
    def __init__(self, state: str | None = None, nnodes: int | None = None,
                 guest_dir: str | None = None) -> None:
        self.state = os.path.abspath(state or os.environ.get(
            "SLURM_CHARLIE_SANDBOX", DEFAULT_DIR))
        saved = self._saved()
        self.nnodes = nnodes or saved.get("nodes", 3)
        self.nodes = nodes_for(self.nnodes)
        self.conf = os.path.join(self.state, "etc", "slurm.conf")
        self.charlie_conf = os.path.join(self.state, "etc", "charlie.toml")
        self.hook_dir = os.path.join(self.state, "hooks")
        self.munge_dir = os.path.join(self.state, "munge")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self.runtime_root = os.path.join(self.state, "runtime", "%n")
        #: a directory with vmlinuz and initrd.img (make guest) turns VM jobs on
        self.guest_dir = guest_dir or saved.get("guest_dir")
        from .sandboxdb import Services
        #: MariaDB, slurmdbd and slurmrestd (slurm_charlie/sandboxdb.py)
        self.db = Services(self.state, CTL_ADDR, self.munge_socket, _alive, self._wait,
                           self._env)

    # -- bookkeeping --------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return os.path.join(self.state, *parts)

    def _saved(self) -> dict:
        try:
            return json.load(open(os.path.join(self.state, "sandbox.json")))
        except (OSError, ValueError):
            return {}

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.conf, "SLURM_CHARLIE_CONF": self.charlie_conf,
                "SLURM_CHARLIE_SANDBOX": self.state, "CHARLIE_SANDBOX_REGISTRY": REGISTRY,
                **self.db.env()}

    def default_prolog_flags(self) -> str:
        """Alloc,Contain where Slurm keeps cgroups (the extern step adopts
        QEMU's and the holder's cgroup, so sstat/sacct report them, as on a
        site with pam_slurm_adopt); Alloc,NoHold otherwise.  The environment
        variable CHARLIE_SANDBOX_PROLOG_FLAGS overrides it."""
        return os.environ.get("CHARLIE_SANDBOX_PROLOG_FLAGS") or (
            "Alloc,Contain" if self.cgroups else "Alloc,NoHold")

    @property
    def prolog_flags(self) -> str:
        """PrologFlags of the running sandbox's slurm.conf ("" if none)."""
        try:
            with open(self.conf) as f:
                for line in f:
                    if line.startswith("PrologFlags="):
                        return line.split("=", 1)[1].strip()
        except OSError:
            pass
        return ""

    # -- up -----------------------------------------------------------------
    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NodeFault("sandbox", "must run as root", hint="sudo make demo")
        missing = [p for p in NEEDED if shutil.which(p) is None] + self.db.missing()
        if missing:
            raise NodeFault("sandbox", "programs missing", " ".join(missing),
                            hint="run `make deps` (installs Debian's slurmctld, "
                                 "slurmd, slurmdbd, slurmrestd, mariadb-server, munge, "
                                 "iproute2, util-linux)")
        self.check_own_name()

    @staticmethod
    def check_own_name() -> None:
        """srun runs on this machine: at each job's end slurmctld looks up
        srun's host by name, retrying for 10 s when it does not resolve,
        and meanwhile the steps' completion messages time out; their nodes
        then drain ("Kill task failed").  Seen in the Debian 13 lane, whose
        node had no /etc/hosts line for its name."""
        import socket
        name = socket.gethostname()
        try:
            socket.getaddrinfo(name, None)
        except OSError as e:
            raise NodeFault("sandbox", f"this machine's name {name!r} does not resolve "
                            f"({e.strerror or e}): slurmctld looks srun's host up at the end of "
                            "every job, waits 10 s when it fails, and nodes then drain "
                            "('Kill task failed')",
                            hint=f"add a line '127.0.1.1 {name}' to /etc/hosts") from None

    def ensure_user(self) -> None:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            _run(["useradd", "--create-home", "--shell", "/bin/sh",
                  "--comment", "slurm-charlie sandbox user", USER])

    def write_files(self, hooks: str = "on") -> None:
        """hooks: "on" (slurm-charlie installed), "off" (no plugstack, no
        Prolog/Epilog) or "trivial" (a Prolog/Epilog that only exits 0)."""
        from .render import render as _render
        for d in ("etc", "log", "run", "spool/ctld", "runtime", "work"):
            os.makedirs(self._p(d), mode=0o755, exist_ok=True)
        for n in self.nodes:
            os.makedirs(self._p("spool", n.name), mode=0o755, exist_ok=True)
            os.makedirs(self._p("tmp", n.name), exist_ok=True)
            os.chmod(self._p("tmp", n.name), 0o1777)
        text = _render("slurm.conf.j2", ctl_name=CTL_NAME, ctl_addr=CTL_ADDR,
                       ctl_port=CTL_PORT, slurmd_port=SLURMD_PORT,
                       munge_socket=self.munge_socket, state=self.state,
                       hooks=hooks, hook_dir=self.hook_dir, nodes=self.nodes,
                       cpus=2, cgroups=self.cgroups, gpus=self.gpus_per_node,
                       prolog_flags=self.default_prolog_flags(),
                       accounting=self.db.slurm_conf_lines())
        self._write(self.conf, text)
        self.db.write_files()
        self._write(os.path.join(os.path.dirname(self.conf), "gres.conf"), self._write_gpus())
        if self.cgroups:
            self._write(os.path.join(os.path.dirname(self.conf), "cgroup.conf"),
                        self._cgroup_conf())
            if self.cgroup_mode == "v2":
                self._cgroup_v2_slice()
        self._write(self.charlie_conf,
                    "# slurm-charlie sandbox site config\n"
                    f'runtime_root = "{self.runtime_root}"\n'
                    f'log_file = "{self._p("log", "charlie-%n.log")}"\n'
                    "syslog = false\n"
                    'log_level = "debug"\n'
                    + self._vm_conf() + self._gpu_conf() +
                    "[container]\n"
                    f'cache_dir = "{self._p("cache", "%n")}"\n'
                    f'registry_insecure = ["{CTL_ADDR}"]\n'
                    "# each node's TmpFS (slurm.conf), as real nodes have their own /tmp\n"
                    f'tmpdir = "{self._p("tmp", "%n")}"\n'
                    "# Sandbox nodes share one kernel, so UCX takes ranks on different\n"
                    "# 'nodes' for neighbours and maps their shared memory through\n"
                    "# /proc/PID/fd, which fails between two nodes' containers (separate\n"
                    "# user namespaces). Named files in the shared /dev/shm work. Large\n"
                    "# messages would go by cross-memory attach, which the kernel refuses\n"
                    "# between user namespaces (ranks hang): no cma. Real nodes have\n"
                    "# their own boot id and talk over the network instead.\n"
                    'env = ["UCX_POSIX_USE_PROC_LINK=n", "UCX_TLS=^cma"]\n')
        plugstack = self._p("etc", "plugstack.conf")
        if not os.path.exists(plugstack):
            self._write(plugstack, "# slurm-charlie sandbox\n")
        self._write(self._p("etc", "plugstack-off.conf"),
                    "# slurm-charlie switched off (benchmarks)\n")
        self._write(self._p("etc", "trivial-hook"), "#!/bin/sh\nexit 0\n")
        os.chmod(self._p("etc", "trivial-hook"), 0o755)
        # Slurm's default "mixed" PMIx fence (ring for a fence with data,
        # tree for a barrier) let one node finish Open MPI's MPI_Init
        # barrier while the others were still in its data fence: ~1 run in
        # 20-100 segfaulted (docs/developer.rst, "Open MPI over PMIx").
        # One algorithm for both: ring.
        self._write(self._p("etc", "mpi.conf"),
                    "# slurm-charlie sandbox (docs/developer.rst)\nPMIxCollFence=ring\n")
        cmd = [os.path.join(os.path.dirname(sys.executable), "slurm-charlie")]
        if not os.path.exists(cmd[0]):
            cmd = [sys.executable, "-m", "slurm_charlie.cli"]
        # a shim built for another Slurm release than the default one
        # (the Debian 13 lane shares a Debian 12 checkout): CHARLIE_SANDBOX_SO
        so = os.environ.get("CHARLIE_SANDBOX_SO")
        _run(cmd + ["install-hooks", "--apply", "--hook-dir", self.hook_dir,
                    "--plugstack", plugstack, "--conf", self.charlie_conf,
                    "--job-submit-dir", self._p("etc")]
             + (["--so", so] if so else []),
             env={**os.environ, "SLURM_CHARLIE_CONF": self.charlie_conf})
        self._write(self._p("sandbox.json"), json.dumps({"nodes": self.nnodes,
                                                         "guest_dir": self.guest_dir}))
        self._check_user_can_run()

    @property
    def gpus_per_node(self) -> int:
        """Fake GPUs each node declares: FAKE_GPUS where Slurm can confine
        devices -- cgroup v1's devices controller (this machine), cgroup v2's
        device filter (eBPF: the Debian 13 lane) -- none elsewhere."""
        if self.cgroup_mode == "v1" and os.access("/sys/fs/cgroup/devices/cgroup.procs",
                                                  os.W_OK):
            return FAKE_GPUS
        if self.cgroup_mode == "v2":
            return FAKE_GPUS
        return 0

    @property
    def dev_dir(self) -> str:
        """Where the fake GPUs' device files are: in /dev, as a real node's
        are (ch-run shows the host's /dev in every container), one
        directory per sandbox state directory."""
        return os.path.join("/dev", os.path.basename(self.state))

    def gpu_device(self, node: str, index: int) -> str:
        return os.path.join(self.dev_dir, node, f"nvidia{index}")

    def gpu_table(self, node: str) -> str:
        """The fake driver's table of a node's GPUs, laid out as NVIDIA's
        /proc/driver/nvidia/gpus (one directory per PCI address with an
        "information" file naming the UUID and the device minor)."""
        return self._p("fakegpu", node, "gpus")

    @staticmethod
    def gpu_facts(node: str, index: int) -> tuple[str, str]:
        """(UUID, PCI address) of a node's fake GPU: stable, and in PCI order
        the other way round from the device minors, as on real machines
        where the two orders differ."""
        import uuid
        u = uuid.uuid5(uuid.NAMESPACE_URL, f"slurm-charlie-sandbox/{node}/gpu{index}")
        return f"GPU-{u}", f"0000:{0x81 - 0x40 * index:02x}:00.0"

    def _write_gpus(self) -> str:
        """Device files and driver tables of the fake GPUs; gres.conf's text."""
        lines = ["# slurm-charlie sandbox: fake GPUs (docs/sandbox.rst, \"GPUs\")"]
        shutil.rmtree(self._p("fakegpu"), ignore_errors=True)
        shutil.rmtree(self._p("fakevfio"), ignore_errors=True)
        if not self.gpus_per_node:  # nothing made in /dev either
            return lines[0] + "\n"
        self._build_driver()
        from . import fakesys
        for n in self.nodes:
            os.makedirs(os.path.join(self.dev_dir, n.name), mode=0o755, exist_ok=True)
            for i in range(self.gpus_per_node):
                dev = self.gpu_device(n.name, i)
                try:
                    st = os.lstat(dev)
                    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(GPU_MAJOR, i):
                        os.unlink(dev)
                        raise FileNotFoundError
                except FileNotFoundError:
                    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(GPU_MAJOR, i))
                os.chmod(dev, 0o666)
                uuid, pci = self.gpu_facts(n.name, i)
                info = os.path.join(self.gpu_table(n.name), pci)
                os.makedirs(info, mode=0o755, exist_ok=True)
                self._write(os.path.join(info, "information"),
                            "Model: \t\t slurm-charlie sandbox GPU\n"
                            f"GPU UUID: \t {uuid}\n"
                            "Bus Type: \t PCIe\n"
                            f"Bus Location: \t {pci}\n"
                            f"Device Minor: \t {i}\n")
            self._write_cdi(n.name)
            fakesys.build(self._p("fakevfio", n.name),
                          [self.gpu_facts(n.name, i)[1] for i in range(self.gpus_per_node)])
            lines.append(f"NodeName={n.name} Name=gpu File=" + os.path.join(
                self.dev_dir, n.name, f"nvidia[0-{self.gpus_per_node - 1}]"))
        return "\n".join(lines) + "\n"

    def _gpu_conf(self) -> str:
        if not self.gpus_per_node:
            return ""
        return ("[gpu]\n# the sandbox's fake GPUs: their driver's table, their CDI vendor\n"
                f'driver_table = "{self._p("fakegpu", "%n", "gpus")}"\n'
                f'cdi_dirs = ["{self._p("cdi", "%n")}"]\n'
                "# VM jobs' GPUs: a fake sysfs served by slurm_charlie/fakesys.py\n"
                f'vfio_root = "{self._p("fakevfio", "%n")}"\n'
                'cdi_kind = "example.com/gpu"\n')

    def cdi_dir(self, node: str) -> str:
        return self._p("cdi", node)

    FAKE_DRIVER_VERSION = "999.1.0"

    @property
    def driver_root(self) -> str:
        """The fake vendor's driver files, laid out as a host's: its
        libcuda.so (a stub that answers from the device nodes it can open)
        in usr/lib/x86_64-linux-gnu with the loader's cache listing it, its
        nvidia-smi (a probe) in usr/bin."""
        return self._p("fakegpu", "driver")

    def _build_driver(self) -> None:
        """Compile the stub driver library and the probe (slurm_charlie/fakegpu)."""
        src = os.path.join(os.path.dirname(__file__), "fakegpu")
        root = self.driver_root
        lib = os.path.join(root, "usr/lib/x86_64-linux-gnu")
        os.makedirs(lib, mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(root, "usr/bin"), mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(root, "etc"), mode=0o755, exist_ok=True)
        real = f"libcuda.so.{self.FAKE_DRIVER_VERSION}"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                        os.path.join(lib, real), os.path.join(src, "libcuda.c")], check=True)
        os.symlink(real, os.path.join(lib, "libcuda.so.1"))
        subprocess.run(["cc", "-O2", "-o", os.path.join(root, "usr/bin/nvidia-smi"),
                        os.path.join(src, "probe.c"), "-ldl"], check=True)
        self._write(os.path.join(root, "etc/ld.so.conf"), "/usr/lib/x86_64-linux-gnu\n")
        subprocess.run(["ldconfig", "-r", root], check=True)

    def _write_cdi(self, node: str) -> None:
        """The fake vendor's CDI spec for a node's GPUs (example.com/gpu),
        made by slurm-charlie gpu-spec's code from the fake driver (devices
        named by UUID; the stub library, its soname link and the loader's
        cache; the probe as nvidia-smi), plus the variable that tells the
        stub which device node is which GPU."""
        from . import gpuspec
        devices = [(self.gpu_facts(node, i)[0], self.gpu_device(node, i))
                   for i in range(self.gpus_per_node)]
        with open(os.path.join(os.path.dirname(self.gpu_table(node)), "version"), "w") as f:
            f.write("NVRM version: slurm-charlie sandbox Kernel Module  "
                    f"{self.FAKE_DRIVER_VERSION}  (a fake driver)\n")
        table = ",".join(f"{dev}={uuid}" for uuid, dev in devices)
        spec, skipped = gpuspec.generate("example.com/gpu", devices, self.driver_root,
                                         self.gpu_table(node),
                                         ("CHARLIE_SANDBOX_GPU=1",
                                          f"CHARLIE_SANDBOX_GPUS={table}"))
        if skipped:
            raise RuntimeError("the fake vendor's spec left out " + "; ".join(skipped))
        os.makedirs(self.cdi_dir(node), mode=0o755, exist_ok=True)
        self._write(os.path.join(self.cdi_dir(node), "example.json"),
                    json.dumps(spec, indent=2) + "\n")

    @property
    def cgroup_mode(self) -> str | None:
        """"v2" where /sys/fs/cgroup is a writable cgroup2 with the memory
        controller (Debian 13, most clusters), "v1" where this machine has
        a writable cgroup v1 memory controller and freezer (the hybrid
        Debian 12 machines here); None: plain process tracking
        (docs/sandbox.rst)."""
        try:
            with open("/sys/fs/cgroup/cgroup.controllers") as f:
                v2 = "memory" in f.read().split()
        except OSError:
            v2 = False
        if v2 and os.access("/sys/fs/cgroup/cgroup.procs", os.W_OK):
            return "v2"
        if os.access("/sys/fs/cgroup/memory/cgroup.procs", os.W_OK) and \
                os.path.isdir("/sys/fs/cgroup/freezer"):
            return "v1"
        return None

    @property
    def cgroups(self) -> bool:
        return self.cgroup_mode is not None

    def _cgroup_conf(self) -> str:
        """cgroup.conf for this machine's layout and Slurm release.  v2
        without systemd: IgnoreSystemd=yes (Slurm makes its scopes by hand
        under system.slice), and 23.x+ enables the controllers itself
        (EnableControllers=yes); 22.05 had CgroupAutomount instead."""
        head = ("# slurm-charlie sandbox: each slurmd gets its own tree\n"
                "ConstrainCores=yes\nConstrainRAMSpace=yes\n"
                "CgroupMountpoint=/sys/fs/cgroup\n")
        if self.cgroup_mode == "v1":
            return head + "# <controller>/slurm_<node>/uid_U/job_J/step_S\n" \
                "CgroupPlugin=cgroup/v1\n" + (
                    "# a job opens only its own GPUs (the fake ones in gres.conf)\n"
                    "ConstrainDevices=yes\n" if self.gpus_per_node else "")
        text = head + "# system.slice/<node>_slurmstepd.scope/job_J/step_S/user/task_T\n" \
            "CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\n" + (
                "# a job opens only its own GPUs (v2: Slurm's eBPF device filter)\n"
                "ConstrainDevices=yes\n" if self.gpus_per_node else "")
        return text + ("EnableControllers=yes\n" if slurm_version() >= (23, 2)
                       else "CgroupAutomount=yes\n")

    def _cgroup_v2_slice(self) -> None:
        """v2 without systemd: system.slice, with the controllers the jobs'
        limits need enabled on the way down (what systemd would do)."""
        want = ("cpuset", "cpu", "memory", "pids")
        base = "/sys/fs/cgroup"
        os.makedirs(os.path.join(base, "system.slice"), exist_ok=True)
        for path in (base, os.path.join(base, "system.slice")):
            with open(os.path.join(path, "cgroup.controllers")) as f:
                offered = f.read().split()
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join(f"+{c}" for c in want if c in offered))

    def _vm_conf(self) -> str:
        """[vm]: the guest kernel and initrd copied where every user can read
        them; tcg because KVM hangs on these machines (docs/sandbox.rst)."""
        if not self.guest_dir:
            return ""
        vm_dir = self._p("vm")
        os.makedirs(vm_dir, mode=0o755, exist_ok=True)
        # the uncompressed kernel when make guest wrote one (PVH boot:
        # seconds faster per guest under tcg), else the vmlinuz
        kernel = "vmlinux" if os.path.exists(os.path.join(self.guest_dir, "vmlinux")) \
            else "vmlinuz"
        for name in (kernel, "initrd.img"):
            src = os.path.join(self.guest_dir, name)
            if not os.path.exists(src):
                raise NodeFault("sandbox", "guest kernel missing", src,
                                hint="run `make guest`")
            shutil.copyfile(src, os.path.join(vm_dir, name))
            os.chmod(os.path.join(vm_dir, name), 0o644)
        # the nodes' names do not resolve on this host: the job networks
        # (VXLAN) take their addresses from this table, as a site may
        addrs = self._p("etc", "node-addresses")
        self._write(addrs, "# slurm-charlie sandbox: node addresses for the job networks\n"
                    + "".join(f"{n.name} {n.addr}\n" for n in self.nodes))
        return ("[vm]\n"
                'accel = "tcg"\n'
                f'node_addresses = "{addrs}"\n'
                f'kernel = "{vm_dir}/{kernel}"\n'
                f'initrd = "{vm_dir}/initrd.img"\n'
                "memory_mib = 512\n"
                "tmp_size_mib = 256\n"
                f'ssh_secret = "{os.path.join(self.munge_dir, "munge.key")}"\n'
                f'subnet = "172.22.0.0/16"\n')

    def charlie_bin(self) -> str:
        """The slurm-charlie command the installed hooks run."""
        with open(os.path.join(self.hook_dir, "charlie.env")) as f:
            return [shlex.split(l.split("=", 1)[1])[0] for l in f
                    if l.startswith("CHARLIE_BIN=")][0]

    def _check_user_can_run(self) -> None:
        bin_ = self.charlie_bin()
        r = _run(["runuser", "-u", USER, "--", bin_, "--version"], check=False)
        if r.returncode != 0:
            raise NodeFault("sandbox", f"user {USER} cannot run {bin_}",
                            r.stderr.strip()[-200:], hint="put the checkout and "
                            "its .venv where every user can read them (not "
                            "below /root)")

    @staticmethod
    def _write(path: str, text: str) -> None:
        from .files import write_file
        write_file(path, text, 0o644)

    def start_munge(self) -> None:
        pidfile = os.path.join(self.munge_dir, "munged.pid")
        if _alive(pidfile):
            return
        os.makedirs(self.munge_dir, exist_ok=True)
        munge = pwd.getpwnam("munge")
        key = os.path.join(self.munge_dir, "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o755)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        _daemon(["runuser", "-u", "munge", "--", "munged", "--force",
                 f"--socket={self.munge_socket}", f"--key-file={key}",
                 f"--pid-file={pidfile}",
                 f"--log-file={os.path.join(self.munge_dir, 'munged.log')}",
                 f"--seed-file={os.path.join(self.munge_dir, 'munged.seed')}"],
                self._p("log", "munged.out"))
        self._wait(lambda: os.path.exists(self.munge_socket) and _alive(pidfile),
                   "munged", 20, os.path.join(self.munge_dir, "munged.log"))

    def net_up(self) -> None:
        links = _run(["ip", "-o", "link", "show"]).stdout
        if f" {BRIDGE}:" not in links:
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            _run(["ip", "addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        existing = _run(["ip", "netns", "list"]).stdout.split()
        for n in self.nodes:
            if n.netns not in existing:
                _run(["ip", "netns", "add", n.netns])
            if f" {n.veth}@" not in _run(["ip", "-o", "link", "show"]).stdout:
                _run(["ip", "link", "add", n.veth, "type", "veth", "peer", "name",
                      "eth0", "netns", n.netns])
                _run(["ip", "link", "set", n.veth, "master", BRIDGE, "up"])
            ns = ["ip", "-n", n.netns]
            _run(ns + ["link", "set", "lo", "up"])
            if n.addr not in _run(ns + ["-o", "addr", "show", "eth0"]).stdout:
                _run(ns + ["addr", "add", f"{n.addr}/24", "dev", "eth0"])
            _run(ns + ["link", "set", "eth0", "up"])
            if "224.0.0.0/4" not in _run(ns + ["route", "show"]).stdout:
                _run(ns + ["route", "add", "224.0.0.0/4", "dev", "eth0"])

    def start_registry(self) -> None:
        """A local image registry on the bridge's address, as a site has one
        (Debian's docker-registry; storage in the state directory; the tests
        seed it).  Nodes and the host reach it; nothing else does."""
        pidfile = self._p("run", "registry.pid")
        if _alive(pidfile):
            return
        conf = self._p("etc", "registry.yml")
        self._write(conf, "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self._p('registry')}\n"
                    f"http:\n  addr: {REGISTRY}\n")
        _spawn(["docker-registry", "serve", conf], self._p("log", "registry.log"), pidfile)

        def up() -> bool:
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        self._wait(up, "the image registry", 30, self._p("log", "registry.log"))

    def fakesys_root(self, node: str) -> str:
        return self._p("fakevfio", node)

    def start_fakesys(self) -> None:
        """The fake kernel behind the fake GPUs' sysfs (slurm_charlie/fakesys.py)."""
        pidfile = self._p("run", "fakesys.pid")
        if not self.gpus_per_node or _alive(pidfile):
            return
        _spawn([sys.executable, "-m", "slurm_charlie.fakesys",
                *(self.fakesys_root(n.name) for n in self.nodes)],
               self._p("log", "fakesys.log"), pidfile,
               cwd=os.path.dirname(os.path.dirname(__file__)))

    def start_slurm(self) -> None:
        ctl_pid = self._p("run", "slurmctld.pid")
        if not _alive(ctl_pid):
            _daemon(["unshare", "--uts", "sh", "-c",
                     f'hostname {CTL_NAME} && exec slurmctld -f "$1"', "sh",
                     self.conf], self._p("log", "slurmctld.out"))
            self._wait(lambda: _alive(ctl_pid) and self._ping(), "slurmctld",
                       30, self._p("log", "slurmctld.log"))
        for n in self.nodes:
            if _alive(self._p("run", f"slurmd-{n.name}.pid")):
                continue
            _daemon(["nsenter", f"--net=/run/netns/{n.netns}", "unshare", "--uts",
                     "sh", "-c", f'hostname {n.name} && exec slurmd -N {n.name} '
                     '-f "$1"', "sh", self.conf],
                    self._p("log", f"slurmd-{n.name}.out"))
        self._wait(self._all_idle, "slurmd on every node", 60,
                   self._p("log", "slurmd-node1.log"))

    def restart_slurmd(self, name: str, timeout: float = 30) -> None:
        """Stop one node's slurmd (its running steps stay) and start it again,
        as an admin's restart does; for the churn run."""
        node = next(n for n in self.nodes if n.name == name)
        pidfile = self._p("run", f"slurmd-{name}.pid")
        pid = _alive(pidfile)
        if pid:
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + timeout
            while _alive(pidfile) == pid and time.monotonic() < end:
                time.sleep(0.1)
        _daemon(["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts",
                 "sh", "-c", f'hostname {name} && exec slurmd -N {name} -f "$1"', "sh",
                 self.conf], self._p("log", f"slurmd-{name}.out"))
        self._wait(lambda: bool(_alive(pidfile)), f"slurmd on {name}", timeout,
                   self._p("log", f"slurmd-{name}.log"))

    def _ping(self) -> bool:
        return _run(["scontrol", "ping"], check=False, env=self._env()).returncode == 0

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    def node_states(self, reasons: bool = False) -> dict[str, str]:
        """{node: Slurm's state}; with reasons, a drained or down node's
        state carries Slurm's reason ("drained: Kill task failed")."""
        r = _run(["sinfo", "-h", "-N", "-o", "%N|%T|%E"], check=False, env=self._env())
        states = {}
        for line in r.stdout.splitlines():
            node, state, reason = (line.split("|", 2) + ["", ""])[:3]
            if not node or not state:
                continue
            states[node] = state if not reasons or state == "idle" \
                or reason in ("", "none") else f"{state}: {reason}"
        return states

    def _all_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n.name, "").rstrip("*") in ("idle", "mixed", "allocated")
                   for n in self.nodes)

    def _wait(self, cond, what: str, timeout: float, log: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        tail = ""
        try:
            tail = " | ".join(open(log).read().splitlines()[-3:])
        except OSError:
            pass
        raise NodeFault("sandbox", f"{what} did not come up within {timeout} s",
                        tail, hint=f"see {log}")

    def up(self) -> None:
        self.preflight()
        self.ensure_user()
        os.makedirs(self.state, mode=0o755, exist_ok=True)
        os.chmod(self.state, 0o755)
        self.write_files()
        self.fuse_as_on_a_host()
        self.start_munge()
        self.net_up()
        self.start_registry()
        self.start_fakesys()
        self.db.start_mariadb()
        self.db.start_slurmdbd()
        self.db.add_associations("charlie-sandbox", ["root", USER])
        self.start_slurm()
        self.db.start_slurmrestd(self.openapi_plugins())
        for n in self.nodes:  # a node drained by an earlier run comes back
            _run(["scontrol", "update", f"NodeName={n.name}", "State=RESUME"],
                 check=False, env=self._env())

    @staticmethod
    def openapi_plugins() -> list[str]:
        """slurmrestd's plugins: the versioned ones of 22.05, the
        data_parser based ones from 23.11 on."""
        if slurm_version() >= (23, 11):
            return ["openapi/slurmctld", "openapi/slurmdbd"]
        return ["openapi/v0.0.38", "openapi/dbv0.0.38"]

    FUSE = "/dev/fuse"

    def fuse_as_on_a_host(self) -> None:
        """/dev/fuse is 0600 on the machines this is tested on, 0666 on a real
        host (users mount squashfs images through it); set it so for the
        sandbox's life and put the old mode back at down."""
        try:
            mode = stat.S_IMODE(os.stat(self.FUSE).st_mode)
        except OSError:
            return
        keep = self._p("fuse-mode")
        if not os.path.exists(keep):
            self._write(keep, f"{mode:o}\n")
        os.chmod(self.FUSE, 0o666)

    def _fuse_back(self) -> None:
        try:
            os.chmod(self.FUSE, int(open(self._p("fuse-mode")).read().strip(), 8))
        except (OSError, ValueError):
            pass

    def set_hooks(self, mode: str) -> None:
        """Switch slurm-charlie (Prolog/Epilog and the shim) "on", "off" or to
        a "trivial" Prolog/Epilog, for benchmarks, and reconfigure."""
        self.write_files(hooks=mode)
        _run(["scontrol", "reconfigure"], env=self._env())
        time.sleep(1)

    # -- down ---------------------------------------------------------------
    def down(self) -> None:
        if os.path.exists(self.conf) and self._ping():
            _run(["scancel", "--full", "--quiet", "--partition=debug"], check=False,
                 env=self._env())
        netns_inodes = set()
        for n in self.nodes_on_disk():
            try:
                netns_inodes.add(os.stat(f"/run/netns/{n}").st_ino)
            except OSError:
                pass
        pids = [p for p in (_alive(f) for f in glob.glob(self._p("run", "*.pid"))) if p]
        pids += self._stepds(netns_inodes)
        munged = _alive(os.path.join(self.munge_dir, "munged.pid"))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._wait_gone(pids)
        from . import asroot
        for n in self.nodes_on_disk():  # the warm hook servers the prologs started
            try:
                asroot.stop_warm(n.removeprefix("chsbx-"))
            except OSError:
                pass  # killed with the rest of the netns below
        # slurmd's hooks may still be cleaning: kill what is left in our netns
        self._wait_gone(self._stepds(netns_inodes), sig=signal.SIGKILL)
        if munged:
            os.kill(munged, signal.SIGTERM)
            self._wait_gone([munged])
        from . import asroot
        for n in self.nodes_on_disk():
            _run(["ip", "netns", "delete", n], check=False)
            # the background prologs' lock files (whose epilogs did not run)
            shutil.rmtree(os.path.join(asroot.SETUP_DIR, n.removeprefix("chsbx-")),
                          ignore_errors=True)
        for link in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
            name = link.split(":")[1].strip().split("@")[0]
            if name == BRIDGE or (name.startswith("chsbx") and name.endswith("h")):
                _run(["ip", "link", "delete", name], check=False)
        self._fuse_back()
        if os.path.basename(self.state) and os.path.isdir(self.dev_dir) \
                and not os.path.ismount(self.dev_dir):
            shutil.rmtree(self.dev_dir, ignore_errors=True)  # the fake GPUs
        shutil.rmtree(self.state, ignore_errors=True)
        left = self.leftovers()
        if left:
            raise NodeFault("sandbox down", "left behind", "; ".join(left),
                            hint="see docs/sandbox.rst; remove them by hand")

    def leftovers(self) -> list[str]:
        """What `down` must not leave: daemons, namespaces, links, files."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or is_zombie(int(d)):
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline").read().split("\0")
            except OSError:
                continue
            if any(self.state in c for c in cmd) and os.path.basename(cmd[0]) in (
                    "slurmctld", "slurmd", "slurmstepd", "munged",
                    "qemu-system-x86_64", "mariadbd"):
                out.append(f"process {d} {os.path.basename(cmd[0])}")
            elif os.path.basename(cmd[0]) in ("slurmdbd", "slurmrestd") \
                    and self._has_env(d, f"SLURM_CONF={self.conf}"):
                out.append(f"process {d} {os.path.basename(cmd[0])}")
            elif "slurm_charlie.warm_main" in " ".join(cmd[:3]) and len(cmd) > 3 \
                    and re.fullmatch(r"node\d+", cmd[3]):
                out.append(f"process {d} warm hook server of {cmd[3]}")
        out += [f"netns {n}" for n in self.nodes_on_disk()]
        for link in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
            name = link.split(":")[1].strip().split("@")[0]
            if name.startswith("chsbx"):
                out.append(f"link {name}")
        if os.path.exists(self.state):
            out.append(f"directory {self.state}")
        return out

    @staticmethod
    def _has_env(pid: str, entry: str) -> bool:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return entry.encode() in f.read().split(b"\0")
        except OSError:
            return False

    def nodes_on_disk(self) -> list[str]:
        try:
            return [n for n in os.listdir("/run/netns") if n.startswith("chsbx-node")]
        except FileNotFoundError:
            return []

    @staticmethod
    def _stepds(netns_inodes: set[int]) -> list[int]:
        """Processes living in one of the sandbox's network namespaces."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino in netns_inodes:
                    out.append(int(d))
            except OSError:
                pass
        return out

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float = 15,
                   sig: signal.Signals | None = None) -> None:
        if sig:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + timeout
        left = list(pids)
        while left and time.monotonic() < end:
            left = [p for p in left if not is_zombie(p)]
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def db_port(self) -> int:
        from .sandboxdb import DB_PORT
        return DB_PORT

    def status(self) -> int:
        ok = True
        print(f"state directory: {self.state}")
        munged = _alive(os.path.join(self.munge_dir, "munged.pid"))
        print(f"munged:    {'running, pid %d' % munged if munged else 'stopped'}")
        ok &= bool(munged)
        ctl = _alive(self._p("run", "slurmctld.pid"))
        print(f"slurmctld: {'running, pid %d' % ctl if ctl else 'stopped'}")
        ok &= bool(ctl)
        reg = _alive(self._p("run", "registry.pid"))
        print(f"registry:  {'running, pid %d (%s)' % (reg, REGISTRY) if reg else 'stopped'}")
        ok &= bool(reg)
        for name, pidfile, where in (
                ("mariadb", "mariadb.pid", f"127.0.0.1:{self.db_port}"),
                ("slurmdbd", "slurmdbd.pid", ""),
                ("slurmrestd", "slurmrestd.pid", self.db.rest_url)):
            pid = _alive(self._p("run", pidfile))
            print(f"{name + ':':<11}{'running, pid %d' % pid if pid else 'stopped'}"
                  + (f" ({where})" if pid and where else ""))
            ok &= bool(pid)
        states = self.node_states() if ctl else {}
        for n in self.nodes:
            pid = _alive(self._p("run", f"slurmd-{n.name}.pid"))
            print(f"{n.name}:     {'slurmd pid %d' % pid if pid else 'stopped':<20} "
                  f"{n.addr:<14} {states.get(n.name, '?')}")
            ok &= bool(pid)
        return 0 if ok else 1


def main(args: argparse.Namespace) -> int:
    sb = Sandbox(args.dir, args.nodes if args.action == "up" else None,
                 os.path.abspath(args.guest_dir) if args.guest_dir else None)
    if args.action == "up":
        sb.up()
        print(f"{PROG}: sandbox up: {sb.nnodes} nodes; run as {USER} with:")
        for k, v in sb.env().items():
            print(f"export {k}={v}")
        return 0
    if args.action == "down":
        sb.down()
        print(f"{PROG}: sandbox down")
        return 0
    if args.action == "env":
        for k, v in sb.env().items():
            print(f"export {k}={v}")
        print(f"# REST: $CHARLIE_SANDBOX_REST with X-SLURM-USER-TOKEN from `scontrol token` "
              f"(as {USER}); accounting: sacct, slurm-charlie jobs (docs/sandbox.rst)")
        return 0
    return sb.status()
