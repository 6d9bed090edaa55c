"""A 10,000-node VM job, unit level: what every node writes and sends grows
with the node count once (O(N) per node, O(N) messages in total), never with
its square: meta tables, the guests' neighbour entries, the VXLAN
forwarding entries.  (The time per guest, side by side for 1,000 and 10,000
guests, is printed by tests/bench/scale.py.)"""

from slurm_charlie import meta

from slurm_charlie.asroot import jobnet

N = 10_000


def _inp(n):
    nodes = tuple(f"n{i:05d}" for i in range(n))
    return meta.MetaInput(job_id="77", nodes=nodes, cpus=(2,) * n, type="vm",
                          data_dirs=0, subnet="10.64.0.0/14", nameservers=(),
                          mode="batch", user=("u", 1000, 1000, "u"))


def test_meta_tables_are_linear():
    files = meta.render(_inp(N))
    assert files["guest-macs"].count(b"\n") == N       # one line per guest
    assert files["hosts"].count(b"\n") == 2 * N + 1    # guest and host names
    assert files["hostfile"].count(b"\n") == N
    # each guest derives its N-1 neighbour entries from guest-macs (boot.sh)
    lines = files["guest-macs"].decode().splitlines()
    assert len({line.split()[1] for line in lines}) == N  # distinct MACs
    assert len({line.split()[2] for line in lines}) == N  # distinct addresses


def test_forwarding_entries_per_node_are_linear():
    addrs = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(N)]
    for index in (0, N // 2, N - 1):
        lines = jobnet.fdb_lines("77", index, addrs, "chv77")
        assert len(lines) == 2 * (N - 1)
        assert not any(f"dst {addrs[index]}" in line for line in lines)
    # N nodes x 2(N-1) local entries, but no message on the network at all:
    # the entries are written locally from the node list
