"""Churn: many jobs of every type on the sandbox with faults injected at
random points, then a count of everything that must not be left.

    PYTHONPATH=tests python -m helpers.churn [--jobs N] [--seed S]   (make churn)

Faults: scancel at a random moment (during the prolog, the unpack, a VM
boot, the job), kill -9 or SIGSTOP of the container holder or QEMU, kill -9
or SIGSTOP of the prolog's step as the user, a slurmd restart while jobs
run, the epilog run a second time by hand.  Hostile jobs among them: an
image whose holder starts a process that leaves the container (its own
session and namespaces), and one whose holder starts a process stuck on
the user's FUSE server that stops answering (tests/helpers/stallfs.py).  Afterwards: drained nodes,
processes of the user, job directories, root's records, job cgroups,
/dev/shm entries of the user, deleted-but-open files under the runtime
roots, and kept overlays not listed by `slurm-charlie status`.  Exit 1 when
any count is not 0.  `make churn` runs 200 jobs; `make test` runs a short
form (tests/adversarial/test_churn.py)."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from helpers import stallfs  # noqa: E402
from helpers.cluster import USER, build_busybox_image, holder_sh_image, make_cluster  # noqa: E402

from slurm_charlie.doctor import deleted_open  # noqa: E402
from slurm_charlie.procfs import proc_stat  # noqa: E402
from slurm_charlie.procfs import pids_of

FAULTS = ("none", "scancel", "kill-holder", "stop-holder", "kill-user-step",
          "stop-user-step", "epilog-twice")


def _cmd(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    fields = proc_stat(pid)
    return int(fields[1]) if fields else 0


class Churn:
    def __init__(self, jobs: int, seed: int, vm_share: float = 0.05) -> None:
        self.c = make_cluster()
        self.rng = random.Random(seed)
        self.jobs = jobs
        self.vm_share = vm_share if self.c.sb.guest_dir else 0.0
        self.uid = int(self.c.run(["id", "-u", USER]).stdout)
        # an interrupted run's stalling mounts would keep its directory
        for line in open("/proc/self/mountinfo").read().splitlines():
            point = line.split()[4]
            if "/charlie-tests/churn/stall-" in point:
                subprocess.run(["umount", "-l", point], capture_output=True)
        self.wd = self.c.workdir("churn")
        self.faults: dict[str, int] = {f: 0 for f in FAULTS}
        self.kinds: dict[str, int] = {}
        self.restarts = 0
        self.servers: list[tuple[subprocess.Popen, str]] = []

    # -- images -----------------------------------------------------------------
    def images(self) -> dict[str, str]:
        bb = build_busybox_image(os.path.join(self.wd, "bb"), owner=USER)
        tgz = os.path.join(self.wd, "bb.tgz")
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(bb, arcname=".")
            data = os.urandom(4 << 20)  # an unpack that takes a moment
            info = tarfile.TarInfo("./big")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        shutil.chown(tgz, USER, USER)
        out = {"dir": bb, "tgz": tgz,
               # the holder's /bin/sh (the image author's) leaves the container
               "escape": holder_sh_image(os.path.join(self.wd, "escape"),
                                          "/bin/busybox setsid /bin/busybox unshare -r -m "
                                          "/bin/busybox sleep 4242"),
               # ... or looks a name up in the user's stalled FUSE (/ch/data1)
               "stall": holder_sh_image(os.path.join(self.wd, "stall"),
                                         "/bin/busybox setsid /bin/busybox stat "
                                         "/ch/data1/stall")}
        if self.vm_share:
            img = os.path.join(self.wd, "image.qcow2")
            shutil.copyfile(os.path.join(self.c.sb.guest_dir, "guest.qcow2"), img)
            shutil.chown(img, USER, USER)
            out["vm"] = img
        return out

    # -- one job ---------------------------------------------------------------
    def submit(self, images: dict[str, str]) -> tuple[str, str, str]:
        r = self.rng.random()
        nodes = self.rng.randint(1, 3)
        if r < self.vm_share:
            kind, args = "vm", [f"--charlie-image={images['vm']}", "--charlie-interactive",
                                "--charlie-commit", "--mem=900M", "--wrap", "sleep 2"]
            nodes = 1
        elif r < 0.35:
            kind, args = "none", ["--charlie-type=none", "--wrap",
                                  f"srun -N{nodes} sleep {self.rng.uniform(0, 2):.1f}"]
        elif r < 0.7:
            kind, args = "container", [f"--charlie-image={images['dir']}", "--wrap",
                                       f"srun -N{nodes} sh -c 'sleep "
                                       f"{self.rng.uniform(0, 2):.1f}; ls /ch/meta >/dev/null'"]
        elif r < 0.75:
            kind, args = "escape", [f"--charlie-image={images['escape']}", "--wrap",
                                    f"srun -N{nodes} true"]
        elif r < 0.8:
            kind, args = "stall-fuse", [f"--charlie-image={images['stall']}",
                                        f"--charlie-dir={self.stalling_mount()}", "--wrap",
                                        f"srun -N{nodes} sleep 1"]
        else:
            kind, args = "tarball", [f"--charlie-image={images['tgz']}", "--wrap",
                                     f"srun -N{nodes} true"]
        p = self.c.as_user(["sbatch", "--parsable", "--no-requeue", f"-N{nodes}",
                            "-o", "/dev/null", *args], self.wd)
        jobid = p.stdout.strip().split(";")[0]
        if not jobid.isdigit():
            raise SystemExit(f"sbatch failed: {p.stderr}")
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        return jobid, kind, self.rng.choice(FAULTS)

    def stalling_mount(self) -> str:
        """A new mount of the user's stalling FUSE server (each job's epilog
        aborts the connection its holder's child waits on)."""
        mnt = os.path.join(self.wd, f"stall-{len(self.servers)}")
        os.makedirs(mnt)
        shutil.chown(mnt, USER, USER)
        server = stallfs.start(mnt, USER)
        self.servers.append((server, mnt))
        return mnt

    def stop_servers(self) -> None:
        for server, mnt in self.servers:
            server.kill()
            server.wait()
            subprocess.run(["umount", "-l", mnt], capture_output=True)

    def record_pids(self, jobid: str) -> list[int]:
        pids = []
        for n in self.c.sb.nodes:
            path = os.path.join(self.c.sb.state, "runtime", n.name, ".root", f"{jobid}.json")
            try:
                pids += [p["pid"] for p in json.load(open(path)).get("procs", [])]
            except (OSError, ValueError):
                pass
        return pids

    def user_steps(self) -> list[int]:
        """Children of a prolog running as the user: its steps as the user
        (proc.call_as) and what it spawns (QEMU, the holder) while it waits."""
        # the background prolog is `python -I -c ...prolog_hook import main`,
        # or a child of the node's warm hook server (`...warm_main import
        # main`), whose epilogs' steps as the user are hit as well
        return [p for p in pids_of(self.uid)
                if any(w in _cmd(_ppid(p)) for w in (
                    "slurm-charlie prolog", "slurm_charlie.cli prolog",
                    "slurm_charlie.prolog_hook", "slurm_charlie.warm_main"))]

    def inject(self, jobid: str, fault: str) -> None:
        deadline = time.monotonic() + self.rng.uniform(0.05, 4)
        hit = False
        while time.monotonic() < deadline and not hit:
            if fault == "scancel" and time.monotonic() > deadline - 0.05:
                self.c.run(["scancel", jobid])
                hit = True
            elif fault in ("kill-holder", "stop-holder"):
                for pid in self.record_pids(jobid):
                    os.kill(pid, signal.SIGKILL if fault == "kill-holder" else signal.SIGSTOP)
                    hit = True
            elif fault in ("kill-user-step", "stop-user-step"):
                for pid in self.user_steps():
                    try:
                        os.kill(pid, signal.SIGKILL if fault == "kill-user-step"
                                else signal.SIGSTOP)
                        hit = True
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)
        if hit:
            self.faults[fault] += 1

    def epilog_again(self, jobid: str) -> None:
        """The epilog of a finished job once more, by hand, on every node."""
        for n in self.c.sb.nodes:
            env = {**os.environ, **self.c.sb.env(), "SPANK_CHARLIE": "1",
                   "SLURM_JOB_ID": jobid, "SLURM_JOB_UID": str(self.uid),
                   "SLURM_JOB_GID": str(self.uid), "SLURMD_NODENAME": n.name,
                   "SLURM_JOB_NODELIST": n.name}
            p = subprocess.run([self.c.sb.charlie_bin(), "epilog"], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"epilog run twice failed: {p.stderr}")
        self.faults["epilog-twice"] += 1

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        images = self.images()
        t0 = time.monotonic()
        done: list[tuple[str, str]] = []
        restart_at = self.jobs // 2
        for i in range(self.jobs):
            jobid, kind, fault = self.submit(images)
            if fault not in ("none", "epilog-twice"):
                self.inject(jobid, fault)
            done.append((jobid, fault))
            if i == restart_at:
                self.c.sb.restart_slurmd("node2")
                self.restarts += 1
            while len(self.c.run(["squeue", "-h", "-u", USER]).stdout.splitlines()) > 6:
                self.no_drain()
                time.sleep(0.2)
        for jobid, fault in done:
            self.no_drain()
            info = self.c.wait_done(jobid, timeout=600)
            if fault == "epilog-twice" and info.get("JobState") != "PENDING":
                self.epilog_again(jobid)
        self.stop_servers()
        # stopped processes are the user's business, but they must not keep
        # anything of the job alive: whatever is left is counted below
        counts = self.leftovers()
        counts["seconds"] = int(time.monotonic() - t0)
        return counts

    def no_drain(self) -> None:
        """A drained node ends the run at once (its jobs would wait forever)."""
        bad = {n: s for n, s in self.c.sb.node_states().items()
               if "drain" in s or "down" in s}
        if bad:
            reasons = self.c.run(["sinfo", "-h", "-R", "-o", "%N: %E"]).stdout.strip()
            raise SystemExit(f"churn: node drained: {bad}: {reasons}")

    def leftovers(self) -> dict[str, int]:
        states = self.c.wait_nodes_idle(120)
        rt = os.path.join(self.c.sb.state, "runtime")
        records = [f for n in os.listdir(rt) if os.path.isdir(os.path.join(rt, n, ".root"))
                   for f in os.listdir(os.path.join(rt, n, ".root"))]
        # a step cgroup whose only members are zombies stays until they are
        # reaped, and this machine's PID 1 reaps nothing (docs/sandbox.rst):
        # the tests ignore zombies, so such a cgroup is not a leak of ours
        cgroups = [d for d in subprocess.run(
            ["find", "/sys/fs/cgroup/memory", "-maxdepth", "4", "-name", "step_extern"],
            capture_output=True, text=True).stdout.split() if not _zombies_only(d)]
        shm = [e for e in os.listdir("/dev/shm")
               if os.lstat(os.path.join("/dev/shm", e)).st_uid == self.uid]
        deleted = deleted_open(rt)
        status = "".join(self.c.run([self.c.sb.charlie_bin(), "status", "--node", n.name]
                                    ).stdout for n in self.c.sb.nodes)
        kept = [os.path.join(r, f) for r, _, fs in os.walk(rt) if "/kept" in r for f in fs]
        unlisted = [k for k in kept if k not in status]
        mounts = [l for l in open("/proc/mounts") if rt in l or "/charlie-tests/" in l]
        return {"drained": sum(1 for s in states.values() if s != "idle"),
                "processes": len(self.c.user_processes(timeout=30)),
                "job_dirs": len(self.c.job_dirs()), "records": len(records),
                "cgroups": len(cgroups), "shm": len(shm), "deleted_open": len(deleted),
                "mounts": len(mounts), "kept_unlisted": len(unlisted)}


def _zombies_only(cgroup: str) -> bool:
    """Every process in the cgroup is a zombie (and there is one)."""
    try:
        pids = open(os.path.join(cgroup, "cgroup.procs")).read().split()
    except OSError:
        return False
    states = []
    for pid in pids:
        try:
            states.append(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0])
        except OSError:
            states.append("Z")  # gone meanwhile
    return bool(states) and all(s == "Z" for s in states)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    churn = Churn(args.jobs, args.seed)
    logs = [os.path.join(churn.c.sb.state, "log", f"charlie-{n.name}.log")
            for n in churn.c.sb.nodes]
    sizes = {f: os.path.getsize(f) if os.path.exists(f) else 0 for f in logs}
    counts = churn.run()
    print(f"churn: {args.jobs} jobs (seed {args.seed}): " + ", ".join(
        f"{k} {v}" for k, v in sorted(churn.kinds.items())))
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in churn.faults.items())
          + f", slurmd restarts {churn.restarts}")
    how: dict[str, int] = {}
    for f, start in sizes.items():
        with open(f, errors="replace") as log:
            log.seek(start)
            for line in log:
                for hook in ("prolog", "epilog"):
                    for way in ("warm", "cold"):
                        if f"{hook} done in" in line and f" {way})" in line:
                            how[f"{hook} {way}"] = how.get(f"{hook} {way}", 0) + 1
    print("hooks that ended: " + ", ".join(f"{k} {v}" for k, v in sorted(how.items())))
    print("left behind: " + ", ".join(f"{k} {v}" for k, v in counts.items()
                                      if k != "seconds") + f" ({counts['seconds']} s)")
    bad = {k: v for k, v in counts.items() if k != "seconds" and v}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
