"""slurm-charlie command line.  Parses, calls the library, prints; the only
place (with hooks.py) that reads argv/environment and picks exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import TYPE_CHECKING, Sequence

from . import PROG, __version__, config
from .errors import CharlieError, NodeFault, UserError, format_message

if TYPE_CHECKING:
    import argparse

#: run by slurmd for every charlie job on every node: main() takes them
#: before argparse, and they import only what the hooks need
HOOKS = ("prolog", "epilog")


# --- subcommands ----------------------------------------------------------

def _checked_pairs(words: Sequence[str], nodes: int | None) -> list[tuple[str, str]]:
    """--charlie-* words (and CHARLIE_* variables) checked as at submit ->
    the pairs the prolog reads."""
    from . import log as logmod
    from . import options, validate
    logmod.setup("info", stderr=True)  # warnings reach the submitting user
    cmdline = options.parse_argv(words)
    merged = options.merge(cmdline, options.parse_user_env(os.environ))
    opts = options.build(merged)
    cfg = config.load()
    resolved = validate.resolve(opts, cfg, cwd=os.getcwd(), num_nodes=nodes)
    # an archive is hashed here, once, not on every node
    resolved = validate.submit_digest(resolved, cfg, validate.user_cache_home(os.environ))
    return options.to_env(resolved)


def cmd_validate(args: argparse.Namespace) -> int:
    pairs = _checked_pairs(args.options, args.nodes)
    if args.emit:
        for name, value in pairs:
            print(f"{name}={value}")
    else:
        for name, value in pairs:
            print(f"{name}={value}", file=sys.stderr)
        print(f"{PROG}: options ok", file=sys.stderr)
    return 0


def cmd_rest_json(args: argparse.Namespace) -> int:
    """The spank_environment a REST client (Slurm >= 23.02) puts in its job."""
    import json
    from .errors import UserError
    pairs = [f"{n}={v}" for n, v in _checked_pairs(args.options, args.nodes)]
    if args.into:
        try:
            with open(args.into) as f:
                request = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(args.into, "not a readable JSON request", str(e)[:120]) from None
        job = request.get("job") if isinstance(request, dict) else None
        if not isinstance(job, dict):
            raise UserError(args.into, "has no \"job\" object",
                            hint="give the body you POST to /slurm/v0.0.4x/job/submit")
        job["spank_environment"] = pairs
        json.dump(request, sys.stdout, indent=2)
    else:
        json.dump({"spank_environment": pairs}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from . import accounting
    return accounting.jobs_main(args.since, args.all_users, args.jobs, args.json)


def cmd_prolog(args: argparse.Namespace) -> int:
    from . import hooks
    return hooks.prolog_main(os.environ)


def cmd_epilog(args: argparse.Namespace) -> int:
    from . import hooks
    return hooks.epilog_main(os.environ)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "example":
        sys.stdout.write(config.render_example())
        return 0
    cfg = config.load(path=args.file)
    print(f"# site config: {cfg.path or '(none: all defaults)'}")
    width = max(len(k) for k in cfg.values)
    for name, value in cfg.values.items():
        print(f"{name:<{width}} = {value!r:<40} # {cfg.sources[name]}")
    root = cfg["runtime_root"]
    config.check_root_safe(config.expand_node(root, "NODE"))
    print(f"{PROG}: config ok", file=sys.stderr)
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from .render import (render_config_rst, render_header, render_options_rst,
                         render_root_ops_rst)
    out = {"header": render_header, "options-rst": render_options_rst,
           "config-example": config.render_example,
           "config-rst": render_config_rst, "root-ops-rst": render_root_ops_rst}[args.what]()
    sys.stdout.write(out)
    return 0


def cmd_install_hooks(args: argparse.Namespace) -> int:
    from . import install
    return install.main(args)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from . import sandbox
    return sandbox.main(args)


def cmd_status(args: argparse.Namespace) -> int:
    from . import asroot, layout, state
    cfg = config.load()
    node = args.node or os.uname().nodename.split(".")[0]
    root = cfg.runtime_root(node)
    jobs = layout.list_job_dirs(root)
    print(f"# {root}: {len(jobs)} job director{'y' if len(jobs) == 1 else 'ies'}")
    records = asroot.Records(root) if os.geteuid() == 0 else None
    for job in jobs:
        used = ""
        if records is not None:  # root: its own record, not the user's file
            rec = records.read(job)
            st = {"type": rec.type, "phase": rec.phase} if rec else {}
            u = asroot.cgroup_usage(node, rec.uid, job) if rec else {}
            if u:  # what root started for the job, from its cgroup
                used = (f"\tcpu={u.get('cpu_ns', 0) / 1e9:.1f}s"
                        f"\tmem_peak={u.get('memory_peak', 0) >> 10}KiB")
        else:
            st = state.read(layout.JobPaths(root, job).state) or {}
        print(f"{job}\ttype={st.get('type', '?')}\tphase={st.get('phase', '?')}{used}")
    kept = cfg.kept_dir(node)
    try:
        users = sorted(os.listdir(kept))
    except OSError:
        users = []
    for uid in users:
        try:
            names = sorted(os.listdir(os.path.join(kept, uid)))
        except OSError:  # another user's: only root sees inside
            continue
        for name in names:
            print(f"kept\t{os.path.join(kept, uid, name)}\t(commit with: "
                  f"{PROG} commit PATH)")
    return 0


def _node(args: argparse.Namespace) -> str:
    from .jobenv import ids
    node = ids(os.environ)[1]
    return args.node or (node if node != "?" else os.uname().nodename.split(".")[0])


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UserError(what, "must run as root on the node",
                        hint=f"sudo {PROG} {what}")


def cmd_reconcile(args: argparse.Namespace) -> int:
    from . import log as logmod
    from . import reconcile
    _need_root("reconcile")
    logmod.setup("info", stderr=True)
    cfg = config.load()
    node = _node(args)
    running = reconcile.jobs_on_node(node)
    if running is None:
        raise NodeFault("reconcile", "cannot ask Slurm which jobs run on " + node,
                        hint="run it where squeue works; nothing was removed")
    report = reconcile.reconcile(cfg, node, running, min_age=args.min_age,
                                 dry_run=args.dry_run)
    for line in report.lines():
        print(("would clean: " if args.dry_run and line.startswith("leftover") else "")
              + line)
    print(f"{PROG}: {node}: {len(report.jobs)} leftover job(s) "
          f"{'found' if args.dry_run else 'cleaned'}, {len(report.kept_removed)} old "
          f"kept overlay(s), {len(report.skipped)} job(s) left alone (running or young)",
          file=sys.stderr)
    return 1 if report.faults else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor
    _need_root("doctor")
    return doctor.main(config.load(), _node(args))


def cmd_gpu_spec(args: argparse.Namespace) -> int:
    import json
    from . import gpuspec
    cfg = config.load()
    node = _node(args)
    try:
        devices = gpuspec.node_devices(cfg, node, os.environ.get("SLURM_CONF")
                                       or "/etc/slurm/slurm.conf")
        spec, skipped = gpuspec.generate(args.kind or cfg["gpu.cdi_kind"], devices,
                                         args.driver_root or cfg["gpu.driver_root"],
                                         config.expand_node(cfg["gpu.driver_table"], node),
                                         tuple(args.env))
    except (NodeFault, UserError) as e:
        print(f"slurm-charlie gpu-spec: {e.line()}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    for line in skipped:
        print(f"slurm-charlie gpu-spec: left out {line}", file=sys.stderr)
    if args.output == "-":
        json.dump(spec, sys.stdout, indent=2)
        print()
    else:
        gpuspec.write(spec, args.output)
        print(f"{args.output}: {spec['kind']}, {len(spec['devices'])} GPU(s), "
              f"{len(spec['containerEdits'].get('mounts', []))} mount(s)", file=sys.stderr)
    return 0


def cmd_vm_initrd(args: argparse.Namespace) -> int:
    from . import vmbuild
    names = vmbuild.build_initrd(args.modules, args.out, args.busybox)
    print(f"{PROG}: wrote {args.out} ({len(names)} modules)", file=sys.stderr)
    return 0


def cmd_vm_kernel(args: argparse.Namespace) -> int:
    from . import vmbuild
    kind = vmbuild.extract_kernel(args.kernel, args.out)
    print(f"{PROG}: wrote {args.out} (the {kind}-compressed kernel of {args.kernel}, "
          "uncompressed: set vm.kernel to it)", file=sys.stderr)
    return 0


def cmd_ssh_proxy(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.ssh_proxy(args.socket)


def cmd_ssh_relay(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.ssh_relay(args.socket, args.address)


def cmd_task_relay(args: argparse.Namespace) -> int:
    from . import taskrelay
    if not args.task_command:
        raise UserError("task-relay", "no command to run in the guest")
    return taskrelay.relay(args.socket, args.task_command)


def cmd_task_mux(args: argparse.Namespace) -> int:
    from . import taskrelay
    return taskrelay.mux(args.agent_socket, args.tasks_socket, args.status_file)


def cmd_guest_go(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.guest_go(os.environ.get("CH_JOB_DIR"))


def cmd_guest_wait(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.guest_wait(args.job_dir, args.guest)


def cmd_console(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.console(args.guest, args.job_dir)


def cmd_ssh(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.ssh(args.guest, args.remote_command, args.job_dir)


def cmd_commit(args: argparse.Namespace) -> int:
    from . import vmtools
    return vmtools.commit_kept(args.overlay, config.load())


def build_parser(validate_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line; with validate_only, only `validate`: the
    shim runs it in every sbatch/srun/salloc with --charlie-*, and the
    other twenty subcommands cost it ~8 ms."""
    import argparse
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Per-job containers and virtual machines for Slurm."))
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check --charlie-* options as the "
                       "shim does at submit time")
    v.add_argument("--emit", action="store_true",
                   help="print the normalized NAME=VALUE lines for the shim")
    v.add_argument("--nodes", type=int, help="node count, when known")
    v.add_argument("options", nargs="*", metavar="--charlie-NAME[=VALUE]",
                   help="options as given to sbatch/srun/salloc")
    v.set_defaults(func=cmd_validate)
    if validate_only:
        return p

    sub.add_parser("prolog", help="Slurm Prolog (root)").set_defaults(func=cmd_prolog)
    sub.add_parser("epilog", help="Slurm Epilog (root)").set_defaults(func=cmd_epilog)

    c = sub.add_parser("config", help="check or show the site config")
    c.add_argument("action", choices=("check", "example"))
    c.add_argument("file", nargs="?", help="config file (default: "
                   f"${config.ENV_VAR} or {config.DEFAULT_PATH})")
    c.set_defaults(func=cmd_config)

    g = sub.add_parser("gen", help="generated files (C header, docs)")
    g.add_argument("what", choices=("header", "options-rst", "config-example", "root-ops-rst",
                                    "config-rst"))
    g.set_defaults(func=cmd_gen)

    i = sub.add_parser("install-hooks", help="print (or --apply) the Slurm "
                       "configuration that enables slurm-charlie")
    i.add_argument("--apply", action="store_true")
    i.add_argument("--hook-dir", default="/etc/slurm/charlie")
    i.add_argument("--plugstack", default="/etc/slurm/plugstack.conf")
    i.add_argument("--so", help="built shim (default: the one next to the package)")
    i.add_argument("--bin", help="slurm-charlie command to use in hooks "
                   "(default: this one)")
    i.add_argument("--conf", help="site config the hooks use "
                   f"(default: ${config.ENV_VAR} or {config.DEFAULT_PATH})")
    i.add_argument("--job-submit-dir", metavar="DIR",
                   help="slurmctld's configuration directory (where slurm.conf is, "
                   "default /etc/slurm): write the submit gate there "
                   "(slurm_charlie_gate.lua, and job_submit.lua unless the site has one)")
    i.add_argument("--no-gate", action="store_true",
                   help="do not write the submit gate (a compute node)")
    i.set_defaults(func=cmd_install_hooks)

    s = sub.add_parser("sandbox", help="a real multi-node Slurm on this machine")
    s.add_argument("action", choices=("up", "down", "status", "env"))
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--dir", default=None, help="state directory")
    s.add_argument("--guest-dir", default=None, help="directory with the guest "
                   "vmlinuz and initrd.img (make guest): enables VM jobs")
    s.set_defaults(func=cmd_sandbox)

    rc = sub.add_parser("reconcile", help="(root) remove what finished jobs left on "
                        "this node: job directories, root's records and processes, "
                        "old kept overlays")
    rc.add_argument("--node", help="node name (default: $SLURMD_NODENAME or the "
                    "short hostname)")
    rc.add_argument("--dry-run", action="store_true", help="only say what would go")
    rc.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                    help="leave younger job directories alone (default: "
                    "reconcile.min_age)")
    rc.set_defaults(func=cmd_reconcile)

    dr = sub.add_parser("doctor", help="(root) check this node for what "
                        "slurm-charlie needs, with the fix for each problem")
    dr.add_argument("--node", help="node name (default: $SLURMD_NODENAME or the "
                    "short hostname)")
    dr.set_defaults(func=cmd_doctor)

    gs = sub.add_parser("gpu-spec", help="(root) write a CDI spec for this node's GPUs "
                        "from the driver (for nodes whose vendor tools wrote none)")
    gs.add_argument("--node", help="node name (default: $SLURMD_NODENAME or the "
                    "short hostname)")
    gs.add_argument("-o", "--output", default="-", help="where to write it (default: "
                    "standard output), e.g. /etc/cdi/nvidia.json")
    gs.add_argument("--kind", help="CDI kind (default: gpu.cdi_kind)")
    gs.add_argument("--driver-root", help="where the driver's files are (default: "
                    "gpu.driver_root, itself / unless set)")
    gs.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable for every GPU job's tasks (repeatable)")
    gs.set_defaults(func=cmd_gpu_spec)

    rj = sub.add_parser("rest-json", help="check --charlie-* options as at submit and "
                        "print the spank_environment a REST job request carries "
                        "(Slurm 23.02 and later)")
    rj.add_argument("--nodes", type=int, default=None, help="the job's node count")
    rj.add_argument("--into", metavar="REQUEST.json", help="print this job request "
                    "with spank_environment set in its \"job\"")
    rj.add_argument("options", nargs="*", metavar="--charlie-NAME[=VALUE]")
    rj.set_defaults(func=cmd_rest_json)

    jb = sub.add_parser("jobs", help="recent charlie jobs from Slurm's accounting "
                        "(sacct): type, image and digest")
    jb.add_argument("-S", "--since", default="now-7days", help="sacct's start time "
                    "(default now-7days)")
    jb.add_argument("-a", "--all-users", action="store_true", help="every user's "
                    "jobs (as sacct --allusers allows)")
    jb.add_argument("-j", "--jobs", action="append", default=[], metavar="JOBID")
    jb.add_argument("--json", action="store_true", help="JSON instead of a table")
    jb.set_defaults(func=cmd_jobs)

    st = sub.add_parser("status", help="charlie job directories on this node")
    st.add_argument("--node", help="node name (default: short hostname)")
    st.set_defaults(func=cmd_status)

    vi = sub.add_parser("vm-initrd", help="build the guest initrd for direct "
                        "kernel boot (vm.initrd)")
    vi.add_argument("--modules", required=True,
                    help="the guest kernel's modules directory (lib/modules/VERSION)")
    vi.add_argument("--out", required=True)
    vi.add_argument("--busybox", default="/bin/busybox", help="a static busybox")
    vi.set_defaults(func=cmd_vm_initrd)

    vk = sub.add_parser("vm-kernel", help="write the guest kernel uncompressed "
                        "(vm.kernel): QEMU boots it through its PVH entry, seconds "
                        "faster under software emulation")
    vk.add_argument("kernel", help="the guest's vmlinuz (a bzImage)")
    vk.add_argument("--out", required=True)
    vk.set_defaults(func=cmd_vm_kernel)

    gw = sub.add_parser("guest-wait", help="(batch step of a VM job) show guest "
                        "N's job output and exit with its exit code")
    gw.add_argument("job_dir")
    gw.add_argument("--guest", type=int, default=0)
    gw.set_defaults(func=cmd_guest_wait)

    sp = sub.add_parser("ssh-proxy", help="(ssh's ProxyCommand) connect to a "
                        "guest's ssh relay socket")
    sp.add_argument("socket")
    sp.set_defaults(func=cmd_ssh_proxy)
    sr = sub.add_parser("ssh-relay", help="(started by the prolog) relay a unix "
                        "socket to a guest's sshd")
    sr.add_argument("socket")
    sr.add_argument("address")
    sr.set_defaults(func=cmd_ssh_relay)
    tr = sub.add_parser("task-relay", help="(what the shim makes of each srun "
                        "task of a VM job) run the task in the node's guest")
    tr.add_argument("socket")
    tr.add_argument("task_command", nargs=argparse.REMAINDER, metavar="COMMAND")
    tr.set_defaults(func=cmd_task_relay)
    tm = sub.add_parser("task-mux", help="(started by the prolog) carry the node's "
                        "task relays to its guest's agent")
    tm.add_argument("agent_socket")
    tm.add_argument("tasks_socket")
    tm.add_argument("status_file")
    tm.set_defaults(func=cmd_task_mux)
    gg = sub.add_parser("guest-go", help="(srun task of a VM batch job, started "
                        "by guest-wait on every node) let the node's guest run the job")
    gg.set_defaults(func=cmd_guest_go)

    co = sub.add_parser("console", help="attach to a guest's serial console "
                        "(inside the job's allocation)")
    co.add_argument("guest", nargs="?", type=int, default=0)
    co.add_argument("--job-dir", help=argparse.SUPPRESS)
    co.set_defaults(func=cmd_console)

    sh = sub.add_parser("ssh", help="ssh into a guest as yourself (inside the "
                        "job's allocation)")
    sh.add_argument("guest", nargs="?", type=int, default=0)
    sh.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                    help="command to run (default: a login shell)")
    sh.add_argument("--job-dir", help=argparse.SUPPRESS)
    sh.set_defaults(func=cmd_ssh)

    cm = sub.add_parser("commit", help="commit a kept guest overlay into its image")
    cm.add_argument("overlay", help="the overlay a job kept (its path was in "
                    "the job's output)")
    cm.set_defaults(func=cmd_commit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0] in HOOKS:
        if argv[0] == "prolog":
            from . import prolog_hook
            return prolog_hook.main()
        from . import prolog_hook
        return prolog_hook.epilog()
    parser = build_parser(validate_only=bool(argv) and argv[0] == "validate")
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("validate", "rest-json"):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.options = list(args.options) + extra
    from .jobenv import ids
    jobid = ids(os.environ)[0] if args.command in ("prolog", "epilog") else None
    try:
        return args.func(args)
    except CharlieError as e:
        print(format_message(e, jobid), file=sys.stderr)
        return 1 if isinstance(e, UserError) else 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.errno == errno.EPIPE:
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main())
