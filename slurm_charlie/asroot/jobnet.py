"""The private job network of a VM job (``vm.network = "vxlan"``), built by
root on each of the job's nodes and removed at job end.

Per job and node::

    guest --virtio-net-- TAP cht<J> --+-- bridge chb<J> --+-- VXLAN chv<J>
    (QEMU as the user holds the TAP's   no host address     VNI from the job
     only fd, opened here by root)                          id, unicast to the
                                                            job's other nodes

* The VXLAN device knows the job's guests: one static forwarding entry per
  remote guest MAC (guest N runs on the job's node N) and head-end
  replication of broadcasts to the job's nodes; no learning, no multicast.
* nftables (table ``inet slurm_charlie``) drops VXLAN packets from a source
  port >= 1024 -- only root can send from below 1024, and the job's devices
  send from 1000-1023 -- and, per job (table ``inet charlie_j<J>``), every
  packet for the job's VNI that does not come from one of the job's nodes.
  So no unprivileged process on any node, and nobody off the job's nodes,
  can put a frame on the segment.
* The bridge and the VXLAN device get no address (IPv4 or IPv6): the node
  is not on the job's network.

Device names carry the job id (``chv``/``chb``/``cht`` + id: at most 15
characters); they live in the node's network namespace.  Everything here is
safe to run twice; ``remove`` is what the epilog and reconcile call.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import socket
import struct

from .. import files, layout
from ..errors import NodeFault
from ..log import log
from ..meta import guest_mac
from ..proc import SYSTEM_PATH, run, system_tool

#: the VXLAN source-port range of job devices: privileged ports only
SRC_PORTS = (1000, 1023)
#: VXLAN header 8 bytes after the UDP header: VNI at bits 32..55
_VNI_BITS = "@th,96,24"
_NAME = re.compile(r"^ch[vbtr]([0-9]{1,12})$")
_NODE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
NETNS_DIR = "/run/netns"
GLOBAL_TABLE = "slurm_charlie"
#: the system tools the job network runs
TOOLS = ("ip", "bridge", "nft")


def missing_tools() -> list[str]:
    """The job network's tools that are not installed here."""
    return [t for t in TOOLS if system_tool(t) is None]


def _need(name: str) -> str:
    path = system_tool(name)
    if path is None:
        raise NodeFault("job network", f"{name} is not installed", SYSTEM_PATH,
                        hint="apt-get install iproute2 nftables (vm.network = "
                        "\"vxlan\" needs ip, bridge and nft)")
    return path


_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


@dataclasses.dataclass(frozen=True)
class Names:
    vxlan: str
    bridge: str
    tap: str
    table: str
    veth: str       # the relay namespace's link to the bridge


def names(job_id: str) -> Names:
    layout.check_job_id(job_id)
    if len(job_id) > 12:  # Slurm's ids are 32-bit: 10 digits at most
        raise NodeFault("job id", "too long for a network device name", job_id)
    return Names(f"chv{job_id}", f"chb{job_id}", f"cht{job_id}", f"charlie_j{job_id}",
                 f"chr{job_id}")


def relay_netns(job_id: str, node: str) -> str:
    """The network namespace of the job's ssh relay on this node (its name
    carries the node: several slurmd may share one host's /run/netns)."""
    layout.check_job_id(job_id)
    if not _NODE.match(node):
        raise NodeFault("node name", "unusable in a namespace name", node)
    return f"charlie-{node}-{job_id}"


def vni(job_id: str) -> int:
    """1 .. 2^24-1 from the job id (ids 2^24-1 apart share one: never two
    running jobs on the same nodes in practice)."""
    return int(job_id) % 0xFFFFFF + 1


def node_addresses(nodes: tuple[str, ...], table_path: str) -> list[str]:
    """IPv4 address of every node of the job: from the site's table
    (``vm.node_addresses``: "NAME ADDRESS" lines) when set, else the name
    service.  A node that has none is the site's problem (NodeFault)."""
    table: dict[str, str] = {}
    if table_path:
        text = files.read_small(table_path, 16 << 20)
        if text is None:
            raise NodeFault("vm.node_addresses", "cannot read", table_path)
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2:
                table[parts[0]] = parts[1]
    out = []
    for node in nodes:
        addr = table.get(node)
        if addr is None:
            try:
                addr = socket.getaddrinfo(node, None, socket.AF_INET)[0][4][0]
            except (OSError, IndexError):
                raise NodeFault("job network", "node name does not resolve", node,
                                hint="list the nodes in vm.node_addresses or in the "
                                "name service") from None
        try:
            socket.inet_aton(addr)
        except OSError:
            raise NodeFault("vm.node_addresses", "not an IPv4 address",
                            f"{node} {addr}") from None
        out.append(addr)
    return out


def _err(p) -> str:
    return p.stderr.decode(errors="replace").strip()[-300:]


def _ip(*args: str, check: bool = True) -> bool:
    p = run([_need("ip"), *args], timeout=30, check=False)
    if p.returncode != 0 and check:
        raise NodeFault("job network", f"ip {' '.join(args)} failed", _err(p),
                        hint="slurm-charlie doctor")
    return p.returncode == 0


def _nft(script: str, check: bool = True) -> bool:
    p = run([_need("nft"), "-f", "-"], input=script.encode(), timeout=30, check=False)
    if p.returncode != 0 and check:
        raise NodeFault("job network", "nft failed", _err(p),
                        hint="install nftables (slurm-charlie doctor)")
    return p.returncode == 0


def _replace(table: str, rules: str) -> str:
    """One nft transaction that replaces the table (or makes it) atomically:
    no moment without filters, nothing left of an older definition."""
    return f"add table inet {table}\ndelete table inet {table}\n{rules}"


def _global_rules(port: int) -> str:
    return (f"table inet {GLOBAL_TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority -20; policy accept;\n"
            f"    udp dport {port} udp sport >= {SRC_PORTS[1] + 1} counter drop\n"
            "  }\n}\n")


def _job_rules(n: Names, port: int, vni_: int, addrs: list[str]) -> str:
    allowed = ", ".join(sorted(set(addrs)))
    return (f"table inet {n.table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f"    udp dport {port} {_VNI_BITS} {vni_} ip saddr != {{ {allowed} }}"
            " counter drop\n"
            "  }\n}\n")


def create(job_id: str, index: int, nodes: tuple[str, ...], port: int,
           table_path: str, relay: tuple[str, str, str] | None = None
           ) -> dict[str, object]:
    """As root: filters, VXLAN device and bridge of the job on this node
    (node index in the job), replacing any left from an earlier run of the
    same job id; with relay = (address/prefix, local guest's address, its
    MAC), also the ssh relay's namespace.  Returns the facts root records."""
    n = names(job_id)
    remove(job_id, nodes[index])
    addrs = node_addresses(nodes, table_path)
    local, vni_ = addrs[index], vni(job_id)
    _nft(_replace(GLOBAL_TABLE, _global_rules(port)))
    _nft(_replace(n.table, _job_rules(n, port, vni_, addrs)))
    _ip("link", "add", n.bridge, "type", "bridge")
    _ip("link", "set", n.bridge, "addrgenmode", "none")
    _ip("link", "add", n.vxlan, "type", "vxlan", "id", str(vni_), "local", local,
        "dstport", str(port), "srcport", str(SRC_PORTS[0]), str(SRC_PORTS[1] + 1),
        "nolearning")
    _ip("link", "set", n.vxlan, "addrgenmode", "none")
    _ip("link", "set", n.vxlan, "master", n.bridge, "up")
    _ip("link", "set", n.bridge, "up")
    fdb = fdb_lines(job_id, index, addrs, n.vxlan)
    if fdb:
        p = run([_need("bridge"), "-batch", "-"], input=("\n".join(fdb) + "\n").encode(),
                timeout=60, check=False)
        if p.returncode != 0:
            raise NodeFault("job network", "bridge fdb failed", _err(p))
    mtu = _mtu(n.vxlan)
    facts: dict[str, object] = {"network": "vxlan", "vni": vni_, "mtu": mtu}
    if relay is not None:
        facts["relay_netns"] = _relay_netns(job_id, nodes[index], n, mtu, *relay)
    log.info("job network: VNI %d on UDP %d, %d nodes, bridge %s, MTU %d",
             vni_, port, len(addrs), n.bridge, mtu)
    return facts


def _relay_netns(job_id: str, node: str, n: Names, mtu: int, address: str,
                 guest_ip: str, guest_mac_: str) -> str:
    """A namespace of its own on the job's bridge (address: chguNhost), for
    the job user's ssh relay: the node itself stays off the job network,
    and no TCP port is opened on the node for ssh."""
    ns = relay_netns(job_id, node)
    _ip("netns", "add", ns)
    _ip("link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    _ip("link", "set", n.veth, "addrgenmode", "none")
    _ip("link", "set", n.veth, "mtu", str(mtu), "master", n.bridge, "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "link", "set", "eth0", "mtu", str(mtu), "up")
    _ip("-n", ns, "addr", "add", address, "dev", "eth0")
    _ip("-n", ns, "neigh", "replace", guest_ip, "lladdr", guest_mac_, "dev", "eth0",
        "nud", "permanent")
    return ns


def fdb_lines(job_id: str, index: int, addrs: list[str], dev: str) -> list[str]:
    """`bridge -batch` lines for node index: each remote guest's MAC to its
    node, broadcasts to every other node (2 per remote node: O(N) per node,
    one process for all)."""
    out = []
    for i, addr in enumerate(addrs):
        if i != index:
            out.append(f"fdb append 00:00:00:00:00:00 dev {dev} dst {addr}")
            out.append(f"fdb add {guest_mac(job_id, i)} dev {dev} dst {addr}")
    return out


def _links() -> dict[str, int]:
    """{device name: MTU} of this network namespace (from the kernel through
    ip, not /sys: sysfs shows the namespace that mounted it, which is not
    the node's when several slurmd share a host)."""
    p = run([_need("ip"), "-j", "link", "show"], timeout=30, check=False)
    if p.returncode != 0:
        raise NodeFault("job network", "ip link show failed", _err(p))
    try:
        return {d["ifname"]: int(d.get("mtu", 0)) for d in json.loads(p.stdout)}
    except (ValueError, KeyError, TypeError):
        raise NodeFault("job network", "ip link show: unexpected output") from None


def _mtu(dev: str) -> int:
    return _links().get(dev) or 1450


def open_tap(job_id: str) -> int:
    """As root: create the job's TAP, enslave it to the bridge, return its
    fd (the only one: the device goes away when QEMU, which inherits it,
    exits).  The caller closes its copy once QEMU runs."""
    n = names(job_id)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", n.tap.encode(),
                                                _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
        _ip("link", "set", n.tap, "addrgenmode", "none")
        _ip("link", "set", n.tap, "master", n.bridge, "up")
    except OSError as e:
        os.close(fd)
        raise NodeFault("job network", f"cannot create the TAP: {e.strerror}",
                        n.tap, hint="the node needs /dev/net/tun (module tun)") from None
    except NodeFault:
        os.close(fd)
        raise
    return fd


def open_vhost() -> int | None:
    """As root: /dev/vhost-net for QEMU's vhostfd= where the node has it."""
    try:
        return os.open("/dev/vhost-net", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None


def remove(job_id: str, node: str) -> None:
    """As root: the job's devices, relay namespace and filters, whatever of
    them exists (its processes must be gone: the epilog stops them first)."""
    n = names(job_id)
    if system_tool("ip") is None:
        return  # no iproute2: no job network was ever built here
    ns = relay_netns(job_id, node)
    if os.path.exists(os.path.join(NETNS_DIR, ns)):
        _ip("netns", "del", ns, check=False)
    links = _links()
    for dev in (n.tap, n.veth, n.vxlan, n.bridge):
        if dev in links:
            _ip("link", "del", dev, check=False)
    if system_tool("nft") and _nft(f"list table inet {n.table}\n", check=False):
        _nft(f"delete table inet {n.table}\n")
    links = _links()
    left = [d for d in (n.tap, n.veth, n.vxlan, n.bridge) if d in links]
    if os.path.exists(os.path.join(NETNS_DIR, ns)):
        left.append(ns)
    if left:
        raise NodeFault("job network", "devices could not be removed", " ".join(left))


def jobs_with_devices(node: str) -> set[str]:
    """Job ids that have a device, relay namespace or filter table of a job
    network on this node (for reconcile)."""
    devs = _links() if system_tool("ip") else {}
    found = {m.group(1) for d in devs if (m := _NAME.match(d))}
    prefix = relay_netns("0", node)[:-1]
    try:
        found |= {f[len(prefix):] for f in os.listdir(NETNS_DIR)
                  if f.startswith(prefix) and f[len(prefix):].isdigit()}
    except OSError:
        pass
    tables: list[str] = []
    if system_tool("nft"):  # no nft here: no job network either
        p = run([_need("nft"), "list", "tables"], timeout=30, check=False)
        if p.returncode == 0:
            tables = p.stdout.decode(errors="replace").split()
    found |= {t[len("charlie_j"):] for t in tables
              if t.startswith("charlie_j") and t[len("charlie_j"):].isdigit()}
    return found
