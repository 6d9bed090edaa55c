"""Pure parts of the VM path: key derivation (checked by the real
ssh-keygen), module load order, guest network numbers, QEMU command line."""

import os
import subprocess

import pytest

from slurm_charlie import config, layout, meta, sshkey, vmbuild
from slurm_charlie.backends import Context
from slurm_charlie.backends.vm import disks, qemu
from slurm_charlie.backends.vm.qemu import mcast
from slurm_charlie.errors import UserError
from slurm_charlie.options import Options
from slurm_charlie.proc import User


def test_job_key_is_valid_for_openssh_and_deterministic(tmp_path):
    seed = sshkey.job_seed(b"site secret", "42", 1001)
    private, public = sshkey.openssh_keys(seed, "slurm-charlie-job-42")
    assert (private, public) == sshkey.openssh_keys(seed, "slurm-charlie-job-42")
    key = tmp_path / "id"
    key.write_bytes(private)
    key.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                             text=True, check=True).stdout
    assert derived.split()[:2] == public.decode().split()[:2]


def test_job_key_differs_by_job_user_and_secret():
    keys = {sshkey.openssh_keys(sshkey.job_seed(s, j, u), "c")[1]
            for s, j, u in ((b"a", "1", 1), (b"a", "2", 1), (b"a", "1", 2), (b"b", "1", 1))}
    assert len(keys) == 4


def test_module_load_order_puts_dependencies_first(tmp_path):
    moddir = tmp_path / "6.1.0-x"
    moddir.mkdir()
    (moddir / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio.ko.xz\n"
        "kernel/drivers/virtio/virtio.ko.xz:\n")
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    order = vmbuild.load_order(str(moddir), ("9p", "9pnet_virtio", "virtio"))
    assert order.index("kernel/net/9p/9pnet.ko.xz") < order.index("kernel/fs/9p/9p.ko.xz")
    assert order.index("kernel/fs/netfs/netfs.ko.xz") < order.index("kernel/fs/9p/9p.ko.xz")
    assert order.count("kernel/net/9p/9pnet.ko.xz") == 1
    with pytest.raises(UserError, match="kernel has no module ext4"):
        vmbuild.load_order(str(moddir), ("ext4",))


def test_guest_network_numbers():
    cfg = config.parse('[vm]\nmcast_group = "239.77.0.0/16"\nmcast_port = 20000\n')
    assert mcast(cfg, "5") == ("239.77.0.5", 20005)
    assert mcast(cfg, "65541") == ("239.77.0.5", 25541)   # same group, other port
    assert meta.guest_mac("258", 3) == "52:54:01:02:00:03"
    assert meta.guest_mac("258", 3) != meta.guest_mac("259", 3)


def test_qemu_command_line():
    cfg = config.parse('[vm]\naccel = "tcg"\nkernel = "/k"\ninitrd = "/i"\n'
                       'network = "multicast"\nmcast_localaddr = "10.0.0.5"\n')
    user = User(1001, 1001, (1001,), "u", "/home/u")
    paths = layout.JobPaths("/rt", "17")
    ctx = Context(opts=Options(image="/img.qcow2", dir=("/d1", "/d2"), cpus=3, mem=700),
                  cfg=cfg, paths=paths, user=user, job_id="17", node="n2",
                  guest_id=1, nodes=("n1", "n2"), cpus=8)
    argv = qemu.argv(ctx, "none", "qcow2")
    line = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-smp") + 1] == "3" and argv[argv.index("-m") + 1] == "700M"
    assert "charlie.guest=1" in argv[argv.index("-append") + 1]
    assert "file=/rt/17/run/1.overlay.qcow2,format=qcow2,if=virtio,cache=none" in line
    assert "mcast=239.77.0.17:20017,localaddr=10.0.0.5" in line
    assert "mac=52:54:00:11:00:01" in line
    assert "path=/rt/17/meta,mount_tag=meta,security_model=none,readonly=on" in line
    assert "path=/rt/17/meta/sync,mount_tag=sync,security_model=none " in line + " "
    assert "path=/d2,mount_tag=data2,security_model=none" in line
    assert "logfile=/rt/17/out/1_console.out" in line
    assert argv[argv.index("-kernel") + 1] == "/k" and argv[argv.index("-initrd") + 1] == "/i"
    # no site kernel: the image's boot loader
    own = qemu.argv(Context(**{**ctx.__dict__, "cfg": config.parse("")}),
                           "none", "qcow2")
    assert "-kernel" not in own and own[own.index("-boot") + 1] == "order=c"
    # multicast network: ssh from the node only, restricted user-mode NIC,
    # loopback forward
    assert "user,id=net1,restrict=on,hostfwd=tcp:127.0.0.1:40017-:22" in line
    off = config.parse('[vm]\nkernel = "/k"\nnetwork = "multicast"\nssh_port_base = 0\n')
    assert "user,id=net1" not in " ".join(qemu.argv(
        Context(**{**ctx.__dict__, "cfg": off}), "none", "qcow2"))
    # the job network: the TAP root opened (fd, vhost), the segment's MTU,
    # and no port on the node at all (ssh goes through the relay's socket)
    vx = qemu.argv(Context(**{**ctx.__dict__, "cfg": config.parse('[vm]\nkernel = "/k"\n')}),
                          "none", "qcow2", net=(5, 6, 1450))
    vline = " ".join(vx)
    assert "tap,id=net0,fd=5,vhost=on,vhostfd=6" in vline
    assert "mac=52:54:00:11:00:01,host_mtu=1450" in vline
    assert "mcast=" not in vline and "hostfwd" not in vline and "user,id=net1" not in vline


def test_job_memory_from_slurms_json():
    """Both shapes Slurm's JSON has had: 22.05's openapi/v0.0.38 (plain
    integers, null for the one not set) and the data parsers of 23.02+
    ({"set", "infinite", "number"}); the record picked by job_id."""
    import json
    from slurm_charlie.backends.vm.sizing import job_memory_of, job_record
    v38 = {"jobs": [{"job_id": 4, "name": "other", "memory_per_node": 9000,
                     "memory_per_cpu": None},
                    {"job_id": 5, "name": "x MinMemoryNode=1024", "memory_per_node": 300,
                     "memory_per_cpu": None}]}
    rec = job_record("5", json.dumps(v38).encode())
    assert rec["name"] == "x MinMemoryNode=1024" and job_memory_of(rec, 2) == 300
    per_cpu = {"job_id": 5, "memory_per_node": None, "memory_per_cpu": 700}
    assert job_memory_of(per_cpu, 3) == 2100
    unset = {"set": False, "infinite": False, "number": 0}
    v42 = {"job_id": 5, "memory_per_node": {"set": True, "infinite": False, "number": 300},
           "memory_per_cpu": unset}
    assert job_memory_of(v42, 2) == 300
    v42cpu = {"job_id": 5, "memory_per_node": unset,
              "memory_per_cpu": {"set": True, "infinite": False, "number": 512}}
    assert job_memory_of(v42cpu, 2) == 1024
    # none asked for, or nothing Slurm meant as a size
    for odd in ({}, {"memory_per_node": 0}, {"memory_per_node": True},
                {"memory_per_node": "1024"}, {"memory_per_node": {"set": True,
                                                                  "infinite": True,
                                                                  "number": 0}}):
        assert job_memory_of({"job_id": 5, **odd}, 2) is None, odd
    # not there, or not JSON (22.05's scontrol: "unrecognized option")
    assert job_record("6", json.dumps(v38).encode()) is None
    assert job_record("5", b"scontrol: unrecognized option '--json'") is None
    assert job_record("5", b'{"jobs": {"5": {}}}') is None
    assert job_record("5", b"[]") is None


def test_kept_overlay_never_overwrites_an_earlier_one(tmp_path):
    """A job id Slurm hands out again must not replace what an earlier job
    of that id kept."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for i in range(3):
        ov = tmp_path / f"run{i}.qcow2"
        ov.write_text(f"changes {i}")
        dst = disks.keep(str(ov), str(kept), "job7-chgu0.overlay.qcow2")
        assert not ov.exists()
    assert sorted(os.listdir(kept)) == ["job7-chgu0.1.overlay.qcow2",
                                        "job7-chgu0.2.overlay.qcow2",
                                        "job7-chgu0.overlay.qcow2"]
    assert (kept / "job7-chgu0.overlay.qcow2").read_text() == "changes 0"
    assert dst.endswith("job7-chgu0.2.overlay.qcow2")


# -- slurm-charlie vm-kernel: the ELF kernel out of a bzImage ----------------

def _elf(pvh: bool) -> bytes:
    """A minimal 64-bit ELF file with one PT_NOTE segment: Xen's PVH entry
    note (type 18) or another one."""
    import struct
    name = b"Xen\0"
    note = struct.pack("<III", len(name), 4, 18 if pvh else 5) + name + b"\0\0\0\x01"
    phoff, phentsize = 64, 56
    note_off = phoff + phentsize
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0, 64,
                            phentsize, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return header + phdr + note + b"kernel text" * 100


def _bzimage(payload: bytes, setup_sects: int = 3, version: int = 0x20f) -> bytes:
    import struct
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1f1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x3c0  # the decompressor's own code comes first
    struct.pack_into("<II", setup, 0x248, offset, len(payload) + 4)
    # the kernel's build appends the decompressed size (4 bytes) to the payload
    return bytes(setup) + bytes(offset) + payload + b"\x00\x10\x00\x00" + b"rest of image"


@pytest.mark.parametrize("kind", ["xz", "gzip", "bzip2", "lzma", "zstd"])
def test_vm_kernel_extracts_the_elf_kernel(tmp_path, kind):
    import bz2
    import gzip as gz
    import lzma
    elf = _elf(pvh=True)

    def zstd(b):  # Debian 13's kernels: the zstd program (make deps installs it)
        return subprocess.run(["zstd", "-q", "-c"], input=b, capture_output=True,
                              check=True).stdout
    packed = {"xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
              "gzip": gz.compress, "bzip2": bz2.compress, "zstd": zstd,
              "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)}[kind](elf)
    src, out = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    src.write_bytes(_bzimage(packed))
    assert vmbuild.kernel_is_compressed(str(src)) is True
    assert vmbuild.extract_kernel(str(src), str(out)) == kind
    assert out.read_bytes() == elf
    assert out.stat().st_mode & 0o777 == 0o644
    assert vmbuild.kernel_is_compressed(str(out)) is False
    # an ELF kernel given again is kept as it is
    assert vmbuild.extract_kernel(str(out), str(tmp_path / "again")) == "none"


def test_vm_kernel_refuses_what_qemu_could_not_boot(tmp_path):
    import lzma
    src, out = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    src.write_bytes(_bzimage(lzma.compress(_elf(pvh=False))))
    with pytest.raises(UserError, match="no PVH entry point") as e:
        vmbuild.extract_kernel(str(src), str(out))
    assert "CONFIG_PVH" in e.value.hint and not out.exists()
    for data, what in ((b"just some file" * 100, "neither an ELF kernel nor a bzImage"),
                       (_bzimage(b"\x00" * 64), "not one this knows"),
                       (_bzimage(b"\xfd7zXZ\x00garbage"), "does not decompress"),
                       (_bzimage(b"", version=0x206), "too old")):
        src.write_bytes(data)
        with pytest.raises(UserError, match=what):
            vmbuild.extract_kernel(str(src), str(out))
        assert not out.exists()
    assert vmbuild.kernel_is_compressed(str(tmp_path / "missing")) is None
