"""`make demo` on a Debian 13 host: the lane node has run `make deps shim`
(tests/trixie/lane.py) and brought the sandbox up on Slurm 24.11 with
cgroup/v2; here the demo script itself runs, as `make demo` runs it, with
the lane's venv (Debian's Python packages: the node has no PyPI) and
without its VM part (QEMU inside the emulated node: make test-trixie-vm)."""

import os
import re
import subprocess
import sys

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_on_debian_13(v2):
    env = {**os.environ, "CHARLIE_DEMO_VENV": sys.prefix, "CHARLIE_DEMO_VM": "no"}
    p = subprocess.run(["bash", os.path.join(SRC, "docs", "examples", "demo.sh")],
                       env=env, capture_output=True, text=True, timeout=900,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    # the meta directory as every node saw it: one guest id each, one hosts file
    meta = re.findall(r"^(node\d): CH_GUEST_ID=(\d) CH_GUEST_COUNT=3 meta/hosts "
                      r"sha256=(\w+) meta/hostfile=\[([^\]]*)\]$", p.stdout, re.M)
    assert [(n, g) for n, g, _, _ in meta] == [("node1", "0"), ("node2", "1"),
                                                ("node3", "2")], out
    assert len({h for _, _, h, _ in meta}) == 1, out
    assert all([e.split(":")[0] for e in f.split()] == ["node1", "node2", "node3"]
               for *_, f in meta), out
    # the mistake is refused at submit, naming the image
    assert re.search(r"/nonexistent\.qcow2", p.stderr), out
    assert "Submitted batch job" in p.stdout
    # MPICH in containers: 6 ranks, each inside the image, the right sum
    ranks = re.findall(r"^rank (\d) of 6 on node\d sum 6$", p.stdout, re.M)
    assert sorted(ranks) == [str(i) for i in range(6)], out
    assert p.stdout.count(": inside-the-image, CH_META=") == 6, out
    assert "VM jobs left out (CHARLIE_DEMO_VM=no)" in p.stdout
