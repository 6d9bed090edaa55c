#!/usr/bin/env python3
"""VM job networks side by side in one run (issue 10): round-trip time
guest0 -> guest1 on two nodes over the root-built VXLAN network and over the
multicast network, and host -> host between the same nodes for reference.
Alternating rounds; medians and ratios.  Under tcg the guests' own
emulation dominates; the ratio between the two networks is the point.

    PYTHONPATH=tests .venv/bin/python tests/bench/vmnet.py   (make bench)

Needs the sandbox with the test guest.  Asserts nothing about time.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time

from helpers.cluster import USER, make_cluster

from slurm_charlie.files import write_file

PINGS = int(os.environ.get("BENCH_PINGS", "20"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))


def _rtt(text: str) -> float:
    m = re.search(r"= [\d.]+/([\d.]+)/", text)
    if not m:
        raise SystemExit(f"vmnet: no ping summary in: {text[-400:]}")
    return float(m.group(1))


def _with_network(conf: str, network: str) -> str:
    text = open(conf).read()
    text = re.sub(r'(?m)^network = ".*"\n', "", text)
    return text.replace("[vm]\n", f'[vm]\nnetwork = "{network}"\n', 1)


def guest_rtt(cluster, image: str, network: str) -> float:
    conf = cluster.sb.charlie_conf
    saved = open(conf).read()
    write_file(conf, _with_network(conf, network), 0o644)  # atomic: prologs read it
    wd = cluster.workdir(f"bench-vmnet-{network}")
    img = os.path.join(wd, "image.qcow2")
    shutil.copyfile(image, img)
    shutil.chown(img, USER, USER)
    try:
        p = cluster.as_user(["sbatch", "--parsable", "-N2", "-w", "node[1-2]", "-o", "out",
                             "--charlie-image=image.qcow2", "--charlie-interactive",
                             "--wrap", "sleep 600"], wd)
        job = p.stdout.strip()
        assert job, p.stderr
        end = time.monotonic() + 300
        while time.monotonic() < end and sum(
                os.path.exists(f"{d}/meta/sync/{g}.ready")
                for d in cluster.job_dirs() if d.endswith(f"/{job}") for g in (0, 1)) < 2:
            time.sleep(0.2)
    finally:
        write_file(conf, saved, 0o644)
    try:
        for _ in range(60):  # the job runs once every prolog has reported back
            q = cluster.as_user([cluster.sb.charlie_bin(), "ssh", "0", "ping", "-q", "-c",
                                 str(PINGS), "-i", "0.2", "chgu1"], wd,
                                env={"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "node[1-2]"},
                                timeout=300)
            if q.returncode == 0:
                break
            time.sleep(1)
        return _rtt(q.stdout + q.stderr)
    finally:
        cluster.run(["scancel", job])
        cluster.wait_done(job, timeout=180)


def host_rtt(cluster) -> float:
    node1 = next(n for n in cluster.sb.nodes if n.name == "node1")
    node2 = next(n for n in cluster.sb.nodes if n.name == "node2")
    p = subprocess.run(["ip", "netns", "exec", node1.netns, "ping", "-q", "-c", str(PINGS),
                        "-i", "0.2", node2.addr], capture_output=True, text=True)
    return _rtt(p.stdout)


def main() -> None:
    cluster = make_cluster()
    image = os.path.join(cluster.sb.guest_dir, "guest.qcow2")
    results: dict[str, list[float]] = {"vxlan": [], "multicast": [], "host": []}
    for _ in range(ROUNDS):
        for network in ("vxlan", "multicast"):
            results[network].append(guest_rtt(cluster, image, network))
        results["host"].append(host_rtt(cluster))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"guest0 -> guest1 (2 nodes) and host -> host round trip, median of "
          f"{ROUNDS} rounds x {PINGS} pings")
    for k in ("vxlan", "multicast", "host"):
        print(f"  {k:10} {med[k]:8.3f} ms")
    print(f"  vxlan / multicast: {med['vxlan'] / med['multicast']:.2f}")
    print(f"  vxlan / host:      {med['vxlan'] / med['host']:.2f}")


if __name__ == "__main__":
    main()
