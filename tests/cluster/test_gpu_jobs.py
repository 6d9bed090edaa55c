"""GPUs on the sandbox (issue 21): each node declares two fake GPUs in
gres.conf (character devices with NVIDIA's numbers and no driver, so
opening one says ENXIO where the job's device cgroup allows it and EPERM
where it does not), with a driver's table giving each a UUID and a PCI
address in the other order from its minor.  Slurm allots and confines them;
the prolog maps the job's to devices and UUIDs."""

import os
import re
import time

import pytest

from helpers.cluster import build_busybox_image

OPEN = ("import errno, os, sys\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n"
        "        os.close(os.open(d, os.O_RDWR))\n"
        "        print(d, 'opened')\n"
        "    except OSError as e:\n"
        "        print(d, errno.errorcode[e.errno])\n")


@pytest.fixture(autouse=True)
def gpus(cluster):
    if not cluster.sb.gpus_per_node:
        pytest.fail("the sandbox declares no GPUs here: it needs Slurm's cgroup v1 "
                    "devices controller (docs/sandbox.rst, \"GPUs\")")
    return cluster.sb.gpus_per_node


def node_log(cluster, node):
    try:  # a fresh sandbox's node has no log before its first charlie job
        return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()
    except FileNotFoundError:
        return ""


def test_slurm_confines_a_job_to_its_allotted_gpu(cluster):
    """The sandbox itself, as a GPU site: Slurm's ConstrainDevices lets a
    job with one GPU open only that one; a job with none opens none."""
    wd = cluster.workdir("gpus-slurm")
    devs = [cluster.sb.gpu_device("node1", i) for i in range(2)]
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1", "sh", "-c",
                         'echo "visible=$CUDA_VISIBLE_DEVICES"; python3 -c "$0" "$@"', OPEN,
                         *devs], wd)
    assert p.returncode == 0, p.stderr
    assert "visible=0" in p.stdout, p.stdout
    assert f"{devs[0]} ENXIO" in p.stdout and f"{devs[1]} EPERM" in p.stdout, p.stdout
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "python3", "-c", OPEN, *devs], wd)
    assert p.returncode == 0, p.stderr
    assert f"{devs[0]} EPERM" in p.stdout and f"{devs[1]} EPERM" in p.stdout, p.stdout


def _gpu_lines(cluster, node, jobid, timeout=60):
    end = time.monotonic() + timeout
    while True:
        found = re.findall(rf"job {jobid}: info: the job's gpu (\d+): (\S+) \((\d+):(\d+)\), "
                           r"(\S+) at (\S+)", node_log(cluster, node))
        if found or time.monotonic() > end:
            return found
        time.sleep(0.2)


def test_the_prolog_maps_each_jobs_gpu_to_its_device_and_uuid(cluster):
    """Two charlie jobs share node1, one GPU each: the prolog of each finds
    its own GPU's device and, through the driver's table (by minor, not by
    PCI order), its UUID; a charlie job without GPUs has none."""
    wd = cluster.workdir("gpus-map")
    bb = build_busybox_image(os.path.join(wd, "bb"))
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={bb}", "-o", "first.out",
                         "--wrap", "srun sleep 300"], wd)
    assert p.returncode == 0, p.stderr
    first = p.stdout.strip()
    try:
        got = _gpu_lines(cluster, "node1", first)
        p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                             f"--charlie-image={bb}", "sh", "-c", "echo $SLURM_JOB_ID"], wd)
        assert p.returncode == 0, p.stderr
        second = p.stdout.strip()
        got += _gpu_lines(cluster, "node1", second)
    finally:
        cluster.run(["scancel", first], check=True)
    want = []
    for index in (0, 1):
        uuid, pci = cluster.sb.gpu_facts("node1", index)
        want.append((str(index), cluster.sb.gpu_device("node1", index), "195", str(index),
                     uuid, pci))
    assert sorted(got) == want, got
    cluster.wait_done(first, timeout=120)
    p = cluster.as_user(["srun", "-N1", "-w", "node1", f"--charlie-image={bb}", "sh", "-c",
                         "echo $SLURM_JOB_ID"], wd)
    assert p.returncode == 0, p.stderr
    assert _gpu_lines(cluster, "node1", p.stdout.strip(), timeout=0) == []
    cluster.wait_nodes_idle()


@pytest.fixture(scope="module")
def cdi_job(cluster):
    """(working directory, busybox image) for the CDI tests."""
    wd = cluster.workdir("gpus-cdi")
    return wd, build_busybox_image(os.path.join(wd, "bb"))


def test_a_gpu_container_jobs_cdi_edits_are_read_and_checked(cluster, cdi_job):
    wd, bb = cdi_job
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={bb}", "sh", "-c", "echo $SLURM_JOB_ID"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    uuid, _ = cluster.sb.gpu_facts("node1", 0)
    assert (f"job {jobid}: info: CDI edits for the job's GPUs (example.com/gpu={uuid}): "
            "1 device node(s), 0 mount(s), 1 variable(s), 0 hook(s)") in node_log(cluster, "node1")


#: what goes wrong in the node's spec (merged into its own containerEdits)
BAD_SPECS = {
    "unknown field": ({"mystery": True}, "containerEdits: unknown field 'mystery'"),
    "unknown hook": ({"hooks": [{"hookName": "createContainer",
                                 "path": "/usr/local/bin/site-hook"}]},
                     "unknown hook program /usr/local/bin/site-hook"),
    "missing device node": ({"deviceNodes": [{"path": "/dev/nvidia9",
                                              "hostPath": "/dev/nvidia-absent"}]},
                            "device node /dev/nvidia-absent: /dev/nvidia-absent: "
                            "No such file or directory"),
    "the user's mount source": ({"mounts": [{"hostPath": "USERFILE",
                                             "containerPath": "/usr/lib/libcuda.so.1"}]},
                                "owned by uid"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_fails_the_gpu_job_and_drains_nothing(cluster, cdi_job, case):
    """What the admin's spec gets wrong (or a user slipped into it) fails
    the GPU job that uses it, with the spec file and the reason; the node
    stays in service; a job without GPUs does not read specs."""
    import json
    wd, bb = cdi_job
    edits, reason = BAD_SPECS[case]
    user_file = os.path.join(wd, "libcuda.so.1")
    cluster.write(user_file, "not a library\n", 0o644)
    spec = os.path.join(cluster.sb.cdi_dir("node1"), "example.json")
    good = open(spec).read()
    doc = json.loads(good)
    doc["containerEdits"].update(json.loads(json.dumps(edits).replace("USERFILE", user_file)))
    doc["cdiVersion"] = "0.5.0"  # hostPath
    with open(spec, "w") as f:
        json.dump(doc, f)
    try:
        p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                             f"--charlie-image={bb}", "true"], wd)
        assert p.returncode != 0
        assert f"CDI spec {spec}: " in p.stderr and reason in p.stderr, p.stderr
        p = cluster.as_user(["srun", "-N1", "-w", "node1", f"--charlie-image={bb}", "true"],
                            wd)
        assert p.returncode == 0, p.stderr
    finally:
        with open(spec, "w") as f:
            f.write(good)
    cluster.wait_nodes_idle()
    assert cluster.sb.node_states().get("node1") == "idle"


def test_doctor_checks_the_nodes_gpus(cluster, tmp_path):
    """doctor's GPU line: ok on the sandbox; a warning where Slurm does not
    confine devices; a failure where no CDI spec names a GPU."""
    import dataclasses
    import shutil
    from slurm_charlie import config, doctor
    cfg = config.load({"SLURM_CHARLIE_CONF": cluster.sb.charlie_conf})
    status, seen, _ = doctor._gpus(cfg, "node1", {"SLURM_CONF": cluster.sb.conf})
    assert status == "ok" and seen.startswith("2 GPU(s): ") and "confined by Slurm" in seen, seen
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(os.path.join(os.path.dirname(cluster.sb.conf), "gres.conf"), etc)
    (etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    status, seen, fix = doctor._gpus(cfg, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "warn" and "ConstrainDevices is not on" in seen and \
        "ConstrainDevices=yes" in fix, seen
    (etc / "cgroup.conf").write_text("ConstrainDevices=yes\n")
    other = dataclasses.replace(cfg, values={**cfg.values, "gpu.cdi_kind": "nvidia.com/gpu"})
    status, seen, _ = doctor._gpus(other, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "FAIL" and "have no device nvidia.com/gpu=GPU-" in seen, seen
    assert doctor._gpus(cfg, "node1", {"SLURM_CONF": str(tmp_path / "none" / "slurm.conf")})[0] \
        == "ok"


PROBE = ('for i in 0 1; do d=$0/$SLURMD_NODENAME/nvidia$i; r=$( (exec 3<>"$d") 2>&1 ); '
         'echo "GPU $SLURMD_NODENAME $i $(cat /MARKER) var=$CHARLIE_SANDBOX_GPU [$r]"; done')


def _probe(cluster, wd, bb, *args):
    p = cluster.as_user(["srun", "-N2", "-w", "node1,node2", *args, f"--charlie-image={bb}",
                         "sh", "-c", PROBE, cluster.sb.dev_dir], wd)
    assert p.returncode == 0, p.stderr
    found = {}
    for node, index, marker, var, why in re.findall(r"GPU (\S+) (\d) (\S+) var=(\S*) \[(.*)\]",
                                                     p.stdout):
        assert marker == "inside-the-image", p.stdout
        found[(node, int(index))] = (var, "open" if not why else
                                     "allowed" if "No such device" in why else
                                     "denied" if "not permitted" in why else why)
    return found


def test_each_container_opens_only_its_own_gpu_and_gets_the_specs_variables(cluster, cdi_job):
    """A 2-node container job with one GPU per node: in each node's
    container the job's GPU opens as far as a device without a driver can
    (ENXIO), the other is refused (EPERM: Slurm's device cgroup), and the
    spec's variables are set; a job without GPUs gets neither."""
    wd, bb = cdi_job
    assert _probe(cluster, wd, bb, "--gres=gpu:1") == {
        (n, i): ("1", "allowed" if i == 0 else "denied") for n in ("node1", "node2")
        for i in (0, 1)}
    assert _probe(cluster, wd, bb) == {
        (n, i): ("", "denied") for n in ("node1", "node2") for i in (0, 1)}
    cluster.wait_nodes_idle()
