"""The job network's pure parts: names, VNI, the filter rules, the node
address table.  The devices themselves are built on the sandbox
(tests/vm, tests/adversarial)."""

import os
import tempfile

import pytest

from slurm_charlie.asroot import jobnet
from slurm_charlie.errors import NodeFault


def test_names_fit_ifnamsiz_and_carry_the_job():
    n = jobnet.names("123456789012")  # 12 digits, the most options accept
    assert (n.vxlan, n.bridge, n.tap) == ("chv123456789012", "chb123456789012",
                                          "cht123456789012")
    assert all(len(x) <= 15 for x in (n.vxlan, n.bridge, n.tap))
    for bad in ("12;rm", "1234567890123"):
        with pytest.raises(NodeFault):
            jobnet.names(bad)


def test_vni_in_range_and_distinct_for_neighbours():
    assert {jobnet.vni(str(j)) for j in range(1, 1000)} == set(range(2, 1001))
    assert all(1 <= jobnet.vni(str(j)) <= 0xFFFFFF for j in (0, 0xFFFFFE, 0xFFFFFF, 10**12))


def test_rules_drop_unprivileged_ports_and_strangers():
    g = jobnet._global_rules(4789)
    assert "udp dport 4789 udp sport >= 1024 counter drop" in g
    r = jobnet._job_rules(jobnet.names("42"), 4789, 43, ["10.0.0.2", "10.0.0.1", "10.0.0.2"])
    assert "table inet charlie_j42" in r
    assert "udp dport 4789 @th,96,24 43 ip saddr != { 10.0.0.1, 10.0.0.2 } counter drop" in r


def test_node_addresses_from_the_site_table():
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("# comment\nnode1 10.1.0.1\nnode2 10.1.0.2  # trailing\n")
    try:
        assert jobnet.node_addresses(("node2", "node1"), f.name) == ["10.1.0.2", "10.1.0.1"]
        with pytest.raises(NodeFault, match="does not resolve"):
            jobnet.node_addresses(("no-such-node.invalid",), f.name)
        with open(f.name, "a") as g:
            g.write("node3 not-an-address\n")
        with pytest.raises(NodeFault, match="not an IPv4 address"):
            jobnet.node_addresses(("node3",), f.name)
    finally:
        os.unlink(f.name)
