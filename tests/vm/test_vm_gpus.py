"""VM jobs with GPUs on the sandbox's fake sysfs (slurm_charlie/fakesys.py):
the job's GPU (and its audio function) taken from the host's driver by
driver_override, QEMU given it on a q35 machine with a 64-bit window and
its memory lockable, and the epilog giving it back; a GPU that does not
come back drains the node with the reason.  These machines have no IOMMU,
so QEMU itself cannot open the fake device: it exits, which is the job's
failure, and everything above is still checked end to end."""

import os
import re
import subprocess

import pytest

from helpers.vm import assert_clean, image_copy, wait_for

GPU = "0000:81:00.0"  # node2's GPU 0 (Slurm's index 0 on an idle node)


@pytest.fixture(autouse=True)
def gpus(cluster):
    if not cluster.sb.gpus_per_node:
        pytest.fail("the sandbox declares no GPUs here (docs/sandbox.rst, \"GPUs\")")


def fake(cluster, *parts):
    return os.path.join(cluster.sb.fakesys_root("node2"), *parts)


def driver(cluster, pci):
    return os.path.basename(os.readlink(fake(cluster, "sys/bus/pci/devices", pci, "driver")))


def can_raise_memlock():
    """Root may raise a process's locked-memory limit (CAP_SYS_RESOURCE), or
    slurmd's own is unlimited."""
    caps = int(next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("CapEff:")), 16)
    import resource
    slurmd = int(subprocess.run(["pgrep", "-n", "slurmd"], capture_output=True,
                                text=True).stdout.split()[0])
    soft, _ = resource.prlimit(slurmd, resource.RLIMIT_MEMLOCK)
    return bool(caps & (1 << 24)) or soft == resource.RLIM_INFINITY


def job_log(cluster, job):
    text = open(os.path.join(cluster.sb.state, "log", "charlie-node2.log")).read()
    return "\n".join(line for line in text.splitlines() if f"job {job}:" in line)


def test_a_vm_jobs_gpu_is_taken_for_its_guest_and_given_back(cluster, guest):
    wd = cluster.workdir("vm-gpus")
    img = image_copy(cluster, guest, wd)
    assert cluster.sb.gpu_facts("node2", 0)[1] == GPU
    p = cluster.as_user(["srun", "-N1", "-w", "node2", "--gres=gpu:1", "--charlie-type=vm",
                         f"--charlie-image={img}", "hostname"], wd, timeout=300)
    assert p.returncode != 0
    job = re.search(r"job (\d+)", p.stderr).group(1)
    # QEMU was handed the fake GPU: it cannot open it here (no IOMMU)
    assert "QEMU exited" in p.stderr and GPU in p.stderr, p.stderr
    wait_for(lambda: "epilog done in" in job_log(cluster, job), "the epilog", 120)
    log = job_log(cluster, job)
    assert f"GPU {GPU}: taken from nvidia for the guest (IOMMU group 10)" in log, log
    assert "GPU 0000:81:00.1: taken from snd_hda_intel for the guest" in log, log
    started = [line for line in log.splitlines() if "starting guest 0" in line][0]
    assert "-machine q35 -global q35-pcihost.pci-hole64-size=64G" in started, started
    assert f"-device vfio-pci,host={GPU},id=gpu0" in started, started
    assert "0000:81:00.1" not in started  # taken along, not given to the guest
    # where root may not raise limits (no CAP_SYS_RESOURCE, as on these
    # machines) and slurmd's own limit is small, the job is told why
    if can_raise_memlock():
        assert re.search(r"guest 0: QEMU may lock \d+ MiB \(VFIO pins guest memory\)",
                         log), log
    else:
        assert re.search(r"guest 0: QEMU may lock only \d+ MiB here and VFIO pins all of "
                         r"the guest's memory \(\d+ MiB with QEMU's own\)", log), log
        assert "LimitMEMLOCK=infinity" in p.stderr, p.stderr
    assert f"GPU {GPU}: given back to nvidia" in log, log
    assert driver(cluster, GPU) == "nvidia"
    assert driver(cluster, "0000:81:00.1") == "snd_hda_intel"
    assert driver(cluster, "0000:41:00.0") == "nvidia"  # the other GPU never moved
    st = os.stat(fake(cluster, "dev/vfio/10"))
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert_clean(cluster, job)


def test_a_gpu_that_does_not_come_back_drains_the_node_with_the_reason(cluster, guest):
    wd = cluster.workdir("vm-gpus-stuck")
    img = image_copy(cluster, guest, wd)
    stuck = fake(cluster, "sys/bus/pci/devices", GPU, "fake-stuck")
    open(stuck, "w").close()
    try:
        p = cluster.as_user(["srun", "-N1", "-w", "node2", "--gres=gpu:1",
                             "--charlie-type=vm", f"--charlie-image={img}", "hostname"], wd,
                            timeout=300)
        assert p.returncode != 0
        wait_for(lambda: "drain" in cluster.sb.node_states().get("node2", ""),
                 "node2 drained", 60)
        reason = cluster.run(["sinfo", "-h", "-n", "node2", "-o", "%E"]).stdout
        assert f"GPU {GPU}: not given back to nvidia" in reason, reason
        job = re.search(r"job (\d+)", p.stderr).group(1)
        record = os.path.join(cluster.sb.state, "runtime", "node2", ".root", f"{job}.json")
        assert os.path.exists(record)  # kept: what is still to give back
    finally:
        os.unlink(stuck)  # the admin's fix; reconcile then gives the GPU back
    out = cluster.run([cluster.sb.charlie_bin(), "reconcile", "--node", "node2",
                       "--min-age", "0"])
    assert out.returncode == 0 and f"leftover job {job}: cleaned" in out.stdout, \
        out.stdout + out.stderr
    assert not os.path.exists(record)
    assert driver(cluster, GPU) == "nvidia"
    cluster.resume_until_stable("node2")
