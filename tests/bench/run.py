#!/usr/bin/env python3
"""Benchmarks for the foundation (issue 2), measured side by side in one run.

1. Launch latency of a non-charlie `srun -N3 true` with slurm-charlie
   installed (shim + Prolog/Epilog) vs. not installed.  Goal: <= 1.02x.
   A third set-up has a trivial Prolog/Epilog (`exit 0`): it shows what
   Slurm itself charges for running any prolog with PrologFlags=Alloc, so
   the part that is ours can be told apart.  Rounds rotate the set-ups so
   drift of the machine hits all of them.
2. Rendering meta for a synthetic 10,000-node job (hostlist expansion +
   render), vs. a 100-node job.  Goal: < 50 ms.

Needs the sandbox (`make bench` brings it up).  Prints a table; asserts
nothing about time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time


from slurm_charlie import hostlist, meta, sandbox  # noqa: E402


def srun_times(sb: sandbox.Sandbox, n: int) -> list[float]:
    # no CHARLIE_* from the caller's environment (make's, CI's): one that names
    # an option would make these plain jobs charlie jobs
    env = {k: v for k, v in {**os.environ, **sb.env()}.items() if not k.startswith("CHARLIE_")}
    cmd = ["runuser", "-u", sandbox.USER, "--", "env", f"SLURM_CONF={sb.conf}",
           "srun", "-N3", "true"]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def charlie_jobs_logged(sb: sandbox.Sandbox) -> int:
    """Charlie jobs the nodes' logs have seen (a line per hook and job)."""
    n = 0
    for node in ("node1", "node2", "node3"):
        try:
            with open(os.path.join(sb.state, "log", f"charlie-{node}.log")) as f:
                n += sum("prolog done in" in line for line in f)
        except OSError:
            pass
    return n


def bench_launch(rounds: int = 6, per_round: int = 20) -> None:
    sb = sandbox.Sandbox()
    seen = charlie_jobs_logged(sb)
    modes = ["off", "trivial", "on"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                sb.set_hooks(mode)
                srun_times(sb, 2)  # warm-up after reconfigure
                times[mode].extend(srun_times(sb, per_round))
    finally:
        sb.set_hooks("on")
    med = {m: statistics.median(v) for m, v in times.items()}
    label = {"off": "slurm-charlie not installed",
             "trivial": "only a trivial Prolog/Epilog (exit 0)",
             "on": "slurm-charlie installed (shim + hooks)"}
    print(f"{'srun -N3 true (non-charlie job)':<46} {'median s':>9} {'runs':>5}")
    for m in modes:
        print(f"{'  ' + label[m]:<46} {med[m]:>9.4f} {len(times[m]):>5}")
    print(f"{'  ratio installed / not installed':<46} {med['on'] / med['off']:>9.3f}"
          "   (goal <= 1.02)")
    print(f"{'  ratio installed / trivial prolog':<46} {med['on'] / med['trivial']:>9.3f}"
          "   (our share; goal <= 1.01)")
    print(f"{'  of these jobs, charlie jobs (must be 0)':<46} "
          f"{charlie_jobs_logged(sb) - seen:>9d}")


def render_time(nodes: int, repeat: int = 15) -> float:
    nodelist = f"n[{0:05d}-{nodes - 1:05d}]"
    cpus = f"2(x{nodes})"
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        names = tuple(hostlist.expand(nodelist))
        counts = tuple(hostlist.expand_counts(cpus))
        meta.render(meta.MetaInput("1", names, counts, "vm", data_dirs=2))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_render() -> None:
    small, big = render_time(100), render_time(10000)
    print(f"{'render meta (expand + render), median':<44} {'ms':>9}")
    print(f"{'  100 nodes':<44} {small * 1000:>9.2f}")
    print(f"{'  10,000 nodes':<44} {big * 1000:>9.2f}   (goal < 50 ms)")
    print(f"{'  ratio 10,000 / 100 nodes':<44} {big / small:>9.1f}   (linear would be 100)")


if __name__ == "__main__":
    bench_render()
    print()
    bench_launch()
