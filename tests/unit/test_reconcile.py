"""Reconcile on this machine's filesystem, as root: leftovers of jobs Slurm no
longer runs (a record with a live process, a directory without a record,
young and running ones left alone), old kept overlays.  The list of running
jobs is given here; tests/cluster/test_reconcile_slurm.py asks the real Slurm."""

import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from slurm_charlie import config, asroot, layout, procfs, reconcile

from slurm_charlie.proc import User

pytestmark = pytest.mark.root  # records and job dirs owned by root and nobody


@pytest.fixture
def site(monkeypatch):
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-rec-")
    os.chmod(base, 0o755)
    conf = os.path.join(base, "charlie.toml")
    with open(conf, "w") as f:
        f.write(f'runtime_root = "{base}/rt/%n"\nsyslog = false\n'
                "[reconcile]\nmin_age = 60\nkept_max_days = 2\n"
                "[timeouts]\nshutdown = 1\n")
    monkeypatch.setenv("SLURM_CHARLIE_CONF", conf)
    cfg = config.load()
    yield cfg, os.path.join(base, "rt", "n1")
    shutil.rmtree(base)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def _leftover(cfg, root, jid, user, proc=None, record=True, age=3600):
    paths = layout.JobPaths(root, jid)
    asroot.create_job_dir(paths, user)
    os.makedirs(os.path.join(paths.job_dir, "run", "deep", "er"))
    if record:
        procs = ()
        if proc is not None:
            procs = (asroot.ProcRecord("qemu", proc.pid, procfs.starttime(proc.pid),
                                           user.uid, procfs.exe_of(proc.pid)),)
        asroot.Records(root).write(asroot.JobRecord(jid, user.uid, user.gid,
                                                            "vm", 0, "started", procs, {}))
        _age(os.path.join(root, ".root", f"{jid}.json"), age)
    _age(paths.job_dir, age)
    return paths


def test_reconcile_cleans_only_dead_old_jobs(site):
    cfg, root = site
    nobody = User.lookup(pwd.getpwnam("nobody").pw_uid)
    qemu = subprocess.Popen(["sleep", "300"], user=nobody.uid, group=nobody.gid)
    try:
        time.sleep(0.1)
        dead = _leftover(cfg, root, "11", nobody, proc=qemu)      # record + live process
        bare = _leftover(cfg, root, "12", nobody, record=False)   # prolog died early
        young = _leftover(cfg, root, "13", nobody, age=5)         # may be starting
        running = _leftover(cfg, root, "14", nobody)              # Slurm still runs it
        dry = reconcile.reconcile(cfg, "n1", {"14"}, dry_run=True)
        assert dry.jobs == ["11", "12"] and os.path.isdir(dead.job_dir)
        report = reconcile.reconcile(cfg, "n1", {"14"})
        assert report.jobs == ["11", "12"] and report.faults == []
        assert sorted(report.skipped) == ["13", "14"]
        assert qemu.wait(10) < 0  # root's recorded process was stopped
        for p in (dead, bare):
            assert not os.path.lexists(p.job_dir)
        assert os.path.isdir(young.job_dir) and os.path.isdir(running.job_dir)
        assert asroot.Records(root).job_ids() == ["13", "14"]
        assert reconcile.reconcile(cfg, "n1", {"14"}).jobs == []  # twice is fine
    finally:
        qemu.kill()
        qemu.wait()


def test_old_kept_overlays_go(site):
    cfg, root = site
    kept = os.path.join(cfg.kept_dir("n1"), "1000")
    os.makedirs(kept)
    for name, days in (("old.overlay.qcow2", 3), ("new.overlay.qcow2", 1), ("notes", 9)):
        with open(os.path.join(kept, name), "w") as f:
            f.write("x")
        _age(os.path.join(kept, name), days * 86400)
    report = reconcile.reconcile(cfg, "n1", set())
    assert report.kept_removed == [os.path.join(kept, "old.overlay.qcow2")]
    assert sorted(os.listdir(kept)) == ["new.overlay.qcow2", "notes"]


def test_prolog_sweep_is_rate_limited(site, monkeypatch):
    cfg, root = site
    calls = []
    monkeypatch.setattr(reconcile, "jobs_on_node", lambda node: calls.append(node) or set())
    os.makedirs(root)
    reconcile.from_prolog(cfg, "n1")
    reconcile.from_prolog(cfg, "n1")
    assert calls == ["n1"]  # once per reconcile.interval
    _age(os.path.join(root, reconcile.STAMP), cfg["reconcile.interval"] + 1)
    reconcile.from_prolog(cfg, "n1")
    assert calls == ["n1", "n1"]
