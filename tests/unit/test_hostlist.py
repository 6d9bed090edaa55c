"""Hostlist expansion, written as a table.  The cluster suite checks the same
table against `scontrol show hostnames` (tests/cluster/test_hostlist_slurm.py)."""

import pytest

from slurm_charlie import hostlist
from slurm_charlie.errors import UserError

from helpers.hostlists import TABLE


@pytest.mark.parametrize("text,hosts", TABLE)
def test_expand(text, hosts):
    assert hostlist.expand(text) == hosts


@pytest.mark.parametrize("text,why", [
    ("n[1-", "unclosed '['"), ("n]1[", "']' without '['"), ("n[a-b]", "bad range"),
    ("n[3-1]", "range goes backwards"), ("n[[1]]", "nested '['"),
])
def test_expand_bad(text, why):
    with pytest.raises(UserError) as e:
        hostlist.expand(text)
    assert e.value.line() == f"hostlist: {why}: {text}"


@pytest.mark.parametrize("text,counts", [
    ("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]),
    ("4,1(x2),8", [4, 1, 1, 8]),
])
def test_counts(text, counts):
    assert hostlist.expand_counts(text) == counts


@pytest.mark.parametrize("text", ["", "2(x)", "x", "2(3)"])
def test_counts_bad(text):
    with pytest.raises(UserError) as e:
        hostlist.expand_counts(text)
    assert e.value.line() == f"cpu counts: cannot parse: {text}"


def test_large():
    hosts = hostlist.expand("n[00000-09999]")
    assert len(hosts) == 10000 and hosts[-1] == "n09999"
