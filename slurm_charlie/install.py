"""`slurm-charlie install-hooks`: print, or with --apply write, what a site
needs: the hook directory (dispatchers, 50-charlie hooks, shim, charlie.env),
the plugstack.conf line, and the slurm.conf lines to add by hand."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from . import config
from .errors import NodeFault

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_TREE = os.path.dirname(HERE)
SHARE = os.path.join(sys.prefix, "share", "slurm-charlie")


def _find(rel: str, what: str) -> str:
    for base in (SOURCE_TREE, SHARE):
        path = os.path.join(base, rel)
        if os.path.exists(path):
            return path
    raise NodeFault(what, "not found", rel, hint=f"looked in {SOURCE_TREE} "
                    f"and {SHARE}; build the shim with `make -C spank`")


def default_bin() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "slurm-charlie")
    return cand if os.path.exists(cand) else (shutil.which("slurm-charlie") or cand)


def plugstack_line(so: str, bin_: str, runtime_root: str, conf: str) -> str:
    for name, value in (("shim", so), ("bin", bin_), ("runtime_root", runtime_root),
                        ("conf", conf)):
        if any(c.isspace() for c in value):
            raise NodeFault("install-hooks", f"{name} contains white space, "
                            "which plugstack.conf cannot hold", value)
    return f"required {so} bin={bin_} runtime_root={runtime_root} conf={conf}"


def render_dispatch(kind: str) -> str:
    from .render import render
    return render("dispatch.sh.j2", kind=kind)


def _write(path: str, text: str, mode: int) -> None:
    from .files import write_file
    write_file(path, text, mode)


def update_plugstack(path: str, line: str) -> None:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [l for l in lines if "charlie.so" not in l]
    _write(path, "\n".join(kept + [line]) + "\n", 0o644)


def python_of(bin_: str) -> str:
    """The Python that runs the slurm-charlie command (its #! line), for
    the prolog hook to start the package directly; "" when it is not a
    Python script (the hook then runs the command)."""
    try:
        with open(bin_, "rb") as f:
            first = f.readline(4096).decode(errors="replace").strip()
    except OSError:
        return ""
    prog = first[2:].strip().split(" ")[0] if first.startswith("#!") else ""
    if os.path.isabs(prog) and os.path.basename(prog).startswith("python") \
            and os.access(prog, os.X_OK):
        return prog
    return ""


def main(args: argparse.Namespace) -> int:
    conf = args.conf or config.config_path(os.environ)[0]
    cfg = config.load(path=conf) if os.path.exists(conf) else config.load(path=None, environ={})
    bin_ = os.path.abspath(args.bin or default_bin())
    hook_dir = os.path.abspath(args.hook_dir)
    so_src = os.path.abspath(args.so) if args.so else _find("spank/charlie.so", "shim")
    so = os.path.join(hook_dir, "charlie.so")
    line = plugstack_line(so, bin_, cfg["runtime_root"], conf)
    if args.apply:
        for sub in ("", "prolog.d", "epilog.d"):
            os.makedirs(os.path.join(hook_dir, sub), mode=0o755, exist_ok=True)
        with open(so_src, "rb") as f:
            from .files import write_file
            write_file(so, f.read(), 0o755)
        for kind in ("prolog", "epilog"):
            src = _find(f"{kind}.d/50-charlie", f"{kind} hook")
            with open(src) as f:
                _write(os.path.join(hook_dir, f"{kind}.d", "50-charlie"), f.read(), 0o755)
            _write(os.path.join(hook_dir, kind), render_dispatch(kind), 0o755)
        _write(os.path.join(hook_dir, "charlie.env"),
               "# written by slurm-charlie install-hooks; sourced by the hooks\n"
               f"CHARLIE_BIN={shlex.quote(bin_)}\n"
               f"CHARLIE_PYTHON={shlex.quote(python_of(bin_))}\n"
               f"SLURM_CHARLIE_CONF={shlex.quote(conf)}\n", 0o644)
        update_plugstack(args.plugstack, line)
    gate_dir = None if args.no_gate else _gate_dir(args.job_submit_dir)
    if gate_dir is not None and args.apply:
        from . import gate
        for path in gate.install(gate_dir, gate.slurm_version()):
            print(f"# wrote {path}")
    verb = "wrote" if args.apply else "would write"
    print(f"# {verb} hooks, dispatchers and shim in {hook_dir}/")
    print(f"# plugstack.conf ({args.plugstack}) {'has' if args.apply else 'needs'} this line:")
    print(line)
    print("# slurm.conf needs (then restart slurmd and slurmctld):")
    print(f"Prolog={hook_dir}/prolog")
    print(f"Epilog={hook_dir}/epilog")
    print("PrologFlags=Alloc,NoHold   # Alloc is required; NoHold (optional) lets srun")
    print("                           # start while prologs run: steps still wait per node")
    print("# or PrologFlags=Alloc,Contain: sstat/sacct then count guests and holders")
    print("#                           in the J.extern step (Slurm refuses NoHold with it)")
    if gate_dir is not None:
        _print_gate(gate_dir, args.apply)
    print(f"# site config: {conf} ({'found' if os.path.exists(conf) else 'absent: defaults apply'})")
    return 0


def _gate_dir(given: str | None) -> str | None:
    """Where the gate goes: --job-submit-dir, else slurm.conf's directory
    when there is a slurm.conf (not on a configless compute node)."""
    if given:
        return os.path.abspath(given)
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if os.path.isfile(conf):
        return os.path.dirname(os.path.abspath(conf))
    print(f"# gate: no {conf} here, so no submit gate written: run install-hooks on "
          "slurmctld's host, or give --job-submit-dir")
    return None


def _print_gate(gate_dir: str, applied: bool) -> None:
    """The submit gate's lines, and what keeps it from running."""
    from . import gate
    print("# the submit gate (slurmctld's host; docs/admin.rst, \"The submit gate\"):")
    print("JobSubmitPlugins=lua        # with the site's others, comma-separated")
    conf = os.path.join(gate_dir, "slurm.conf")
    try:
        with open(conf) as f:
            text: str | None = f.read()
    except OSError:
        text = None
    if not applied:
        print(f"# would write {os.path.join(gate_dir, gate.GATE_FILE)}")
        return
    problems = gate.check_installed(gate_dir, text)
    for p in problems:
        print(f"# gate: to do: {p}")
    if not problems:
        print(f"# gate: installed in {gate_dir} and called by its job_submit.lua"
              + ("" if text is not None else f" (no slurm.conf in {gate_dir} to check)"))
