"""slurm-charlie's submit gate: a job_submit/lua script generated from the
option table, as the shim's C header is.  slurmctld runs it for every job
(sbatch, salloc, srun, scrontab, the REST API) under its locks, so it looks
only at the request: option names, value sanity, no files.

`install-hooks --job-submit-dir DIR` writes DIR/slurm_charlie_gate.lua and,
when DIR has no job_submit.lua of the site's own, a job_submit.lua that
calls it; `check_installed` says what is missing (doctor, install-hooks).
"""

from __future__ import annotations

import os
import re

from . import __version__, options
from .errors import NodeFault

GATE_FILE = "slurm_charlie_gate.lua"
JOB_SUBMIT = "job_submit.lua"
#: the line that marks a job_submit.lua as calling the gate
CALL_MARK = "charlie_gate.check(job_desc)"
OURS = "written by `slurm-charlie install-hooks`"
#: the first Slurm whose REST API takes spank_environment (openapi v0.0.39)
REST_SPANK_SINCE = (23, 2)


def spank_kinds() -> list[tuple[str, str]]:
    """(name, kind of value) of every CHARLIE* name the shim hands on."""
    kind_of = {"path": "path", "paths": "path", "choice": "choice", "flag": "flag",
               "optint": "number", "int": "number", "id": "number", "size": "number"}
    out = [(options.MARKER, "marker")]
    for spec in options.OPTIONS:
        if spec.kind == "paths":
            out += [(f"{spec.env}{i}", "path") for i in range(1, spec.max_count + 1)]
        else:
            out.append((spec.env, kind_of[spec.kind]))
    out.append((options.DIGEST_ENV, "digest"))
    return out


def render_gate(slurm_version: tuple[int, int]) -> str:
    from .render import render
    return render("charlie_gate.lua.j2", version=__version__, opts=options.OPTIONS,
                  spank=spank_kinds(), max_value=options.MAX_VALUE,
                  max_digits=options.MAX_DIGITS,
                  choices=[(o.env, o.choices) for o in options.OPTIONS if o.kind == "choice"],
                  rest_spank=slurm_version >= REST_SPANK_SINCE,
                  slurm_version="%d.%02d" % slurm_version)


def render_job_submit(gate_path: str) -> str:
    from .render import render
    if not os.path.isabs(gate_path) or '"' in gate_path or "\\" in gate_path:
        raise NodeFault("install-hooks", "the gate's path must be absolute, without "
                        "quotes or backslashes", gate_path)
    return render("job_submit.lua.j2", gate_path=gate_path)


def slurm_version() -> tuple[int, int]:
    """(major, minor) of the Slurm here: slurmctld -V (the gate's host), else
    slurmd -V or scontrol -V (which needs a reachable configuration)."""
    import shutil
    from .proc import run, slurm_tool
    # a program that is missing is a NodeFault from run(): the next is tried
    for prog in (shutil.which("slurmctld") or "/usr/sbin/slurmctld",
                 shutil.which("slurmd") or "/usr/sbin/slurmd", slurm_tool("scontrol")):
        try:
            out = run([prog, "-V"], timeout=30, check=False).stdout.decode()
        except NodeFault:
            continue
        m = re.search(r"(\d+)\.(\d+)\.\d+", out)
        if m:
            return int(m.group(1)), int(m.group(2))
    raise NodeFault("slurm version", "neither slurmctld -V, slurmd -V nor scontrol -V "
                    "printed one", hint="run install-hooks where Slurm is installed")


def install(directory: str, version: tuple[int, int]) -> list[str]:
    """Write the gate into slurmctld's configuration directory.  Returns
    what was written; a site's own job_submit.lua is never replaced."""
    from .files import write_file
    gate_path = os.path.join(directory, GATE_FILE)
    write_file(gate_path, render_gate(version), 0o644)
    done = [gate_path]
    js = os.path.join(directory, JOB_SUBMIT)
    if own_job_submit(js) is None:
        write_file(js, render_job_submit(gate_path), 0o644)
        done.append(js)
    return done


def own_job_submit(path: str) -> str | None:
    """None when path is absent or ours; else the site's text."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return None if OURS in text else text


def check_installed(directory: str, slurm_conf_text: str | None) -> list[str]:
    """What keeps the gate from running: [] when it runs."""
    problems = []
    gate_path = os.path.join(directory, GATE_FILE)
    try:
        with open(gate_path) as f:
            head = f.read(4096)
    except OSError:
        return [f"{gate_path} is missing: run `slurm-charlie install-hooks --apply "
                f"--job-submit-dir {directory}`"]
    m = re.search(r"gate.VERSION = \"([^\"]*)\"", head)
    if not m or m.group(1) != __version__:
        problems.append(f"{gate_path} was made by slurm-charlie "
                        f"{m.group(1) if m else '?'}, this is {__version__}: run "
                        "install-hooks again")
    js = os.path.join(directory, JOB_SUBMIT)
    try:
        with open(js) as f:
            text = f.read()
    except OSError:
        text = ""
    if CALL_MARK not in text:
        problems.append(f"{js} does not call the gate: add `local charlie_gate = "
                        f"dofile(\"{gate_path}\")` at its top and, first in "
                        "slurm_job_submit, `local refused = charlie_gate.check(job_desc)` "
                        "(return slurm.ERROR with slurm.log_user(\"%s\", refused) when set)")
    if slurm_conf_text is not None:
        plugins = ""
        for line in slurm_conf_text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.lower().startswith("jobsubmitplugins="):
                plugins = line.split("=", 1)[1]
        if "lua" not in [p.strip().removeprefix("job_submit/") for p in plugins.split(",")]:
            problems.append("slurm.conf has no JobSubmitPlugins=lua: add it and run "
                            "`scontrol reconfigure`")
    return problems
