"""A GPU job's image against the step that puts the driver's files in it
(slurm_charlie/cdimount.py, run as the job user in the holder's own
namespaces): the image's links, files where directories belong, and its
own ldconfig.  Each ends with the job failed or run with a clear message,
nothing of the host's touched, the node in service and nothing left."""

import os
import shutil
import time

import pytest

from helpers.cluster import build_gpu_image, make_cluster
from test_attacks import settled


@pytest.fixture(scope="module")
def cluster():
    c = make_cluster()
    if not c.sb.gpus_per_node:
        pytest.fail("the sandbox declares no GPUs here (docs/sandbox.rst, \"GPUs\")")
    return c


@pytest.fixture(scope="module")
def base(cluster):
    wd = cluster.workdir("gpu-attacks")
    probe = os.path.join(cluster.sb.driver_root, "usr/bin/nvidia-smi")
    return wd, build_gpu_image(os.path.join(wd, "base"), probe)


def variant(base, name, change):
    wd, img = base
    path = os.path.join(wd, name)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(img, path, symlinks=True)
    change(path)
    return path


def gpu_job(cluster, wd, img, command="nvidia-smi", timeout=120):
    return cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                            f"--charlie-image={img}", "sh", "-c", command], wd,
                           timeout=timeout)


def test_links_out_of_the_image_stay_in_it(cluster, base):
    """/usr/lib/x86_64-linux-gnu leads up and out (../ past the root, then
    a host directory root owns): the library lands at that path inside the
    image's overlay; the host directory gets nothing."""
    host_dir = os.path.join(cluster.sb.state, "etc")
    before = sorted(os.listdir(host_dir))

    def change(path):
        os.makedirs(os.path.join(path, "usr", "lib"), exist_ok=True)
        os.symlink("../../../../../../.." + host_dir,
                   os.path.join(path, "usr", "lib", "x86_64-linux-gnu"))
    img = variant(base, "outward", change)
    p = gpu_job(cluster, base[0], img, f"nvidia-smi && ls {host_dir}")
    assert p.returncode == 0 and "devices 1" in p.stdout, p.stdout + p.stderr
    assert "libcuda.so.999.1.0" in p.stdout, p.stdout
    assert sorted(os.listdir(host_dir)) == before
    settled(cluster)


@pytest.mark.parametrize("case,reason", [
    ("file", "the image's /usr/lib is not a directory (/usr/lib/x86_64-linux-gnu/"),
    ("loop", "too many links at /usr/lib/x86_64-linux-gnu/"),
])
def test_a_path_the_files_cannot_take_fails_the_job_with_the_reason(cluster, base,
                                                                     case, reason):
    def change(path):
        shutil.rmtree(os.path.join(path, "usr"), ignore_errors=True)
        os.makedirs(os.path.join(path, "usr"))
        if case == "file":
            open(os.path.join(path, "usr", "lib"), "w").close()
        else:
            os.symlink("lib2", os.path.join(path, "usr", "lib"))
            os.symlink("lib", os.path.join(path, "usr", "lib2"))
    img = variant(base, f"bad-{case}", change)
    p = gpu_job(cluster, base[0], img)
    assert p.returncode != 0
    assert reason in p.stderr, p.stderr
    settled(cluster)


def test_an_images_ldconfig_that_never_returns_is_cut_short(cluster, base):
    """The image's ldconfig hangs: after 20 s it is killed, the job runs
    (the library by its soname link in a folder the loader searches) and
    says why its loader cache was not updated; nothing of it is left."""
    def change(path):
        ld = os.path.join(path, "sbin", "ldconfig")
        os.unlink(ld)
        with open(ld, "w") as f:
            f.write("#!/bin/sh\nexec sleep 100000\n")
        os.chmod(ld, 0o755)
    img = variant(base, "hang", change)
    start = time.monotonic()
    p = cluster.as_user(["sbatch", "--wait", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={img}", "-o", "hang.out", "--wrap",
                         "srun nvidia-smi"], base[0], timeout=180)
    out = open(os.path.join(base[0], "hang.out")).read()
    assert p.returncode == 0 and "devices 1" in out, p.stderr + out
    assert time.monotonic() - start >= 20
    assert "warning: the image's ldconfig did not update its loader cache for " \
        "/usr/lib/x86_64-linux-gnu (no answer in 20 s)" in out, out
    settled(cluster)


def test_a_user_cannot_make_a_gpu_look_busy_from_their_own_namespace(tmp_path):
    """A VM job's prolog refuses a GPU a process holds open: a user who
    mounts their own /dev in a namespace of theirs and opens a file named
    like the GPU's device node is not taken for such a process (else any
    user could fail every VM job with GPUs), while a process that holds the
    real node in root's namespace is."""
    import subprocess
    from helpers.cluster import USER
    from slurm_charlie.asroot import vfio
    name = "/dev/charlie-test-gpu0"
    import signal
    fake = subprocess.Popen(
        ["runuser", "-u", USER, "--", "unshare", "--user", "--map-root-user", "--mount",
         "sh", "-c", f"mount -t tmpfs x /dev && : > {name} && exec 3<{name} && "
         "echo ready && exec sleep 60"], stdout=subprocess.PIPE, text=True,
        start_new_session=True)  # its own group: runuser's children go with it
    try:
        assert fake.stdout.readline().strip() == "ready"
        kids = subprocess.run(["pgrep", "-P", str(fake.pid)], capture_output=True,
                              text=True).stdout.split()
        holders = [int(p) for p in [str(fake.pid), *kids]]
        assert any(name in vfio.fd_targets(p) for p in holders)  # the bait is there
        assert vfio.busy([name]) == {}
        with open("/dev/null") as f:  # root's namespace: the real thing counts
            assert os.getpid() in vfio.busy(["/dev/null"])["/dev/null"]
            assert not f.closed
    finally:
        os.killpg(fake.pid, signal.SIGKILL)
        fake.wait()
        for _ in range(500):  # nothing of the user's may outlive the test
            if subprocess.run(["pgrep", "-s", str(fake.pid)],
                              capture_output=True).returncode != 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"session {fake.pid} still has processes")
