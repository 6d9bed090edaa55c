"""Scale of a VM job's per-node set-up, side by side in one run: the time
per guest to render meta (hosts, guest-macs, hostfiles) and the VXLAN
forwarding entries for 1,000 and for 10,000 guests.  Linear work shows a
ratio near 1; anything quadratic would show ~10.

    PYTHONPATH=tests .venv/bin/python tests/bench/scale.py   (make bench)
"""

from __future__ import annotations

import time

from slurm_charlie import meta

from slurm_charlie.asroot import jobnet


def per_guest(n: int, rounds: int = 5) -> float:
    nodes = tuple(f"n{i:05d}" for i in range(n))
    inp = meta.MetaInput(job_id="77", nodes=nodes, cpus=(2,) * n, type="vm",
                         data_dirs=0, subnet="10.64.0.0/14", nameservers=(),
                         mode="batch", user=("u", 1000, 1000, "u"))
    addrs = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        meta.render(inp)
        jobnet.fdb_lines("77", n // 2, addrs, "chv77")
        best = min(best, time.perf_counter() - t)
    return best / n


def main() -> None:
    small, large = per_guest(1_000), per_guest(10_000)
    print("VM job set-up per node, time per guest (best of 5)")
    print(f"  1,000 guests:  {small * 1e6:8.2f} us/guest")
    print(f"  10,000 guests: {large * 1e6:8.2f} us/guest")
    print(f"  ratio 10k/1k:  {large / small:8.2f}  (1 = linear; 10 would be quadratic)")


if __name__ == "__main__":
    main()
