#!/usr/bin/env python3
"""VM benchmarks (issue 4), side by side in one run, ratios:

1. Boot to job start on one node: `sbatch --charlie-image --charlie-job`
   (submit -> the job script's first line in the job's stdout) vs. a bare
   QEMU boot of the same guest with the same accel, kernel, initrd, disks,
   shares and boot script, started by hand (QEMU start -> the same line in
   the guest's output file).  Goal <= 1.1x.  Rounds alternate the two.
2. Commit time with 10 MB vs 100 MB changed in the overlay, on a small and
   on a large base image: it should scale with the change, not the image.

Needs the sandbox with the test guest (`make bench`).  Asserts nothing
about time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time


from slurm_charlie import config, layout, meta, sandbox  # noqa: E402
from slurm_charlie.backends import Context  # noqa: E402
from slurm_charlie.backends.vm import VMBackend, _commit  # noqa: E402
from slurm_charlie.options import Options  # noqa: E402
from slurm_charlie.proc import User  # noqa: E402

SB = sandbox.Sandbox()
USER = sandbox.USER
HOME = os.path.expanduser(f"~{USER}")
WORK = os.path.join(HOME, "charlie-bench-vm")
MARK = "JOB-STARTED"


def as_user(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", "env", f"SLURM_CONF={SB.conf}",
                           *argv], capture_output=True, text=True, cwd=WORK, **kw)


def wait_line(path: str, timeout: float = 600) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path) as f:
                if MARK in f.read():
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"no {MARK} in {path} after {timeout} s")


def charlie_boot(image: str, job: str, n: int) -> float:
    out = os.path.join(WORK, f"charlie-{n}.out")
    t0 = time.monotonic()
    p = as_user(["sbatch", "-N1", "-w", "node1", "-o", out, f"--charlie-image={image}",
                 f"--charlie-job={job}", "--wrap", "true"])
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    t = wait_line(out) - t0
    jobid = p.stdout.split()[-1]
    while subprocess.run(["squeue", "-h", "-j", jobid], capture_output=True, text=True,
                         env={**os.environ, **SB.env()}).stdout.strip():
        time.sleep(0.2)
    return t


def bare_boot(image: str, job: str, cfg: config.Config, user: User) -> float:
    """The same guest started by hand: what the prolog prepares, minus Slurm
    and slurm-charlie (no validation, no state, no readiness wait)."""
    root = tempfile.mkdtemp(dir=WORK, prefix="bare.")
    shutil.chown(root, USER, USER)
    paths = layout.JobPaths(root, "1")
    os.makedirs(paths.job_dir)
    for d in (paths.meta, f"{paths.meta}/sync", paths.run, paths.out):
        os.makedirs(d, exist_ok=True)
    inp = meta.MetaInput(job_id="1", nodes=("node1",), cpus=(1,), type="vm",
                         subnet=cfg["vm.subnet"], mode="batch",
                         user=(user.name, user.uid, user.gid, user.name))
    for name, data in meta.render(inp).items():
        path = os.path.join(paths.meta, name)
        if data is None:
            os.makedirs(path, exist_ok=True)
        else:
            with open(path, "wb") as f:
                f.write(data)
    shutil.copyfile(job, os.path.join(paths.meta, "jobscript"))
    os.chmod(os.path.join(paths.meta, "jobscript"), 0o755)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", root], check=True)
    ctx = Context(opts=Options(image=image, job=job), cfg=cfg, paths=paths, user=user,
                  job_id="1", node="node1", guest_id=0, nodes=("node1",), cpus=1)
    argv = VMBackend().argv(ctx, "writeback", "qcow2")
    t0 = time.monotonic()
    for a in (["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image,
               f"{paths.run}/0.overlay.qcow2"],
              ["qemu-img", "create", "-q", "-f", "qcow2", f"{paths.run}/0.tmp.qcow2",
               f"{cfg['vm.tmp_size_mib']}M"]):
        as_user(a, check=True)
    q = subprocess.Popen(["runuser", "-u", USER, "--", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=WORK)
    t = wait_line(f"{paths.out}/0_job.out") - t0
    q.kill()
    q.wait()
    subprocess.run(["pkill", "-KILL", "-f", f"path={paths.run}"], check=False)
    time.sleep(0.5)
    shutil.rmtree(root, ignore_errors=True)
    return t


def boot(rounds: int = int(os.environ.get("BENCH_ROUNDS", "5"))) -> None:
    cfg = config.load({"SLURM_CHARLIE_CONF": SB.charlie_conf})
    user = User.lookup(int(subprocess.check_output(["id", "-u", USER])))
    image = os.path.join(WORK, "image.qcow2")
    shutil.copyfile(os.path.join(SB.guest_dir, "guest.qcow2"), image)
    shutil.chown(image, USER, USER)
    job = os.path.join(WORK, "job.sh")
    with open(job, "w") as f:
        f.write(f"#!/bin/sh\necho {MARK}\n")
    os.chmod(job, 0o755)
    times: dict[str, list[float]] = {"bare": [], "charlie": []}
    charlie_boot(image, job, -1)  # warm-up: the node's one-time accel/CPU probe
    for r in range(rounds):
        for kind in (("bare", "charlie") if r % 2 == 0 else ("charlie", "bare")):
            t = bare_boot(image, job, cfg, user) if kind == "bare" \
                else charlie_boot(image, job, r)
            times[kind].append(t)
    bare, charlie = statistics.median(times["bare"]), statistics.median(times["charlie"])
    print(f"{'boot to job start, 1 node, accel ' + cfg['vm.accel']:<46} {'median s':>9} {'runs':>5}")
    print(f"{'  bare QEMU, same guest and shares':<46} {bare:>9.2f} {len(times['bare']):>5}")
    print(f"{'  sbatch --charlie-image --charlie-job':<46} {charlie:>9.2f} {len(times['charlie']):>5}")
    print(f"{'  ratio charlie / bare':<46} {charlie / bare:>9.3f}   (goal <= 1.1)")


def commit_times(rounds: int = 3) -> None:
    d = tempfile.mkdtemp(dir=WORK, prefix="commit.")
    small = os.path.join(d, "small.qcow2")
    large = os.path.join(d, "large.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", small, "1G"], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2",
                    os.path.join(SB.guest_dir, "guest.qcow2"), large], check=True)
    # fill the large base so that it really holds data everywhere we write
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1G", large],
                   check=True, capture_output=True)
    sizes = {b: os.path.getsize(b) >> 20 for b in (small, large)}
    rows = {}
    for r in range(rounds):
        for base in (small, large):
            for mib in (10, 100):
                ov = os.path.join(d, "overlay.qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                                "-b", base, ov], check=True)
                subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                f"write -P 0x{0x20 + r:02x} 64M {mib}M", ov],
                               check=True, capture_output=True)
                t0 = time.monotonic()
                ok, why = _commit("qemu-img", ov, 60)
                t = time.monotonic() - t0
                if not ok:
                    raise SystemExit(why)
                os.unlink(ov)
                rows.setdefault((base, mib), []).append(t)
    print(f"{'qemu-img commit (the epilog' + chr(39) + 's)':<46} {'median s':>9} {'runs':>5}")
    for (base, mib), ts in sorted(rows.items(), key=lambda kv: (kv[0][0] != small, kv[0][1])):
        name = f"  {mib} MB changed, base {sizes[base]} MB on disk"
        print(f"{name:<46} {statistics.median(ts):>9.3f} {len(ts):>5}")
    for base in (small, large):
        ratio = statistics.median(rows[(base, 100)]) / statistics.median(rows[(base, 10)])
        print(f"{'  ratio 100 MB / 10 MB, base ' + str(sizes[base]) + ' MB':<46} {ratio:>9.2f}"
              "   (grows with the change; qemu-img's own start is ~10 ms)")
    r10 = statistics.median(rows[(large, 10)]) / statistics.median(rows[(small, 10)])
    print(f"{'  ratio large / small base, 10 MB changed':<46} {r10:>9.2f}"
          "   (independent of the image: about 1)")
    shutil.rmtree(d)


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    shutil.chown(WORK, USER, USER)
    if not SB.guest_dir:
        raise SystemExit("the sandbox has no test guest: make bench brings it up with one")
    boot()
    print()
    commit_times()
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
