"""What the VM suites share: the test guest image, QEMU processes of a job,
waiting, and the end-of-job check (nothing of the job left, its network
included)."""

import os
import re
import shutil
import subprocess
import time

from helpers.cluster import USER

BOOT_TIMEOUT = 300


def image_copy(cluster, guest, wd, name="image.qcow2"):
    path = os.path.join(wd, name)
    shutil.copyfile(guest, path)
    os.chmod(path, 0o644)
    shutil.chown(path, USER, USER)
    return path


def job_helpers(uid, mark):
    """(pid, argv as bytes) of uid's processes one of whose arguments
    contains mark (e.g. "/<job>/run/": the job's task-mux and ssh-relay
    name their sockets there)."""
    found = []
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(mark.encode() in c for c in cmd):
            found.append((int(pid), cmd))
    return found


def qemu_pids(job=None):
    out = []
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not cmd[0].endswith(b"qemu-system-x86_64"):
            continue
        if job is None or f"charlie-{job}-chgu".encode() in b" ".join(cmd):
            out.append(int(d))
    return out


def wait_for(cond, what, timeout=BOOT_TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_clean(cluster, job):
    """Nothing of the job is left: QEMU, job directory, overlay, devices."""
    cluster.wait_done(job, timeout=180)
    wait_for(lambda: not qemu_pids(job), f"QEMU of job {job} to go", 120)
    wait_for(lambda: not [d for d in cluster.job_dirs() if d.endswith(f"/{job}")],
             f"job directory of {job} to go", 120)
    assert cluster.user_processes(timeout=20) == []
    assert job_network(cluster, job) == {}, "job network left behind"


def job_network(cluster, job):
    """{node: [devices and filter tables of the job's network]} (non-empty only)."""
    found = {}
    for n in cluster.sb.nodes:
        links = subprocess.run(["ip", "-n", n.netns, "-o", "link", "show"],
                               capture_output=True, text=True).stdout
        tables = subprocess.run(["ip", "netns", "exec", n.netns, "nft", "list", "tables"],
                                capture_output=True, text=True).stdout
        have = re.findall(rf"^\d+: (ch[vbt]{job})[@:]", links, re.M)
        have += re.findall(rf"\b(charlie_j{job})$", tables, re.M)
        if have:
            found[n.name] = have
    return found
