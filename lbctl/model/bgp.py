"""BGP configuration as plain data, and which nodes announce a Service (pure).

- `parse_peer`: a BGPPeer object → `BGPPeer` (with the sessions the forwarders report in its
  status.nodes); `parse_advertisement`: a pool's spec.advertisement → `Advertisement`. Both raise
  `BgpConfigError` naming the field at fault and the fix. The CRDs' OpenAPI + CEL rules reject
  the same input at the apiserver; parsing again here covers objects written before the CRD was
  upgraded and keeps every reader (operator, forwarder, lbctl doctor) on one interpretation.
- What CEL cannot see, because it spans objects: `check_aggregation` (an aggregation shorter than
  the pool's own CIDRs would draw traffic for addresses outside it), `conflicting_peers` (two
  peers with one address for the same nodes), `advertisement_problem` (a bgp pool no peer takes).
- `announcing_nodes`: the nodes whose routers carry a Service's address (the contract in
  the project notes: lbctl.io/bgp-announcing-nodes).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from lbctl.model.selectors import EVERYTHING, LabelSelector, SelectorError, parse_selector

STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established")
ESTABLISHED = "Established"
DEFAULT_PORT = 179
DEFAULT_HOLD_S = 90
MAX_ASN = 2**32 - 1
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_STANDARD = re.compile(r"^(\d{1,5}):(\d{1,5})$")
_LARGE = re.compile(r"^large:(\d{1,10}):(\d{1,10}):(\d{1,10})$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BgpConfigError(ValueError):
    """Bad BGP configuration: `field` is the path at fault, `fix` what to do."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}" + (f"; fix: {fix}" if fix else ""))


class Mode(StrEnum):
    L2 = "l2"
    BGP = "bgp"
    BOTH = "both"


# ---- the pool's advertisement ------------------------------------------------------------------

@dataclass(frozen=True)
class Community:
    """A standard community (two 16-bit numbers) or a large one (three 32-bit numbers)."""

    values: tuple[int, ...]

    @property
    def large(self) -> bool:
        return len(self.values) == 3

    def __str__(self) -> str:
        text = ":".join(str(v) for v in self.values)
        return f"large:{text}" if self.large else text


def parse_community(text: str) -> Community:
    """ "A:B" (each 0..65535) or "large:A:B:C" (each 0..4294967295); ValueError otherwise."""
    if isinstance(text, str):
        if (m := _STANDARD.match(text)) is not None:
            values = tuple(int(v) for v in m.groups())
            if all(v <= 0xFFFF for v in values):
                return Community(values)
        elif (m := _LARGE.match(text)) is not None:
            values = tuple(int(v) for v in m.groups())
            if all(v <= MAX_ASN for v in values):
                return Community(values)
    raise ValueError(f"{text!r} is not a standard community A:B (each 0..65535) or a large one large:A:B:C "
                     "(each 0..4294967295)")


@dataclass(frozen=True)
class Advertisement:
    mode: Mode = Mode.L2
    communities: tuple[Community, ...] = ()
    local_pref: int | None = None
    aggregation_length: int = 32
    aggregation_length_v6: int = 128
    node_selector: LabelSelector = EVERYTHING
    peer_selector: LabelSelector = EVERYTHING

    @property
    def l2(self) -> bool:
        return self.mode in (Mode.L2, Mode.BOTH)

    @property
    def bgp(self) -> bool:
        return self.mode in (Mode.BGP, Mode.BOTH)

    def length_for(self, version: int) -> int:
        return self.aggregation_length if version == 4 else self.aggregation_length_v6


L2_ONLY = Advertisement()


def _int(value: Any, where: str, low: int, high: int, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BgpConfigError(where, f"{value!r} is not a whole number in {low}..{high}",
                             f"set {where.rsplit('.', 1)[-1]} to a number from {low} to {high}")
    return value


def _selector(value: Any, where: str) -> LabelSelector:
    try:
        return parse_selector(value, where)
    except SelectorError as exc:
        raise BgpConfigError(exc.field, exc.problem, "write it as a Kubernetes label selector") from None


def parse_advertisement(value: Any, where: str = "spec.advertisement") -> Advertisement:
    """A pool's spec.advertisement (absent: l2, as every pool before BGP)."""
    if value is None:
        return L2_ONLY
    if not isinstance(value, Mapping):
        raise BgpConfigError(where, "must be an object with mode and bgp")
    mode_text = value.get("mode") or "l2"
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise BgpConfigError(f"{where}.mode", f"{mode_text!r} is not l2, bgp or both",
                             "set mode to l2, bgp or both") from None
    bgp = value.get("bgp") or {}
    at = f"{where}.bgp"
    if not isinstance(bgp, Mapping):
        raise BgpConfigError(at, "must be an object")
    texts = bgp.get("communities") or []
    if not isinstance(texts, list):
        raise BgpConfigError(f"{at}.communities", "must be a list of strings")
    communities: list[Community] = []
    for i, text in enumerate(texts):
        try:
            community = parse_community(text)
        except ValueError as exc:
            raise BgpConfigError(f"{at}.communities[{i}]", str(exc), "write it like 64512:100 or large:64512:1:2") \
                from None
        if community in communities:
            raise BgpConfigError(f"{at}.communities[{i}]", f"{text!r} is listed twice", "list it once")
        communities.append(community)
    return Advertisement(
        mode=mode,
        communities=tuple(communities),
        local_pref=_int(bgp.get("localPref"), f"{at}.localPref", 0, MAX_ASN, None),
        aggregation_length=_int(bgp.get("aggregationLength"), f"{at}.aggregationLength", 0, 32, 32) or 0,
        aggregation_length_v6=_int(bgp.get("aggregationLengthV6"), f"{at}.aggregationLengthV6", 0, 128, 128) or 0,
        node_selector=_selector(bgp.get("nodeSelector"), f"{at}.nodeSelector"),
        peer_selector=_selector(bgp.get("peerSelector"), f"{at}.peerSelector"),
    )


def check_aggregation(advertisement: Advertisement, ranges: Iterable[tuple[int, int, int]],
                      where: str = "spec.advertisement.bgp") -> None:
    """BgpConfigError when an aggregation length is shorter than one of the pool's own blocks.
    `ranges`: (IP version, first, last) as integers. The route for an address is its
    aggregate (address/length); shorter than the pool's block, it would claim addresses outside
    the pool (MetalLB refuses the same)."""
    if not advertisement.bgp:
        return
    for version, first, last in ranges:
        length = advertisement.length_for(version)
        name = "aggregationLength" if version == 4 else "aggregationLengthV6"
        if version == 4:
            blocks = [(b.prefixlen, str(b.network_address)) for b in ipaddress.summarize_address_range(
                ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))]
        else:
            blocks = [(b.prefixlen, str(b.network_address)) for b in ipaddress.summarize_address_range(
                ipaddress.IPv6Address(first), ipaddress.IPv6Address(last))]
        prefix, network = min(blocks)
        if length < prefix:
            raise BgpConfigError(
                f"{where}.{name}", f"{length} is shorter than the pool's block {network}/{prefix}: the route "
                f"{network}/{length} would draw traffic for addresses outside the pool",
                f"set {name} to {prefix} or more")


# ---- peers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    """One node's session with a peer, as its forwarder reports it in status.nodes."""

    node: str
    state: str
    since: str = ""
    routes_announced: int = 0
    message: str = ""

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "password"


@dataclass(frozen=True)
class BGPPeer:
    name: str
    peer_address: IPAddress
    peer_asn: int
    my_asn: int
    peer_port: int = DEFAULT_PORT
    hold_time_s: int = DEFAULT_HOLD_S
    keepalive_time_s: int = DEFAULT_HOLD_S // 3
    node_selector: LabelSelector = EVERYTHING
    password: SecretRef | None = None
    ebgp_multihop: bool = False
    source_address: IPAddress | None = None
    graceful_restart: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    sessions: tuple[Session, ...] = ()
    created: str = ""  # metadata.creationTimestamp: the older of two conflicting peers is kept

    @property
    def ibgp(self) -> bool:
        return self.peer_asn == self.my_asn

    def session(self, node: str) -> Session | None:
        return next((s for s in self.sessions if s.node == node), None)

    @cached_property
    def established(self) -> frozenset[str]:
        """The nodes whose session with this peer is Established."""
        return frozenset(s.node for s in self.sessions if s.established)

    def established_on(self, node: str) -> bool:
        return node in self.established


def parse_duration(text: Any, where: str) -> int:
    """Whole seconds of a duration written like 90s, 1m30s or 1h."""
    m = _DURATION.match(text) if isinstance(text, str) and text else None
    if m is None:
        raise BgpConfigError(where, f"{text!r} is not a duration like 90s or 1m30s", "write it like 90s")
    hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


def _address(value: Any, where: str) -> IPAddress:
    try:
        if not isinstance(value, str) or "%" in value or "/" in value:
            raise ValueError
        return ipaddress.ip_address(value)
    except ValueError:
        raise BgpConfigError(where, f"{value!r} is not an IPv4 or IPv6 address",
                             "write an address like 192.168.1.1 or fd00::1") from None


def _bool(spec: Mapping[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BgpConfigError(f"spec.{key}", f"{value!r} is not true or false", f"set {key} to true or false")
    return value


def _sessions(status: Any) -> tuple[Session, ...]:
    """What the forwarders report; an entry that does not parse is skipped (it counts as not
    Established), never an error: the spec is the user's, the status is ours."""
    nodes = status.get("nodes") if isinstance(status, Mapping) else None
    found = []
    for entry in nodes if isinstance(nodes, list) else ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("node"), str):
            continue
        routes = entry.get("routesAnnounced")
        found.append(Session(node=entry["node"], state=str(entry.get("state") or "Idle"),
                             since=str(entry.get("since") or ""),
                             routes_announced=routes if isinstance(routes, int) and not isinstance(routes, bool) else 0,
                             message=str(entry.get("message") or "")))
    return tuple(sorted(found, key=lambda s: s.node))


def parse_peer(obj: Mapping[str, Any]) -> BGPPeer:
    """A BGPPeer object; BgpConfigError names the field at fault."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise BgpConfigError("metadata.name", "a peer needs a name")
    assert isinstance(meta, Mapping)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise BgpConfigError("spec", "a peer needs a spec with peerAddress, peerASN and myASN")
    for required in ("peerAddress", "peerASN", "myASN"):
        if spec.get(required) is None:
            raise BgpConfigError(f"spec.{required}", "is required", f"set spec.{required}")
    hold = parse_duration(spec.get("holdTime") or f"{DEFAULT_HOLD_S}s", "spec.holdTime")
    if hold != 0 and not 3 <= hold <= 65535:
        raise BgpConfigError("spec.holdTime", f"{hold}s is neither 0s nor in 3s..65535s",
                             "set holdTime to 0s or between 3s and 65535s (90s is usual)")
    keepalive_text = spec.get("keepaliveTime")
    keepalive = hold // 3 if keepalive_text is None else parse_duration(keepalive_text, "spec.keepaliveTime")
    if (hold == 0 and keepalive != 0) or (hold != 0 and keepalive >= hold):
        raise BgpConfigError("spec.keepaliveTime", f"{keepalive}s is not shorter than holdTime {hold}s",
                             "leave keepaliveTime out (holdTime/3) or make it shorter than holdTime")
    secret = spec.get("passwordSecretRef")
    password = None
    if secret is not None:
        if not isinstance(secret, Mapping) or not isinstance(secret.get("name"), str) or not secret.get("name"):
            raise BgpConfigError("spec.passwordSecretRef.name", "a Secret name is required",
                                 "name a Secret in lbctl-system")
        password = SecretRef(secret["name"], str(secret.get("key") or "password"))
    source = spec.get("sourceAddress")
    labels = meta.get("labels")
    return BGPPeer(
        name=name,
        peer_address=_address(spec.get("peerAddress"), "spec.peerAddress"),
        peer_asn=_int(spec.get("peerASN"), "spec.peerASN", 1, MAX_ASN, None) or 0,
        my_asn=_int(spec.get("myASN"), "spec.myASN", 1, MAX_ASN, None) or 0,
        peer_port=_int(spec.get("peerPort"), "spec.peerPort", 1, 65535, DEFAULT_PORT) or DEFAULT_PORT,
        hold_time_s=hold,
        keepalive_time_s=keepalive,
        node_selector=_selector(spec.get("nodeSelector"), "spec.nodeSelector"),
        password=password,
        ebgp_multihop=_bool(spec, "ebgpMultiHop"),
        source_address=None if source is None else _address(source, "spec.sourceAddress"),
        graceful_restart=_bool(spec, "gracefulRestart"),
        labels=dict(labels) if isinstance(labels, Mapping) else {},
        sessions=_sessions(obj.get("status")),
        created=str(meta.get("creationTimestamp") or ""),
    )


@dataclass(frozen=True)
class PeerConflict:
    rejected: BGPPeer
    kept: BGPPeer

    @property
    def message(self) -> str:
        return (f"spec.peerAddress: {self.rejected.peer_address} port {self.rejected.peer_port} is peer "
                f"{self.kept.name}'s too, for the same nodes; fix: delete one of them, or give them node "
                f"selectors that choose different nodes (peer {self.kept.name}, the older, is used)")


def conflicting_peers(peers: Iterable[BGPPeer]) -> list[PeerConflict]:
    """Two peers with one address and port whose node selectors may choose the same node (one of
    them selects every node, or both select alike): a node cannot hold two sessions to one
    router. The older peer (then the first by name) is kept."""
    ordered = sorted(peers, key=lambda p: (p.created, p.name))
    kept: list[BGPPeer] = []
    conflicts = []
    for peer in ordered:
        clash = next((k for k in kept if k.peer_address == peer.peer_address and k.peer_port == peer.peer_port
                      and (k.node_selector == peer.node_selector or EVERYTHING in (k.node_selector,
                                                                                   peer.node_selector))), None)
        if clash is None:
            kept.append(peer)
        else:
            conflicts.append(PeerConflict(peer, clash))
    return conflicts


# ---- which nodes announce ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    eligible: bool = True


def selected_peers(advertisement: Advertisement, peers: Iterable[BGPPeer]) -> list[BGPPeer]:
    return [p for p in peers if advertisement.peer_selector.matches(p.labels)]


def candidate_nodes(advertisement: Advertisement, nodes: Iterable[NodeInfo],
                    peers: Iterable[BGPPeer]) -> tuple[str, ...]:
    """The nodes that announce a pool's addresses (before externalTrafficPolicy), sorted: eligible,
    chosen by the advertisement's nodeSelector, and with at least one Established session with a
    peer that the advertisement selects (its peerSelector) and that selects the node (the peer's
    nodeSelector). Empty when the mode is l2."""
    if not advertisement.bgp:
        return ()
    chosen = selected_peers(advertisement, peers)
    found = []
    for node in nodes:
        if not node.eligible or not advertisement.node_selector.matches(node.labels):
            continue
        if any(node.name in p.established and p.node_selector.matches(node.labels) for p in chosen):
            found.append(node.name)
    return tuple(sorted(found))


def announcing_nodes(advertisement: Advertisement, local_traffic: bool, ready_nodes: Collection[str],
                     nodes: Iterable[NodeInfo], peers: Iterable[BGPPeer],
                     candidates: Sequence[str] | None = None) -> tuple[str, ...]:
    """The nodes announcing a Service's address by BGP, sorted: the pool's `candidate_nodes`
    once the Service has a ready endpoint somewhere (`ready_nodes`: the nodes of its ready
    endpoints, "" for one on no named node) — a route with no endpoint behind it would only draw
    traffic to drop, as MetalLB and the speaker (lbctl.forwarder.bgp_decide) hold — and with
    externalTrafficPolicy Local (`local_traffic`) only the nodes with a ready local endpoint.
    `candidates`: candidate_nodes already computed for the pool (one per pass, not per Service)."""
    if not ready_nodes:
        return ()
    if candidates is None:
        candidates = candidate_nodes(advertisement, nodes, peers)
    return tuple(n for n in candidates if not local_traffic or n in ready_nodes)


def format_nodes(names: Sequence[str]) -> str:
    """The annotation's value: sorted, comma-separated."""
    return ",".join(sorted(names))


# ---- a pool's BGP condition -----------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    reason: str
    message: str  # names the field and says the fix


def advertisement_problem(advertisement: Advertisement, peers: Sequence[BGPPeer] | None) -> Problem | None:
    """What keeps a bgp pool from being announced, from the peers (None: BGPPeers are not served,
    their CRD is missing); None when nothing does, or the pool is l2 only."""
    if not advertisement.bgp:
        return None
    if peers is None:
        return Problem("NoBGPPeers", "spec.advertisement.mode is bgp/both but this cluster has no BGPPeer resource; "
                       "fix: install its CRD (kubectl apply -f examples/deploy/crd-bgppeer.yaml) and create a "
                       "BGPPeer")
    chosen = selected_peers(advertisement, peers)
    if not chosen:
        where = ("spec.advertisement.bgp.peerSelector matches none of the "
                 f"{len(peers)} BGPPeer(s)") if advertisement.peer_selector != EVERYTHING else \
            "spec.advertisement.mode is bgp/both but there is no valid BGPPeer"
        return Problem("NoMatchingPeer", f"{where}; fix: create a BGPPeer (examples/services/14-bgp.yaml) or change "
                       "the pool's peerSelector to match a peer's labels")
    if advertisement.local_pref is not None and not any(p.ibgp for p in chosen):
        return Problem("LocalPrefIgnored", "spec.advertisement.bgp.localPref is sent to iBGP peers only and every "
                       "selected peer is eBGP (peerASN differs from myASN); fix: remove localPref, or select an "
                       "iBGP peer")
    return None
