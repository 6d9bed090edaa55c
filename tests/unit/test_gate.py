"""The submit gate (slurm_charlie/gate.py) run by a real Lua 5.1, the
interpreter Debian's job_submit_lua.so links, on job requests shaped as
slurmctld hands them over: the environment readable by name only (no
iteration, as in Slurm 22.05 and 24.11), spank_job_env a numbered table.
The cluster tests (tests/cluster/test_submit_paths.py) run it in slurmctld."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from slurm_charlie import gate, options

#: Debian's job_submit_lua.so links Lua 5.1; other builds link 5.3 or 5.4
LUAS = ("lua5.1", "lua5.4")


@pytest.fixture(params=LUAS)
def lua(request):
    path = shutil.which(request.param)
    if path is None:
        pytest.fail(f"{request.param} is not installed (make deps installs it)")
    return path


def lua_str(s: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in " -_=/:.@," else "\\%d" % b
                         for c in s for b in c.encode()) + '"' if s is not None else "nil"


def run_gate(tmp_path, env=None, script=None, spank=None, cron=False,
             version=(22, 5)) -> str | None:
    path = tmp_path / "gate.lua"
    path.write_text(gate.render_gate(version))
    env_t = "{" + ", ".join(f"[{lua_str(k)}] = {lua_str(v)}" for k, v in (env or {}).items()) + "}"
    spank_t = "nil" if spank is None else \
        "{" + ", ".join(f"[{i}] = {lua_str(e)}" for i, e in enumerate(spank)) + "}"
    prog = f"""
local gate = dofile({lua_str(str(path))})
local envdata = {env_t}
local env = setmetatable({{}}, {{__index = function(t, k) return envdata[k] end}})
local jd = {{ script = {lua_str(script) if script is not None else "nil"},
              environment = {"env" if script is not None else "nil"},
              spank_job_env = {spank_t}, cron_job = {"true" if cron else "false"} }}
local r = gate.check(jd)
if r == nil then io.write("ACCEPT") else io.write(r) end
"""
    p = subprocess.run([_LUA[0], "-"], input=prog, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return None if p.stdout == "ACCEPT" else p.stdout


_LUA: list[str] = []


@pytest.fixture(autouse=True)
def _interpreter(lua):
    _LUA[:] = [lua]


SHIM = ["CHARLIE=1", "CHARLIE_IMAGE=/home/u/img.sqfs", "CHARLIE_TYPE=container"]


def test_a_plain_job_passes(tmp_path):
    assert run_gate(tmp_path, env={"PATH": "/bin"}, script="#!/bin/sh\nhostname\n") is None
    assert run_gate(tmp_path) is None  # salloc/srun: no script, no environment


def test_a_job_the_shim_checked_passes(tmp_path):
    assert run_gate(tmp_path, env={"CHARLIE_IMAGE": "img.sqfs"},
                    script="#!/bin/sh\n#SBATCH --charlie-image=img.sqfs\nhostname\n",
                    spank=["OTHER_PLUGIN=1"] + SHIM + ["CHARLIE_DIR1=/data", "CHARLIE_MEM=4096",
                                                       "CHARLIE_WRITE=1"]) is None
    assert run_gate(tmp_path, spank=SHIM) is None  # salloc


@pytest.mark.parametrize("env,script,what", [
    ({"CHARLIE_IMAGE": "/x.sqfs"}, "#!/bin/sh\nhostname\n", "CHARLIE_IMAGE in its environment"),
    ({}, "#!/bin/sh\n# comment\n#SBATCH -N 2\n#SBATCH --charlie-image=/x --charlie-dir=/d\nhostname\n",
     "--charlie-image, --charlie-dir in its script"),
    ({"CHARLIE_TYPE": "vm"}, "#!/bin/sh\n#SBATCH  --charlie-image /x\n",
     "CHARLIE_TYPE in its environment and --charlie-image in its script"),
])
def test_a_job_that_asks_for_charlie_without_the_shim_is_refused(tmp_path, env, script, what):
    msg = run_gate(tmp_path, env=env, script=script)
    assert msg is not None and what in msg and "bare host" in msg
    assert "REST API (before 23.02) cannot carry them" in msg
    msg = run_gate(tmp_path, env=env, script=script, version=(24, 11))
    assert "spank_environment" in msg and "slurm-charlie rest-json" in msg


def test_only_the_scripts_header_counts(tmp_path):
    script = "#!/bin/sh\necho hi\n#SBATCH --charlie-image=/x\nsrun --charlie-image=/y true\n"
    assert run_gate(tmp_path, env={}, script=script) is None


def test_unrelated_charlie_names_do_not_select_charlie(tmp_path):
    assert run_gate(tmp_path, env={"CHARLIE_FOO": "bar", "CHARLIE_SANDBOX_REGISTRY": "x"},
                    script="#!/bin/sh\ntrue\n") is None


def test_a_misspelt_option_in_the_script_is_named_with_the_valid_ones(tmp_path):
    msg = run_gate(tmp_path, env={}, script="#!/bin/sh\n#SBATCH --charlie-imgae=/x\n")
    assert "--charlie-imgae: unknown option" in msg and "--charlie-image" in msg


def test_scrontab_with_charlie_is_refused(tmp_path):
    script = "#!/bin/sh\n#SCRON --charlie-image=/x\n# crontab time request was: '* * * * *'\ntrue\n"
    msg = run_gate(tmp_path, env={"SLURM_GET_USER_ENV": "1"}, script=script, cron=True)
    assert "scrontab cannot run charlie jobs" in msg and "--charlie-image in its script" in msg
    assert run_gate(tmp_path, env={}, script="#!/bin/sh\ntrue\n", spank=SHIM,
                    cron=True).startswith("slurm-charlie: error: scrontab")
    assert run_gate(tmp_path, env={}, script="#!/bin/sh\ntrue\n", cron=True) is None


@pytest.mark.parametrize("spank,says", [
    (SHIM + ["CHARLIE_IMGAE=/x"], "CHARLIE_IMGAE is not one slurm-charlie sets"),
    (SHIM + ["CHARLIE_TYPE=pod"], "CHARLIE_TYPE is given twice"),
    (["CHARLIE=1", "CHARLIE_TYPE=pod"], "CHARLIE_TYPE: unknown value 'pod'"),
    (["CHARLIE=1", "CHARLIE_MEM=4G"], "CHARLIE_MEM: not a number"),
    (["CHARLIE=1", "CHARLIE_CPUS=" + "9" * 40], "CHARLIE_CPUS: not a number"),
    (["CHARLIE=yes"], "CHARLIE must be 1"),
    (["CHARLIE=1", "CHARLIE_WRITE=0"], "CHARLIE_WRITE must be 1"),
    (["CHARLIE=1", "CHARLIE_IMAGE=/a\nb"], "CHARLIE_IMAGE contains a newline"),
    (["CHARLIE=1", "CHARLIE_IMAGE=/" + "a" * 5000], "CHARLIE_IMAGE is longer than 4096"),
    (["CHARLIE=1", "CHARLIE_IMAGE="], "CHARLIE_IMAGE is empty"),
    (["CHARLIE=1", "CHARLIE_IMAGE_DIGEST=md5:x"], "not an image digest"),
    (["CHARLIE_IMAGE=/x"], "without the CHARLIE=1 marker"),
    (["CHARLIE=1", "CHARLIE_\x01\x02=x"], "CHARLIE_?? is not one"),
])
def test_forged_spank_values_are_refused_by_name(tmp_path, spank, says):
    msg = run_gate(tmp_path, spank=spank)
    assert msg is not None and says in msg, msg


def test_a_z_in_a_value_is_not_taken_for_a_nul(tmp_path):
    assert run_gate(tmp_path, spank=["CHARLIE=1", "CHARLIE_IMAGE=/home/u/zz.sqfs"]) is None
    assert "contains a newline or NUL" in run_gate(
        tmp_path, spank=["CHARLIE=1", "CHARLIE_IMAGE=/a\0b"])


def test_every_name_the_prolog_accepts_is_known_to_the_gate(lua):
    assert {n for n, _ in gate.spank_kinds()} == options._known_names()


def test_the_wrapper_calls_the_gate_and_a_sites_own_script_is_kept(tmp_path, lua):
    gate.install(str(tmp_path), (22, 5))
    assert gate.CALL_MARK in (tmp_path / "job_submit.lua").read_text()
    conf = "JobSubmitPlugins=lua\n"
    assert gate.check_installed(str(tmp_path), conf) == []
    assert "no JobSubmitPlugins=lua" in gate.check_installed(str(tmp_path), "")[0]
    site = "function slurm_job_submit(j, p, u) return slurm.SUCCESS end\n"
    (tmp_path / "job_submit.lua").write_text(site)
    assert gate.install(str(tmp_path), (22, 5)) == [str(tmp_path / gate.GATE_FILE)]
    assert (tmp_path / "job_submit.lua").read_text() == site
    assert "does not call the gate" in gate.check_installed(str(tmp_path), conf)[0]


def test_install_hooks_writes_the_gate_only_where_slurm_conf_is(tmp_path, monkeypatch, lua):
    """A compute node without slurm.conf (configless) gets no gate and a
    line saying so; the controller's directory gets it, and the check says
    what is missing."""
    from slurm_charlie import install
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "absent" / "slurm.conf"))
    assert install._gate_dir(None) is None
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "slurm.conf").write_text("ClusterName=x\n")
    monkeypatch.setenv("SLURM_CONF", str(etc / "slurm.conf"))
    assert install._gate_dir(None) == str(etc)
    assert install._gate_dir(str(tmp_path)) == str(tmp_path)
    gate.install(str(etc), (24, 11))
    assert gate.check_installed(str(etc), (etc / "slurm.conf").read_text()) == [
        "slurm.conf has no JobSubmitPlugins=lua: add it and run `scontrol reconfigure`"]
    text = (etc / gate.GATE_FILE).read_text().replace(
        f'gate.VERSION = "{gate.__version__}"', 'gate.VERSION = "0.0.1"')
    (etc / gate.GATE_FILE).write_text(text)
    assert "made by slurm-charlie 0.0.1" in gate.check_installed(
        str(etc), "JobSubmitPlugins=lua\n")[0]
