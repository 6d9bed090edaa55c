#!/usr/bin/env python3
"""A container job's whole life vs a plain job's (issue 11), side by side in
one run: `srun -N3 true` in its own allocation, from submission until the
last node's epilog has finished (the nodes are idle again), rounds
rotating plain, container with the nodes' warm hook servers (the default)
and container with ``hooks.warm = false`` (every hook a cold Python start).
Also the prolog's and epilog's own time per node, from the charlie log
("prolog done in", "epilog done in"), warm and cold apart.

    PYTHONPATH=tests .venv/bin/python tests/bench/life.py   (make bench)

Needs the sandbox.  Asserts nothing about time.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time

from helpers.cluster import build_busybox_image, make_cluster

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
#: 3 is the issue's measure; 1 shows a node's own cost without the three
#: sandbox nodes' hooks sharing this machine's two cores
NODES = int(os.environ.get("BENCH_NODES", "3"))


def life(cluster, wd: str, image: str | None) -> float:
    args = ["srun", f"-N{NODES}", "--quiet"] + ([f"--charlie-image={image}"] if image else []) + ["true"]
    t0 = time.perf_counter()
    p = cluster.as_user(args, wd)
    if p.returncode != 0:
        raise SystemExit(f"life: {' '.join(args)} failed: {p.stderr[-400:]}")
    while True:  # the epilogs end when no node is completing any more
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             env={**os.environ, "SLURM_CONF": cluster.sb.conf}).stdout.split()
        if out and all(s == "idle" for s in out):
            return time.perf_counter() - t0
        time.sleep(0.01)


NODE_NAMES = [f"node{i}" for i in range(1, 4)]


def set_warm(cluster, wd: str, image: str, on: bool) -> None:
    """Switch the site's hooks.warm (the config is rewritten atomically: the
    hooks read it at every job) and bring the nodes' servers to match."""
    from slurm_charlie import asroot
    from slurm_charlie.files import write_file
    conf = cluster.sb.charlie_conf
    text = re.sub(r"(?ms)^\[hooks\]\nwarm = \w+\n", "", open(conf).read())
    if not on:
        text += "[hooks]\nwarm = false\n"
    write_file(conf, text, 0o644)
    if not on:
        for n in NODE_NAMES:
            asroot.stop_warm(n)
        return
    for _ in range(50):  # a job's prologs start the servers that are missing
        if all(asroot.warm_running(n) for n in NODE_NAMES[:NODES]):
            return
        life(cluster, wd, image)
        time.sleep(0.5)
    raise SystemExit("life: the warm hook servers did not start")


def main() -> None:
    cluster = make_cluster()
    wd = cluster.workdir("bench-life")
    bb = build_busybox_image(os.path.join(wd, "bb"))
    log_before = {n: os.path.getsize(f) if os.path.exists(f) else 0
                  for n in ("node1", "node2", "node3")
                  for f in [os.path.join(cluster.sb.state, "log", f"charlie-{n}.log")]}
    kinds = ("plain", "container", "container, hooks.warm = false")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    life(cluster, wd, bb)  # warm-up: caches, page cache
    try:
        for r in range(ROUNDS):
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                if kind != "plain":
                    set_warm(cluster, wd, bb, "false" not in kind)
                times[kind].append(life(cluster, wd, bb if kind != "plain" else None))
    finally:
        set_warm(cluster, wd, bb, True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{f'srun -N{NODES} true, submission to the end of the epilogs':<52} "
          f"{'median s':>9} {'runs':>5}")
    for k in kinds:
        print(f"  {k:<50} {med[k]:>9.3f} {len(times[k]):>5}")
    for k in kinds[1:]:
        print(f"  {'ratio ' + k + ' / plain':<50} {med[k] / med['plain']:>9.2f}")
    goal = 1.3 if NODES > 1 else 1.2
    print(f"  {'goal (container / plain)':<50} {goal:>9.2f}")
    hooks: dict[str, list[float]] = {}
    for n, start in log_before.items():
        with open(os.path.join(cluster.sb.state, "log", f"charlie-{n}.log")) as f:
            f.seek(start)
            for line in f:
                m = re.search(r"(prolog|epilog) done in ([\d.]+) s \(this process's life, "
                              r"(\w+)", line)
                if m:
                    hooks.setdefault(f"{m.group(1)} on a node, {m.group(3)}", []).append(
                        float(m.group(2)))
    for k, v in sorted(hooks.items()):
        print(f"  {k + ' (its own log)':<50} {statistics.median(v):>9.3f} {len(v):>5}")

if __name__ == "__main__":
    main()
