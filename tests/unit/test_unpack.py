"""Container archives: member checks (a table), unpacking into the cache,
reuse, eviction.  Runs on the local filesystem; the cluster suite runs the
same through real jobs."""

import hashlib
import io
import os
import stat
import subprocess
import tarfile

import pytest

from slurm_charlie import options, unpack
from slurm_charlie.errors import UserError


def make_tar(path, entries, mode="w:gz"):
    """entries: (name, kind, data) with kind file|dir|sym|lnk|dev."""
    with tarfile.open(path, mode) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                         "lnk": tarfile.LNKTYPE, "dev": tarfile.CHRTYPE}[kind]
            info.mode = 0o755
            if kind in ("sym", "lnk"):
                info.linkname = data
            tar.addfile(info)
    return path


GOOD_IMAGE = [("bin", "dir", None), ("bin/sh", "file", b"#!"), ("etc", "dir", None),
              ("bin/ash", "sym", "sh"), ("bin/abs", "sym", "/bin/sh"),
              ("etc/hosts", "file", b""), ("etc/hosts2", "lnk", "etc/hosts")]


@pytest.mark.parametrize("prefix,strip", [("", ""), ("./", ""), ("myimg/", "myimg/")])
def test_good_layouts(tmp_path, prefix, strip):
    entries = ([(prefix.rstrip("/"), "dir", None)] if prefix not in ("", "./") else []) + [
        (prefix + n, k, (prefix + d if k == "lnk" else d)) for n, k, d in GOOD_IMAGE]
    tgz = make_tar(str(tmp_path / "img.tgz"), entries)
    with tarfile.open(tgz) as tar:
        assert unpack.check_members(tar.getmembers(), tgz) == strip
    got = unpack.unpack(tgz, "tar.gz", str(tmp_path / "cache"), "11", 5)
    image = got["image"]
    assert got["unpacked"] and open(os.path.join(image, "bin/sh")).read() == "#!"
    assert os.readlink(os.path.join(image, "bin/abs")) == "/bin/sh"
    for m in unpack.MOUNT_POINTS:
        assert os.path.isdir(os.path.join(image, m))
    assert os.path.exists(os.path.join(image + ".jobs", "11"))


BAD = [
    ([("/etc/evil", "file", b"x")], "absolute member path: {t}: /etc/evil"),
    ([("../evil", "file", b"x")], "member path with '..': {t}: ../evil"),
    ([("a/../../evil", "file", b"x")], "member path with '..'"),
    ([("lnk", "sym", "/tmp"), ("lnk/evil", "file", b"x")], "member below a symbolic link"),
    ([("up", "sym", "../../outside")], "symbolic link pointing outside the image: {t}: up -> ../../outside"),
    ([("d", "dir", None), ("d/up", "sym", "../..")], "symbolic link pointing outside the image"),
    ([("hl", "lnk", "/etc/shadow")], "hard link pointing outside the image"),
    ([("hl", "lnk", "../x")], "hard link pointing outside the image"),
    # an absolute link, then a file of the same name: would write through it
    ([("etc", "dir", None), ("etc/passwd", "sym", "/etc/passwd"),
      ("etc/passwd", "file", b"owned")], "member given twice"),
    # a link, then a directory over it: would chmod its target
    ([("d", "sym", "/etc"), ("d", "dir", None)], "member given twice"),
    ([("a", "sym", "/etc"), ("hl", "lnk", "a/passwd")], "hard link to or through a symbolic link"),
    ([("hl", "lnk", "later"), ("later", "file", b"x")], "hard link to a file not earlier"),
]


@pytest.mark.parametrize("entries,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_members_refused_nothing_written(tmp_path, entries, message):
    tgz = make_tar(str(tmp_path / "bad.tgz"), entries)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        unpack.unpack(tgz, "tar.gz", str(cache), "12", 5)
    assert "unsafe tarball: " + message.format(t=tgz) in e.value.line()
    assert "tar -C IMAGE_DIR" in e.value.hint
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()
    leftovers = [p for p in os.listdir(cache) if p != "index"
                 and not p.endswith((".lock", ".jobs"))]
    assert leftovers == []


def test_device_files_are_skipped(tmp_path):
    """A rootfs tarball made as root (debootstrap, docker export) has /dev
    nodes: the user cannot make them and ch-run binds the host's /dev, so
    they are left out, the rest unpacked."""
    tgz = make_tar(str(tmp_path / "img.tgz"), GOOD_IMAGE + [
        ("dev", "dir", None), ("dev/null", "dev", None), ("dev/sda", "dev", None)])
    got = unpack.unpack(tgz, "tar.gz", str(tmp_path / "cache"), "13", 5)
    assert os.listdir(os.path.join(got["image"], "dev")) == []
    assert open(os.path.join(got["image"], "bin/sh")).read() == "#!"


def test_garbage_tarball(tmp_path):
    bad = tmp_path / "cut.tgz"
    make_tar(str(bad), GOOD_IMAGE)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(UserError, match="cannot unpack"):
        unpack.unpack(str(bad), "tar.gz", str(tmp_path / "cache"), "1", 5)


@pytest.mark.parametrize("mode,suffix,damage", [
    ("w:xz", "tar.xz", "corrupt"), ("w:xz", "tar.xz", "truncate"),
    ("w:gz", "tar.gz", "truncate"), ("w:bz2", "tar.bz2", "corrupt"),
    ("w:bz2", "tar.bz2", "truncate")])
def test_damaged_compressed_tarball_is_a_user_error(tmp_path, mode, suffix, damage):
    """Zeroed bytes in the stream (lzma's LZMAError is not tarfile's) or a
    cut-off download: a UserError, nothing left in the cache."""
    bad = tmp_path / f"img.{suffix}"
    make_tar(str(bad), GOOD_IMAGE + [("big", "file", b"compressible text " * 20000)], mode)
    data = bytearray(bad.read_bytes())
    if damage == "corrupt":
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(16)
    else:
        data = data[:len(data) * 6 // 10]
    bad.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="cannot unpack"):
        unpack.unpack(str(bad), suffix, str(cache), "1", 5)
    assert [p for p in os.listdir(cache) if p != "index"
            and not p.endswith((".lock", ".jobs"))] == []


def test_extraction_never_writes_through_a_link(tmp_path):
    """Even with the member checks bypassed, the writer itself refuses to go
    through a link already in the image or to replace an entry."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "img"
    dest.mkdir()
    os.symlink(str(outside), dest / "d")
    tgz = make_tar(str(tmp_path / "x.tgz"), [("d/f", "file", b"x")])
    with tarfile.open(tgz) as tar:
        with pytest.raises(OSError):
            unpack._write_members(tar, tar.getmembers(), str(dest))
    assert os.listdir(outside) == []


def test_fifo_member_and_modes(tmp_path):
    tgz = str(tmp_path / "f.tgz")
    with tarfile.open(tgz, "w:gz") as tar:
        for name, typ, mode in (("bin", tarfile.DIRTYPE, 0o555), ("p", tarfile.FIFOTYPE, 0o644)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = typ, mode
            tar.addfile(info)
        info = tarfile.TarInfo("bin/su")
        info.mode, info.size = 0o4755, 2
        tar.addfile(info, io.BytesIO(b"#!"))
    image = unpack.unpack(tgz, "tar.gz", str(tmp_path / "c"), "1", 5)["image"]
    assert stat.S_ISFIFO(os.lstat(os.path.join(image, "p")).st_mode)
    assert os.stat(os.path.join(image, "bin/su")).st_mode & 0o7777 == 0o755  # no setuid
    assert os.stat(os.path.join(image, "bin")).st_mode & 0o700 == 0o700  # cleanable


def test_second_job_reuses_the_unpack(tmp_path):
    tgz = make_tar(str(tmp_path / "img.tgz"), GOOD_IMAGE)
    first = unpack.unpack(tgz, "tar.gz", str(tmp_path / "c"), "1", 5)
    second = unpack.unpack(tgz, "tar.gz", str(tmp_path / "c"), "2", 5)
    assert first["image"] == second["image"] and second["unpacked"] is False
    assert sorted(os.listdir(first["image"] + ".jobs")) == ["1", "2"]


def test_eviction_lru_spares_running_jobs(tmp_path):
    cache = str(tmp_path / "c")
    shas = []
    for i, job in enumerate(("1", "2", "3")):
        tgz = make_tar(str(tmp_path / f"img{i}.tgz"),
                       GOOD_IMAGE + [("big", "file", bytes(1000 * (i + 1)))])
        shas.append(unpack.unpack(tgz, "tar.gz", cache, job, 5)["sha"])
        os.utime(os.path.join(cache, shas[-1] + ".size"), (100 + i, 100 + i))
    # image 0 is oldest but its job 1 still runs; image 1 goes first
    removed = unpack.evict(cache, 3500, running_jobs={"1", "3"})
    assert removed == [shas[1]]
    assert not os.path.exists(os.path.join(cache, shas[1]))
    assert os.path.isdir(os.path.join(cache, shas[0])) and os.path.isdir(os.path.join(cache, shas[2]))
    unpack.release(cache, shas[0], "1")
    assert unpack.evict(cache, 3500, running_jobs={"3"}) == [shas[0]]


def _no_hashing(*a):
    raise AssertionError("the archive was read to hash it")


def test_archive_hashed_once(tmp_path, monkeypatch):
    tgz = make_tar(str(tmp_path / "img.tgz"), GOOD_IMAGE)
    first, how = unpack.archive_key(tgz, str(tmp_path / "idx"))
    assert how == "hashed" and first == hashlib.sha256(open(tgz, "rb").read()).hexdigest()
    monkeypatch.setattr(unpack.images, "sha256_file", _no_hashing)
    assert unpack.archive_key(tgz, str(tmp_path / "idx")) == (first, "index")


def test_archive_digest_from_submit_is_taken_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """The node does not read the archive when the validator's digest names
    this very file version; it hashes what it finds once the file changed."""
    tgz = make_tar(str(tmp_path / "img.tgz"), GOOD_IMAGE)
    real = hashlib.sha256(open(tgz, "rb").read()).hexdigest()
    claim = options.image_digest("ab" * 32, os.stat(tgz))  # a claim, taken as is
    with monkeypatch.context() as m:
        m.setattr(unpack.images, "sha256_file", _no_hashing)
        assert unpack.archive_key(tgz, str(tmp_path / "idx"), claim) == ("ab" * 32, "submit")
    # the same content written again: a new ctime, so the claim is stale
    data = open(tgz, "rb").read()
    with open(tgz, "wb") as f:
        f.write(data)
    assert unpack.archive_key(tgz, str(tmp_path / "idx2"), claim) == (real, "hashed")
    with pytest.raises(UserError, match="not an image digest"):
        unpack.archive_key(tgz, str(tmp_path / "idx3"), "sha256:00@1:2:3")


def test_archive_key_from_several_processes_at_once(tmp_path):
    """Jobs of one user on one node hash the same new archive together (the
    sandbox once drained a node when two renamed one shared temporary file)."""
    tgz = make_tar(str(tmp_path / "img.tgz"), GOOD_IMAGE)
    for round_ in range(20):
        idx = str(tmp_path / f"idx{round_}")
        pids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    unpack.archive_key(tgz, idx)[0]
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            pids.append(pid)
        codes = [os.waitpid(p, 0)[1] for p in pids]
        assert codes == [0, 0, 0, 0], (round_, codes)
        assert [n for n in os.listdir(idx) if ".tmp" in n] == []


def test_fuse_usable_only_when_users_may_open_it(tmp_path):
    """squashfs images are mounted only where /dev/fuse is open to users
    (0666 on a real host); else they are unpacked, and the log says why."""
    from slurm_charlie.backends.container import fuse_unusable
    dev = tmp_path / "fuse"
    assert "missing" in fuse_unusable(str(dev))
    dev.write_bytes(b"")
    dev.chmod(0o600)
    assert fuse_unusable(str(dev)) == f"{dev} is mode 600, not usable by users (chmod 0666 {dev})"
    dev.chmod(0o666)
    assert fuse_unusable(str(dev)) is None


def test_mpi_list_asked_once_per_node_and_ttl(tmp_path, monkeypatch):
    """srun --mpi=list runs on the first prolog, then again only after the
    TTL or when srun changes; the answer lives in runtime_root."""
    from slurm_charlie.backends import container
    calls = []
    monkeypatch.setattr(container, "mpi_plugins", lambda: calls.append(1) or ["none", "pmi2"])
    root = str(tmp_path)
    assert container.mpi_plugins_cached(root, now=1000.0) == ["none", "pmi2"]
    assert container.mpi_plugins_cached(root, now=1000.0 + 5) == ["none", "pmi2"]
    assert len(calls) == 1
    container.mpi_plugins_cached(root, now=1000.0 + container.MPI_LIST_TTL + 1)
    assert len(calls) == 2
    monkeypatch.setattr(container, "_srun_key", lambda: "/other/srun:1:2")
    container.mpi_plugins_cached(root, now=1000.0 + container.MPI_LIST_TTL + 2)
    assert len(calls) == 3
    (tmp_path / container.MPI_LIST_FILE).write_text("garbage")
    assert container.mpi_plugins_cached(root, now=5000.0) == ["none", "pmi2"]
    assert len(calls) == 4


def test_mpi_type_follows_the_image(tmp_path):
    """container.default_mpi = "auto": Open MPI alone -> pmix, anything
    else -> pmi2; the Open MPI warning only where Slurm has no PMIx."""
    from slurm_charlie.backends.container import mpi_flavours, mpi_for, openmpi_warning
    img = tmp_path / "img"
    lib = img / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    assert mpi_for(mpi_flavours(str(img))) == "pmi2"
    (lib / "libmpi.so.40").write_bytes(b"")
    assert mpi_for(mpi_flavours(str(img))) == "pmix"
    assert openmpi_warning(mpi_flavours(str(img)), "IMG", pmix=True) == []
    assert "image has Open MPI" in openmpi_warning(mpi_flavours(str(img)), "IMG", pmix=False)[0]
    (lib / "libmpich.so.12").write_bytes(b"")
    assert mpi_for(mpi_flavours(str(img))) == "pmi2"
    assert openmpi_warning(mpi_flavours(str(img)), "IMG", pmix=False) == []


def test_squashfs_listing_tells_missing_mount_points_and_mpi(tmp_path):
    """A squashfs image is read from its listing (mksquashfs, unsquashfs
    -l; nothing unpacked): the mount points it lacks (an overlay adds them)
    and the MPI it carries, the same answer as for the directory."""
    from slurm_charlie.backends.container import check_squashfs, inspect_dir, mpi_flavours
    img = tmp_path / "img"
    (img / "usr/lib/x86_64-linux-gnu/openmpi/lib").mkdir(parents=True)
    (img / "usr/lib/x86_64-linux-gnu/openmpi/lib/libmpi.so.40.30.4").write_bytes(b"x")
    (img / "usr/lib/python3/libmpich.so.12").parent.mkdir(parents=True)
    (img / "usr/lib/python3/libmpich.so.12").write_bytes(b"x")  # not a library dir
    (img / "ch/meta").mkdir(parents=True)
    (img / "ch/data1").mkdir()
    (img / "tmp/node1").mkdir(parents=True)
    sqfs = tmp_path / "img.sqfs"
    subprocess.run(["mksquashfs", str(img), str(sqfs), "-quiet", "-no-progress"], check=True)
    mnt = tmp_path / "run" / "squashfs"
    missing, mpi = check_squashfs(str(sqfs), 2, str(mnt), ("tmp/node1", "scratch/node1"))
    assert missing == ["ch/data2", "scratch/node1"]
    assert mpi == {"openmpi": "/usr/lib/x86_64-linux-gnu/openmpi/lib/libmpi.so.40.30.4"}
    assert mpi == mpi_flavours(str(img))
    # a directory gives the same answer in one child (inspect_dir)
    assert inspect_dir(str(img), 2, ("tmp/node1", "scratch/node1")) == (missing, mpi)
    assert mnt.is_dir()
    # the prolog's first child: the holder's FIFO (a planted file replaced),
    # the format, and for a directory the same answer again
    from slurm_charlie.backends.container import first_look
    fifo = tmp_path / "meta.holder"
    fifo.write_text("planted")
    seen = first_look(str(img), 2, ("tmp/node1", "scratch/node1"), str(fifo))
    assert seen == {"fmt": "directory", "missing": missing, "mpi": mpi}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert first_look(str(sqfs), 2, (), str(fifo)) == {"fmt": "squashfs"}
    assert check_squashfs(str(sqfs), 1, str(mnt)) == ([], mpi)
    (tmp_path / "bad.sqfs").write_bytes(b"hsqs" + b"\0" * 200)
    with pytest.raises(UserError, match="not a readable squashfs image"):
        check_squashfs(str(tmp_path / "bad.sqfs"), 1, str(mnt))


@pytest.mark.parametrize("link", ["ch", "ch/data1"])
def test_mount_points_never_follow_an_images_link(tmp_path, link):
    """Trust round 2, class 5: the image's author is not the user.  An
    image whose `ch` (or `ch/data1`) is a symbolic link to a private
    directory of whoever runs it: the mount points are refused by name, and
    the directory gets nothing new and keeps its mode."""
    from slurm_charlie.unpack import mount_points_in
    victim = tmp_path / "private"
    victim.mkdir(mode=0o700)
    (victim / "key").write_text("secret\n")
    image = tmp_path / "image"
    (image / "ch").mkdir(parents=True) if link != "ch" else image.mkdir()
    os.symlink(str(victim), image / link)
    with pytest.raises(UserError) as e:
        mount_points_in(str(image), "img.tgz")
    assert f"the image's /{link} is a symbolic link or not a directory" in str(e.value)
    assert sorted(os.listdir(victim)) == ["key"]
    assert (victim.stat().st_mode & 0o777) == 0o700


def test_mount_points_made_in_a_plain_image(tmp_path):
    from slurm_charlie.unpack import mount_points_in
    image = tmp_path / "image"
    (image / "ch").mkdir(parents=True, mode=0o700)
    (image / "ch" / "data2").write_text("a file where a mount point goes\n")
    with pytest.raises(UserError) as e:
        mount_points_in(str(image), "img.tgz")
    assert "the image's /ch/data2 is a symbolic link or not a directory" in str(e.value)
    (image / "ch" / "data2").unlink()
    mount_points_in(str(image), "img.tgz")
    for m in ("ch/meta", "ch/data1", "ch/data4"):  # /ch itself is left as it was
        assert ((image / m).stat().st_mode & 0o777) == 0o755, m
