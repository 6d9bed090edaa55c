"""Mount points in images ch-run reads in place are looked at without
following the image's links (docs/security.rst, "The image's author is not
the user")."""

import os

import pytest

from slurm_charlie.backends.container import missing_mount_points
from slurm_charlie.errors import UserError


def _image(tmp_path):
    img = tmp_path / "img"
    for d in ("ch/meta", "ch/data1", "var/tmp", "scratch"):
        (img / d).mkdir(parents=True)
    return img


def test_real_directories_are_not_missing(tmp_path):
    img = _image(tmp_path)
    assert missing_mount_points(str(img), 1, ("scratch",)) == []
    assert missing_mount_points(str(img), 2, ("scratch/node1",)) == ["ch/data2",
                                                                       "scratch/node1"]


@pytest.mark.parametrize("where", ["ch", "ch/meta", "ch/data1"])
def test_a_link_at_a_mount_point_is_refused_by_its_name(tmp_path, where):
    img = _image(tmp_path)
    victim = tmp_path / "victim"
    (victim / "meta").mkdir(parents=True)
    (victim / "data1").mkdir()
    target = img / where
    os.rename(target, tmp_path / "moved")
    os.symlink(victim if where == "ch" else victim / where.split("/")[1], target)
    with pytest.raises(UserError, match=f"the image's /{where} is a symbolic link"):
        missing_mount_points(str(img), 1)
    assert sorted(os.listdir(victim)) == ["data1", "meta"]


def test_a_file_at_a_mount_point_is_refused(tmp_path):
    img = _image(tmp_path)
    os.rmdir(img / "ch/data1")
    (img / "ch/data1").write_text("x")
    with pytest.raises(UserError, match="the image's /ch/data1 is a symbolic link or not"):
        missing_mount_points(str(img), 1)


def test_a_link_on_the_sites_tmpfs_path_counts_as_absent(tmp_path):
    img = _image(tmp_path)
    os.symlink("var/tmp", img / "tmp")  # as some images have
    assert missing_mount_points(str(img), 1, ("tmp",)) == ["tmp"]
    assert missing_mount_points(str(img), 1, ("tmp/x",)) == ["tmp/x"]
