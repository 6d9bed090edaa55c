"""The warm hook server on the sandbox (slurm_charlie/asroot/warm.py): a
node's first charlie job starts it, later jobs' prologs and epilogs are
forked from it, and ``hooks.warm = false`` in the site config turns it off
at the next job, with the hooks then starting Python themselves."""

import os
import re
import time

import pytest

from helpers.cluster import build_busybox_image
from slurm_charlie import asroot, config, doctor
from slurm_charlie.files import write_file

NODES = ["node1", "node2", "node3"]


def node_log(cluster, node):
    return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()


def how_hooks_ran(cluster, jobid, timeout=60):
    """{(node, prolog|epilog): 'forked warm' | 'started cold'} for one job,
    once every node's log has both lines (24.11 may show a node idle a
    moment before its epilog's last line is written)."""
    end = time.monotonic() + timeout
    while True:
        out = {}
        for n in NODES:
            for hook, how in re.findall(rf"job {jobid}: info: (prolog|epilog) done in [\d.]+ s "
                                        r"\(this process's life, (forked warm|started cold)\)",
                                        node_log(cluster, n)):
                out[(n, hook)] = how
        if len(out) == 2 * len(NODES) or time.monotonic() > end:
            return out
        time.sleep(0.2)


def job(cluster, wd, image):
    p = cluster.as_user(["srun", "-N3", "--quiet", f"--charlie-image={image}", "sh", "-c",
                         "echo $SLURM_JOB_ID $(wc -l < /ch/meta/hosts)"], wd)
    assert p.returncode == 0, p.stderr
    lines = {tuple(line.split()) for line in p.stdout.splitlines()}
    if not (len(lines) == 1 and len(p.stdout.splitlines()) == 3):
        ids = {line[0] for line in lines if line}
        said = "".join(line + "\n" for n in NODES for line in node_log(cluster, n).splitlines()
                       if any(f"job {i}:" in line for i in ids))
        pytest.fail(f"stdout:\n{p.stdout}stderr:\n{p.stderr}the nodes' logs:\n{said}")
    jobid, hosts = lines.pop()
    assert hosts == "7"  # the meta directory is there on each node
    cluster.wait_nodes_idle()
    return jobid


@pytest.fixture
def image(cluster):
    wd = cluster.workdir("warm-hooks")
    return wd, build_busybox_image(os.path.join(wd, "bb"))


def test_jobs_are_forked_warm_once_the_node_has_its_server(cluster, image):
    wd, bb = image
    job(cluster, wd, bb)  # starts the servers on nodes that had none
    for _ in range(50):
        if all(asroot.warm_running(n) for n in NODES):
            break
        job(cluster, wd, bb)
    servers = {n: asroot.warm_running(n) for n in NODES}
    assert all(servers.values()), servers
    jobid = job(cluster, wd, bb)
    assert how_hooks_ran(cluster, jobid) == {(n, h): "forked warm" for n in NODES
                                             for h in ("prolog", "epilog")}
    assert {n: asroot.warm_running(n) for n in NODES} == servers  # the same servers
    cfg = config.load({"SLURM_CHARLIE_CONF": cluster.sb.charlie_conf})
    status, seen, _ = doctor._warm(cfg, "node1")
    assert status == "ok" and seen.startswith(f"pid {servers['node1'][0]}:"), seen


def test_the_site_turns_it_off_and_on(cluster, image):
    wd, bb = image
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    try:
        write_file(conf, saved + "[hooks]\nwarm = false\n", 0o644)  # atomic: hooks read it
        job(cluster, wd, bb)  # a server's child reads it and ends its server
        assert not any(asroot.warm_running(n) for n in NODES)
        jobid = job(cluster, wd, bb)
        assert how_hooks_ran(cluster, jobid) == {(n, h): "started cold" for n in NODES
                                                 for h in ("prolog", "epilog")}
        assert not any(asroot.warm_running(n) for n in NODES)  # and started none
        cfg = config.load({"SLURM_CHARLIE_CONF": conf})
        assert doctor._warm(cfg, "node1")[1].startswith("off (hooks.warm = false)")
    finally:
        write_file(conf, saved, 0o644)
    job(cluster, wd, bb)
    for _ in range(50):
        if all(asroot.warm_running(n) for n in NODES):
            break
        job(cluster, wd, bb)
    assert all(asroot.warm_running(n) for n in NODES)
