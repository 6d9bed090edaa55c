"""Render the meta/ directory: pure functions, inputs -> {name: bytes}.

Every node renders meta itself from what Slurm hands every prolog (node list,
CPUs per node, job id) plus the options and site config.  The same inputs give
byte-identical files on every node, so no node talks to another.
"""

from __future__ import annotations

import dataclasses
import shlex

from .errors import UserError

GUEST_PREFIX = "chgu"
#: directory entries: value None means "a directory"
SYNC_DIR = "sync"
#: mount points every container image gets (/ch/meta, /ch/data1..4)
MOUNT_POINTS = ("ch/meta",) + tuple(f"ch/data{i}" for i in range(1, 5))


@dataclasses.dataclass(frozen=True)
class MetaInput:
    job_id: str
    nodes: tuple[str, ...]
    cpus: tuple[int, ...]
    type: str
    data_dirs: int = 0          # number of --charlie-dir
    subnet: str = "172.22.0.0/16"
    nameservers: tuple[str, ...] = ()
    mode: str = ""              # VM: "batch" or "interactive"
    pmi_fence_release: float | None = None  # VM: vm.pmi_fence_release
    #: VM: the job user as the guests create it: name, uid, gid, group name,
    #: then (gid, group name) of every supplementary group
    user: tuple = ()


def guest_name(index: int) -> str:
    return f"{GUEST_PREFIX}{index}"


def _dotted_range(start: int, count: int) -> list[str]:
    """Dotted quads of start .. start+count-1 (prefix strings reused per /24)."""
    out, prefix, cur24 = [], "", -1
    for n in range(start, start + count):
        if n >> 8 != cur24:
            cur24 = n >> 8
            prefix = f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}."
        out.append(prefix + str(n & 255))
    return out


def addresses(subnet: str, count: int) -> tuple[list[str], list[str], int]:
    """Guest i gets the (i+1)-th address of the subnet, the host side of node
    i the (i+1)-th address of its upper half.  Returns (guests, hosts, prefix)."""
    try:
        import ipaddress  # VMs only: not paid by every container prolog
        net = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise UserError("vm.subnet", "not an IPv4 network", subnet) from e
    half = net.num_addresses // 2
    if count > half - 2:
        raise UserError("nodes", f"too many nodes for guest network {subnet}",
                        count, hint="ask the admin for a larger vm.subnet")
    base = int(net.network_address)
    guests = _dotted_range(base + 1, count)
    hosts = _dotted_range(base + half + 1, count)
    return guests, hosts, net.prefixlen


def guest_env(inp: MetaInput) -> list[tuple[str, str]]:
    """CH_* variables common to every guest, as seen inside a guest/container."""
    env = [("CH_JOB_ID", inp.job_id), ("CH_TYPE", inp.type),
           ("CH_GUEST_COUNT", str(len(inp.nodes))), ("CH_META", "/ch/meta")]
    env += [(f"CH_DATA{i}", f"/ch/data{i}") for i in range(1, inp.data_dirs + 1)]
    if inp.mode:
        env.append(("CH_MODE", inp.mode))
    if inp.pmi_fence_release is not None:
        env.append(("CH_PMI_FENCE_RELEASE", f"{inp.pmi_fence_release:g}"))
    return env


def guest_mac(job_id: str, index: int) -> str:
    """Locally administered unicast MAC of guest index in a job."""
    j = int(job_id) & 0xFFFF
    return f"52:54:{j >> 8:02x}:{j & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"


def ssh_files(public: bytes, private: bytes, subnet: str) -> dict[str, bytes]:
    """meta/ssh/: the job's key (user key and every guest's host key)."""
    known = f"chgu*,{subnet.split('/')[0].rsplit('.', 2)[0]}.* ".encode() + \
        b" ".join(public.split()[:2]) + b"\n"
    return {"ssh/id_ed25519": private, "ssh/id_ed25519.pub": public,
            "ssh/known_hosts": known}


def render_env(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in pairs).encode()


def render(inp: MetaInput) -> dict[str, bytes | None]:
    n = len(inp.nodes)
    if n == 0:
        raise UserError("nodes", "empty node list")
    if len(inp.cpus) != n:
        raise UserError("cpus per node", f"{len(inp.cpus)} counts for {n} nodes")
    names = [guest_name(i) for i in range(n)]
    guest_ip, host_ip, _ = addresses(inp.subnet, n)
    hosts = ["127.0.0.1 localhost"]
    for i in range(n):
        hosts.append(f"{guest_ip[i]} {names[i]}")
        hosts.append(f"{host_ip[i]} {names[i]}host")
    slot_names = names if inp.type == "vm" else list(inp.nodes)
    # MPICH's (Hydra) format, the MPI we support; Open MPI's beside it
    hostfile = [f"{slot_names[i]}:{inp.cpus[i]}" for i in range(n)]
    hostfile_ompi = [f"{slot_names[i]} slots={inp.cpus[i]}" for i in range(n)]
    node_table = [f"{names[i]} {inp.nodes[i]} {inp.cpus[i]}" for i in range(n)]
    resolv = ["# nameservers from the site config (vm.nameservers)"]
    resolv += [f"nameserver {ns}" for ns in inp.nameservers]
    return {
        "guest-count": f"{n}\n".encode(),
        "guests": ("\n".join(names) + "\n").encode(),
        "nodes": ("\n".join(node_table) + "\n").encode(),
        "hosts": ("\n".join(hosts) + "\n").encode(),
        "hostfile": ("\n".join(hostfile) + "\n").encode(),
        "hostfile.openmpi": ("\n".join(hostfile_ompi) + "\n").encode(),
        "resolv.conf": ("\n".join(resolv) + "\n").encode(),
        "env": render_env(guest_env(inp)),
        SYNC_DIR: None,
        **(_vm_files(inp, names, guest_ip) if inp.type == "vm" else {}),
    }


def _vm_files(inp: MetaInput, names: list[str], guest_ip: list[str]) -> dict[str, bytes]:
    _, _, prefix = addresses(inp.subnet, 0)
    macs = [f"{names[i]} {guest_mac(inp.job_id, i)} {guest_ip[i]}/{prefix}"
            for i in range(len(names))]
    user = ""
    if inp.user:
        name, uid, gid, gname, *groups = inp.user
        user = f"{name} {uid} {gid} {gname}\n" + "".join(f"{g} {n}\n" for g, n in groups)
    return {"guest-macs": ("\n".join(macs) + "\n").encode(), "user": user.encode(),
            "ssh": None}
