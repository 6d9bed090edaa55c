"""Our hostlist expansion against Slurm's own (`scontrol show hostnames`),
for the table in tests/helpers/hostlists.py."""

import pytest
from helpers.hostlists import TABLE

from slurm_charlie import hostlist


@pytest.mark.parametrize("text", [t for t, _ in TABLE])
def test_same_as_scontrol(cluster, text):
    p = cluster.run(["scontrol", "show", "hostnames", text])
    ours = hostlist.expand(text)
    if p.returncode != 0 or "Invalid hostlist" in p.stdout + p.stderr:
        # Slurm 22.05 has no suffix after a bracket (gpu[1-2]-ib); Slurm never
        # hands such a list to a prolog there, and newer Slurm expands it as we do
        assert "]-" in text, (text, p.stdout, p.stderr)
        return
    assert ours == p.stdout.split(), (text, p.stdout)


def test_slurm_compresses_what_we_expand(cluster):
    hosts = [f"n{i:03d}" for i in (1, 2, 3, 7, 10, 11)] + ["gpu1", "gpu2"]
    p = cluster.run(["scontrol", "show", "hostlistsorted", ",".join(hosts)])
    assert p.returncode == 0, p.stderr
    assert sorted(hostlist.expand(p.stdout.strip())) == sorted(hosts)
