"""Inside the Debian 13 lane node (run by tests/trixie/init.sh as PID 1's
child): the project's own sandbox on Slurm 24.11 with cgroup/v2, then the
lane's tests.  The checkout is /src (read-only), results go to /out.

Python from Debian (jinja2, filelock, pytest): a venv with the system's
site packages and a .pth for /src stands in for `pip install -e`, which
would write into the read-only checkout."""

import os
import signal
import subprocess
import sys
import time

SRC, OUT = "/src", "/out"
VENV = "/opt/charlie-venv"
ARGS = os.path.join(OUT, "pytest-args")
#: tests/vm/build_guest.sh's output for Debian 13 (tests/trixie/build.sh)
GUEST = "/opt/charlie-guest"
#: the lane's tests unless make test-trixie TRIXIE_ARGS=... names others:
#: the v2 tests, `make demo`'s job script, the SPANK tests, the container
#: part of the cluster suite, root's ending of what escapes or stalls, and
#: RunInJob last, as it leaves Slurm reconfigured.  Two
#: container tests stay out for CI's time (tcg: 400 s and 145 s, where the
#: host takes 13 s and 9 s; docs/developer.rst, "The Debian 13 lane"): the
#: 350 MB Debian MPI image pulled from the registry (its Open MPI and MPICH
#: runs are covered by the tests with the same image unpacked) and hashing
#: a big tarball once at submit (the same code on both releases).
_C = "tests/cluster/test_container.py"
LEFT_OUT = (_C + "::test_registry_mpi_image_runs_mpich_and_open_mpi",
            _C + "::test_tarball_hashed_once_at_submit_not_on_the_nodes",
            # CI's time again (68 s and 30 s under tcg): a pull is in the
            # private registry test too (skopeo is what differs between the
            # releases), and the cache's eviction is the same Python on both
            _C + "::test_registry_image_pulled_once_for_the_job",
            _C + "::test_eviction_beyond_the_cache_bound",
            # the same Python on both releases, and 25 minutes were no longer
            # enough once the lane ran the submit paths (CI 35): tar unpacking
            # (the squashfs case stays: squashfs-tools differ), the shared
            # unpack's lock, and the site's hooks.warm switch (113 s here)
            _C + "::test_archive_images[tar]", _C + "::test_archive_images[tgz]",
            _C + "::test_archive_images[topdir]",
            _C + "::test_concurrent_jobs_share_one_unpack",
            "tests/cluster/test_warm_hooks.py::test_the_site_turns_it_off_and_on")
DEFAULT_TESTS = ["tests/trixie/test_v2.py", "tests/trixie/test_demo.py",
                 # the shim under 24.11's SPANK rules (failed callbacks fail
                 # the step; options with --export=NONE)
                 "tests/cluster/test_spank.py", _C,
                 # the tasks of a job whose preparation died fail, and say so
                 # (the shim finds SLURM_SPANK_CHARLIE under 24.11 too)
                 "tests/adversarial/test_prolog_background.py::"
                 "test_a_killed_background_prolog_fails_the_job_at_once",
                 *[a for t in LEFT_OUT for a in ("--deselect", t)],
                 # what root ends on v2 (cgroup.kill; a stalled FUSE server)
                 "tests/adversarial/test_fuse.py",
                 "tests/adversarial/test_attacks.py::"
                 "test_a_process_that_leaves_the_container_ends_with_the_job",
                 # GPUs under cgroup v2's eBPF device filter, and ch-run newer
                 # than Debian 12's taking the CDI edits
                 "tests/cluster/test_gpu_jobs.py::test_slurm_confines_a_job_to_its_allotted_gpu",
                 "tests/cluster/test_gpu_jobs.py::"
                 "test_each_container_gets_its_own_gpu_through_the_driver_library",
                 "tests/cluster/test_gpu_jobs.py::"
                 "test_a_second_job_on_the_node_sees_the_other_gpu",
                 "tests/cluster/test_gpu_jobs.py::"
                 "test_every_image_kind_gets_the_gpus_files[stock-squashfs]",
                 # REST with spank_environment (23.02+), forged SPANK values
                 # through it, and scrontab (Debian 12 has none)
                 "tests/cluster/test_submit_paths.py::"
                 "test_rest_submissions_either_run_as_asked_or_are_refused",
                 "tests/cluster/test_submit_paths.py::test_forged_spank_values_fail_only_that_job",
                 "tests/trixie/test_scrontab.py",
                 # the warm hook server on 24.11 and cgroup v2 (Python 3.13)
                 "tests/unit/test_warm.py", "tests/cluster/test_warm_hooks.py",
                 # last: it leaves node3 drained and Slurm reconfigured
                 "tests/trixie/test_run_in_job.py"]


def sh(argv, **kw):
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, **kw)


def pytest(argv, env, t0: float) -> int:
    """Run the tests; interrupt them (SIGINT: pytest still writes its
    summary and junit.xml) when the host's time for the lane
    (tests/trixie/run.py writes it to /out/budget) is about to run out, so
    that the logs are still copied and the sandbox stopped."""
    try:
        budget = float(open(os.path.join(OUT, "budget")).read())
    except (OSError, ValueError):
        budget = None
    # the boot before t0, copying logs and `sandbox down` after: 4 minutes
    left = None if budget is None else max(60.0, budget - 240 - (time.monotonic() - t0))
    print("+", " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, cwd=SRC, env=env)
    try:
        return proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        print(f"lane: the tests ran out of the lane's time ({budget:.0f} s): "
              "interrupting them", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


def venv() -> str:
    """A venv whose slurm-charlie runs the shared checkout."""
    if not os.path.exists(os.path.join(VENV, "bin", "python3")):
        sh([sys.executable, "-m", "venv", "--system-site-packages", VENV], check=True)
    purelib = subprocess.run([os.path.join(VENV, "bin", "python3"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "slurm_charlie_src.pth"), "w") as f:
        f.write(SRC + "\n")
    exe = os.path.join(VENV, "bin", "slurm-charlie")
    with open(exe, "w") as f:
        f.write(f"#!{VENV}/bin/python3\nimport sys\nfrom slurm_charlie.cli import main\n"
                "sys.exit(main())\n")
    os.chmod(exe, 0o755)
    os.chmod(VENV, 0o755)
    return exe


def shim() -> str:
    """`make deps shim` as on a Debian 13 host, in a copy of the Makefile
    and spank/ (the checkout is read-only): every package of the list is
    there (tests/trixie/build.sh installed the same list), and the shim
    builds with -Werror against this node's Slurm 24.11 headers."""
    work = "/tmp/charlie-src"
    sh(["rm", "-rf", work])
    os.makedirs(work)
    sh(["cp", "-a", os.path.join(SRC, "Makefile"), os.path.join(SRC, "spank"), work],
       check=True)
    sh(["rm", "-f", *[os.path.join(work, "spank", f) for f in os.listdir(
        os.path.join(work, "spank")) if f.endswith(".so")]], check=True)
    sh(["make", "-C", work, "CACHE=/tmp/charlie-cache", "deps", "shim"], check=True)
    so = "/opt/charlie-shim/charlie.so"
    os.makedirs(os.path.dirname(so), exist_ok=True)
    sh(["cp", os.path.join(work, "spank", "charlie.so"), so], check=True)
    return so


def why_nodes(logs: str) -> None:
    """After a failure: each node's state and reason, and what slurmctld
    said about nodes going down or draining -- CI keeps only this output."""
    conf = os.path.join(os.path.dirname(logs), "etc", "slurm.conf")
    nodes = sh(["sinfo", "-N", "-h", "-o", "%N %T %E"], capture_output=True, text=True,
               env={**os.environ, "SLURM_CONF": conf})
    print(nodes.stdout, flush=True)
    for line in nodes.stdout.splitlines():
        name, state = (line.split() + ["", ""])[:2]
        if name and state not in ("idle", "allocated", "mixed"):
            for f in (f"slurmd-{name}.log", f"charlie-{name}.log"):
                print(f"--- the end of {f}", flush=True)
                sh(["tail", "-n", "25", os.path.join(logs, f)])
    kernel = sh(["dmesg"], capture_output=True, text=True).stdout
    sys.stdout.write("".join(ln + "\n" for ln in kernel.splitlines() if any(
        w in ln.lower() for w in ("oom", "killed process", "segfault", "hung task"))))
    try:
        with open(os.path.join(logs, "slurmctld.log"), errors="replace") as f:
            lines = [ln for ln in f if any(w in ln for w in (
                "drain", "DRAIN", "DOWN", "not responding", "Prolog", "Epilog",
                "epilog", "prolog"))]
    except OSError as e:
        print(f"lane: no slurmctld.log: {e}", flush=True)
        return
    sys.stdout.write("".join(lines[-40:]))
    sys.stdout.flush()


def main() -> int:
    t0 = time.monotonic()
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ["CHARLIE_SANDBOX_SO"] = shim()
    print(open("/etc/debian_version").read().strip(), os.uname().release, flush=True)
    sh(["slurmd", "-V"])
    exe = venv()
    state = "/run/slurm-charlie-sandbox"
    up = sh([exe, "sandbox", "up", "--nodes", "3", "--guest-dir", GUEST], cwd=SRC)
    print(f"sandbox up: rc={up.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
    rc = up.returncode
    if rc == 0:
        args = open(ARGS).read().split() if os.path.exists(ARGS) else DEFAULT_TESTS
        # Open MPI's repeat count: tests/cluster/test_container.py, OMPI_RUNS
        env = {**os.environ, "PYTHONPATH": os.path.join(SRC, "tests"),
               "CHARLIE_TEST_OMPI_RUNS": "3"}
        env["CHARLIE_TEST_FAILLOG"] = os.path.join(OUT, "failures.log")
        rc = pytest([os.path.join(VENV, "bin", "python3"), "-m", "pytest", "-p",
                     "no:cacheprovider", "-ra", "--durations=15",
                     f"--junitxml={OUT}/junit.xml", *args], env, t0)
    logs = os.path.join(state, "log")
    if rc != 0 and up.returncode == 0:
        why_nodes(logs)
    if os.path.isdir(logs):  # before `sandbox down` takes the state away
        sh(["cp", "-r", logs, os.path.join(OUT, "sandbox-log")])
    if up.returncode == 0:
        sh([exe, "sandbox", "down"], cwd=SRC)
    print(f"lane: rc={rc} after {time.monotonic() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
