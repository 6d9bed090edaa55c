#!/usr/bin/env python3
"""Container benchmarks (issue 3), side by side in one run, ratios:

1. Step launch: `srun -N3 -n6 true` inside a container allocation vs. a
   plain one (goal <= 1.3x).  Rounds alternate the two allocations.
2. MPI ping-pong (tests/helpers/src/pingpong.c): latency and bandwidth,
   two ranks on one node and on two nodes, in containers vs. bare metal
   (goal >= 0.97x of bare-metal performance); MPICH over srun --mpi=pmi2,
   and Open MPI over srun --mpi=pmix in the stock Debian image
   (.cache/vm/debian.sqfs, mounted, mount points from the overlay).
3. Start of a job from a tarball image: first job (unpack) vs. cached.
4. Start of a job from a ~1 GB squashfs image: first job on the node with
   a new file vs. the next job with the same file (goal <= 1.2x), and the
   same content as a tarball (unpacked per node) for comparison.

Needs the sandbox (`make bench`).  Asserts nothing about time.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time

from helpers.cluster import build_busybox_image, build_mpi_image  # noqa: E402

from slurm_charlie import sandbox  # noqa: E402

SB = sandbox.Sandbox()
USER = sandbox.USER
HOME = os.path.expanduser(f"~{USER}")
WORK = os.path.join(HOME, "charlie-bench")


def as_user(cmd: str, timeout: float = 600) -> str:
    p = subprocess.run(["runuser", "-u", USER, "--", "env", f"SLURM_CONF={SB.conf}",
                        "sh", "-c", f"cd {WORK} && {cmd}"], capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def step_launch(image: str, rounds: int = 4, per_round: int = 15) -> None:
    loop = ("sh -c 'for i in $(seq %d); do s=$(date +%%s%%N); srun -N3 -n6 true; "
            "e=$(date +%%s%%N); echo STEP $((e - s)); done'" % per_round)
    times = {"plain": [], "container": []}
    for r in range(rounds):
        for kind in (("plain", "container") if r % 2 == 0 else ("container", "plain")):
            opt = f"--charlie-image={image}" if kind == "container" else ""
            out = as_user(f"salloc -N3 -n6 {opt} {loop}")
            times[kind] += [int(x) / 1e9 for x in re.findall(r"STEP (\d+)", out)][1:]
    plain, cont = statistics.median(times["plain"]), statistics.median(times["container"])
    print(f"{'srun -N3 -n6 true inside an allocation':<46} {'median s':>9} {'runs':>5}")
    print(f"{'  plain':<46} {plain:>9.4f} {len(times['plain']):>5}")
    print(f"{'  in containers (setns in task_init)':<46} {cont:>9.4f} {len(times['container']):>5}")
    print(f"{'  ratio container / plain':<46} {cont / plain:>9.3f}   (goal <= 1.3)")


def pingpong(image: str, inner: str, bare: str, mpi: str = "pmi2", rounds: int = 5) -> None:
    """Bare metal twice: as is, and with the UCX settings the site config
    gives container jobs (container.env), so that the container's own cost
    can be told from the cost of those settings."""
    from slurm_charlie import config
    ucx_env = " ".join(config.load(path=SB.charlie_conf)["container.env"])
    res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    layouts = {"same node": "-N1 -n2", "two nodes": "-N2 -n2 --ntasks-per-node=1"}
    kinds = {"bare metal": f"srun --mpi={mpi} {{layout}} {bare}",
             "bare, container.env": f"env {ucx_env} srun --mpi={mpi} {{layout}} {bare}",
             "containers": f"srun --mpi={mpi} {{layout}} --charlie-image={image} {inner}"}
    for _ in range(rounds):
        for where, layout in layouts.items():
            for kind, cmd in kinds.items():
                out = as_user(cmd.format(layout=layout))
                m = re.search(r"latency_us (\S+) bandwidth_MBps (\S+)", out)
                res.setdefault((where, kind), []).append((float(m.group(1)), float(m.group(2))))
    print(f"MPI ping-pong ({os.path.basename(bare)}, srun --mpi={mpi}), median of {rounds}; "
          f"container.env = {ucx_env or '(none)'}")
    print(f"{'':<34} {'latency us':>11} {'MB/s':>9} {'lat. ratio':>11} {'bw ratio':>9}")
    for where in layouts:
        med = {k: (statistics.median(x[0] for x in res[(where, k)]),
                   statistics.median(x[1] for x in res[(where, k)])) for k in kinds}
        for kind in kinds:
            lat, bw = med[kind]
            line = f"{'  ' + where + ', ' + kind:<34} {lat:>11.2f} {bw:>9.0f}"
            if kind == "containers":
                for ref in ("bare metal", "bare, container.env"):
                    rl, rb = med[ref]
                    print(line + f" {rl / lat:>11.3f} {bw / rb:>9.3f}   vs {ref} (goal >= 0.97)")
                    line = " " * 56
            else:
                print(line)


def unpack_vs_cached(image_dir: str, repeat: int = 3) -> None:
    first, cached = [], []
    for i in range(repeat):
        tgz = os.path.join(WORK, f"img-{time.time_ns()}.tar.gz")
        with open(os.path.join(image_dir, "unique"), "w") as f:
            f.write(f"{tgz}\n")
        subprocess.run(["tar", "-C", image_dir, "-czf", tgz, "."], check=True)
        os.chmod(tgz, 0o644)
        for sink in (first, cached):
            t = time.perf_counter()
            as_user(f"srun -N1 -w node1 --charlie-image={tgz} true")
            sink.append(time.perf_counter() - t)
    f, c = statistics.median(first), statistics.median(cached)
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(image_dir)
               for n in ns if not os.path.islink(os.path.join(r, n)))
    print(f"{'job start from a %.0f MB tarball' % (size / 1e6):<46} {'median s':>9}")
    print(f"{'  first job on the node (unpack)':<46} {f:>9.3f}")
    print(f"{'  next job (cached)':<46} {c:>9.3f}")
    print(f"{'  ratio first / cached':<46} {f / c:>9.2f}")


def squashfs_start(debian_sqfs: str, pad_mb: int = 850, repeat: int = 3) -> None:
    """A ~1 GB image (the Debian MPI image + pad_mb of incompressible data):
    a new squashfs file (never seen by the node) vs. the next job from the
    same file; the same content as a tarball, unpacked per node, for
    comparison (first job only: the cached tarball is item 3)."""
    src = os.path.join(WORK, "images", "big")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    subprocess.run(["unsquashfs", "-q", "-d", src, debian_sqfs], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(src, "pad"), "wb") as f:
        for _ in range(pad_mb):
            f.write(os.urandom(1 << 20))
    first, nxt, tar = [], [], []
    for i in range(repeat):
        with open(os.path.join(src, "unique"), "w") as f:
            f.write(f"{time.time_ns()}\n")
        sqfs = os.path.join(WORK, f"big-{i}.sqfs")
        subprocess.run(["mksquashfs", src, sqfs, "-quiet", "-no-progress", "-all-root",
                        "-comp", "zstd"], check=True, stdout=subprocess.DEVNULL)
        os.chmod(sqfs, 0o644)
        for sink in (first, nxt):
            t = time.perf_counter()
            as_user(f"srun -N1 -w node1 --charlie-image={sqfs} true")
            sink.append(time.perf_counter() - t)
        size = os.path.getsize(sqfs)
        os.unlink(sqfs)
    tgz = os.path.join(WORK, "big.tar")
    subprocess.run(["tar", "-C", src, "-cf", tgz, "."], check=True)
    os.chmod(tgz, 0o644)
    t = time.perf_counter()
    as_user(f"srun -N1 -w node1 --charlie-image={tgz} true")
    tar.append(time.perf_counter() - t)
    os.unlink(tgz)
    f, n = statistics.median(first), statistics.median(nxt)
    print(f"{'job start from a %.0f MB squashfs image' % (size / 1e6):<46} {'median s':>9}")
    print(f"{'  first job on the node (new file, mounted)':<46} {f:>9.3f}")
    print(f"{'  next job (same file)':<46} {n:>9.3f}")
    print(f"{'  ratio first / next':<46} {f / n:>9.2f}   (goal <= 1.2)")
    print(f"{'  same content as a tar, unpacked on the node':<46} {tar[0]:>9.3f}"
          f"   ({tar[0] / f:.1f}x the mounted first job)")


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    shutil.chown(WORK, USER, USER)
    images = os.path.join(WORK, "images")
    bb = build_busybox_image(os.path.join(images, "bb"))
    mpi = build_mpi_image(os.path.join(images, "mpi"))
    bare = os.path.join(WORK, "pingpong")
    shutil.copy(os.path.join(mpi, "usr", "bin", "pingpong"), bare)
    os.chmod(bare, 0o755)
    debian_sqfs = os.path.join(SB.guest_dir or ".cache/vm", "debian.sqfs")
    ompi_bare = os.path.join(WORK, "pingpong.openmpi")
    subprocess.run(["mpicc.openmpi", "-O2", "-o", ompi_bare,
                    os.path.join(os.path.dirname(__file__), "..", "helpers", "src", "pingpong.c")],
                   check=True)
    step_launch(bb)
    print()
    pingpong(mpi, "/usr/bin/pingpong", bare)
    print()
    pingpong(debian_sqfs, "/usr/local/bin/pingpong", ompi_bare, mpi="pmix")
    print()
    unpack_vs_cached(mpi)
    print()
    squashfs_start(debian_sqfs)


if __name__ == "__main__":
    main()
