"""Fixtures of the Debian 13 lane's tests (tests/trixie)."""

import os
import subprocess

import pytest

from helpers.cluster import build_busybox_image

SCOPE = "/sys/fs/cgroup/system.slice/{node}_slurmstepd.scope"


@pytest.fixture(scope="session")
def v2(cluster):
    assert cluster.sb.cgroup_mode == "v2", "the v2 tests run on a cgroup v2 node " \
        "(make test-trixie)"
    assert os.path.isdir(SCOPE.format(node="node1")), os.listdir("/sys/fs/cgroup/system.slice")
    return cluster


@pytest.fixture(scope="session")
def images(v2):
    base = os.path.join(v2.home, "charlie-tests", "images")
    os.makedirs(base, exist_ok=True)
    bb = build_busybox_image(os.path.join(base, "bb"))
    sqfs = os.path.join(base, "bb.sqfs")
    if not os.path.exists(sqfs):
        subprocess.run(["mksquashfs", bb, sqfs, "-quiet", "-no-progress", "-all-root"],
                       check=True, capture_output=True)
        os.chmod(sqfs, 0o644)
    return {"bb": bb, "sqfs": sqfs}


