"""slurm-charlie gpu-spec's making of a CDI spec from a driver
(slurm_charlie/gpuspec.py), on a driver root built here: a real shared
library with libcuda's soname in the loader's cache ldconfig writes, a
tool, firmware, and the kernel module's version file."""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from slurm_charlie import cdi, gpuspec
from slurm_charlie.errors import NodeFault

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="root-owned trees need root")
SRC = pathlib.Path(__file__).parents[2] / "slurm_charlie" / "fakegpu"
GPUS = [("GPU-11111111-2222-3333-4444-555555555555", "/dev/null"),
        ("GPU-66666666-7777-8888-9999-000000000000", "/dev/zero")]


@pytest.fixture
def driver():
    """(driver root, driver table) under /run: root's all the way up."""
    top = pathlib.Path(tempfile.mkdtemp(dir="/run", prefix="charlie-test-gpuspec."))
    os.chmod(top, 0o755)
    root = top / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (root / "usr/bin").mkdir()
    (root / "etc").mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    lib / "libcuda.so.550.54.14", SRC / "libcuda.c"], check=True)
    (lib / "libcuda.so.1").symlink_to("libcuda.so.550.54.14")
    shutil.copy("/bin/true", root / "usr/bin/nvidia-smi")
    fw = root / "lib/firmware/nvidia/550.54.14"
    fw.mkdir(parents=True)
    (fw / "gsp_ga10x.bin").write_bytes(b"\0")
    (root / "etc/ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n")
    subprocess.run(["ldconfig", "-r", root], check=True)
    table = top / "proc/gpus"
    table.mkdir(parents=True)
    (top / "proc/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 "
        "UTC 2024\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    yield root, table
    shutil.rmtree(top)


@needs_root
def test_a_spec_is_made_from_the_driver_as_the_vendors_tool_makes_it(driver):
    root, table = driver
    spec, skipped = gpuspec.generate("nvidia.com/gpu", GPUS, str(root), str(table))
    assert skipped == []
    assert [(d["name"], d["containerEdits"]["deviceNodes"][0]["path"])
            for d in spec["devices"]] == GPUS
    e = spec["containerEdits"]
    lib = "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14"
    assert [(m["hostPath"], m["containerPath"]) for m in e["mounts"]] == [
        (f"{root}{lib}", lib),
        (f"{root}/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi"),
        (f"{root}/lib/firmware/nvidia/550.54.14/gsp_ga10x.bin",
         "/lib/firmware/nvidia/550.54.14/gsp_ga10x.bin")]
    assert all(m["options"] == ["ro", "nosuid", "nodev", "bind"] for m in e["mounts"])
    assert [h["args"][1:] for h in e["hooks"]] == [
        ["create-symlinks", "--link", f"libcuda.so.550.54.14::{os.path.dirname(lib)}/"
         "libcuda.so.1"],
        ["update-ldcache", "--folder", "/usr/lib/x86_64-linux-gnu"]]
    # what we write, our strict reader reads back as the same thing
    parsed = cdi.parse(json.dumps(spec), "gen.json")
    assert parsed.kind == "nvidia.com/gpu" and sorted(parsed.devices) == sorted(
        u for u, _ in GPUS)
    assert spec["cdiVersion"] == cdi.minimum_version(parsed)


@needs_root
def test_files_others_may_write_are_left_out_and_said(driver):
    root, table = driver
    os.chmod(root / "usr/bin/nvidia-smi", 0o777)
    os.chown(root / "lib/firmware/nvidia/550.54.14/gsp_ga10x.bin", 1000, 1000)
    spec, skipped = gpuspec.generate("nvidia.com/gpu", GPUS, str(root), str(table),
                                     env=("A=1",))
    assert [m["containerPath"] for m in spec["containerEdits"]["mounts"]] == [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14"]
    assert len(skipped) == 2 and "writable by others" in skipped[0] and \
        "owned by uid 1000" in skipped[1], skipped
    assert spec["containerEdits"]["env"] == ["A=1"]


@needs_root
def test_no_driver_no_spec(driver, tmp_path):
    root, table = driver
    os.unlink(table.parent / "version")
    with pytest.raises(NodeFault, match="cannot tell the driver's version"):
        gpuspec.generate("nvidia.com/gpu", GPUS, str(root), str(tmp_path / "none" / "gpus"))
    for f in (root / "usr/lib/x86_64-linux-gnu").iterdir():
        f.unlink()
    subprocess.run(["ldconfig", "-r", root], check=True)
    (table.parent / "version").write_text("550.54.14\n")
    with pytest.raises(NodeFault, match="has no libcuda.so.1"):
        gpuspec.generate("nvidia.com/gpu", GPUS, str(root), str(table))
