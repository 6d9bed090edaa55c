"""VM image checks with the real qemu-img, run as an unprivileged user the
way the validator (submit) and the prolog (node) run them."""

import os
import shutil
import subprocess
import tempfile

import pytest

from slurm_charlie import config, validate
from slurm_charlie.errors import UserError
from slurm_charlie.options import Options
from slurm_charlie.proc import User, call_as

pytestmark = pytest.mark.root  # qemu-img runs as nobody

NOBODY = User.lookup(65534)
CFG = config.parse('[vm]\nkernel = "/boot/vmlinuz-for-tests"\n')
QEMU_IMG = shutil.which("qemu-img")


def qimg(*args):
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tree():
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-vmimg-")
    os.chmod(base, 0o755)
    j = lambda n: os.path.join(base, n)  # noqa: E731
    qimg("create", "-q", "-f", "qcow2", j("good.qcow2"), "64M")
    qimg("create", "-q", "-f", "qcow2", j("zero.qcow2"), "0")
    # -u: do not open the backing file (it would be read as root here)
    qimg("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow",
         j("shadow.qcow2"), "1M")
    open(j("data.raw"), "wb").close()
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={j('data.raw')}",
         j("datafile.qcow2"), "1M")
    with open(j("garbage.bin"), "wb") as f:
        f.write(os.urandom(4096))
    with open(j("badheader.qcow2"), "wb") as f:
        f.write(b"QFI\xfb" + os.urandom(4092))
    qimg("create", "-q", "-f", "raw", j("disk.raw"), "16M")
    for n in os.listdir(base):
        os.chmod(j(n), 0o644)
    shutil.copy(j("good.qcow2"), j("mine.qcow2"))
    os.chown(j("mine.qcow2"), NOBODY.uid, NOBODY.gid)
    yield base
    shutil.rmtree(base)


def _resolve(opts, cwd):
    import dataclasses
    return dataclasses.asdict(validate.resolve(opts, CFG, cwd, 3))


def check(tree, **kw):
    out = call_as(NOBODY, _resolve, Options(**kw), tree)
    return Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in out.items()})


def test_good_qcow2_and_raw_pass(tree):
    assert check(tree, image="good.qcow2").type == "vm"
    assert check(tree, image="disk.raw").type == "vm"


def test_backing_file_refused(tree):
    with pytest.raises(UserError, match=r"has a backing file \(/etc/shadow\); refused"):
        check(tree, image="shadow.qcow2")


def test_external_data_file_refused(tree):
    with pytest.raises(UserError, match="external data file"):
        check(tree, image="datafile.qcow2")


def test_zero_size_refused(tree):
    with pytest.raises(UserError, match="virtual size is 0"):
        check(tree, image="zero.qcow2")


def test_garbage_refused(tree):
    with pytest.raises(UserError, match="not a recognised image"):
        check(tree, image="garbage.bin")
    # the qcow2 magic with a broken header: qemu-img refuses to open it
    with pytest.raises(UserError, match="qemu-img cannot read it as qcow2"):
        check(tree, image="badheader.qcow2")


def test_commit_needs_write_access(tree):
    with pytest.raises(UserError, match="image not writable by you"):
        check(tree, image="good.qcow2", commit=0)
    assert check(tree, image="mine.qcow2", commit=0).commit == 0


def test_commit_guest_must_exist(tree):
    with pytest.raises(UserError, match="guest 5 does not exist in a job of 3"):
        check(tree, image="mine.qcow2", commit=5)
