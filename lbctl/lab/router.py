"""A top-of-rack router for the lab: FRR's zebra and bgpd in a router namespace on the lab's LAN,
with a client network behind it.

    client (198.19.250.2/24, 2001:db8:2::2/64) ── router (.1, ::1 | LAN .2, LAN6 ::2) ── LAN bridge ── nodes

The nodes' sessions are IPv4; they carry IPv6 unicast too (MP-BGP, next hop the node's IPv6 address).

bgpd accepts sessions from any node of the LAN (`bgp listen range`, one peer group), installs up
to 8 equal paths per prefix (`maximum-paths`, multipath over the nodes) into the router's kernel
through zebra; the router hashes flows on addresses and ports (fib_multipath_hash_policy=1).

FRR runs with its own pathspace (-N) and every file in a directory of its own, so several labs
(and a host FRR, if any) do not meet; both daemons are lab processes, stopped with the lab.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import utils

from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, LabError

FRR_DIR = Path("/usr/lib/frr")
CLIENT_NET = "198.19.250"  # the network behind the router (not routed anywhere but inside the lab)
CLIENT_NET6 = "2001:db8:2:"  # its IPv6 twin, 2001:db8:2::/64
ROUTER_HOST = 2  # the router's host number on the LAN
_DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"


def frr_missing() -> str | None:
    for name in ("zebra", "bgpd"):
        if not (FRR_DIR / name).exists():
            return f"{FRR_DIR / name} not found (apt-get install frr; `bash .ci/setup` does it)"
    if shutil.which("vtysh") is None:
        return "vtysh not found (apt-get install frr; `bash .ci/setup` does it)"
    return None


def bgpd_config(asn: int, router_id: str, lan_cidr: str, node_asn: int, hold_s: int = 3,
                password: str | None = None) -> str:
    keepalive = max(hold_s // 3, 1)
    lines = [
        "frr defaults datacenter",
        "hostname lab-router",
        f"router bgp {asn}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp default ipv4-unicast",
        " bgp bestpath as-path multipath-relax",
        " neighbor NODES peer-group",
        f" neighbor NODES remote-as {node_asn}",
        f" neighbor NODES timers {keepalive} {hold_s}",
        " neighbor NODES timers connect 1",
    ]
    if password:
        lines.append(f" neighbor NODES password {password}")
    lines += [
        f" bgp listen range {lan_cidr} peer-group NODES",
        " address-family ipv4 unicast",
        "  neighbor NODES activate",
        "  maximum-paths 8",
        " exit-address-family",
        " address-family ipv6 unicast",
        "  neighbor NODES activate",
        "  maximum-paths 8",
        " exit-address-family",
        "exit",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Router:
    lab: Lab
    namespace: str
    client: str
    workdir: Path
    asn: int

    @property
    def lan_address(self) -> str:
        return self.lab.lan_address(ROUTER_HOST)

    @property
    def client_address(self) -> str:
        return f"{CLIENT_NET}.2"

    @property
    def client_address6(self) -> str:
        return f"{CLIENT_NET6}:2"

    def vtysh(self, command: str) -> str:
        return self.lab.run_in(self.namespace, "vtysh", "--vty_socket", str(self.workdir), "-c", command).stdout

    def bgp_json(self, command: str) -> dict[str, Any]:
        out = self.vtysh(command)
        try:
            value = json.loads(out or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def established(self) -> set[str]:
        """The neighbors with an Established session."""
        summary = self.bgp_json("show bgp ipv4 unicast summary json")
        peers = (summary.get("peers") or {}) if isinstance(summary, dict) else {}
        return {address for address, p in peers.items() if p.get("state") == "Established"}

    def next_hops(self, prefix: str) -> set[str]:
        """The next hops bgpd has for `prefix` (every path, best and multipath; for IPv6 the
        global next hops)."""
        afi = "ipv6" if ":" in prefix else "ipv4"
        route = self.bgp_json(f"show bgp {afi} unicast {prefix} json")
        hops = set()
        for path in route.get("paths") or ():
            for hop in path.get("nexthops") or ():
                if hop.get("ip") and hop.get("scope", "global") == "global":
                    hops.add(hop["ip"])
        return hops

    def kernel_next_hops(self, address: str) -> set[str]:
        """The next hops of the kernel route to `address` in the router (what zebra installed)."""
        six = ":" in address
        out = self.lab.run_in(self.namespace, "ip", "-j", "-6" if six else "-4", "route", "show",
                              f"{address}/{128 if six else 32}", check=False).stdout
        hops = set()
        for route in json.loads(out or "[]"):
            if route.get("gateway"):
                hops.add(route["gateway"])
            for hop in route.get("nexthops") or ():
                if hop.get("gateway"):
                    hops.add(hop["gateway"])
        return hops

    def route_attributes(self, prefix: str) -> list[dict[str, Any]]:
        route = self.bgp_json(f"show bgp {'ipv6' if ':' in prefix else 'ipv4'} unicast {prefix} json")
        return list(route.get("paths") or ())


def start_router(lab: Lab, asn: int = 64500, node_asn: int = 64512, hold_s: int = 3,
                 password: str | None = None) -> Router:
    """The router namespace (on the LAN), its client namespace, and zebra + bgpd in it; nodes get a
    route to the client network through the router. Everything goes with `lab.close()`."""
    problem = frr_missing()
    if problem:
        raise LabError(problem)
    router = lab.add_namespace("router")
    lab.attach(router, "rt", lab.lan_address(ROUTER_HOST), lab.lan6_address(ROUTER_HOST))
    client = lab.add_namespace("bgpclient")
    lab.run_in(router, "ip", "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", client)
    lab.run_in(router, "ip", "addr", "add", f"{CLIENT_NET}.1/24", "dev", "c0")
    lab.run_in(router, "ip", "link", "set", "c0", "up")
    lab.run_in(client, "ip", "addr", "add", f"{CLIENT_NET}.2/24", "dev", "eth0")
    lab.run_in(client, "ip", "link", "set", "eth0", "up")
    lab.run_in(client, "ip", "route", "add", "default", "via", f"{CLIENT_NET}.1")
    lab.run_in(router, "ip", "addr", "add", f"{CLIENT_NET6}:1/64", "dev", "c0", "nodad")
    lab.run_in(client, "ip", "addr", "add", f"{CLIENT_NET6}:2/64", "dev", "eth0", "nodad")
    lab.run_in(client, "ip", "-6", "route", "add", "default", "via", f"{CLIENT_NET6}:1")
    lab.sysctl(router, "net.ipv4.ip_forward", "1")
    lab.sysctl(router, "net.ipv6.conf.all.forwarding", "1")
    lab.sysctl(router, "net.ipv4.fib_multipath_hash_policy", "1")  # L4: flows spread by ports too
    lab.sysctl(router, "net.ipv6.fib_multipath_hash_policy", "1")
    for index, node in lab.nodes.items():
        lab.run_in(node, "ip", "route", "replace", f"{CLIENT_NET}.0/24", "via", lab.lan_address(ROUTER_HOST))
        lab.on_close(f"route to {CLIENT_NET}.0/24 in node-{index}", functools.partial(
            lab.run_in, node, "ip", "route", "del", f"{CLIENT_NET}.0/24", check=False))
        lab.run_in(node, "ip", "-6", "route", "replace", f"{CLIENT_NET6}:/64", "via", lab.lan6_address(ROUTER_HOST))
        lab.on_close(f"route to {CLIENT_NET6}:/64 in node-{index}", functools.partial(
            lab.run_in, node, "ip", "-6", "route", "del", f"{CLIENT_NET6}:/64", check=False))

    # FRR drops to the frr user: its directory must be reachable by it (the lab's log directory is not)
    workdir = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-frr-"))
    lab.on_close(f"FRR directory {workdir}", functools.partial(shutil.rmtree, workdir, ignore_errors=True))
    workdir.chmod(0o755)
    shutil.chown(workdir, "frr", "frr")
    router_id = lab.lan_address(ROUTER_HOST)
    lan_cidr = f"{lab.lan}.0/24"
    (workdir / "zebra.conf").write_text("hostname lab-router\n")
    (workdir / "bgpd.conf").write_text(bgpd_config(asn, router_id, lan_cidr, node_asn, hold_s, password))
    for name in ("zebra.conf", "bgpd.conf"):
        shutil.chown(workdir / name, "frr", "frr")
    common = ["-N", lab.prefix, "--vty_socket", str(workdir), "-z", str(workdir / "zserv.api")]
    lab.start(router, [str(FRR_DIR / "zebra"), *common, "-f", str(workdir / "zebra.conf"),
                       "-i", str(workdir / "zebra.pid"), "--log", "stdout"], "frr-zebra.log")
    wait_for(lambda: (workdir / "zserv.api").exists(), 20, "zebra's socket")
    lab.start(router, [str(FRR_DIR / "bgpd"), *common, "-f", str(workdir / "bgpd.conf"),
                       "-i", str(workdir / "bgpd.pid"), "--log", "stdout", "-l", router_id],
              "frr-bgpd.log")
    result = Router(lab, router, client, workdir, asn)

    def answers() -> bool:
        proc = lab.run_in(router, "vtysh", "--vty_socket", str(workdir), "-c", "show bgp ipv4 unicast summary json",
                          check=False)
        return proc.returncode == 0 and proc.stdout.strip().startswith("{")
    wait_for(answers, 20, "bgpd answering vtysh")
    return result


BIRD_HOST = 3  # a second router, BIRD, on the LAN


def bird_config(router_id: str, asn: int, neighbors: dict[str, str], node_asn: int, hold_s: int = 3) -> str:
    """BIRD 2: one passive BGP protocol per node (name → address), IPv4 routes in, nothing out."""
    lines = [f"router id {router_id};", "protocol device {}"]
    for name, address in sorted(neighbors.items()):
        lines += [
            f"protocol bgp {name} {{",
            f"  local as {asn};",
            f"  neighbor {address} as {node_asn};",
            "  passive on;",
            f"  hold time {hold_s};",
            "  ipv4 { import all; export none; };",
            "  ipv6 { import all; export none; };",
            "}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Bird:
    lab: Lab
    namespace: str
    socket: Path
    asn: int
    process: subprocess.Popen[bytes]

    @property
    def lan_address(self) -> str:
        return self.lab.lan_address(BIRD_HOST)

    def birdc(self, command: str) -> str:
        return self.lab.run_in(self.namespace, "birdc", "-s", str(self.socket), command, check=False).stdout

    def established(self) -> set[str]:
        """The node protocols (names) whose session is Established."""
        return {line.split()[0] for line in self.birdc("show protocols").splitlines()
                if " BGP " in f" {line} " and "Established" in line}

    def next_hops(self, prefix: str) -> set[str]:
        """The gateways of every route BIRD has for `prefix` ("via A on eth0" lines)."""
        out = self.birdc(f"show route {prefix} all")
        return {m.group(1) for m in re.finditer(r"via (\S+) on ", out)}


def start_bird(lab: Lab, asn: int = 64501, node_asn: int = 64512, hold_s: int = 3) -> Bird:
    """A second router namespace on the LAN running BIRD 2 with a passive session per node; it goes
    with `lab.close()` (a lab process)."""
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        raise LabError("bird not found (apt-get install bird2; `bash .ci/setup` does it)")
    namespace = lab.add_namespace("bird")
    lab.attach(namespace, "bd", lab.lan_address(BIRD_HOST))
    workdir = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-bird-"))
    lab.on_close(f"BIRD directory {workdir}", functools.partial(shutil.rmtree, workdir, ignore_errors=True))
    neighbors = {f"node{index}": lab.node_address(index) for index in lab.nodes}
    (workdir / "bird.conf").write_text(bird_config(lab.lan_address(BIRD_HOST), asn, neighbors, node_asn, hold_s))
    socket = workdir / "bird.ctl"
    process = lab.start(namespace, ["bird", "-f", "-c", str(workdir / "bird.conf"), "-s", str(socket),
                                    "-P", str(workdir / "bird.pid")], "bird.log")
    result = Bird(lab, namespace, socket, asn, process)
    wait_for(lambda: "BIRD" in result.birdc("show status"), 20, "BIRD answering birdc")
    return result


def install_bgp_api(kube: LabKube) -> None:
    """The BGPPeer CRD (examples/deploy/crd-bgppeer.yaml); the forwarder's RBAC for it comes with
    `LabKube.install_forwarder_rbac`, the pool CRD's advertisement with `install_pool_crd`."""
    try:
        utils.create_from_dict(kube.api, yaml.safe_load((_DEPLOY / "crd-bgppeer.yaml").read_text()))
    except utils.FailToCreateError as exc:
        if any(getattr(e, "status", None) != 409 for e in exc.api_exceptions):
            raise

    def established() -> bool:
        crd: Any = kube.api.sanitize_for_serialization(
            kube.extensions.read_custom_resource_definition("bgppeers.lbctl.io"))
        return any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in (crd.get("status") or {}).get("conditions") or ())
    wait_for(established, 30, "the BGPPeer CRD")
