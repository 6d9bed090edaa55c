"""Hostlist expansion, written as a table.  The cluster suite checks the same
table against `scontrol show hostnames` (tests/cluster/test_hostlist.py)."""

import pytest

from slurm_charlie import hostlist
from slurm_charlie.errors import UserError

TABLE = [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("n[01-03,7]", ["n01", "n02", "n03", "n7"]),
    ("n[1-10]", [f"n{i}" for i in range(1, 11)]),
    ("n[9-011]", ["n9", "n10", "n11"]),
    ("n[008-10]", ["n008", "n009", "n010"]),
    ("n[1,01-02]", ["n1", "n01", "n02"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n[01-03,7],gpu1-ib", ["n01", "n02", "n03", "n7", "gpu1-ib"]),
    ("x,y[2-3],z", ["x", "y2", "y3", "z"]),
    # a suffix after a range: newer Slurm accepts it, 22.05 refuses it
    ("n[01-03,7],gpu[1-2]-ib", ["n01", "n02", "n03", "n7", "gpu1-ib", "gpu2-ib"]),
]


@pytest.mark.parametrize("text,hosts", TABLE)
def test_expand(text, hosts):
    assert hostlist.expand(text) == hosts


@pytest.mark.parametrize("text", ["n[1-", "n]1[", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_bad(text):
    with pytest.raises(UserError):
        hostlist.expand(text)


@pytest.mark.parametrize("text,counts", [
    ("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]),
    ("4,1(x2),8", [4, 1, 1, 8]),
])
def test_counts(text, counts):
    assert hostlist.expand_counts(text) == counts


@pytest.mark.parametrize("text", ["", "2(x)", "x", "2(3)"])
def test_counts_bad(text):
    with pytest.raises(UserError):
        hostlist.expand_counts(text)


def test_large():
    hosts = hostlist.expand("n[00000-09999]")
    assert len(hosts) == 10000 and hosts[-1] == "n09999"
