"""House rules of the code base, each backed by a check that fails when the
rule is broken (docs/developer.rst, "Conventions")."""

import ast
import os
import re
import subprocess
import sys

import pytest

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
SUBPROCESS_OK = {"proc.py", "asroot/procs.py", "sandbox.py", "sandboxdb.py", "guest/agent.py"}


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
                  " and m != 'slurm_charlie.backends.base' or m == 'filelock')")
    assert out == "[]", out


def test_the_prolog_hook_imports_nothing_before_it_forks():
    """The prolog hook's process must end within srun's first poll (0.1 s,
    docs/admin.rst): up to the fork it loads only its entry point, root's
    background room and jobenv, none of the standard library's costly
    modules."""
    out = _loaded("slurm_charlie.prolog_hook, slurm_charlie.jobenv",
                  "[slurm_charlie.asroot.detach_prolog.__name__] + "
                  "sorted(m for m in sys.modules if m.startswith('slurm_charlie.') or m in "
                  "('dataclasses', 'typing', 'tomllib', 're', 'subprocess', 'logging', "
                  "'inspect', 'json'))")
    assert out == "['detach', 'slurm_charlie.asroot', 'slurm_charlie.asroot.background', " \
        "'slurm_charlie.errors', 'slurm_charlie.jobenv', 'slurm_charlie.prolog_hook']", out


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


#: who may rename into place: the atomic file writer (files), the image cache
#: (a whole unpacked directory), the initrd builder (a gzip stream) and
#: the registry cache (a squashfs mksquashfs made)
RENAME_OK = {"files.py", "unpack.py", "vmbuild.py", "registry.py"}


def test_one_atomic_file_writer():
    users = {rel for rel, text in _sources()
             if re.search(r"\bos\.(replace|rename)\(", text)}
    assert users <= RENAME_OK, f"write files with files.write_file: {users - RENAME_OK}"


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


# --- root's closed list (slurm_charlie/asroot) ----------------------------------

#: modules whose code never runs as root for a job, and why.  "call_as":
#: root's side calls them only through proc.call_as (checked below)
NOT_ROOT = {
    "asuser.py": "call_as: the job user's side of the prolog",
    "unpack.py": "call_as: image archives unpacked as the job user",
    "registry.py": "call_as: registry pulls as the job user",
    "backends/vm/disks.py": "call_as: qemu-img as the job user (and `slurm-charlie commit`)",
    "validate.py": "the submitting user (the shim's validator), or the prolog's call_as",
    "taskrelay.py": "the job user's task relay and multiplexer",
    "vmtools.py": "the job user's commands (guest-wait, guest-go, console, ssh, commit)",
    "guest/agent.py": "root of the guest, inside the guest",
    "guest/pmifence.py": "inside the guest",
    "guest/wire.py": "inside the guest and the job user's relay",
    "sandbox.py": "the developer's cluster (make demo, make test)",
    "sandboxdb.py": "the developer's cluster: its MariaDB, slurmdbd and slurmrestd",
    "fakesys.py": "the sandbox's fake sysfs and its fake kernel (make demo, make test)",
    "install.py": "the admin installing the hooks (install-hooks)",
    "vmbuild.py": "the admin or developer building a guest initrd",
}

#: functions of root's modules that run as the job user: each is handed to
#: proc.call_as, or called only by such functions (checked below)
AS_USER = {
    "backends/container.py": {"_make_fifo", "first_look", "check_squashfs"},
    "backends/vm/jobend.py": {"poweroff_as_user", "save_outputs", "_copy_outputs"},
    "shm.py": {"clean_as_user"},
}

#: Backend.check runs at submit (the validator, as the submitting user) and
#: in the prolog's prepare step (validate.resolve inside call_as)
USER_METHODS = {"check"}

#: the command gate ends the children it forked itself (run's timeout,
#: call_as's limit): its own processes, not a job's
OWN_CHILDREN = {"proc.py": {"_collect", "run_watched"}}

#: what only root's package may do: calls ...
ROOT_CALLS = {("os", n) for n in ("chown", "fchown", "lchown", "kill", "killpg", "unlink",
                                  "remove", "rmdir", "mkdir", "makedirs")} | {
    ("shutil", "rmtree"), ("signal", "pidfd_send_signal")}
#: ... methods of a process root started ...
ROOT_METHODS = {"kill", "send_signal", "terminate"}
#: ... and names of what root changes: cgroup files, the network tools
ROOT_STRINGS = ("/sys/fs/cgroup", "cgroup.procs", "memory.limit_in_bytes", "ip", "nft")


def _functions(tree: ast.AST) -> dict[ast.AST, str]:
    """node -> name of the outermost function it is in (module level: "")."""
    where: dict[ast.AST, str] = {}

    def visit(node: ast.AST, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = fn or (child.name if isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef)) else "")
            where[child] = name
            visit(child, name)
    visit(tree, "")
    return where


def _root_acts(tree: ast.AST):
    """(line, what) of every root-only act in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in ROOT_CALLS:
                yield node, f"{f.value.id}.{f.attr}()"
            elif f.attr in ROOT_METHODS and not (isinstance(f.value, ast.Name)
                                                 and f.value.id in ("os", "signal")):
                yield node, f".{f.attr}()"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in ("ip", "nft", "cgroup.procs", "memory.limit_in_bytes")
                or node.value.startswith("/sys/fs/cgroup")):
            yield node, repr(node.value)


def _call_as_targets() -> set[str]:
    out = set()
    for _, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "call_as" and len(node.args) >= 2:
                fn = node.args[1]
                out.add(fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", ""))
    return out


def test_only_roots_package_acts_as_root():
    """Outside slurm_charlie/asroot, no code that runs as root for a job
    chowns, kills, unlinks, mkdirs, writes a cgroup file or runs ip/nft."""
    found = []
    for rel, text in _sources():
        if rel.startswith("asroot/") or rel in NOT_ROOT:
            continue
        tree = ast.parse(text)
        where = _functions(tree)
        for node, what in _root_acts(tree):
            fn = where.get(node, "")
            if fn not in AS_USER.get(rel, set()) | OWN_CHILDREN.get(rel, set()):
                found.append(f"{rel}:{node.lineno}: {what} in {where.get(node) or 'module'}")
    assert found == [], "root's acts belong in slurm_charlie/asroot:\n" + "\n".join(found)


def test_the_as_user_functions_run_as_the_user():
    """Every function AS_USER names is handed to call_as, or called only by
    such functions: the list cannot hide a root act."""
    targets = _call_as_targets()
    for rel, names in AS_USER.items():
        tree = ast.parse(open(os.path.join(PKG, rel)).read())
        where = _functions(tree)
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert names <= defined, (rel, names - defined)
        for name in names - targets:
            callers = {where.get(n, "") for n in ast.walk(tree) if isinstance(n, ast.Call)
                       and getattr(n.func, "id", getattr(n.func, "attr", None)) == name}
            assert callers and callers <= names | targets, (rel, name, callers)


def test_call_as_modules_are_only_called_through_call_as():
    """Root's side never calls the user-side modules' functions itself."""
    user_mods = {rel[:-3].split("/")[-1] for rel, why in NOT_ROOT.items()
                 if why.startswith("call_as")}
    found = []
    for rel, text in _sources():
        if rel in NOT_ROOT:
            continue
        tree = ast.parse(text)
        where = _functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in user_mods \
                    and where.get(node, "") not in USER_METHODS:
                found.append(f"{rel}:{node.lineno}: {node.func.value.id}.{node.func.attr}()")
    assert found == [], "call these through proc.call_as:\n" + "\n".join(found)


def test_callers_use_only_the_listed_root_operations():
    """Outside asroot, root's package is reached by the names in
    asroot.OPERATIONS only: no room imported directly, no other name."""
    from slurm_charlie import asroot
    bad = []
    for rel, text in _sources():
        if rel.startswith("asroot/"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "asroot" and node.attr not in asroot.OPERATIONS \
                    and node.attr != "OPERATIONS":
                bad.append(f"{rel}:{node.lineno}: asroot.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.endswith("asroot") or ".asroot." in f".{node.module}."):
                if node.module.split(".")[-1] != "asroot":
                    bad.append(f"{rel}:{node.lineno}: from {node.module} import ...")
                else:
                    bad += [f"{rel}:{node.lineno}: from asroot import {a.name}"
                            for a in node.names if a.name not in asroot.OPERATIONS]
    assert bad == [], "not on root's closed list:\n" + "\n".join(bad)


def test_every_listed_operation_exists():
    from slurm_charlie import asroot
    for name, (room, attr, what) in asroot.OPERATIONS.items():
        assert getattr(asroot, name) is not None, name
        assert len(what) > 10, name
    with pytest.raises(AttributeError, match="not one of root's operations"):
        asroot.chown_anything  # noqa: B018


# --- the import graph ------------------------------------------------------------

def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["slurm_charlie", *parts])


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (at the top or in a function), relative
    imports resolved; asroot's package also depends on every room its
    closed list names (it imports them when a name is first used)."""
    mods = {_module_name(rel): rel for rel, _ in _sources()}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, rel in mods.items():
        pkg = mod if rel.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(os.path.join(PKG, rel)).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    from slurm_charlie import asroot
    graph["slurm_charlie.asroot"] |= {f"slurm_charlie.asroot.{room}"
                                      for room, _, _ in asroot.OPERATIONS.values()}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert "slurm_charlie.asroot.procs" in graph["slurm_charlie.asroot"]
    assert "slurm_charlie.cleanup" in graph["slurm_charlie.reconcile"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_root_act_scan_sees_root_acts():
    tree = ast.parse("import os, shutil\ndef f(p, fd):\n    os.fchown(fd, 1, 1)\n"
                     "    p.kill()\n    open('/sys/fs/cgroup/memory/x')\n"
                     "    run(['nft', '-f', '-'])\n    shutil.rmtree('/x')\n"
                     "    os.replace('a', 'b')\n")
    assert sorted(w for _, w in _root_acts(tree)) == [
        "'/sys/fs/cgroup/memory/x'", "'nft'", ".kill()", "os.fchown()", "shutil.rmtree()"]


def test_one_lookup_of_slurms_commands():
    """Slurm's commands are found by proc.slurm_tool only (the sandbox,
    which installs its own, aside)."""
    where = [rel for rel, text in _sources() if rel not in ("proc.py", "sandbox.py")
             and re.search(r"""which\(["'](srun|scontrol|squeue|sinfo|sbatch|salloc|scancel)""",
                           text)]
    assert where == [], where


def test_test_modules_have_names_of_their_own():
    """The suite's directories have no __init__.py, so pytest imports each
    test module by its base name: two of one name (tests/unit/test_x.py and
    tests/cluster/test_x.py) stop the whole run at collection."""
    tests = os.path.join(os.path.dirname(__file__), "..")
    seen: dict[str, str] = {}
    twice = []
    for d, _, files in os.walk(tests):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                if f in seen:
                    twice.append(f"{seen[f]} and {os.path.join(d, f)}")
                seen.setdefault(f, os.path.join(d, f))
    assert twice == []
