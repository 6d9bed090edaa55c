"""meta/ rendering: golden files, and the fan-out property (same input,
same bytes, whichever node renders)."""

import difflib
import os

import pytest

from slurm_charlie import hostlist, meta
from slurm_charlie.errors import UserError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
REGEN = "SLURM_CHARLIE_REGEN_GOLDEN"

CASES = {
    "none-3": meta.MetaInput("42", ("node1", "node2", "node3"), (2, 2, 2), "none",
                             data_dirs=2),
    "vm-mixed": meta.MetaInput("7", tuple(hostlist.expand("n[01-03,7]")),
                               tuple(hostlist.expand_counts("4,1(x2),8")), "vm",
                               subnet="10.99.0.0/24", nameservers=("10.0.0.53",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    files = meta.render(CASES[case])
    text = "".join(f"==> {name} <==\n" + ("(directory)\n" if data is None else
                                         data.decode()) for name, data in
                   sorted(files.items()))
    path = os.path.join(GOLDEN, f"meta-{case}.txt")
    if os.environ.get(REGEN):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        want = f.read()
    diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                        path, "rendered"))
    assert not diff, f"{diff}\nregenerate with {REGEN}=1 pytest {__file__}"


def test_same_input_same_bytes():
    a = meta.render(CASES["vm-mixed"])
    b = meta.render(meta.MetaInput(**CASES["vm-mixed"].__dict__))
    assert a == b


def test_hostfile_slots_follow_cpus():
    files = meta.render(CASES["vm-mixed"])
    assert files["hostfile"].decode().splitlines() == [
        "chgu0:4", "chgu1:1", "chgu2:1", "chgu3:8"]
    assert files["hostfile.openmpi"].decode().splitlines() == [
        "chgu0 slots=4", "chgu1 slots=1", "chgu2 slots=1", "chgu3 slots=8"]


def test_host_names_in_hostfile_for_non_vm():
    files = meta.render(CASES["none-3"])
    assert files["hostfile"] == b"node1:2\nnode2:2\nnode3:2\n"


def test_too_many_nodes_for_subnet():
    inp = meta.MetaInput("1", tuple(f"n{i}" for i in range(200)), (1,) * 200, "vm",
                         subnet="10.0.0.0/24")
    with pytest.raises(UserError, match="too many nodes for guest network"):
        meta.render(inp)


def test_counts_must_match_nodes():
    with pytest.raises(UserError, match="2 counts for 3 nodes"):
        meta.render(meta.MetaInput("1", ("a", "b", "c"), (1, 1), "none"))


def test_env_is_shell_quoted():
    assert meta.render_env([("CH_X", "a b'c")]) == b"CH_X='a b'\"'\"'c'\n"
