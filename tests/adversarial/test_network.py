"""Attack class 8 (issue 10): nobody outside a VM job reaches its network.

A 2-node VM job (node1, node2) on the root-built VXLAN network; then, from
node3 (not in the job) and from node1 (a node the victim shares), VXLAN
packets carrying frames for the job's VNI are sent at node2:
  * by the unprivileged user, from an ordinary (>= 1024) source port,
  * by root on node3 from a privileged port (a stranger to the job),
  * by root on node1 from a privileged port: the control -- these must
    arrive, which shows the counting below would see forged frames.
What reaches the segment is read from node2's VXLAN device counters; the
nftables drop counters say which rule stopped the rest."""

import json
import os
import re
import subprocess

import pytest

from helpers.cluster import USER
from helpers.vm import assert_clean, image_copy, job_helpers, wait_for

PORT = 4789
COUNT = 40

SEND = r"""
import socket, sys
dst, port, sport, vni, mac, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), bytes.fromhex(sys.argv[5].replace(":", "")), int(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sport:
    s.bind(("", sport))
vxlan = bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"
# an IPv4 frame for the guest's MAC from a made-up one
frame = mac + bytes.fromhex("020000000099") + b"\x08\x00" + b"\x45" + b"\0" * 45
for _ in range(count):
    s.sendto(vxlan + frame, (dst, port))
print("sent", count)
"""


def _ns(cluster, node):
    return next(n for n in cluster.sb.nodes if n.name == node)


def _in_ns(cluster, node, argv, user=None):
    cmd = ["ip", "netns", "exec", _ns(cluster, node).netns]
    if user:
        cmd += ["runuser", "-u", user, "--"]
    return subprocess.run(cmd + argv, capture_output=True, text=True, timeout=60)


def _rx(cluster, node, dev):
    p = subprocess.run(["ip", "-n", _ns(cluster, node).netns, "-s", "-j", "link", "show",
                        dev], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)[0]["stats64"]["rx"]["packets"]


def _drops(cluster, node, table):
    p = _in_ns(cluster, node, ["nft", "list", "table", "inet", table])
    assert p.returncode == 0, p.stderr
    return sum(int(x) for x in re.findall(r"counter packets (\d+)", p.stdout))


@pytest.fixture(scope="module")
def vm_job(cluster, guest):
    wd = cluster.workdir("net-attack")
    img = image_copy(cluster, guest, wd)
    p = cluster.as_user(["sbatch", "--parsable", "--no-requeue", "-N2", "-w", "node[1-2]",
                         "-o", "out", f"--charlie-image={img}", "--charlie-interactive",
                         "--wrap", "sleep 600"], wd)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    try:
        wait_for(lambda: sum(os.path.exists(f"{d}/meta/sync/{g}.ready")
                             for d in cluster.job_dirs() if d.endswith(f"/{job}")
                             for g in (0, 1)) == 2, "both guests")
        yield job
    finally:
        cluster.run(["scancel", job])
        assert_clean(cluster, job)


def test_only_the_jobs_nodes_from_privileged_ports_reach_the_segment(cluster, vm_job):
    job = vm_job
    from slurm_charlie.asroot.jobnet import vni
    from slurm_charlie.meta import guest_mac
    dst = _ns(cluster, "node2").addr
    args = [str(PORT), None, str(vni(job)), guest_mac(job, 1), str(COUNT)]
    dev = f"chv{job}"
    # the node is not on the job's network: no address on its devices
    for node in ("node1", "node2"):
        for d in (f"chb{job}", dev):
            out = subprocess.run(["ip", "-n", _ns(cluster, node).netns, "-o", "addr",
                                  "show", "dev", d], capture_output=True, text=True)
            assert out.returncode == 0 and out.stdout.strip() == "", (node, d, out)

    def attempt(node, sport, user):
        a = list(args)
        a[1] = str(sport)
        before = (_rx(cluster, "node2", dev), _drops(cluster, "node2", "slurm_charlie"),
                  _drops(cluster, "node2", f"charlie_j{job}"))
        p = _in_ns(cluster, node, ["python3", "-c", SEND, dst, *a], user=user)
        assert p.returncode == 0 and f"sent {COUNT}" in p.stdout, p.stderr
        after = (_rx(cluster, "node2", dev), _drops(cluster, "node2", "slurm_charlie"),
                 _drops(cluster, "node2", f"charlie_j{job}"))
        return [b - a for a, b in zip(before, after)]

    # the unprivileged user, on a stranger node and on a node of the job
    for node in ("node3", "node1"):
        rx, port_drops, _ = attempt(node, 0, USER)
        assert port_drops >= COUNT, (node, port_drops)
        assert rx < COUNT // 2, (node, rx)  # guests' own chatter at most
    # root on a node outside the job, from a privileged port
    rx, _, stranger_drops = attempt("node3", 1000, None)
    assert stranger_drops >= COUNT and rx < COUNT // 2, (stranger_drops, rx)
    # control: root on a node of the job is let through (so forged frames
    # would have been counted above)
    rx, port_drops, stranger_drops = attempt("node1", 1001, None)
    assert rx >= COUNT and port_drops == 0 and stranger_drops == 0, (rx, port_drops,
                                                                     stranger_drops)


def test_the_user_cannot_capture_frames(cluster, vm_job):
    """No raw sockets without root: the user cannot read the segment on a
    node either (the bridge is root's)."""
    p = _in_ns(cluster, "node1", ["python3", "-c",
                                  "import socket; socket.socket(socket.AF_PACKET, "
                                  "socket.SOCK_RAW, socket.htons(3))"], user=USER)
    assert p.returncode != 0 and "PermissionError" in p.stderr, p.stderr


def test_no_tcp_port_on_the_node_ssh_through_the_job_directory(cluster, vm_job):
    """Class 7: nothing of the job listens on a TCP port of its nodes (no
    port to squat); ssh reaches each guest through a unix socket in the
    0700 job directory, served by the user's relay in a namespace of its
    own on the job network."""
    import stat as st
    job = vm_job
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    for i, node in enumerate(("node1", "node2")):
        p = _in_ns(cluster, node, ["ss", "-H", "-ltnp"])
        assert p.returncode == 0, p.stderr
        assert "qemu" not in p.stdout and "python" not in p.stdout, p.stdout
        [jd] = [d for d in cluster.job_dirs() if d.endswith(f"/{node}/{job}")]
        assert st.S_IMODE(os.stat(jd).st_mode) == 0o700
        sock = os.lstat(os.path.join(jd, "run", f"{i}.sshd"))
        assert st.S_ISSOCK(sock.st_mode) and sock.st_uid == uid
    sc = cluster.sb.charlie_bin()
    p = cluster.as_user([sc, "ssh", "1", "hostname"], cluster.workdir("net-attack"),
                        env={"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "node[1-2]"})
    assert p.returncode == 0 and p.stdout.strip() == "chgu1", (p.stdout, p.stderr)


def _users_helpers(cluster, job, command):
    """Pids of the user's `slurm-charlie COMMAND` processes of this job."""
    uid = int(cluster.run(["id", "-u", USER]).stdout)
    return [pid for pid, cmd in job_helpers(uid, f"/{job}/run/") if command in cmd]


def test_the_user_killing_their_task_multiplexer_costs_only_their_steps(cluster, vm_job):
    """srun reaches the guest through the user's own multiplexer: killed, the
    next step on that node fails with a message that says what happened,
    and the node stays in service (the last test checks the epilog)."""
    job = vm_job
    wd = cluster.workdir("adv-mux")
    step = ["srun", f"--jobid={job}", "--overlap", "-N1", "-n1", "-w", "node1", "hostname"]
    p = cluster.as_user(step, wd)
    assert p.returncode == 0 and p.stdout.strip() == "chgu0", (p.stdout, p.stderr)
    muxes = _users_helpers(cluster, job, b"task-mux")
    assert len(muxes) == 2, muxes  # one per node of the job
    for pid in muxes:  # joined the job's cgroup at its spawn gate, as QEMU
        memory = [line.split(":", 2)[2] for line in open(f"/proc/{pid}/cgroup")
                  if line.split(":")[1] == "memory"]
        assert re.fullmatch(rf"/slurm_node\d/uid_\d+/job_{job}/step_extern/task_\d",
                            memory[0].strip()), memory
    for pid in muxes:
        os.kill(pid, 9)
    p = cluster.as_user(step, wd)
    assert p.returncode != 0
    assert "cannot reach the guest's task agent" in p.stderr, p.stderr
    assert "CHARLIE_ON_HOST=1" in p.stderr  # the way to run a step anyway
    assert "drain" not in cluster.sb.node_states()["node1"]


def test_the_user_killing_their_relay_costs_only_their_ssh(cluster, vm_job):
    """The relay is the user's own process: killing it leaves the job's ssh
    without a way in, and nothing else -- the epilog finds it gone, removes
    the network and its namespace, and no node is drained.  (Runs last: it
    ends the module's job.)"""
    job = vm_job
    relays = _users_helpers(cluster, job, b"ssh-relay")
    assert len(relays) == 2, relays  # one per node of the job
    for pid in relays:
        os.kill(pid, 9)
    cluster.run(["scancel", job])
    cluster.wait_done(job, timeout=180)
    states = cluster.wait_nodes_idle(120)
    assert all(s == "idle" for s in states.values()), states
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout
    assert f"-{job}" not in namespaces, namespaces
