"""Can this node run the site's accelerator and CPU model?  A test guest
booted as `nobody`, once per node and setting."""

from __future__ import annotations

import hashlib
import os

from ... import config
from ...errors import NodeFault, UserError
from ...files import read_small, write_file
from ...log import log
from ...proc import User, run
from ..base import Context

PROBE_FILE = ".vm-probe"


def cpu_model(cfg: config.Config) -> str:
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
    accel, cpu = cfg["vm.accel"], cpu_model(cfg)
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
    accel, cpu = cfg["vm.accel"], cpu_model(cfg)
    record = os.path.join(ctx.paths.root, PROBE_FILE)
    key = _probe_key(qemu, accel, cpu, cfg["vm.kernel"])
    if (read_small(record) or "").strip() == key:
        return
    probe_boot(cfg, qemu)
    write_file(record, key + "\n")
    log.info("probe: -accel %s -cpu %s works here", accel, cpu)
