#!/usr/bin/env python3
"""srun into VMs (issue 10), side by side in one run, ratios:

1. Step launch: `srun -N3 -n6 true` inside a plain allocation, a container
   allocation and a VM allocation (every task through the relay, the node's
   multiplexer and the guest's agent).  The VM/plain ratio is the relay's
   cost (tcg guests: the guest's own process start is emulated too).
2. MPI ping-pong (tests/helpers/src/pingpong.c, MPICH, srun --mpi=pmi2,
   one rank on each of two nodes): guest<->guest over the VXLAN job network,
   over the multicast network, and host<->host (where MPICH ranks on two
   sandbox nodes use shared memory: same kernel, same boot id).

    PYTHONPATH=tests .venv/bin/python tests/bench/vmsrun.py   (make bench)

Needs the sandbox with the test guest.  Asserts nothing about time.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess

from helpers.cluster import USER, build_busybox_image, make_cluster

from slurm_charlie.files import write_file

STEPS = int(os.environ.get("BENCH_STEPS", "12"))
PINGPONGS = int(os.environ.get("BENCH_PINGPONGS", "3"))
TIMED = ("for i in $(seq %d); do s=$(date +%%s%%N); srun -N3 -n6 true; "
         "e=$(date +%%s%%N); echo STEP $((e - s)); done" % STEPS)


def _batch(cluster, wd: str, args: list[str], script: str, timeout: float = 900) -> str:
    cluster.write(os.path.join(wd, "bench.sh"), "#!/bin/sh\n" + script + "\n")
    p, job = cluster.sbatch(wd, [*args, "-o", "bench.out", "-e", "bench.err", "bench.sh"],
                            timeout=timeout)
    out = open(os.path.join(wd, "bench.out")).read()
    if p.returncode != 0 or not job:
        raise SystemExit(f"vmsrun: job failed ({p.returncode}): {out[-600:]}"
                         f"{open(os.path.join(wd, 'bench.err')).read()[-600:]}")
    return out


def step_times(cluster, kind: str, image: str | None) -> list[float]:
    wd = cluster.workdir(f"bench-vmsrun-{kind}")
    args = ["-N3", "--ntasks-per-node=2"]
    if image:
        args.append(f"--charlie-image={image}")
    out = _batch(cluster, wd, args, TIMED)
    return [int(x) / 1e9 for x in re.findall(r"STEP (\d+)", out)][1:]  # first: warm-up


def _with_network(conf: str, network: str) -> str:
    text = open(conf).read()
    text = re.sub(r'(?m)^network = ".*"\n', "", text)
    return text.replace("[vm]\n", f'[vm]\nnetwork = "{network}"\n', 1)


def pingpong(cluster, kind: str, image: str | None, program: str) -> list[tuple[float, float]]:
    wd = cluster.workdir(f"bench-vmsrun-pp-{kind}")
    args = ["-N2", "-w", "node[1-2]", "--ntasks-per-node=1"]
    conf, saved = cluster.sb.charlie_conf, None
    if image:
        args.append(f"--charlie-image={image}")
        saved = open(conf).read()
        write_file(conf, _with_network(conf, kind), 0o644)  # atomic: prologs read it
    script = (f"for i in $(seq {PINGPONGS}); do "
              f"timeout 120 srun --mpi=pmi2 -N2 -n2 {program}; done")
    try:
        if saved is not None:  # the prologs read the config at job start only
            cluster.write(os.path.join(wd, "bench.sh"), "#!/bin/sh\n" + script + "\n")
            p = cluster.as_user(["sbatch", "--parsable", "--wait", "--no-requeue", *args,
                                 "-o", "bench.out", "bench.sh"], wd, timeout=900)
            out = open(os.path.join(wd, "bench.out")).read()
            if p.returncode != 0:
                raise SystemExit(f"vmsrun: ping-pong job failed: {out[-600:]}")
        else:
            out = _batch(cluster, wd, args, script)
    finally:
        if saved is not None:
            write_file(conf, saved, 0o644)
    return [(float(a), float(b)) for a, b in
            re.findall(r"latency_us (\S+) bandwidth_MBps (\S+)", out)]


def main() -> None:
    cluster = make_cluster()
    guest = os.path.join(cluster.sb.guest_dir, "guest.qcow2")
    wd = cluster.workdir("bench-vmsrun-images")
    img = os.path.join(wd, "image.qcow2")
    shutil.copyfile(guest, img)
    shutil.chown(img, USER, USER)
    bb = build_busybox_image(os.path.join(wd, "bb"))
    bare = os.path.join(wd, "pingpong")
    src = os.path.join(os.path.dirname(__file__), "..", "helpers", "src", "pingpong.c")
    subprocess.run(["mpicc.mpich", "-O2", "-o", bare, src], check=True)
    shutil.chown(bare, USER, USER)

    steps = {"plain": step_times(cluster, "plain", None),
             "container": step_times(cluster, "container", bb),
             "vm": step_times(cluster, "vm", img)}
    med = {k: statistics.median(v) for k, v in steps.items()}
    print(f"{'srun -N3 -n6 true inside an allocation':<44} {'median s':>9} {'runs':>5}")
    for k, label in (("plain", "plain"), ("container", "in containers"),
                     ("vm", "in VM guests (relay, tcg)")):
        print(f"  {label:<42} {med[k]:>9.3f} {len(steps[k]):>5}")
    print(f"  {'ratio container / plain':<42} {med['container'] / med['plain']:>9.2f}")
    print(f"  {'ratio VM / plain':<42} {med['vm'] / med['plain']:>9.2f}")
    print()
    pp = {"vxlan": pingpong(cluster, "vxlan", img, "/usr/local/bin/pingpong.mpich"),
          "multicast": pingpong(cluster, "multicast", img, "/usr/local/bin/pingpong.mpich"),
          "host": pingpong(cluster, "host", None, bare)}
    print(f"MPI ping-pong, 2 nodes x 1 rank, MPICH over srun --mpi=pmi2, median of "
          f"{PINGPONGS}")
    print(f"{'':<30} {'latency us':>11} {'MB/s':>9}")
    lat = {k: statistics.median(x[0] for x in v) for k, v in pp.items() if v}
    bw = {k: statistics.median(x[1] for x in v) for k, v in pp.items() if v}
    for k, label in (("vxlan", "guest<->guest, VXLAN"), ("multicast", "guest<->guest, multicast"),
                     ("host", "host<->host (shared memory)")):
        if k in lat:
            print(f"  {label:<28} {lat[k]:>11.1f} {bw[k]:>9.1f}")
        else:
            print(f"  {label:<28} {'no result':>11}")
    if "vxlan" in lat and "multicast" in lat:
        print(f"  {'vxlan / multicast latency':<28} {lat['vxlan'] / lat['multicast']:>11.2f}")
        print(f"  {'vxlan / multicast bandwidth':<28} {bw['vxlan'] / bw['multicast']:>21.2f}")


if __name__ == "__main__":
    main()
