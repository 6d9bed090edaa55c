"""A VM job's GPUs taken for its guest and given back
(slurm_charlie/asroot/vfio.py) on the sandbox's fake sysfs
(slurm_charlie/fakesys.py), with its fake kernel serving the tree in a
thread: the IOMMU group checks, the driver dance, /dev/vfio/N's owner, a
GPU that will not come back, and QEMU's arguments."""

import os
import pathlib
import shutil
import stat
import tempfile
import threading

import pytest

from slurm_charlie import fakesys
from slurm_charlie.asroot import vfio
from slurm_charlie.backends.vm import qemu
from slurm_charlie.errors import NodeFault, UserError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")
GPU0, GPU1 = "0000:81:00.0", "0000:41:00.0"


@pytest.fixture
def tree():
    top = pathlib.Path(tempfile.mkdtemp(dir="/run", prefix="charlie-test-vfio."))
    fakesys.build(str(top), [GPU0, GPU1])
    stop = threading.Event()

    def kernel():
        while not stop.is_set():
            fakesys.step(str(top))
            stop.wait(0.002)
    t = threading.Thread(target=kernel, daemon=True)
    t.start()
    yield top
    stop.set()
    t.join()
    shutil.rmtree(top)


def devices_dir(top):
    return top / "sys/bus/pci/devices"


@needs_root
def test_a_gpu_takes_its_slots_audio_function_along_and_the_bridge_stays(tree):
    got = vfio.plan(str(tree), [GPU0])
    assert [(d.pci, d.driver, d.group, d.guest) for d in got] == [
        (GPU0, "nvidia", "10", True), ("0000:81:00.1", "snd_hda_intel", "10", False)]
    assert got[0].bar64 == 32 << 30 and qemu.mmio_window_gib(tuple(got)) == 64


@needs_root
def test_a_group_shared_with_what_is_not_the_jobs_fails_the_job(tree):
    g10 = tree / "sys/kernel/iommu_groups/10/devices"
    (g10 / GPU1).symlink_to(f"../../../../bus/pci/devices/{GPU1}")
    with pytest.raises(UserError) as e:
        vfio.plan(str(tree), [GPU0])
    assert f"GPU {GPU0}'s IOMMU group 10 also holds {GPU1} (class 0302)" in e.value.line()
    assert "ask for every GPU of the group" in e.value.hint
    assert [d.pci for d in vfio.plan(str(tree), [GPU0, GPU1])] == [
        GPU1, GPU0, "0000:81:00.1", "0000:41:00.1"]


@needs_root
def test_no_iommu_fails_the_job_with_what_the_site_needs(tree):
    os.unlink(devices_dir(tree) / GPU0 / "iommu_group")
    with pytest.raises(UserError) as e:
        vfio.plan(str(tree), [GPU0])
    assert "no IOMMU group for GPU" in e.value.line() and "intel_iommu=on" in e.value.hint


@needs_root
def test_taken_for_the_guest_and_given_back_twice_over(tree):
    devs = vfio.plan(str(tree), [GPU0])
    node = tree / "dev/vfio/10"
    for _ in range(2):  # a second prolog, a second epilog: the same end
        vfio.take(str(tree), devs, 4321)
        assert vfio.driver_of(str(tree), GPU0) == "vfio-pci"
        assert vfio.driver_of(str(tree), "0000:81:00.1") == "vfio-pci"
        assert vfio.driver_of(str(tree), GPU1) == "nvidia"  # not the job's
        assert (node.stat().st_uid, stat.S_IMODE(node.stat().st_mode)) == (4321, 0o600)
    for _ in range(2):
        vfio.give_back(str(tree), devs)
        assert vfio.driver_of(str(tree), GPU0) == "nvidia"
        assert vfio.driver_of(str(tree), "0000:81:00.1") == "snd_hda_intel"
        # cleared (the real kernel then shows "(null)")
        assert (devices_dir(tree) / GPU0 / "driver_override").read_text() == "\n"
        assert (node.stat().st_uid, node.stat().st_gid) == (0, 0)


@needs_root
def test_a_gpu_that_does_not_come_back_is_the_nodes_fault_the_rest_comes_back(tree):
    devs = vfio.plan(str(tree), [GPU0])
    vfio.take(str(tree), devs, 4321)
    (devices_dir(tree) / GPU0 / "fake-stuck").write_text("")
    with pytest.raises(NodeFault) as e:
        vfio.give_back(str(tree), devs, limit=0.5)
    assert e.value.line() == f"GPU {GPU0}: not given back to nvidia (now: no driver)"
    assert "drivers_probe" in e.value.hint
    assert vfio.driver_of(str(tree), "0000:81:00.1") == "snd_hda_intel"
    assert (tree / "dev/vfio/10").stat().st_uid == 0


def test_a_gpu_in_use_is_found_by_its_device_node():
    with open("/dev/null") as f:
        assert os.getpid() in vfio.busy(["/dev/null"])["/dev/null"]
        assert f.fileno() >= 0
    assert vfio.busy(["/nonexistent"]) == {}


def test_qemu_gets_q35_a_window_the_gpus_fit_in_and_only_the_guests_devices():
    devs = (vfio.Device(GPU0, "nvidia", "10", True, 80 << 30),
            vfio.Device("0000:81:00.1", "snd_hda_intel", "10", False))
    assert qemu._gpus(devs) == ["-machine", "q35", "-global",
                                "q35-pcihost.pci-hole64-size=256G",
                                "-device", f"vfio-pci,host={GPU0},id=gpu0"]
    assert qemu._gpus(()) == []
    assert vfio.Device.from_dict(devs[0].to_dict()) == devs[0]
