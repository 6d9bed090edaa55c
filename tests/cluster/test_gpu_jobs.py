"""GPUs on the sandbox (issue 21): each node declares two fake GPUs in
gres.conf (character devices with NVIDIA's numbers and no driver, so
opening one says ENXIO where the job's device cgroup allows it and EPERM
where it does not), with a driver's table giving each a UUID and a PCI
address in the other order from its minor.  Slurm allots and confines them;
the prolog maps the job's to devices and UUIDs."""

import os
import re
import time

import pytest

import shutil
import subprocess

from helpers.cluster import build_busybox_image, build_gpu_image

OPEN = ("import errno, os, sys\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n"
        "        os.close(os.open(d, os.O_RDWR))\n"
        "        print(d, 'opened')\n"
        "    except OSError as e:\n"
        "        print(d, errno.errorcode[e.errno])\n")


@pytest.fixture(autouse=True)
def gpus(cluster):
    if not cluster.sb.gpus_per_node:
        pytest.fail("the sandbox declares no GPUs here: it needs Slurm's cgroup v1 "
                    "devices controller (docs/sandbox.rst, \"GPUs\")")
    return cluster.sb.gpus_per_node


def node_log(cluster, node):
    try:  # a fresh sandbox's node has no log before its first charlie job
        return open(os.path.join(cluster.sb.state, "log", f"charlie-{node}.log")).read()
    except FileNotFoundError:
        return ""


def test_slurm_confines_a_job_to_its_allotted_gpu(cluster):
    """The sandbox itself, as a GPU site: Slurm's ConstrainDevices lets a
    job with one GPU open only that one; a job with none opens none."""
    wd = cluster.workdir("gpus-slurm")
    devs = [cluster.sb.gpu_device("node1", i) for i in range(2)]
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1", "sh", "-c",
                         'echo "visible=$CUDA_VISIBLE_DEVICES"; python3 -c "$0" "$@"', OPEN,
                         *devs], wd)
    assert p.returncode == 0, p.stderr
    assert "visible=0" in p.stdout, p.stdout
    assert f"{devs[0]} ENXIO" in p.stdout and f"{devs[1]} EPERM" in p.stdout, p.stdout
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "python3", "-c", OPEN, *devs], wd)
    assert p.returncode == 0, p.stderr
    assert f"{devs[0]} EPERM" in p.stdout and f"{devs[1]} EPERM" in p.stdout, p.stdout


def _gpu_lines(cluster, node, jobid, timeout=60):
    end = time.monotonic() + timeout
    while True:
        found = re.findall(rf"job {jobid}: info: the job's gpu (\d+): (\S+) \((\d+):(\d+)\), "
                           r"(\S+) at (\S+)", node_log(cluster, node))
        if found or time.monotonic() > end:
            return found
        time.sleep(0.2)


def test_the_prolog_maps_each_jobs_gpu_to_its_device_and_uuid(cluster):
    """Two charlie jobs share node1, one GPU each: the prolog of each finds
    its own GPU's device and, through the driver's table (by minor, not by
    PCI order), its UUID; a charlie job without GPUs has none."""
    wd = cluster.workdir("gpus-map")
    bb = build_busybox_image(os.path.join(wd, "bb"))
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={bb}", "-o", "first.out",
                         "--wrap", "srun sleep 300"], wd)
    assert p.returncode == 0, p.stderr
    first = p.stdout.strip()
    try:
        got = _gpu_lines(cluster, "node1", first)
        p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                             f"--charlie-image={bb}", "sh", "-c", "echo $SLURM_JOB_ID"], wd)
        assert p.returncode == 0, p.stderr
        second = p.stdout.strip()
        got += _gpu_lines(cluster, "node1", second)
    finally:
        cluster.run(["scancel", first], check=True)
    want = []
    for index in (0, 1):
        uuid, pci = cluster.sb.gpu_facts("node1", index)
        want.append((str(index), cluster.sb.gpu_device("node1", index), "195", str(index),
                     uuid, pci))
    assert sorted(got) == want, got
    cluster.wait_done(first, timeout=120)
    p = cluster.as_user(["srun", "-N1", "-w", "node1", f"--charlie-image={bb}", "sh", "-c",
                         "echo $SLURM_JOB_ID"], wd)
    assert p.returncode == 0, p.stderr
    assert _gpu_lines(cluster, "node1", p.stdout.strip(), timeout=0) == []
    cluster.wait_nodes_idle()


@pytest.fixture(scope="module")
def cdi_job(cluster):
    """(working directory, busybox image) for the CDI tests."""
    wd = cluster.workdir("gpus-cdi")
    return wd, build_busybox_image(os.path.join(wd, "bb"))


def test_a_gpu_container_jobs_cdi_edits_are_read_and_checked(cluster, cdi_job):
    wd, bb = cdi_job
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={bb}", "sh", "-c", "echo $SLURM_JOB_ID"], wd)
    assert p.returncode == 0, p.stderr
    jobid = p.stdout.strip()
    uuid, _ = cluster.sb.gpu_facts("node1", 0)
    assert (f"job {jobid}: info: CDI edits for the job's GPUs (example.com/gpu={uuid}): "
            "1 device node(s), 2 mount(s), 1 link(s), 2 variable(s), loader cache for "
            "/usr/lib/x86_64-linux-gnu") in node_log(cluster, "node1")


#: what goes wrong in the node's spec (merged into its own containerEdits)
BAD_SPECS = {
    "unknown field": ({"mystery": True}, "containerEdits: unknown field 'mystery'"),
    "unknown hook": ({"hooks": [{"hookName": "createContainer",
                                 "path": "/usr/local/bin/site-hook"}]},
                     "unknown hook program /usr/local/bin/site-hook"),
    "missing device node": ({"deviceNodes": [{"path": "/dev/nvidia9",
                                              "hostPath": "/dev/nvidia-absent"}]},
                            "device node /dev/nvidia-absent: /dev/nvidia-absent: "
                            "No such file or directory"),
    "the user's mount source": ({"mounts": [{"hostPath": "USERFILE",
                                             "containerPath": "/usr/lib/libcuda.so.1"}]},
                                "owned by uid"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_fails_the_gpu_job_and_drains_nothing(cluster, cdi_job, case):
    """What the admin's spec gets wrong (or a user slipped into it) fails
    the GPU job that uses it, with the spec file and the reason; the node
    stays in service; a job without GPUs does not read specs."""
    import json
    wd, bb = cdi_job
    edits, reason = BAD_SPECS[case]
    user_file = os.path.join(wd, "libcuda.so.1")
    cluster.write(user_file, "not a library\n", 0o644)
    spec = os.path.join(cluster.sb.cdi_dir("node1"), "example.json")
    good = open(spec).read()
    doc = json.loads(good)
    doc["containerEdits"].update(json.loads(json.dumps(edits).replace("USERFILE", user_file)))
    doc["cdiVersion"] = "0.5.0"  # hostPath
    with open(spec, "w") as f:
        json.dump(doc, f)
    try:
        p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                             f"--charlie-image={bb}", "true"], wd)
        assert p.returncode != 0
        assert f"CDI spec {spec}: " in p.stderr and reason in p.stderr, p.stderr
        p = cluster.as_user(["srun", "-N1", "-w", "node1", f"--charlie-image={bb}", "true"],
                            wd)
        assert p.returncode == 0, p.stderr
    finally:
        with open(spec, "w") as f:
            f.write(good)
    cluster.wait_nodes_idle()
    assert cluster.sb.node_states().get("node1") == "idle"


def test_doctor_checks_the_nodes_gpus(cluster, tmp_path):
    """doctor's GPU line: ok on the sandbox; a warning where Slurm does not
    confine devices; a failure where no CDI spec names a GPU."""
    import dataclasses
    import shutil
    from slurm_charlie import config, doctor
    cfg = config.load({"SLURM_CHARLIE_CONF": cluster.sb.charlie_conf})
    status, seen, _ = doctor._gpus(cfg, "node1", {"SLURM_CONF": cluster.sb.conf})
    assert status == "ok" and seen.startswith("2 GPU(s): ") and "confined by Slurm" in seen, seen
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(os.path.join(os.path.dirname(cluster.sb.conf), "gres.conf"), etc)
    (etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    status, seen, fix = doctor._gpus(cfg, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "warn" and "ConstrainDevices is not on" in seen and \
        "ConstrainDevices=yes" in fix, seen
    (etc / "cgroup.conf").write_text("ConstrainDevices=yes\n")
    other = dataclasses.replace(cfg, values={**cfg.values, "gpu.cdi_kind": "nvidia.com/gpu"})
    status, seen, _ = doctor._gpus(other, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "FAIL" and "have no device nvidia.com/gpu=GPU-" in seen, seen
    assert doctor._gpus(cfg, "node1", {"SLURM_CONF": str(tmp_path / "none" / "slurm.conf")})[0] \
        == "ok"
    gen = dataclasses.replace(other, values={**other.values, "gpu.generate": True,
                                             "gpu.driver_root": cluster.sb.driver_root})
    status, seen, _ = doctor._gpus(gen, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "ok" and "gpu.generate makes a spec (2 mount(s))" in seen, seen
    gen.values["gpu.driver_root"] = str(tmp_path)
    status, seen, _ = doctor._gpus(gen, "node1", {"SLURM_CONF": str(etc / "slurm.conf")})
    assert status == "FAIL" and "gpu.generate cannot make a spec: gpu-spec: cannot read " \
        "the loader's cache" in seen, seen


PROBE = ('for i in 0 1; do d=$0/$SLURMD_NODENAME/nvidia$i; r=$( (exec 3<>"$d") 2>&1 ); '
         'echo "GPU $SLURMD_NODENAME $i $(cat /MARKER) var=$CHARLIE_SANDBOX_GPU [$r]"; done')


def _probe(cluster, wd, bb, *args):
    p = cluster.as_user(["srun", "-N2", "-w", "node1,node2", *args, f"--charlie-image={bb}",
                         "sh", "-c", PROBE, cluster.sb.dev_dir], wd)
    assert p.returncode == 0, p.stderr
    found = {}
    for node, index, marker, var, why in re.findall(r"GPU (\S+) (\d) (\S+) var=(\S*) \[(.*)\]",
                                                     p.stdout):
        assert marker == "inside-the-image", p.stdout
        found[(node, int(index))] = (var, "open" if not why else
                                     "allowed" if "No such device" in why else
                                     "denied" if "not permitted" in why else why)
    return found


def test_each_container_opens_only_its_own_gpu_and_gets_the_specs_variables(cluster, cdi_job):
    """A 2-node container job with one GPU per node: in each node's
    container the job's GPU opens as far as a device without a driver can
    (ENXIO), the other is refused (EPERM: Slurm's device cgroup), and the
    spec's variables are set; a job without GPUs gets neither."""
    wd, bb = cdi_job
    assert _probe(cluster, wd, bb, "--gres=gpu:1") == {
        (n, i): ("1", "allowed" if i == 0 else "denied") for n in ("node1", "node2")
        for i in (0, 1)}
    assert _probe(cluster, wd, bb) == {
        (n, i): ("", "denied") for n in ("node1", "node2") for i in (0, 1)}
    cluster.wait_nodes_idle()


# --- the driver's files in the container (the fake vendor's spec) -----------

#: what a CUDA program sees, as the sandbox's stand-in for nvidia-smi (the
#: probe, slurm_charlie/fakegpu/probe.c) says it, and how the library came
SMI = ('nvidia-smi; echo "smi=$?"; /sbin/ldconfig -p | grep "libcuda.so.1 "; '
       'grep " /usr/lib/x86_64-linux-gnu/libcuda" /proc/self/mountinfo')


def smi(cluster, wd, image, *args, nodes="node1,node2", check=True):
    """{node: (UUIDs the probe listed, the library it loaded, the loader's
    cache line, the bind's mount options)} of one srun over nodes."""
    n = len(nodes.split(","))
    p = cluster.as_user(["srun", f"-N{n}", "-w", nodes, "-l", *args,
                         f"--charlie-image={image}", "sh", "-c", SMI], wd)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    out = {}
    for rank, node in enumerate(sorted(nodes.split(","))):
        lines = [line.split(": ", 1)[1] for line in p.stdout.splitlines()
                 if line.startswith(f"{rank}: ")]
        text = "\n".join(lines)
        # mountinfo: ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS ... - TYPE ...
        opts = [f[5] for f in (line.split() for line in lines if " - " in line)
                if len(f) > 5 and f[4].startswith("/usr/lib/x86_64-linux-gnu/libcuda")]
        out[node] = (re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", text),
                     (re.findall(r"^library (\S+)", text, re.M) or [None])[0],
                     "=> /usr/lib/x86_64-linux-gnu/libcuda.so.1" in text,
                     opts[0] if opts else None,
                     (re.findall(r"^smi=(\d+)", text, re.M) or [None])[0])
    return out, p


@pytest.fixture(scope="module")
def gpu_image(cluster):
    """An image with glibc and its ldconfig (as CUDA images have), without
    any GPU file of its own."""
    wd = cluster.workdir("gpus-image")
    probe = os.path.join(cluster.sb.driver_root, "usr/bin/nvidia-smi")
    return wd, build_gpu_image(os.path.join(wd, "img"), probe)


def test_each_container_gets_its_own_gpu_through_the_driver_library(cluster, gpu_image):
    """A 2-node job with one GPU per node: in each container the vendor's
    library, bound read-only from the host and found through the loader's
    cache the image's ldconfig rebuilt, sees exactly the GPU Slurm allotted
    (its UUID from the driver's table); a job without GPUs has no library
    and no nvidia-smi."""
    wd, img = gpu_image
    got, _ = smi(cluster, wd, img, "--gres=gpu:1")
    lib = "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    for node in ("node1", "node2"):
        uuid, _ = cluster.sb.gpu_facts(node, 0)  # an idle node gives index 0
        uuids, loaded, cached, opts, rc = got[node]
        assert (uuids, loaded, cached, rc) == ([uuid], lib, True, "0"), got
        assert opts is not None and {"ro", "nosuid", "nodev"} <= set(opts.split(",")), got
    got, p = smi(cluster, wd, img, check=False)
    for node in ("node1", "node2"):
        assert got[node] == ([], None, False, None, "127"), (got, p.stderr)
    cluster.wait_nodes_idle()


def test_a_second_job_on_the_node_sees_the_other_gpu(cluster, gpu_image):
    """Two GPU jobs on node1 at once: each container lists only its own
    GPU, the two UUIDs differ, and both are the node's."""
    wd, img = gpu_image
    p = cluster.as_user(["sbatch", "--parsable", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={img}", "-o", "first.out", "--wrap",
                         "srun sh -c 'nvidia-smi; sleep 300'"], wd)
    assert p.returncode == 0, p.stderr
    first = p.stdout.strip()
    try:
        out = os.path.join(wd, "first.out")
        end = time.monotonic() + 120
        while "devices" not in (open(out).read() if os.path.exists(out) else ""):
            assert time.monotonic() < end, "the first job's probe never ran"
            time.sleep(0.3)
        theirs = re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", open(out).read())
        got, _ = smi(cluster, wd, img, "--gres=gpu:1", nodes="node1")
    finally:
        cluster.run(["scancel", first], check=True)
    mine = got["node1"][0]
    both = {cluster.sb.gpu_facts("node1", i)[0] for i in (0, 1)}
    assert len(theirs) == 1 and len(mine) == 1 and {theirs[0], mine[0]} == both, (theirs, mine)
    cluster.wait_done(first, timeout=120)
    cluster.wait_nodes_idle()


@pytest.fixture(scope="module")
def gpu_kinds(cluster, gpu_image):
    """The GPU image as a squashfs with every mount point (ch-run would
    mount it itself), as a stock squashfs (no /ch), and as a tar archive."""
    wd, img = gpu_image
    full = os.path.join(wd, "full")
    shutil.rmtree(full, ignore_errors=True)
    shutil.copytree(img, full, symlinks=True)
    for n in ("node1", "node2", "node3"):
        os.makedirs(full + os.path.join(cluster.sb.state, "tmp", n), exist_ok=True)
    stock = os.path.join(wd, "stock")
    shutil.rmtree(stock, ignore_errors=True)
    shutil.copytree(img, stock, symlinks=True)
    shutil.rmtree(os.path.join(stock, "ch"))
    out = {"squashfs": os.path.join(wd, "full.sqfs"), "stock-squashfs":
           os.path.join(wd, "stock.sqfs"), "archive": os.path.join(wd, "img.tar")}
    for src, dst in ((full, out["squashfs"]), (stock, out["stock-squashfs"])):
        if os.path.exists(dst):
            os.unlink(dst)
        subprocess.run(["mksquashfs", src, dst, "-quiet", "-no-progress"], check=True,
                       capture_output=True)
    subprocess.run(["tar", "-C", img, "-cf", out["archive"], "."], check=True)
    for f in out.values():
        os.chmod(f, 0o644)
    return wd, out


@pytest.mark.parametrize("kind", ["squashfs", "stock-squashfs", "archive"])
def test_every_image_kind_gets_the_gpus_files(cluster, gpu_kinds, kind):
    """The same edits whatever the image is: a squashfs goes under an
    overlay (squashfuse) instead of being mounted by ch-run as it is, an
    archive is unpacked; the image file is never written."""
    wd, images = gpu_kinds
    before = os.stat(images[kind]).st_mtime_ns
    got, _ = smi(cluster, wd, images[kind], "--gres=gpu:1", nodes="node2")
    uuid, _ = cluster.sb.gpu_facts("node2", 0)
    assert got["node2"][:3] == ([uuid], "/usr/lib/x86_64-linux-gnu/libcuda.so.1", True), got
    assert os.stat(images[kind]).st_mtime_ns == before
    cluster.wait_nodes_idle()


def test_the_images_own_links_lead_the_files_into_the_image(cluster, gpu_image):
    """An image whose /usr/lib/x86_64-linux-gnu is an absolute link
    (/lib/x86_64-linux-gnu, as merged-/usr images have it the other way
    round): the library lands where the link leads inside the image, found
    by the loader; an image without ldconfig still finds it by the soname
    link (the loader's own folders)."""
    wd, img = gpu_image
    linked = os.path.join(wd, "linked")
    shutil.rmtree(linked, ignore_errors=True)
    shutil.copytree(img, linked, symlinks=True)
    os.makedirs(os.path.join(linked, "lib", "x86_64-linux-gnu"), exist_ok=True)
    os.makedirs(os.path.join(linked, "usr", "lib"), exist_ok=True)
    os.symlink("/lib/x86_64-linux-gnu", os.path.join(linked, "usr/lib/x86_64-linux-gnu"))
    had = sorted(os.listdir(os.path.join(linked, "lib", "x86_64-linux-gnu")))
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={linked}", "sh", "-c",
                         "nvidia-smi && ls /lib/x86_64-linux-gnu/ && readlink "
                         "/usr/lib/x86_64-linux-gnu"], wd)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "libcuda.so.999.1.0" in p.stdout and "devices 1" in p.stdout, p.stdout
    assert p.stdout.rstrip().endswith("/lib/x86_64-linux-gnu"), p.stdout
    assert sorted(os.listdir(os.path.join(linked, "lib", "x86_64-linux-gnu"))) == had
    bare = os.path.join(wd, "no-ldconfig")
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(img, bare, symlinks=True)
    os.unlink(os.path.join(bare, "sbin", "ldconfig"))
    p = cluster.as_user(["sbatch", "--wait", "-N1", "-w", "node1", "--gres=gpu:1",
                         f"--charlie-image={bare}", "-o", "bare.out", "--wrap",
                         "srun nvidia-smi"], wd, timeout=180)
    out = open(os.path.join(wd, "bare.out")).read()
    assert p.returncode == 0 and "devices 1" in out, p.stderr + out
    assert "warning: the image's ldconfig did not update its loader cache for " \
        "/usr/lib/x86_64-linux-gnu (the image has no /sbin/ldconfig)" in out, out
    cluster.wait_nodes_idle()


def test_a_gpu_job_does_not_write_its_image(cluster, gpu_image):
    """--charlie-write would put the driver's files into the user's image:
    refused with the reason and what to do."""
    from helpers.cluster import USER
    wd, img = gpu_image
    mine = os.path.join(wd, "mine")
    shutil.rmtree(mine, ignore_errors=True)
    shutil.copytree(img, mine, symlinks=True)
    subprocess.run(["chown", "-R", f"{USER}:", mine], check=True)
    img = mine
    p = cluster.as_user(["srun", "-N1", "-w", "node1", "--gres=gpu:1", "--charlie-write",
                         f"--charlie-image={img}", "true"], wd)
    assert p.returncode != 0
    assert "--charlie-write: a GPU job's driver files would be bound into the image you " \
        "write" in p.stderr and "without --charlie-write" in p.stderr, p.stderr
    cluster.wait_nodes_idle()


def test_gpu_spec_writes_the_spec_the_sandbox_vendor_has(cluster, tmp_path):
    """`slurm-charlie gpu-spec` on node1's fake driver writes the spec the
    sandbox's vendor directory holds (the sandbox makes it with the same
    code), and says what is missing when the driver is not there."""
    import json
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "slurm-charlie")
    env = {**os.environ, "SLURM_CONF": cluster.sb.conf,
           "SLURM_CHARLIE_CONF": cluster.sb.charlie_conf}
    have = json.load(open(os.path.join(cluster.sb.cdi_dir("node1"), "example.json")))
    out = tmp_path / "spec.json"
    p = subprocess.run([exe, "gpu-spec", "--node", "node1", "--driver-root",
                        cluster.sb.driver_root, "-o", str(out),
                        *[a for e in have["containerEdits"]["env"] for a in ("--env", e)]],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"{out}: example.com/gpu, 2 GPU(s), 2 mount(s)" in p.stderr, p.stderr
    assert json.load(open(out)) == have
    p = subprocess.run([exe, "gpu-spec", "--node", "node1", "--driver-root", str(tmp_path)],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "the loader's cache" in p.stderr, p.stderr


def test_the_prolog_generates_the_spec_when_the_site_asks(cluster, gpu_image):
    """gpu.generate with no spec directory: the first GPU job's prolog
    writes the node's spec from the driver (gpu.driver_root) into the
    runtime root, the job gets the driver's files from it, and the next
    job reuses it until the driver's version changes."""
    wd, img = gpu_image
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    made = os.path.join(cluster.sb.state, "runtime", "node3", ".cdi", "generated.json")
    version = os.path.join(os.path.dirname(cluster.sb.gpu_table("node3")), "version")
    old_version = open(version).read()
    site = re.sub(r"(?m)^cdi_dirs = .*$", "cdi_dirs = []\ngenerate = true\n"
                  f'driver_root = "{cluster.sb.driver_root}"', saved)
    assert site != saved
    try:
        if os.path.exists(made):
            os.unlink(made)
        with open(conf, "w") as f:
            f.write(site)
        p = cluster.as_user(["srun", "-N1", "-w", "node3", "--gres=gpu:1",
                             f"--charlie-image={img}", "nvidia-smi"], wd)
        # the generated spec carries no CHARLIE_SANDBOX_GPUS: the stub finds
        # no device table, so no GPU, but the library came from the spec
        assert "library /usr/lib/x86_64-linux-gnu/libcuda.so.1" in p.stdout, \
            p.stdout + p.stderr
        first = os.stat(made).st_mtime_ns
        doc = open(made).read()
        assert '"kind": "example.com/gpu"' in doc and cluster.sb.driver_root in doc
        cluster.as_user(["srun", "-N1", "-w", "node3", "--gres=gpu:1",
                         f"--charlie-image={img}", "true"], wd)
        assert os.stat(made).st_mtime_ns == first
        with open(version, "w") as f:
            f.write(old_version.replace("999.1.0", "999.2.0"))
        cluster.as_user(["srun", "-N1", "-w", "node3", "--gres=gpu:1",
                         f"--charlie-image={img}", "true"], wd)
        assert os.stat(made).st_mtime_ns != first
    finally:
        with open(conf, "w") as f:
            f.write(saved)
        with open(version, "w") as f:
            f.write(old_version)
    cluster.wait_nodes_idle()


def test_the_real_host_check_passes_against_the_fake_vendor(cluster, tmp_path):
    """tests/gpu_host_check: the kit is built, and its check run as an
    ordinary user against node1's fake driver passes every line, with the
    host's ch-run and with the kit's own; without the fake vendor's device
    table the stub sees no GPU and the check says FAIL."""
    import json
    import sys
    from helpers.cluster import USER
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kit = os.path.join(cluster.home, "charlie-tests", "gpu-host-kit")
    p = subprocess.run([sys.executable, os.path.join(top, "tests/gpu_host_check/build.py"),
                        kit], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    size = float(re.search(r": ([\d.]+) MiB", p.stdout).group(1))
    assert size < 40, p.stdout  # small enough to copy onto a GPU host
    spec = json.load(open(os.path.join(cluster.sb.cdi_dir("node1"), "example.json")))
    table = [e for e in spec["containerEdits"]["env"] if e.startswith("CHARLIE_SANDBOX_GPUS=")]
    fake = ["--table", cluster.sb.gpu_table("node1"), "--driver-root", cluster.sb.driver_root,
            "--dev-dir", os.path.join(cluster.sb.dev_dir, "node1"), "--kind",
            "example.com/gpu"]

    def check(*args):
        return subprocess.run(["runuser", "-u", USER, "--", "/usr/bin/python3",
                               os.path.join(kit, "check.py"), *fake, *args],
                              capture_output=True, text=True, timeout=600, cwd="/")
    for extra in ([], ["--kit-ch-run"]):
        p = check("--env", table[0], *extra)
        lines = p.stdout.splitlines()
        assert p.returncode == 0 and [line.split(":")[0] for line in lines] == [
            "PASS spec", "PASS devices", "PASS library", "PASS without edits"], \
            p.stdout + p.stderr
    p = check()
    assert p.returncode == 1 and "FAIL devices: the probe sees none" in p.stdout, p.stdout


def test_a_gpu_job_is_warned_where_slurm_does_not_confine_devices(cluster, gpu_image):
    """ConstrainDevices off: the job runs, and its output says, once, that
    its tasks can open every GPU of the node."""
    wd, img = gpu_image
    conf = os.path.join(os.path.dirname(cluster.sb.conf), "cgroup.conf")
    saved = open(conf).read()
    try:
        with open(conf, "w") as f:  # read by the prolog, not by slurmd (no restart)
            f.write(saved.replace("ConstrainDevices=yes", "ConstrainDevices=no"))
        p = cluster.as_user(["sbatch", "--wait", "-N2", "-w", "node1,node2",
                             "--gres=gpu:1", f"--charlie-image={img}", "-o", "open.out",
                             "--wrap", "srun true"], wd, timeout=180)
        out = open(os.path.join(wd, "open.out")).read()
    finally:
        with open(conf, "w") as f:
            f.write(saved)
    assert p.returncode == 0, p.stderr + out
    assert out.count("(ConstrainDevices is off): the job's tasks can open every GPU of "
                     "the node, not only the job's") == 1, out
    cluster.wait_nodes_idle()


def test_a_registry_image_gets_the_gpus_files(cluster, gpu_image):
    """A stock Debian image from the registry (pulled once into the user's
    cache as a squashfs, unchanged): its own ldconfig and glibc take the
    node's library."""
    from helpers.registry import seed
    from slurm_charlie.sandbox import REGISTRY
    wd, _ = gpu_image
    cache = os.path.join(os.path.dirname(cluster.sb.guest_dir), "images")
    refs = seed(REGISTRY, cache, os.path.join(cluster.sb.guest_dir, "debian.sqfs"),
                ("debian-mpi",))
    got, _ = smi(cluster, wd, f"docker://{refs['debian-mpi']}", "--gres=gpu:1",
                 nodes="node3")
    uuid, _ = cluster.sb.gpu_facts("node3", 0)
    assert got["node3"][:3] == ([uuid], "/usr/lib/x86_64-linux-gnu/libcuda.so.1", True), got
    cluster.wait_nodes_idle()
