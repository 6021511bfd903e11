"""Plain data the forwarder works on: what one Service asks of this node, after validation.

Built from Kubernetes objects by lbctl.forwarder.desired; rendered to nftables by
lbctl.forwarder.render; read by lbctl.forwarder.ownership for the VIPs to announce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TCP = "tcp"
UDP = "udp"
PROTOCOLS = (TCP, UDP)  # nft spelling; SCTP is not carried (see desired.py)
IPV4, IPV6 = 4, 6


def family_of(address: str) -> int:
    """4 or 6 for an address or CIDR in its canonical text (desired.py normalizes them)."""
    return IPV6 if ":" in address else IPV4


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint address and port a service port may be sent to."""

    ip: str
    port: int
    node: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of spec.ports with its chosen backends (sorted; empty: traffic is dropped)."""

    name: str
    protocol: str  # "tcp" or "udp"
    port: int
    node_port: int | None
    backends: tuple[Backend, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceState:
    """Everything this node does for one Service.

    `families` are the Service's IP families (spec.ipFamilies: 4, 6 or both); its LB addresses,
    endpoints and source ranges are of those families only, and traffic of each family goes to
    endpoints of the same family. `source_ranges` None means everyone may reach the LB addresses;
    a tuple (possibly empty) means only those CIDRs may (a family with no range in it: nobody).
    `endpoint_nodes` are the nodes with a ready endpoint of any port (ETP=Local VIP eligibility);
    `local_endpoints` counts this node's ready endpoint addresses of the family with more of them
    (the health-check answer; a dual-stack pod counts once).
    """

    key: str  # namespace/name
    uid: str
    created: str  # metadata.creationTimestamp: the older Service wins a clash of addresses
    ports: tuple[ServicePort, ...]
    lb_ips: tuple[str, ...] = ()
    local_only: bool = False  # externalTrafficPolicy: Local
    source_ranges: tuple[str, ...] | None = None
    affinity_timeout: int | None = None  # sessionAffinity ClientIP, seconds
    health_check_node_port: int | None = None
    announce: bool = False  # the local provider's VIPs: some node must answer ARP for them
    endpoint_nodes: frozenset[str] = frozenset()
    local_endpoints: int = 0
    families: tuple[int, ...] = (IPV4,)

    @property
    def masquerade(self) -> bool:
        return not self.local_only


@dataclass(frozen=True)
class Problem:
    """Something wrong with an object; the forwarder logs it (and skips the offending part)."""

    service: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.service}: {self.field}: {self.message}"
