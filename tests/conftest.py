"""Fixtures every suite may use.  ``cluster`` is the running sandbox; a
suite that asks for it fails (never skips) when the sandbox is not up."""

import os

import pytest

from helpers.cluster import make_cluster


@pytest.fixture(scope="session")
def cluster():
    return make_cluster()


@pytest.fixture(scope="session")
def guest(cluster):
    """The test guest image (`make guest`), for VM jobs."""
    gdir = cluster.sb.guest_dir
    if not gdir or not os.path.exists(os.path.join(gdir, "guest.qcow2")):
        pytest.fail("no test guest: run `make guest` and bring the sandbox up "
                    "with --guest-dir (make test does both)", pytrace=False)
    return os.path.join(gdir, "guest.qcow2")


#: the part of the suite each directory is, as markers (`pytest -m vm`,
#: `make test PYTEST_ARGS="-m 'not vm'"`): vm needs the sandbox too
PARTS = {"unit": (), "cluster": ("cluster",), "adversarial": ("cluster", "adversarial"),
         "vm": ("cluster", "vm"), "trixie": ("cluster", "trixie"),
         "nested": ("cluster", "trixie", "vm")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        part = os.path.basename(os.path.dirname(str(item.fspath)))
        for mark in PARTS.get(part, ()):
            item.add_marker(mark)


def pytest_runtest_setup(item):
    """A test marked ``root`` is skipped for a developer who is not root,
    and fails in CI (a test that cannot run there is a failure)."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        msg = "needs root (it drops to other users): run `make unit` as root"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def pytest_runtest_logreport(report):
    """With CHARLIE_TEST_FAILLOG set (the Debian 13 lane), each failure's
    report is appended to that file the moment it happens: a lane that runs
    out of time still says which tests failed, and why."""
    path = os.environ.get("CHARLIE_TEST_FAILLOG")
    if not path or not report.failed:
        return
    with open(path, "a") as f:
        f.write(f"===== {report.nodeid} ({report.when}, {report.duration:.0f} s)\n")
        f.write(report.longreprtext[-6000:] + "\n")
        if report.capstderr:
            f.write("--- stderr\n" + report.capstderr[-2000:] + "\n")
        f.flush()
        os.fsync(f.fileno())
