"""The cgroup room's pure parts: which layout Slurm's configuration and
the mounts give, and whose Slurm tree a process's cgroup path is in.  The
layouts' file work is proven on real trees: v1 in the sandbox here
(tests/cluster), v2 in the Debian 13 guest (make test-trixie)."""

import pytest

from slurm_charlie.asroot import cgroup

HYBRID = {"/sys/fs/cgroup": "tmpfs", "/sys/fs/cgroup/unified": "cgroup2",
          "/sys/fs/cgroup/memory": "cgroup", "/sys/fs/cgroup/cpuacct": "cgroup"}
V1 = {k: v for k, v in HYBRID.items() if not k.endswith("unified")}
V2 = {"/sys/fs/cgroup": "cgroup2"}


def test_filesystem_names_the_mounts():
    assert cgroup.filesystem(mounted=V2) == "v2"
    assert cgroup.filesystem("/sys/fs/cgroup/", mounted=V2) == "v2"
    assert cgroup.filesystem(mounted=HYBRID) == "hybrid"
    assert cgroup.filesystem(mounted=V1) == "v1"
    assert cgroup.filesystem(mounted={"/sys/fs/cgroup": "tmpfs"}) == "none"
    assert cgroup.filesystem("/cg", mounted={"/cg": "cgroup2", **HYBRID}) == "v2"


def test_mounts_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "31 25 0:27 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
        "32 25 0:28 / /opt rw shared:5 master:1 - ext4 /dev/vda rw\n")
    assert cgroup.mounts(str(info)) == {"/sys/fs/cgroup": "cgroup2",
                                        "/mnt/with space": "tmpfs", "/opt": "ext4"}
    assert cgroup.mounts(str(tmp_path / "missing")) == {}


def _conf(tmp_path, text):
    (tmp_path / "cgroup.conf").write_text(text)
    return {"SLURM_CONF": str(tmp_path / "slurm.conf")}


def test_cgroup_conf_beside_slurm_conf(tmp_path):
    env = _conf(tmp_path, "# comment\nCgroupPlugin=cgroup/v2 # trailing\n"
                "IgnoreSystemd = yes\n\nbogus line\n")
    assert cgroup.slurm_cgroup_conf(env) == {"cgroupplugin": "cgroup/v2",
                                             "ignoresystemd": "yes"}
    assert cgroup.slurm_cgroup_conf({"SLURM_CONF": str(tmp_path / "x" / "slurm.conf")}) == {}


@pytest.mark.parametrize("text,mounts,want", [
    ("", V2, "v2"),                                   # autodetect, as Slurm does
    ("", HYBRID, "v1"),
    ("", V1, "v1"),
    ("CgroupPlugin=cgroup/v2\n", V2, "v2"),
    ("CgroupPlugin=cgroup/v1\n", HYBRID, "v1"),
    ("CgroupPlugin=cgroup/v2\n", HYBRID, "none"),     # Slurm refuses it too
    ("CgroupPlugin=cgroup/v1\n", V2, "none"),
    ("CgroupPlugin=disabled\n", V2, "none"),
    ("CgroupPlugin=cgroup/v2\nCgroupMountpoint=/cg\n", {"/cg": "cgroup2"}, "v2"),
])
def test_layout_follows_slurm_and_the_mounts(tmp_path, monkeypatch, text, mounts, want):
    monkeypatch.setattr(cgroup, "mounts", lambda *a: mounts)
    lay = cgroup.layout("node1", _conf(tmp_path, text))
    assert lay.name == want
    if want == "none":
        assert lay.why and lay.job_cgroups(1001, "7") == [] and lay.stale(set()) == []


def test_whose_tree_a_cgroup_path_is_in():
    v1, v2 = cgroup.CgroupV1("node1"), cgroup.CgroupV2("node1")
    assert v1.tree_of("/slurm_node2/uid_1001/job_5/step_0/task_0") == "node2"
    assert v1.tree_of("/slurm/uid_1001/job_5/step_0") == "node1"
    assert v1.tree_of("/user.slice/user-1001.slice/session-3.scope") is None
    assert v2.tree_of("/system.slice/node3_slurmstepd.scope/job_5/step_0/user/task_0") \
        == "node3"
    assert v2.tree_of("/system.slice/slurmstepd.scope/job_5/charlie") == "node1"
    assert v2.tree_of("/user.slice/user-1001.slice/session-3.scope") is None


@pytest.mark.parametrize("mode,version,want,absent", [
    ("v1", (22, 5), ["CgroupPlugin=cgroup/v1"], ["IgnoreSystemd", "EnableControllers"]),
    ("v2", (24, 11), ["CgroupPlugin=cgroup/v2", "IgnoreSystemd=yes", "EnableControllers=yes"],
     ["CgroupAutomount"]),  # gone from 24.11's cgroup.conf
    ("v2", (22, 5), ["CgroupPlugin=cgroup/v2", "IgnoreSystemd=yes", "CgroupAutomount=yes"],
     ["EnableControllers"]),  # not yet a key in 22.05
])
def test_sandbox_cgroup_conf_fits_the_layout_and_release(monkeypatch, mode, version, want,
                                                          absent):
    from slurm_charlie import sandbox
    monkeypatch.setattr(sandbox.Sandbox, "cgroup_mode", property(lambda self: mode))
    monkeypatch.setattr(sandbox, "slurm_version", lambda: version)
    text = sandbox.Sandbox(state="/nonexistent-sandbox")._cgroup_conf()
    lines = text.splitlines()
    assert all(w in lines for w in want), text
    assert not any(a in text for a in absent), text
    assert "ConstrainRAMSpace=yes" in lines and "CgroupMountpoint=/sys/fs/cgroup" in lines


def test_prolog_hook_sees_which_daemon_runs_it():
    """RunInJob is told from the process tree: the nearest Slurm daemon
    above the hook is slurmstepd instead of slurmd.  Here there is none."""
    from slurm_charlie.prolog_hook import launched_by_slurmstepd
    assert launched_by_slurmstepd() is False
    assert launched_by_slurmstepd(2 ** 22 + 12345) is False  # no such process


@pytest.mark.parametrize("errno_,kind,text", [
    # Slurm removed the job's cgroup: the job ended (cancelled) while root
    # placed the process -- seen in the churn run as a drain
    (2, "UserError", "the job's cgroup went away while root placed it"),
    (3, "UserError", "ended before it could join the job's cgroup"),
    (13, "NodeFault", "cannot place the holder in the job's cgroup (v1)"),
])
def test_a_job_that_ends_during_placement_is_the_jobs_business(monkeypatch, errno_, kind,
                                                               text):
    import os
    from slurm_charlie.asroot.records import ProcRecord

    class Layout:
        name = "v1"

        def join(self, rec, job_id, index, mib):
            raise OSError(errno_, os.strerror(errno_), "/sys/fs/cgroup/memory/slurm/uid_1/"
                          "job_296/step_extern/task_0/cgroup.procs")
    monkeypatch.setattr(cgroup, "layout", lambda node, environ=None: Layout())
    rec = ProcRecord(role="holder", pid=1, start=1, uid=1000, exe="/bin/sh")
    with pytest.raises(Exception) as e:
        cgroup.join_job_cgroup("node1", rec, "296", 0)
    assert type(e.value).__name__ == kind and text in str(e.value), str(e.value)
