"""House rules of the code base, each backed by a check that fails when the
rule is broken (docs/developer.rst, "Conventions")."""

import ast
import os
import re
import subprocess
import sys

from slurm_charlie import config

PKG = os.path.join(os.path.dirname(__file__), "..", "..", "slurm_charlie")


def _sources():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield os.path.relpath(path, PKG), open(path).read()


#: who may start programs directly: the gate for commands and calls as the
#: user, the root side's spawn (QEMU, holder: long-lived, recorded), and the
#: developer sandbox (daemons in network namespaces); and the task agent,
#: which runs inside the guest (root there, stdlib only, no package to import)
SUBPROCESS_OK = {"proc.py", "privileged.py", "sandbox.py", "guest/agent.py"}


def test_one_gate_for_commands():
    users = set()
    for rel, text in _sources():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "subprocess" or n.startswith("subprocess.") for n in names):
                users.add(rel)
    assert users <= SUBPROCESS_OK, f"import subprocess outside the gate: {users - SUBPROCESS_OK}"
    assert "proc.py" in users


def test_every_config_literal_is_a_key():
    """cfg["vm.acel"] would otherwise surface only in a prolog."""
    used = set()
    for rel, text in _sources():
        used |= set(re.findall(r"""cfg\[["']([^"']+)["']\]""", text))
    assert used, "the scan found no config lookups at all"
    unknown = used - set(config.BY_NAME)
    assert not unknown, f"not keys of config.DEFAULTS: {sorted(unknown)}"


def test_one_definition_of_shared_constants():
    for const in ("MOUNT_POINTS", "PROBE_FILE", "RECORD_DIR", "SYNC_DIR"):
        where = [rel for rel, text in _sources()
                 if re.search(rf"(?m)^{const}\s*=", text)]
        assert len(where) == 1, (const, where)


def _loaded(imports: str, test: str) -> str:
    """Import modules in a fresh interpreter; print(test) there."""
    code = f"import sys, {imports}; print({test})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_sandbox_and_cli_do_not_import_each_other():
    out = _loaded("slurm_charlie.sandbox, slurm_charlie.install",
                  "'slurm_charlie.cli' in sys.modules")
    assert out == "False"


def test_submit_side_imports_no_back_end():
    """Every sbatch with a charlie option runs the validator: the back ends
    (and filelock) are imported when their type is used, not before."""
    out = _loaded("slurm_charlie.cli, slurm_charlie.validate, slurm_charlie.backends",
                  "sorted(m for m in sys.modules if m.startswith('slurm_charlie.backends.')"
                  " or m == 'filelock')")
    assert out == "[]", out


def test_the_prolog_hook_imports_nothing_before_it_forks():
    """The prolog hook's process must end within srun's first poll (0.1 s,
    docs/admin.rst): up to the fork it loads only background and jobenv,
    none of the standard library's costly modules."""
    out = _loaded("slurm_charlie.background, slurm_charlie.jobenv",
                  "sorted(m for m in sys.modules if m.startswith('slurm_charlie.') or m in "
                  "('dataclasses', 'typing', 'tomllib', 're', 'subprocess', 'logging', "
                  "'inspect', 'json'))")
    assert out == "['slurm_charlie.background', 'slurm_charlie.errors', " \
        "'slurm_charlie.jobenv']", out


def test_jobenv_is_the_only_reader_of_slurms_variables():
    """Slurm's job variables (SLURM_JOB_ID, SLURMD_NODENAME, ...) are named in
    jobenv's table and nowhere else in the package."""
    from slurm_charlie import jobenv
    names = {name for name, _ in jobenv.VARIABLES.values()}
    found = {}
    for rel, text in _sources():
        if rel == "jobenv.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and node.value in names:
                found.setdefault(rel, set()).add(node.value)
    assert found == {}, f"read Slurm's variables through jobenv: {found}"


def test_hooks_rooms():
    """The edge (hooks) chooses exit codes and nothing else: it starts no
    back end and writes nothing itself; the user's work and the /dev/shm
    sweep have their own modules."""
    text = open(os.path.join(PKG, "hooks.py")).read()
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                for a in n.names}
    assert not imported & {"backends", "layout", "meta", "shm", "hostlist"}, imported
    assert len(text.splitlines()) < 150
    for mod in ("asuser.py", "shm.py", "lifecycle.py"):
        assert os.path.exists(os.path.join(PKG, mod)), mod


#: who may rename into place: layout's atomic writer, the image cache
#: (a whole unpacked directory), the initrd builder (a gzip stream) and
#: the registry cache (a squashfs mksquashfs made)
RENAME_OK = {"layout.py", "unpack.py", "vmbuild.py", "registry.py"}


def test_one_atomic_file_writer():
    users = {rel for rel, text in _sources()
             if re.search(r"\bos\.(replace|rename)\(", text)}
    assert users <= RENAME_OK, f"write files with layout.write_file: {users - RENAME_OK}"


def test_nothing_at_run_time_imports_the_sandbox():
    """The sandbox ships in the package (admins try the product with `make
    demo`), but only the `sandbox` command loads it: the hooks, the validator
    and the admin commands never do (docs/developer.rst, "Layout")."""
    importers = set()
    for rel, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (
                    node.module == "sandbox" or any(a.name == "sandbox" for a in node.names)):
                importers.add(rel)
    assert importers == {"cli.py"}, importers
    out = _loaded("slurm_charlie.cli, slurm_charlie.hooks, slurm_charlie.doctor, "
                  "slurm_charlie.reconcile", "'slurm_charlie.sandbox' in sys.modules")
    assert out == "False"


def test_one_size_parser():
    """Sizes (K/M/G/T) are read in one place, options.parse_size_mib."""
    where = [rel for rel, text in _sources() if re.search(r'"G":\s*1024', text)]
    assert where == ["options.py"], where
