"""A job's GPUs (slurm_charlie/gpus.py): Slurm's indices through gres.conf's
device files to the driver's table, by device minor, never by the order
of files or PCI addresses."""

import os
import stat

import pytest

from slurm_charlie import gpus
from slurm_charlie.errors import NodeFault


@pytest.mark.parametrize("text,want", [("", []), ("0", [0]), ("0,2", [0, 2]),
                                       ("3,1,3", [3, 1]), (" 1 ", [1])])
def test_slurms_indices(text, want):
    assert gpus.parse_indices(text) == want


@pytest.mark.parametrize("text", ["a", "0-1", "0,,1", "-1", "\u0661", "1" * 7])
def test_indices_that_are_not_refused(text):
    with pytest.raises(NodeFault, match="SLURM_JOB_GPUS: not a list of GPU indices"):
        gpus.parse_indices(text)


GRES = """\
# a site's gres.conf
AutoDetect=off
NodeName=gpu[01-04] Name=gpu Type=a100 File=/dev/nvidia[0-3] Cores=0-15
NodeName=gpu[05-08] Name=gpu File=/dev/nvidia0,/dev/nvidia2
name=GPU nodename=gpu01 file=/dev/nvidia7   # lower case keys
NodeName=gpu01 Name=mps Count=100
Name=gpu File=/dev/everywhere0
"""


@pytest.mark.parametrize("node,want", [
    ("gpu01", ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3",
               "/dev/nvidia7", "/dev/everywhere0"]),
    ("gpu06", ["/dev/nvidia0", "/dev/nvidia2", "/dev/everywhere0"]),
    ("login1", ["/dev/everywhere0"]),
])
def test_gres_conf_gives_each_node_its_device_files_in_order(node, want):
    assert gpus.gres_files(GRES, node) == want


def test_a_gpu_line_left_to_autodetect_cannot_be_mapped():
    with pytest.raises(NodeFault) as e:
        gpus.gres_files("AutoDetect=nvml\nNodeName=n1 Name=gpu Count=4\n", "n1", "/etc/slurm/gres.conf")
    assert e.value.line() == ("/etc/slurm/gres.conf line 2: a GPU line without File=: "
                              "NodeName=n1 Name=gpu Count=4")
    assert "File=" in e.value.hint


def _info(root, pci, uuid, minor):
    os.makedirs(os.path.join(root, pci))
    with open(os.path.join(root, pci, "information"), "w") as f:
        f.write(f"Model: \t\t Some GPU\nIRQ: \t\t 55\nGPU UUID: \t {uuid}\n"
                f"Bus Location: \t {pci}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")


@pytest.fixture
def node(tmp_path):
    """Three GPUs whose PCI order (the table's listing) is not their minor
    order, and gres.conf listing the device files in yet another order."""
    table, dev = str(tmp_path / "gpus"), tmp_path / "dev"
    dev.mkdir()
    _info(table, "0000:01:00.0", "GPU-aaaa", 2)
    _info(table, "0000:41:00.0", "GPU-bbbb", 0)
    _info(table, "0000:81:00.0", "GPU-cccc", 1)
    for minor in range(3):
        os.mknod(str(dev / f"nvidia{minor}"), stat.S_IFCHR | 0o666, os.makedev(195, minor))
    gres = f"NodeName=n1 Name=gpu File={dev}/nvidia1,{dev}/nvidia[2,0]\n"
    return table, str(dev), gres


@needs_root
def test_indices_map_to_devices_and_uuids_by_minor(node):
    table, dev, gres = node
    got = gpus.job_gpus([2, 0], gres, "n1", table)
    assert [(g.index, g.device, g.minor, g.uuid, g.pci) for g in got] == [
        (2, f"{dev}/nvidia0", 0, "GPU-bbbb", "0000:41:00.0"),
        (0, f"{dev}/nvidia1", 1, "GPU-cccc", "0000:81:00.0")]
    assert got[0].line() == f"gpu 2: {dev}/nvidia0 (195:0), GPU-bbbb at 0000:41:00.0"
    assert gpus.cdi_names(got, "example.com/gpu") == ["example.com/gpu=GPU-bbbb",
                                                     "example.com/gpu=GPU-cccc"]
    assert gpus.job_gpus([], "garbage", "n1", "/nonexistent") == []


@needs_root
def test_what_does_not_add_up_is_the_nodes_fault_and_says_where(node, tmp_path):
    table, dev, gres = node
    with pytest.raises(NodeFault, match="GPU index 3, but gres.conf gives this node 3"):
        gpus.job_gpus([3], gres, "n1", table)
    os.unlink(f"{dev}/nvidia2")
    with pytest.raises(NodeFault, match="GPU device file missing"):
        gpus.job_gpus([1], gres, "n1", table)
    open(f"{dev}/nvidia2", "w").close()
    with pytest.raises(NodeFault, match="not a character device"):
        gpus.job_gpus([1], gres, "n1", table)
    os.unlink(f"{dev}/nvidia2")
    os.mknod(f"{dev}/nvidia2", stat.S_IFCHR | 0o666, os.makedev(195, 9))
    with pytest.raises(NodeFault, match=r"no GPU with device minor 9"):
        gpus.job_gpus([1], gres, "n1", table)
    with pytest.raises(NodeFault, match="gpu.driver_table: cannot list"):
        gpus.job_gpus([0], gres, "n1", str(tmp_path / "no-driver"))
    with open(os.path.join(table, "0000:41:00.0", "information"), "w") as f:
        f.write("Model: something else\n")
    with pytest.raises(NodeFault, match="without GPU UUID, Bus Location and Device Minor"):
        gpus.job_gpus([0], gres, "n1", table)


@needs_root
def test_the_prolog_reads_gres_conf_beside_slurm_conf(node, tmp_path):
    table, dev, gres = node
    etc = tmp_path / "etc"
    etc.mkdir()
    with pytest.raises(NodeFault, match="gres.conf: cannot read"):
        gpus.for_prolog("0", "n1", table, str(etc / "slurm.conf"))
    (etc / "gres.conf").write_text(gres)
    assert [g.uuid for g in gpus.for_prolog("1,0", "n1", table, str(etc / "slurm.conf"))] \
        == ["GPU-aaaa", "GPU-cccc"]
    assert gpus.for_prolog("", "n1", "/nonexistent", "/nonexistent/slurm.conf") == []


@needs_root
def test_a_mig_device_maps_to_its_gpu_and_is_named_by_slurms_mig_uuid(node):
    """gres.conf's MultipleFiles= is one MIG device: its GPU by the first
    file's minor, its own UUID from what Slurm gave the prolog in
    CUDA_VISIBLE_DEVICES (same order as SLURM_JOB_GPUS); doctor and
    gpu-spec see the GPU once."""
    table, dev, _ = node
    caps = os.path.join(dev, "nvidia-caps")
    os.mkdir(caps)
    gres = (f"Name=gpu File={dev}/nvidia2\n"
            f"Name=gpu Type=1g.5gb MultipleFiles={dev}/nvidia0,{caps}/nvidia-cap21\n"
            f"Name=gpu Type=1g.5gb MultipleFiles={dev}/nvidia0,{caps}/nvidia-cap30\n")
    assert gpus.gres_entries(gres, "n1") == [(f"{dev}/nvidia2",),
                                            (f"{dev}/nvidia0", f"{caps}/nvidia-cap21"),
                                            (f"{dev}/nvidia0", f"{caps}/nvidia-cap30")]
    mig = "MIG-2b5a1c2e-0d4f-5e6a-8b7c-9d0e1f2a3b4c"
    got = gpus.job_gpus([2, 0], gres, "n1", table, visible=f"{mig},GPU-aaaa")
    assert [(g.index, g.uuid, g.mig, g.name) for g in got] == [
        (2, "GPU-bbbb", mig, mig), (0, "GPU-aaaa", "", "GPU-aaaa")]
    assert got[0].line().endswith(f"GPU-bbbb at 0000:41:00.0, MIG device {mig}")
    assert gpus.cdi_names(got, "nvidia.com/gpu")[0] == f"nvidia.com/gpu={mig}"
    with pytest.raises(NodeFault, match="is a MIG device .* no MIG UUID for it"):
        gpus.job_gpus([1], gres, "n1", table, visible="1")
    assert [g.uuid for g in gpus.node_gpus(gres, "n1", table)] == ["GPU-aaaa", "GPU-bbbb"]
