"""How a container job's CDI edits become steps (slurm_charlie/cdimount.py),
and the overlay script's part that finds where they go in the image: the
plan is pure logic; the script's path walk and its upper-layer step are run
with the real sh on a tree in a temporary directory (no mount needed)."""

import os
import subprocess

import pytest

from slurm_charlie import cdi, cdimount
from slurm_charlie.errors import UserError

HOOK = "/usr/bin/nvidia-cdi-hook"


def edits(**kw):
    return cdi.Edits(**kw)


def test_mounts_are_bound_read_only_nosuid_nodev_once_each():
    plan = cdimount.plan(edits(mounts=(
        cdi.Mount("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/libcuda.so.1"),
        cdi.Mount("/usr/bin/true", "/usr/bin/nvidia-smi", ("ro", "noexec")),
        cdi.Mount("/usr/bin/false", "/usr/bin//nvidia-smi"))), "s.json")
    assert plan.binds == (
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/libcuda.so.1", "ro,nosuid,nodev"),
        ("/usr/bin/true", "/usr/bin/nvidia-smi", "ro,nosuid,nodev,noexec"))
    assert plan.text().splitlines()[0] == \
        "b\t/usr/lib/x86_64-linux-gnu/libc.so.6\t/usr/lib/libcuda.so.1\tro,nosuid,nodev"


def test_hooks_become_links_and_loader_folders():
    plan = cdimount.plan(edits(hooks=(
        cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "create-symlinks", "--link",
                                           "libcuda.so.1::/usr/lib/libcuda.so")),
        cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "update-ldcache", "--folder",
                                           "/usr/lib", "--folder", "/usr/lib/")),
        cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "enable-cuda-compat",
                                           "--host-driver-version", "550.54.14")),
        cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "chmod", "--mode", "755",
                                           "--path", "/dev/dri")))), "s.json")
    assert plan.links == (("libcuda.so.1", "/usr/lib/libcuda.so"),)
    assert plan.ldcache == ("/usr/lib",) and plan.cuda_compat == "550.54.14"
    assert plan.text().splitlines() == ["l\tlibcuda.so.1\t/usr/lib/libcuda.so",
                                        "c\t/usr/lib", "x\t550.54.14"]
    assert not cdimount.Plan() and plan


def test_plans_of_two_specs_add_up_with_the_first_bind_of_a_path_kept():
    a = cdimount.Plan((("/a", "/x", "ro,nosuid,nodev"),), (), ("/usr/lib",))
    b = cdimount.Plan((("/b", "/x", "ro,nosuid,nodev"), ("/c", "/y", "ro,nosuid,nodev")),
                      (("t", "/l"),), ("/usr/lib", "/lib"), "1.0")
    assert a + b == cdimount.Plan((("/a", "/x", "ro,nosuid,nodev"),
                                   ("/c", "/y", "ro,nosuid,nodev")), (("t", "/l"),),
                                  ("/usr/lib", "/lib"), "1.0")


@pytest.mark.parametrize("bad,words", [
    (edits(mounts=(cdi.Mount("/usr/bin/true", "/dev/shm/x"),)), "onto /dev/shm/x"),
    (edits(mounts=(cdi.Mount("/usr/bin/true", "/proc/x"),)), "onto /proc/x"),
    (edits(mounts=(cdi.Mount("/usr/bin/true", "/ch/meta"),)), "onto /ch/meta"),
    (edits(mounts=(cdi.Mount("/usr/bin/true", "/"),)), "onto /"),
    (edits(mounts=(cdi.Mount("/usr/bin/true", "lib/x"),)), "is not an absolute path"),
    (edits(mounts=(cdi.Mount("/usr/bin/true", "/usr/lib/a\tb"),)), "on one line"),
    (edits(device_nodes=(cdi.DeviceNode("/dev/nvidia0", "/dev/null"),)),
     "its hostPath /dev/null differs"),
    (edits(device_nodes=(cdi.DeviceNode("/dev/charlie-absent"),)),
     "device node /dev/charlie-absent: No such file"),
    (edits(device_nodes=(cdi.DeviceNode("/dev/shm"),)), "not a device node"),
    (edits(additional_gids=(44,)), "additionalGids"),
    (edits(hooks=(cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "chmod", "--mode",
                                                     "755", "--path", "/etc")),)),
     "chmod hook: /etc"),
    (edits(hooks=(cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "update-ldcache",
                                                     "--folder", "/opt/my libs")),)),
     "a folder with a space"),
    (edits(hooks=(cdi.Hook("createContainer", HOOK, ("nvidia-cdi-hook", "create-symlinks",
                                                     "--link", "x::/ch/meta/x")),)),
     "/ch/meta/x: under a path"),
])
def test_what_a_container_here_cannot_get_is_refused_naming_the_spec(bad, words):
    with pytest.raises(UserError) as e:
        cdimount.plan(bad, "/etc/cdi/vendor.json")
    assert e.value.subject == "CDI spec /etc/cdi/vendor.json" and words in e.value.line(), \
        e.value.line()


def sh(lower, body, *args, plan="", o=""):
    return subprocess.run(["sh", "-c", "set -e\n" + cdimount.SCRIPT + body, "sh", *args],
                          env={"PATH": os.environ["PATH"], "lower": str(lower),
                               "plan": plan, "o": str(o)},
                          capture_output=True, text=True)


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "img"
    (img / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (img / "etc").mkdir()
    (img / "lib").symlink_to("usr/lib")           # merged /usr, relative
    (img / "lib64").symlink_to("/usr/lib")        # absolute: from the image's root
    (img / "up").symlink_to("../../../../../etc")  # .. stops at the root
    (img / "loop").symlink_to("loop2")
    (img / "loop2").symlink_to("loop")
    (img / "file").write_text("")
    return img


@pytest.mark.parametrize("path,where", [
    ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
    ("/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
    ("/lib64/libcuda.so.1", "/usr/lib/libcuda.so.1"),
    ("/up/ld.so.cache", "/etc/ld.so.cache"),
    ("/new/dir/x", "/new/dir/x"),
    ("/./usr//lib/../lib/x", "/usr/lib/x"),
])
def test_a_path_is_found_in_the_image_through_the_images_own_links(image, path, where):
    p = sh(image, 'inimage "$1"', path)
    assert (p.returncode, p.stdout) == (0, where + "\n"), p.stderr


@pytest.mark.parametrize("path,words", [
    ("/loop/x", "too many links at /loop/x in the image"),
    ("/file/x", "the image's /file is not a directory (/file/x goes through it)"),
])
def test_a_path_the_image_cannot_take_fails_with_the_reason(image, path, words):
    p = sh(image, 'inimage "$1"', path)
    assert p.returncode != 0 and words in p.stderr, p.stderr


def test_the_upper_layer_gets_mount_points_links_and_etc_the_image_lacks(image, tmp_path):
    o = tmp_path / "o"
    (o / "upper").mkdir(parents=True)
    (image / "usr/lib/x86_64-linux-gnu/libhad.so.1").write_text("")
    (image / "usr/lib/x86_64-linux-gnu/dir").mkdir()
    plan = cdimount.Plan(
        (("/usr/bin/true", "/lib/x86_64-linux-gnu/libcuda.so.9", "ro"),
         ("/usr/bin/true", "/usr/lib/x86_64-linux-gnu/libhad.so.1", "ro"),
         ("/usr/lib", "/opt/driver", "ro")),
        (("libcuda.so.9", "/lib/x86_64-linux-gnu/libcuda.so.1"),
         ("x", "/usr/lib/x86_64-linux-gnu/dir")),
        ("/usr/lib/x86_64-linux-gnu",)).text()
    p = sh(image, "gpu_prepare", plan=plan, o=o)
    assert p.returncode == 0, p.stderr
    up = o / "upper"
    found = sorted(str(f.relative_to(up)) + ("/" if f.is_dir() and not f.is_symlink() else "")
                   for f in up.rglob("*"))
    assert found == ["etc/", "opt/", "opt/driver/", "usr/", "usr/lib/",
                     "usr/lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/libcuda.so.1",
                     "usr/lib/x86_64-linux-gnu/libcuda.so.9"], found
    assert os.readlink(up / "usr/lib/x86_64-linux-gnu/libcuda.so.1") == "libcuda.so.9"
    assert (up / "usr/lib/x86_64-linux-gnu/libcuda.so.9").stat().st_size == 0
    assert "link /usr/lib/x86_64-linux-gnu/dir not made: the image has a directory there" \
        in p.stderr
