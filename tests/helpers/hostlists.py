"""Hostlist expressions and their expansion: the unit suite checks our
expander against it, the cluster suite checks Slurm's (`scontrol show
hostnames`) against the same table."""

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
