"""`lbctl status`: what the cluster records about lbctl's Services, as rows (one per Service) or
as the full story of one Service (pure: plain API objects in, plain data out)."""

from __future__ import annotations

import bisect
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lbctl.model.status import current_condition
from lbctl.report import facts
from providers.local_pools import Pool, PoolError, parse_pool


@dataclass(frozen=True)
class Row:
    namespace: str
    name: str
    lb_class: str
    provider: str
    addresses: tuple[str, ...]
    balancer: str  # the pool (local) or the cloud balancer's name
    served_by: str  # the L2 owner node, or the cloud's DNS name / forwarding rule
    state: str  # ready | pending | failed
    age: str
    reason: str  # "" when ready; else the problem in plain words
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "addresses": list(self.addresses)}


def parse_pools(objects: Iterable[Mapping[str, Any]]) -> list[Pool]:
    pools = []
    for obj in objects:
        try:
            pools.append(parse_pool(obj))
        except PoolError:
            continue  # an invalid pool holds no address; `lbctl doctor` reports it
    return pools


class PoolIndex:
    """Which pool holds an address: ranges sorted by start, found by bisection (status lists
    thousands of addresses; a pool-by-pool scan with ipaddress objects took most of its time)."""

    def __init__(self, pools: Iterable[Pool]) -> None:
        spans = sorted((r.version, r.first, r.last, p.name, p.avoid_buggy_ips) for p in pools for r in p.ranges)
        self._starts = [(version, first) for version, first, *_ in spans]
        self._spans = spans

    @staticmethod
    def _number(address: str) -> tuple[int, int] | None:
        try:
            if ":" in address:
                return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        except OSError:
            return None

    def pool_of(self, address: str) -> str | None:
        found = self._number(address)
        if found is None:
            return None
        version, n = found
        i = bisect.bisect_right(self._starts, (version, n))
        while i > 0:  # ranges of different pools never overlap, but a later start may end earlier
            i -= 1
            span_version, first, last, name, avoid_buggy = self._spans[i]
            if span_version != version:
                return None
            if first <= n <= last:
                return None if avoid_buggy and version == 4 and n & 255 in (0, 255) else name
        return None


def _balancer(service: Mapping[str, Any], provider: str, pools: PoolIndex) -> str:
    if provider == "local":
        names = sorted({p for p in (pools.pool_of(a) for a in facts.addresses(service)) if p})
        return ",".join(names) or "-"
    if not facts.meta(service).get("uid"):
        return "-"
    return facts.balancer_name(service)


def bgp_nodes(service: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The nodes announcing the Service by BGP (the operator's annotation); None when it is not
    advertised by BGP."""
    value = facts.annotations_of(service).get(facts.BGP_ANNOUNCING_NODES)
    if value is None:
        return None
    return tuple(n for n in str(value).split(",") if n)


def _served_by(service: Mapping[str, Any], provider: str) -> str:
    if provider == "local":
        node = facts.annotations_of(service).get(facts.ANNOUNCING_NODE)
        bgp = bgp_nodes(service)
        parts = [f"{node} (L2)"] if node else []
        if bgp is not None:
            parts.append(f"{','.join(bgp) or 'none'} (BGP)")
        return "; ".join(parts) or "-"
    hostnames = [str(i["hostname"]) for i in facts.ingress_of(service) if i.get("hostname")]
    if hostnames:
        return ",".join(hostnames)
    if provider == "gce" and facts.ingress_of(service):
        return f"forwarding rule {facts.balancer_name(service)}"
    return "-"


def _last_warning(events: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((e for e in reversed(events) if e.get("type") == "Warning"), None)


def row(service: Mapping[str, Any], pools: PoolIndex, events: Sequence[Mapping[str, Any]], now: float) -> Row:
    m = facts.meta(service)
    provider = facts.provider_of(service)
    state = facts.service_state(service)
    reason, fix = "", ""
    if state.state != facts.READY:
        reason, fix = state.problem, state.fix
        warning = _last_warning(events)
        if not reason and warning is not None:
            reason, fix = facts.split_fix(str(warning.get("message") or ""))
        reason = reason or state.reason
    created = facts.parse_time(m.get("creationTimestamp"))
    return Row(
        namespace=str(m.get("namespace") or ""), name=str(m.get("name") or ""),
        lb_class=facts.lb_class(service) or "", provider=provider,
        addresses=tuple(facts.addresses(service)), balancer=_balancer(service, provider, pools),
        served_by=_served_by(service, provider), state=state.state,
        age=facts.age(None if created is None else now - created), reason=reason, fix=fix,
    )


def rows(services: Iterable[Mapping[str, Any]], pools: Iterable[Mapping[str, Any]],
         events: Iterable[Mapping[str, Any]], now: float, classes: Iterable[str] = ()) -> list[Row]:
    """One row per lbctl Service, by namespace and name."""
    parsed = PoolIndex(parse_pools(pools))
    by_object = facts.events_by_object(events)
    extra = tuple(classes)
    ours = [s for s in services if facts.is_lbctls(s, extra)]
    ours.sort(key=lambda s: (facts.meta(s).get("namespace", ""), facts.meta(s).get("name", "")))
    return [row(s, parsed, by_object.get(facts.key_of(s), ()), now) for s in ours]


# -- one Service: the full story ------------------------------------------------------------------

@dataclass(frozen=True)
class NodeView:
    node: str
    forwarder: str  # "live (renewed 3s ago)", "stale (…)", "none"
    announcing: bool
    ready_endpoints: int  # ready endpoints of this Service on the node
    healthz: str = ""  # what the forwarder's /healthz said, when asked (--probe)
    programmed: bool | None = None  # from /healthz: are the Service's rules in the kernel?
    health_check: str = ""  # externalTrafficPolicy Local: what its healthCheckNodePort answers there
    bgp: bool = False  # announces the Service's address to its BGP peers
    # from /healthz (--probe): what the forwarder itself saw of the Service
    seen_endpoints: int | None = None  # ready endpoints it balances to (cluster-wide)
    local_endpoints: int | None = None  # of them on this node (what its health check counts)
    problems: tuple[str, ...] = ()  # what it had to leave out of the Service's rules


@dataclass(frozen=True)
class Detail:
    row: Row
    spec: dict[str, Any]
    condition: dict[str, Any] | None
    nodes: list[NodeView] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.row.to_dict(), "spec": self.spec, "condition": self.condition,
                "nodes": [asdict(n) for n in self.nodes], "events": self.events}


_RELEVANT_ANNOTATION_PREFIXES = ("lbctl.io/", "metallb.io/", "service.beta.kubernetes.io/aws-load-balancer-",
                                 "networking.gke.io/", "cloud.google.com/")


def relevant_spec(service: Mapping[str, Any]) -> dict[str, Any]:
    spec = service.get("spec") or {}
    ports = [f"{p.get('port')}/{p.get('protocol', 'TCP')}" + (f"→{p['nodePort']}" if p.get("nodePort") else "")
             for p in spec.get("ports") or ()]
    found: dict[str, Any] = {
        "ports": ports,
        "externalTrafficPolicy": spec.get("externalTrafficPolicy", "Cluster"),
        "ipFamilies": list(spec.get("ipFamilies") or ()),
        "ipFamilyPolicy": spec.get("ipFamilyPolicy", "SingleStack"),
    }
    for name in ("loadBalancerIP", "loadBalancerSourceRanges", "healthCheckNodePort",
                 "allocateLoadBalancerNodePorts", "sessionAffinity"):
        if spec.get(name) not in (None, [], "None"):
            found[name] = spec[name]
    notes = {k: v for k, v in facts.annotations_of(service).items() if k.startswith(_RELEVANT_ANNOTATION_PREFIXES)}
    if notes:
        found["annotations"] = dict(sorted(notes.items()))
    return found


def ready_endpoints_by_node(slices: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.get("endpoints") or ():
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            node = str(endpoint.get("nodeName") or "?")
            counts[node] = counts.get(node, 0) + 1
    return counts


def health_check(local_endpoints: int) -> str:
    """What a node's healthCheckNodePort answers (kube-proxy's contract, which the forwarder keeps)."""
    return f"200 ({local_endpoints} local)" if local_endpoints else "503 (no local endpoint)"


def _forwarder(lease: Mapping[str, Any] | None, now: float) -> str:
    view = facts.lease_view(lease, now)
    if view is None:
        return "none (no Lease lbctl-system/lbctl-forwarder-<node>)"
    ago = "never" if view.renewed_age_s is None else f"{facts.age(view.renewed_age_s)} ago"
    return f"{'live' if view.fresh else 'stale'} (renewed {ago})"


@dataclass(frozen=True)
class Probe:
    """One node's /healthz answer about one Service (empty when not asked)."""

    healthz: str = ""  # the forwarder's state, or why it did not answer
    programmed: bool | None = None
    seen_endpoints: int | None = None
    local_endpoints: int | None = None
    problems: tuple[str, ...] = ()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_probe(body: Mapping[str, Any] | str | None, key: str) -> Probe:
    if body is None:
        return Probe()
    if isinstance(body, str):
        return Probe(body)
    service = (body.get("services") or {}).get(key)
    state = str(body.get("state") or "?")
    if not isinstance(service, Mapping):
        return Probe(state)
    if service.get("known") is False:
        state += " (does not know the Service)"
    programmed = service.get("programmed")
    problems = service.get("problems")
    return Probe(state, programmed if isinstance(programmed, bool) else None, _count(service.get("readyEndpoints")),
                 _count(service.get("localEndpoints")),
                 tuple(str(p) for p in problems) if isinstance(problems, list) else ())


def detail(service: Mapping[str, Any], pools: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]],
           nodes: Iterable[Mapping[str, Any]], leases: Iterable[Mapping[str, Any]],
           slices: Iterable[Mapping[str, Any]], now: float,
           probes: Mapping[str, Mapping[str, Any] | str] | None = None, max_events: int = 10) -> Detail:
    """Everything about one Service. `probes`: node → its forwarder's /healthz body (or why none)."""
    key = facts.key_of(service)
    own_events = facts.events_by_object(events).get(key, [])
    the_row = row(service, PoolIndex(parse_pools(pools)), own_events, now)
    by_node = facts.forwarder_leases(leases)
    endpoints = ready_endpoints_by_node(slices)
    announcing = facts.annotations_of(service).get(facts.ANNOUNCING_NODE)
    by_bgp = set(bgp_nodes(service) or ())
    spec = service.get("spec") or {}
    local_only = spec.get("externalTrafficPolicy") == "Local" and bool(spec.get("healthCheckNodePort"))
    views = []
    if the_row.provider == "local":
        for node in sorted(str(facts.meta(n).get("name")) for n in nodes):
            probe = parse_probe((probes or {}).get(node), key)
            ready = endpoints.get(node, 0)
            # the health check answers from the forwarder's own count when it was asked, else from the slices
            local = probe.local_endpoints if probe.local_endpoints is not None else ready
            views.append(NodeView(node, _forwarder(by_node.get(node), now), node == announcing, ready, probe.healthz,
                                  probe.programmed, health_check(local) if local_only else "", node in by_bgp,
                                  probe.seen_endpoints, probe.local_endpoints, probe.problems))
    listed = [{
        "age": facts.age(now - facts.event_time(e)), "type": str(e.get("type") or ""),
        "reason": str(e.get("reason") or ""), "count": int(e.get("count") or 1),
        "message": str(e.get("message") or e.get("note") or ""),
    } for e in own_events[-max_events:]]
    condition = current_condition(service)
    return Detail(the_row, relevant_spec(service), dict(condition) if condition else None, views, listed)
