"""File checks run as an unprivileged user (nobody), the way the shim runs
them at submit and the prolog runs them on a node."""

import dataclasses
import os
import shutil
import tempfile

import pytest

from slurm_charlie import config, images, validate
from slurm_charlie.errors import UserError
from slurm_charlie.options import Options
from slurm_charlie.proc import User, call_as

pytestmark = pytest.mark.root  # files owned by and checked as nobody

NOBODY = User.lookup(65534)
CFG = config.parse("")


@pytest.fixture(scope="module")
def tree():
    base = tempfile.mkdtemp(dir="/run", prefix="charlie-validate-")
    os.chmod(base, 0o755)
    def mk(path, mode, content=None):
        full = os.path.join(base, path)
        if content is None:
            os.mkdir(full)
        else:
            with open(full, "wb") as f:
                f.write(content)
        os.chmod(full, mode)
        return full
    mk("data", 0o755)
    mk("secret", 0o700)
    mk("img", 0o755)
    mk("closed-img", 0o700)
    mk("job.sh", 0o644, b"#!/bin/sh\n")
    mk("secret.sh", 0o600, b"#!/bin/sh\n")
    mk("disk.qcow2", 0o644, b"QFI\xfb" + b"\0" * 508)
    mk("closed.qcow2", 0o600, b"QFI\xfb" + b"\0" * 508)
    mk("garbage.bin", 0o644, b"hello, not an image")
    mk("disk.raw", 0o644, b"\0" * 1024)
    yield base
    shutil.rmtree(base)


def _resolve(opts, cfg, cwd, nodes):
    return dataclasses.asdict(validate.resolve(opts, cfg, cwd, nodes))


def resolve_as_nobody(opts, cwd, nodes=None, cfg=CFG):
    return Options(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in call_as(NOBODY, _resolve, opts, cfg, cwd, nodes).items()})


def test_relative_paths_resolved_against_cwd(tree):
    out = resolve_as_nobody(Options(dir=("data", "./data/../data")), tree)
    assert out.dir == (f"{tree}/data", f"{tree}/data") and out.type == "none"


@pytest.mark.parametrize("name,kind", [
    ("img", ("container", "directory")), ("disk.qcow2", ("vm", "qcow2")),
    ("disk.raw", ("vm", "raw"))])
def test_type_from_image(tree, name, kind):
    assert tuple(call_as(NOBODY, images.detect, os.path.join(tree, name))) == kind


BAD = [
    (Options(image="missing.qcow2"), "--charlie-image: cannot access: No such file or directory"),
    (Options(image="closed.qcow2"), "--charlie-image: cannot read: Permission denied"),
    (Options(image="closed-img"), "--charlie-image: directory not readable by you"),
    (Options(image="garbage.bin"), "--charlie-image: not a recognised image"),
    (Options(dir=("job.sh",)), "--charlie-dir: not a directory"),
    (Options(dir=("secret",)), "--charlie-dir: directory not readable by you"),
    (Options(dir=("nope",)), "--charlie-dir: cannot access: No such file"),
    (Options(image="disk.qcow2", job="secret.sh"), "--charlie-job: file not readable by you"),
    (Options(image="disk.qcow2", job="data"), "--charlie-job: not a regular file"),
    (Options(image="disk.qcow2", job="job.sh", interactive=True),
     "--charlie-interactive: conflicts with --charlie-job"),
    (Options(image="disk.qcow2", write=True), "--charlie-write: applies to container images only"),
    (Options(image="disk.raw", write=True), "--charlie-write: applies to container images only"),
    (Options(type="none", image="img"), "--charlie-type=none: takes no image"),
    (Options(type="vm"), "--charlie-type=vm: needs an image"),
    (Options(type="vm", image="img"), "is a directory image, which does not fit --charlie-type=vm"),
    (Options(dir=("data",), commit=0), "--charlie-commit: not supported for type none"),
    (Options(image="img", cpus=2), "--charlie-cpus: applies to VM jobs only"),
    (Options(dir=("data",), uid=0), "--charlie-uid: applies to container jobs only, not type none"),
]


@pytest.mark.parametrize("opts,message", BAD, ids=[m for _, m in BAD])
def test_bad(tree, opts, message):
    with pytest.raises(UserError) as e:
        resolve_as_nobody(opts, tree)
    assert message in e.value.line()


def test_commit_guest_beyond_nodes(tree):
    with pytest.raises(UserError) as e:
        resolve_as_nobody(Options(image="disk.qcow2", commit=5), tree, nodes=3)
    assert "guest 5 does not exist in a job of 3 node(s)" in e.value.line()
    assert "0 .. 2" in e.value.hint


def test_relative_path_refused_without_cwd():
    with pytest.raises(UserError, match="relative path"):
        validate.resolve(Options(dir=("data",)), CFG, cwd=None)


def test_image_roots(tree):
    cfg = config.parse(f'image_roots = ["{tree}/img"]')
    with pytest.raises(UserError, match="outside the allowed image directories"):
        resolve_as_nobody(Options(image="disk.qcow2"), tree, cfg=cfg)


def test_commit_policy_deny(tree):
    cfg = config.parse('[commit]\npolicy = "deny"')
    with pytest.raises(UserError, match="disabled on this cluster"):
        resolve_as_nobody(Options(image="disk.qcow2", commit=0), tree, cfg=cfg)


def test_vm_image_is_checked_by_qemu_img(tree):
    # 512 bytes with the qcow2 magic and nothing else: qemu-img refuses it
    with pytest.raises(UserError, match="qemu-img cannot read it as qcow2"):
        resolve_as_nobody(Options(image="disk.qcow2"), tree)


def test_archive_hashed_at_submit_once(tmp_path, monkeypatch):
    """The validator hashes a tarball the nodes will unpack, keeps the answer
    in the user's cache for the next submit, and hashes nothing the nodes
    mount or use in place."""
    import hashlib
    import subprocess
    from slurm_charlie import options
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "x").write_text("x\n")
    tgz = str(tmp_path / "img.tar.gz")
    subprocess.run(["tar", "-C", str(src), "-czf", tgz, "."], check=True)
    real = hashlib.sha256(open(tgz, "rb").read()).hexdigest()
    home = str(tmp_path / "cache")
    got = validate.submit_digest(Options(image=tgz, type="container"), CFG, home)
    assert options.parse_image_digest(got.image_digest) == (
        real, options.file_identity(os.stat(tgz)))
    monkeypatch.setattr(images, "sha256_file", lambda p: pytest.fail("hashed twice"))
    assert validate.submit_digest(Options(image=tgz, type="container"), CFG, home) == got
    # nothing to hash: a directory, a mounted squashfs, a registry image
    assert validate.submit_digest(Options(image=str(src), type="container"), CFG,
                                  home).image_digest is None
    sqfs = str(tmp_path / "img.sqfs")
    subprocess.run(["mksquashfs", str(src), sqfs, "-quiet", "-no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    assert validate.submit_digest(Options(image=sqfs, type="container"), CFG,
                                  home).image_digest is None
    assert validate.submit_digest(Options(image="docker://r/x@sha256:" + "0" * 64,
                                          type="container"), CFG, home).image_digest is None
    # a squashfs copied to write into is unpacked: hashed
    monkeypatch.undo()
    assert validate.submit_digest(Options(image=sqfs, type="container", write=True),
                                  CFG, None).image_digest.startswith("sha256:")


def test_archive_changed_while_hashed_at_submit_gets_no_digest(tmp_path, monkeypatch):
    import subprocess
    src = tmp_path / "src"
    src.mkdir()
    tgz = str(tmp_path / "img.tar")
    subprocess.run(["tar", "-C", str(src), "-cf", tgz, "."], check=True)
    def hash_while_someone_writes(path):
        with open(path, "ab") as f:
            f.write(b"\0" * 512)
        return "0" * 64
    monkeypatch.setattr(images, "sha256_file", hash_while_someone_writes)
    got = validate.submit_digest(Options(image=tgz, type="container"), CFG,
                                 str(tmp_path / "cache"))
    assert got.image_digest is None  # the nodes hash what they find
    assert not os.path.exists(tmp_path / "cache" / "digests") or \
        os.listdir(tmp_path / "cache" / "digests") == []


def test_user_cache_home():
    assert validate.user_cache_home({"HOME": "/home/u"}) == "/home/u/.cache/slurm-charlie"
    assert validate.user_cache_home({"HOME": "/home/u", "XDG_CACHE_HOME": "/c"}) == \
        "/c/slurm-charlie"
    assert validate.user_cache_home({"HOME": "rel"}) is None
    assert validate.user_cache_home({}) is None
