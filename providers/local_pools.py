"""Address pools and the address allocator of the local provider (MetalLB semantics), pure: no I/O.

The local provider's adapter (providers/local.py) feeds this module plain data and writes back
what it returns. API:

Pools
    ``parse_pool(obj) -> Pool`` reads one ``LoadBalancerPool`` object (``lbctl.io/v1alpha1``,
    cluster-scoped) and raises ``PoolError`` (``.field`` and ``.problem``, ``str()`` is
    ``"spec.addresses[2]: '10.0.0.300' is not an address, CIDR or a-b range"``)::

        spec:
          addresses: ["192.168.10.0/24", "192.168.20.10-192.168.20.20", "fc00::/120", "10.0.0.7"]
          autoAssign: true        # false: only for Services that ask for the pool or one of its addresses
          avoidBuggyIPs: false    # true: never hand out IPv4 addresses ending in .0 or .255
          priority: 0             # 1 is tried before 2 …; 0 (the default) means "no priority": last
          namespaces: [team-a]    # optional: only Services in these namespaces
          serviceSelector:        # optional: only Services whose labels match (Kubernetes LabelSelector)
            matchLabels: {tier: web}
            matchExpressions: [{key: env, operator: In, values: [prod]}]

    ``overlapping_pools(pools) -> list[PoolOverlap(rejected, kept, message)]``: pools are taken
    oldest first (``metadata.creationTimestamp``, then name); a pool whose addresses overlap an
    already taken pool is rejected, so creating a new pool never takes addresses away from Services
    already using an older one. The operator reports ``message`` on the rejected pool and can tell
    the kept one who collided with it. ``Allocator.set_pools`` applies the same rule by itself.

Services
    ``request_from_spec(spec, labels=..., created=...) -> ServiceRequest`` (or ``service_request(...)``
    from plain values) resolves the annotations
    (``lbctl.io/…`` first, the ``metallb.io/…`` names read too so users can migrate; both set and
    different is an error naming both): ``lbctl.io/load-balancer-ips`` (comma-separated, one per
    family; ``metallb.io/loadBalancerIPs``), ``lbctl.io/address-pool`` (``metallb.io/address-pool``),
    ``lbctl.io/allow-shared-ip`` (``metallb.io/allow-shared-ip``). ``requested_ips`` is the part that
    reconciles ``spec.loadBalancerIP`` with the IP annotations. The Service's labels (which
    ``spec.serviceSelector`` matches) and creationTimestamp (RFC 3339 text, orders ``restore``) come
    from the spec unless passed.

Allocator (one per provider; every method is synchronous and does no I/O)
    ``set_pools(pools) -> set[str]``: the keys ("ns/name") to ensure again: Services whose
    addresses are no longer in a pool that admits them (their addresses are released at once), and
    Services whose last ``assign`` failed that a new or changed pool may serve (``may_serve``: a
    pool that changed nothing they need, or that only other Services may use, leaves them waiting).
    ``restore(requests) -> set[str]``: at start-up, before any ``assign``: re-takes each Service's
    ``current_ips`` (its status) oldest first; returns the keys that could not keep them.
    ``assign(request) -> tuple[IPv4Address | IPv6Address, ...]`` (primary family first), raising
    ``InvalidServiceError`` / ``PendingError`` with the field and fix. On error nothing changes: a
    Service keeps what it held until a new assignment succeeds or it is released.
    ``release(key)``; ``allocation(key) -> Allocation(pool, ips) | None``; ``holders(ip)``;
    ``pool_stats() -> {pool: PoolUsage(assigned, free)}`` (exact ints, huge for IPv6);
    ``waiting() -> frozenset[str]`` (keys whose last assign failed, e.g. to nudge after a release).

Assignment rules, in order
    1. Keep what the Service has (its allocation here, or else its status) while it is still valid:
       right families, all in one pool that exists and admits the Service, equal to the requested
       addresses / in the requested pool when those are set, and sharing rules still hold.
       PreferDualStack with one address gets the other family added from the same pool if it can.
    2. Requested addresses: each must lie in a pool (not a .0/.255 of an avoidBuggyIPs pool), all in
       the same pool, which admits the Service (autoAssign does not matter) and is the requested pool
       if one is named; an address held by another Service is shared only as below.
    3. Requested pool: must exist and admit the Service; lowest free address per family.
    4. Otherwise the pools with autoAssign that admit the Service, in preference order: priority
       1, 2, … first, then priority 0 (unset); at equal priority pools restricted by namespaces or
       serviceSelector before open ones (MetalLB tries pools pinned to the Service first), then by
       name. Single family: the first pool with a free address of that family. Two families: the
       first pool with both; PreferDualStack falls back to the first pool with the primary family,
       then the secondary; RequireDualStack does not. Addresses come lowest free first.
    A pool admits a Service when its namespaces (if any) contain the Service's and its
    serviceSelector (if any) matches the Service's labels.

Families: SingleStack wants ``ip_families[0]``; PreferDualStack and RequireDualStack want every family
in ``ip_families`` (the apiserver lists both only in a dual-stack cluster, as MetalLB follows the
ClusterIPs); RequireDualStack with one family listed is an error.

Sharing: two Services hold one address only when both carry the same non-empty sharing key, their
(protocol, port) sets are disjoint, and, when either has externalTrafficPolicy Local, both are Local
with identical selectors. A Service with a sharing key that is auto-assigned or assigned from a pool
joins the lowest address already shared under its key in that pool that it fits on, before taking a
free one (MetalLB takes whichever is lower, which can split a group after a release; joining is what
the key asks for).

Errors (lbctl.model.errors; `field` is where the value came from, e.g. the metallb.io annotation):
    InvalidServiceError: malformed or disagreeing addresses/annotations; a requested address in no
    pool, in pools that differ, outside the named pool, of the wrong family, or in a pool that does
    not admit the Service; an unknown or overlap-rejected pool name; a named pool without the
    Service's family or not admitting it; a sharing key whose other holders use the same port or,
    with externalTrafficPolicy Local, another selector (field: the sharing annotation).
    PendingError (retry later): a requested address held by a Service that cannot share it (names
    the holders); a named pool with no free address; no autoAssign pool admitting the Service or
    having its families; every admitting pool exhausted. Each carries a ``lbctl.model.waits.Wait``:
    an address freed in those pools (or that address, or its holders released), or a new or
    changed pool, so that the operator wakes the Service only for a change that can serve it.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from lbctl.model.errors import InvalidServiceError, LoadBalancerError, PendingError
from lbctl.model.meta import API_VERSION
from lbctl.model.selectors import LabelSelector, SelectorError, parse_selector
from lbctl.model.waits import Range, Wait, WaitFor, address_range

if TYPE_CHECKING:
    from lbctl.model.types import LoadBalancerSpec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

POOL_API_VERSION = API_VERSION
POOL_KIND = "LoadBalancerPool"

ANNOTATION_IPS = "lbctl.io/load-balancer-ips"
ANNOTATION_POOL = "lbctl.io/address-pool"
ANNOTATION_SHARING = "lbctl.io/allow-shared-ip"
METALLB_ANNOTATION_IPS = "metallb.io/loadBalancerIPs"
METALLB_ANNOTATION_POOL = "metallb.io/address-pool"
METALLB_ANNOTATION_SHARING = "metallb.io/allow-shared-ip"
FIELD_LOAD_BALANCER_IP = "spec.loadBalancerIP"

_FAMILIES = {"IPv4": 4, "IPv6": 6}
_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")


_NOTHING: Mapping[str, str] = MappingProxyType({})


def _nothing() -> Mapping[str, str]:
    # A factory: Python 3.11 dataclasses refuse a mappingproxy as a plain default.
    return _NOTHING


def annotation_field(name: str) -> str:
    return f"metadata.annotations[{name}]"


# ---------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------


class PoolError(ValueError):
    """A LoadBalancerPool that cannot be used; `field` is the pool's field at fault."""

    def __init__(self, field: str, problem: str, *, pool: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.pool = pool
        super().__init__(f"{field}: {problem}")


class AddressRange(NamedTuple):
    """Inclusive integer bounds of one family; `source` is the spec.addresses entry it came from."""

    version: int
    first: int
    last: int
    source: str
    position: int  # index in spec.addresses


@dataclass(frozen=True)
class Pool:
    name: str
    ranges: tuple[AddressRange, ...]
    auto_assign: bool = True
    avoid_buggy_ips: bool = False
    priority: int = 0
    namespaces: frozenset[str] = frozenset()
    service_selector: LabelSelector | None = None
    created: str = ""  # metadata.creationTimestamp; orders overlap resolution

    @property
    def families(self) -> frozenset[int]:
        return frozenset(r.version for r in self.ranges)

    @property
    def restricted(self) -> bool:
        return bool(self.namespaces) or self.service_selector is not None

    def usable_addresses(self, version: int) -> int:
        """How many addresses of this family the pool can hand out (avoidBuggyIPs leaves out .0/.255)."""
        usable = 0
        for r in self.ranges:
            if r.version == version:
                usable += r.last - r.first + 1
                if self.avoid_buggy_ips and version == 4:
                    usable -= _buggy_up_to(r.last) - _buggy_up_to(r.first - 1)
        return usable

    def contains(self, ip: IPAddress) -> bool:
        """True when `ip` is one of the pool's usable addresses."""
        n = int(ip)
        if self.avoid_buggy_ips and ip.version == 4 and n & 255 in (0, 255):
            return False
        return any(r.version == ip.version and r.first <= n <= r.last for r in self.ranges)

    def admits(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.namespaces and namespace not in self.namespaces:
            return False
        return self.service_selector is None or self.service_selector.matches(labels)

    def describe_admission(self) -> str:
        parts = []
        if self.namespaces:
            parts.append(f"namespaces {', '.join(sorted(self.namespaces))}")
        if self.service_selector is not None:
            parts.append("Services matching its spec.serviceSelector")
        return " and ".join(parts) or "every Service"

    def describe_addresses(self) -> str:
        return ", ".join(dict.fromkeys(r.source for r in self.ranges))


def _parse_address(text: str) -> IPAddress:
    if "%" in text:  # a zone index names a link, not an address anyone can route to
        raise ValueError(text)
    return ipaddress.ip_address(text.strip())


def parse_address_range(text: str) -> tuple[int, int, int]:
    """(version, first, last) of a CIDR, an "a-b" range or a single address; ValueError otherwise.

    CIDRs with host bits set are taken as their network, as MetalLB does."""
    text = text.strip()
    if "%" in text:
        raise ValueError(f"{text!r} is not an address, CIDR or a-b range")
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            return net.version, int(net.network_address), int(net.broadcast_address)
        if "-" in text:
            start_text, end_text = text.split("-", 1)
            start, end = _parse_address(start_text), _parse_address(end_text)
        else:
            start = end = _parse_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an address, CIDR or a-b range") from None
    if start.version != end.version:
        raise ValueError(f"{text!r} mixes IPv{start.version} and IPv{end.version}")
    if int(start) > int(end):
        raise ValueError(f"{text!r} starts after it ends")
    return start.version, int(start), int(end)


# Addresses a VIP can never be: a link-local one exists on every link (and neighbour discovery of
# the node's own uses it), a multicast one is a group, not a host; and the unspecified and
# loopback addresses.
_UNUSABLE = tuple((net.version, int(net.network_address), int(net.broadcast_address), what) for net, what in (
    (ipaddress.ip_network("0.0.0.0/32"), "the unspecified address 0.0.0.0"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback 127.0.0.0/8"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local 169.254.0.0/16"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast 224.0.0.0/4"),
    (ipaddress.ip_network("::/128"), "the unspecified address ::"),
    (ipaddress.ip_network("::1/128"), "loopback ::1"),
    (ipaddress.ip_network("fe80::/10"), "link-local fe80::/10"),
    (ipaddress.ip_network("ff00::/8"), "multicast ff00::/8"),
))


def _unusable_overlap(version: int, first: int, last: int) -> str | None:
    """What reserved block the range overlaps, or None."""
    for block_version, block_first, block_last, what in _UNUSABLE:
        if version == block_version and first <= block_last and block_first <= last:
            return what
    return None


def _parse_bool(spec: Mapping[str, Any], key: str, default: bool, name: str) -> bool:
    value = spec.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PoolError(f"spec.{key}", f"{value!r} is not true or false", pool=name)
    return value


def _parse_selector(value: Any, name: str) -> LabelSelector:
    try:
        return parse_selector(value, "spec.serviceSelector")
    except SelectorError as exc:
        raise PoolError(exc.field, exc.problem, pool=name) from None


def parse_pool(obj: Mapping[str, Any]) -> Pool:
    """A Pool from a LoadBalancerPool object; PoolError names the field at fault."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise PoolError("metadata.name", "a pool needs a name")
    api_version = obj.get("apiVersion")
    if api_version is not None and api_version != POOL_API_VERSION:
        raise PoolError("apiVersion", f"{api_version!r} is not {POOL_API_VERSION}", pool=name)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PoolError("spec", "a pool needs a spec with addresses", pool=name)

    addresses = spec.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise PoolError("spec.addresses", "a pool needs at least one CIDR, a-b range or address", pool=name)
    ranges: list[AddressRange] = []
    for i, entry in enumerate(addresses):
        if not isinstance(entry, str):
            raise PoolError(f"spec.addresses[{i}]", f"{entry!r} is not an address, CIDR or a-b range", pool=name)
        try:
            version, first, last = parse_address_range(entry)
        except ValueError as exc:
            raise PoolError(f"spec.addresses[{i}]", str(exc), pool=name) from None
        unusable = _unusable_overlap(version, first, last)
        if unusable:
            raise PoolError(f"spec.addresses[{i}]", f"{entry.strip()!r} overlaps {unusable}: no load-balancer "
                            "address can be one; give unicast addresses routable on the LAN", pool=name)
        ranges.append(AddressRange(version, first, last, entry.strip(), i))
    ranges.sort()
    for before, after in pairwise(ranges):
        if before.version == after.version and after.first <= before.last:
            later, earlier = sorted((before, after), key=lambda r: r.position, reverse=True)
            raise PoolError(
                f"spec.addresses[{later.position}]",
                f"{later.source!r} overlaps spec.addresses[{earlier.position}] ({earlier.source!r})",
                pool=name,
            )

    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise PoolError("spec.priority", f"{priority!r} is not a whole number ≥ 0 (1 is preferred, 0 means none)",
                        pool=name)

    namespaces = spec.get("namespaces") or []
    if not isinstance(namespaces, list) or not all(isinstance(n, str) and n for n in namespaces):
        raise PoolError("spec.namespaces", "must be a list of namespace names", pool=name)
    if len(set(namespaces)) != len(namespaces):
        raise PoolError("spec.namespaces", "lists a namespace twice", pool=name)

    selector = spec.get("serviceSelector")
    created = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    return Pool(
        name=name,
        ranges=tuple(ranges),
        auto_assign=_parse_bool(spec, "autoAssign", True, name),
        avoid_buggy_ips=_parse_bool(spec, "avoidBuggyIPs", False, name),
        priority=priority,
        namespaces=frozenset(namespaces),
        service_selector=None if selector is None else _parse_selector(selector, name),
        created=str(created or ""),
    )


class PoolOverlap(NamedTuple):
    rejected: Pool
    kept: Pool
    message: str  # "spec.addresses[..]: …", about the rejected pool


def overlapping_pools(pools: Iterable[Pool]) -> list[PoolOverlap]:
    """Pools rejected for overlapping an older one (creationTimestamp, then name, decides)."""
    kept: list[Pool] = []
    overlaps = []
    for pool in sorted(pools, key=lambda p: (p.created, p.name)):
        clash = next(
            (
                (mine, theirs, other)
                for other in kept
                for mine in pool.ranges
                for theirs in other.ranges
                if mine.version == theirs.version and mine.first <= theirs.last and theirs.first <= mine.last
            ),
            None,
        )
        if clash is None:
            kept.append(pool)
            continue
        mine, theirs, other = clash
        message = (
            f"spec.addresses[{mine.position}]: {mine.source!r} overlaps {theirs.source!r} of pool {other.name!r}, "
            "which is older; this pool is not used until the overlap is removed"
        )
        overlaps.append(PoolOverlap(pool, other, message))
    return overlaps


# ---------------------------------------------------------------------------------------------
# Service requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRequest:
    """What the allocator needs from one Service. `*_field` name where a value came from, for errors."""

    key: str  # "ns/name"
    namespace: str
    labels: Mapping[str, str] = field(default_factory=_nothing)
    ports: frozenset[tuple[str, int]] = frozenset()  # (protocol, port)
    requested_ips: tuple[IPAddress, ...] = ()
    requested_ips_field: str = FIELD_LOAD_BALANCER_IP
    pool: str | None = None
    pool_field: str = annotation_field(ANNOTATION_POOL)
    sharing_key: str | None = None
    sharing_key_field: str = annotation_field(ANNOTATION_SHARING)
    external_traffic_policy: str = "Cluster"
    selector: Mapping[str, str] = field(default_factory=_nothing)
    ip_families: tuple[str, ...] = ("IPv4",)
    ip_family_policy: str = "SingleStack"
    current_ips: tuple[IPAddress, ...] = ()  # from status.loadBalancer.ingress
    created: str = ""  # metadata.creationTimestamp; orders restore

    @property
    def backend_key(self) -> str:
        """Sharing with externalTrafficPolicy Local needs the same backends (MetalLB's rule)."""
        if self.external_traffic_policy != "Local":
            return ""
        return "Local:" + ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))


class RequestedIPs(NamedTuple):
    addresses: tuple[IPAddress, ...]
    field: str  # the field or annotation they came from


def _annotation(annotations: Mapping[str, str], ours: str, metallb: str) -> tuple[str | None, str]:
    """The value of our annotation or MetalLB's, with the field it came from; both set must agree."""
    mine = (annotations.get(ours) or "").strip()
    theirs = (annotations.get(metallb) or "").strip()
    if mine and theirs and mine != theirs:
        raise InvalidServiceError(
            f"{mine!r} disagrees with {annotation_field(metallb)} ({theirs!r})",
            field=annotation_field(ours),
            fix=f"remove {annotation_field(metallb)} or give it the same value",
        )
    if mine:
        return mine, annotation_field(ours)
    if theirs:
        return theirs, annotation_field(metallb)
    return None, annotation_field(ours)


def _parse_ip_list(text: str, where: str) -> tuple[IPAddress, ...]:
    addresses: list[IPAddress] = []
    for item in text.split(","):
        try:
            addresses.append(_parse_address(item))
        except ValueError:
            raise InvalidServiceError(
                f"{item.strip()!r} is not an IP address",
                field=where,
                fix="give IPv4 or IPv6 addresses separated by commas, at most one per family",
            ) from None
    families = [a.version for a in addresses]
    if len(set(families)) != len(families):
        raise InvalidServiceError(
            f"{text!r} has more than one IPv{families[0]} address",
            field=where,
            fix="give at most one IPv4 and one IPv6 address",
        )
    return tuple(addresses)


def requested_ips(load_balancer_ip: str | None, annotations: Mapping[str, str]) -> RequestedIPs:
    """The addresses a Service asks for: spec.loadBalancerIP and/or the IP annotations, which must agree."""
    ann_ips_text = (annotations.get(ANNOTATION_IPS) or "").strip()
    metallb_text = (annotations.get(METALLB_ANNOTATION_IPS) or "").strip()
    ours = _parse_ip_list(ann_ips_text, annotation_field(ANNOTATION_IPS)) if ann_ips_text else ()
    theirs = _parse_ip_list(metallb_text, annotation_field(METALLB_ANNOTATION_IPS)) if metallb_text else ()
    if ours and theirs and set(ours) != set(theirs):
        raise InvalidServiceError(
            f"{ann_ips_text!r} disagrees with {annotation_field(METALLB_ANNOTATION_IPS)} ({metallb_text!r})",
            field=annotation_field(ANNOTATION_IPS),
            fix=f"remove {annotation_field(METALLB_ANNOTATION_IPS)} or give it the same addresses",
        )
    from_annotation = RequestedIPs(ours, annotation_field(ANNOTATION_IPS)) if ours else (
        RequestedIPs(theirs, annotation_field(METALLB_ANNOTATION_IPS))
    )
    text = (load_balancer_ip or "").strip()
    if not text:
        return from_annotation if from_annotation.addresses else RequestedIPs((), FIELD_LOAD_BALANCER_IP)
    try:
        single = _parse_address(text)
    except ValueError:
        raise InvalidServiceError(
            f"{text!r} is not an IP address", field=FIELD_LOAD_BALANCER_IP,
            fix="set an IPv4 or IPv6 address from an address pool, or remove the field",
        ) from None
    if not from_annotation.addresses:
        return RequestedIPs((single,), FIELD_LOAD_BALANCER_IP)
    if single not in from_annotation.addresses:
        raise InvalidServiceError(
            f"{text!r} disagrees with {from_annotation.field} "
            f"({', '.join(map(str, from_annotation.addresses))!r})",
            field=FIELD_LOAD_BALANCER_IP,
            fix=f"remove spec.loadBalancerIP (it is deprecated) and keep {from_annotation.field}",
        )
    return from_annotation


def service_request(
    *,
    key: str,
    namespace: str,
    labels: Mapping[str, str] = _NOTHING,
    annotations: Mapping[str, str] = _NOTHING,
    load_balancer_ip: str | None = None,
    ports: Iterable[tuple[str, int]] = (),
    external_traffic_policy: str = "Cluster",
    selector: Mapping[str, str] = _NOTHING,
    ip_families: Sequence[str] = ("IPv4",),
    ip_family_policy: str = "SingleStack",
    ingress_ips: Iterable[str | None] = (),
    created: str = "",
) -> ServiceRequest:
    """The allocator's view of a Service from plain values; InvalidServiceError for malformed annotations.

    `ingress_ips` are the ip fields of status.loadBalancer.ingress (hostnames and garbage are skipped)."""
    wanted = requested_ips(load_balancer_ip, annotations)
    pool, pool_field = _annotation(annotations, ANNOTATION_POOL, METALLB_ANNOTATION_POOL)
    sharing, sharing_field = _annotation(annotations, ANNOTATION_SHARING, METALLB_ANNOTATION_SHARING)
    current: list[IPAddress] = []
    for text in ingress_ips:
        try:
            current.append(_parse_address(text or ""))
        except ValueError:
            continue  # not an address we could have handed out
    return ServiceRequest(
        key=key,
        namespace=namespace,
        labels=labels,
        ports=frozenset((protocol.upper(), port) for protocol, port in ports),
        requested_ips=wanted.addresses,
        requested_ips_field=wanted.field,
        pool=pool,
        pool_field=pool_field,
        sharing_key=sharing,
        sharing_key_field=sharing_field,
        external_traffic_policy=external_traffic_policy,
        selector=selector,
        ip_families=tuple(ip_families),
        ip_family_policy=ip_family_policy,
        current_ips=tuple(current),
        created=created,
    )


def request_from_spec(
    spec: LoadBalancerSpec, *, labels: Mapping[str, str] | None = None, created: str | None = None
) -> ServiceRequest:
    """`service_request` for a LoadBalancerSpec; `labels` and `created` default to the spec's own."""
    return service_request(
        key=spec.service.key,
        namespace=spec.service.namespace,
        labels=spec.labels if labels is None else labels,
        annotations=spec.annotations,
        load_balancer_ip=spec.load_balancer_ip,
        ports=[(p.protocol, p.port) for p in spec.ports],
        external_traffic_policy=spec.external_traffic_policy,
        selector=spec.selector,
        ip_families=spec.ip_families,
        ip_family_policy=spec.ip_family_policy,
        ingress_ips=[i.ip for i in spec.current_ingress],
        created=spec.created if created is None else created,
    )


def wanted_families(ip_families: Sequence[str], policy: str) -> tuple[int, ...]:
    """The address families (4, 6) a Service gets, primary first."""
    if policy not in _POLICIES:
        raise InvalidServiceError(
            f"{policy!r} is not one of {', '.join(_POLICIES)}", field="spec.ipFamilyPolicy",
            fix="use SingleStack, PreferDualStack or RequireDualStack",
        )
    families: list[int] = []
    for i, name in enumerate(ip_families or ("IPv4",)):
        if name not in _FAMILIES:
            raise InvalidServiceError(f"{name!r} is not IPv4 or IPv6", field=f"spec.ipFamilies[{i}]",
                                      fix="use IPv4 or IPv6")
        if _FAMILIES[name] not in families:
            families.append(_FAMILIES[name])
    if policy == "SingleStack":
        return tuple(families[:1])
    if policy == "RequireDualStack" and len(families) < 2:
        raise InvalidServiceError(
            f"RequireDualStack but spec.ipFamilies lists only {_FAMILY_NAMES[families[0]]}",
            field="spec.ipFamilyPolicy",
            fix="use PreferDualStack or SingleStack, or run the Service in a dual-stack cluster",
        )
    return tuple(families)


def check_source_ranges(ranges: Sequence[str], families: Sequence[int]) -> None:
    """A source range of a family the Service has no address of could never match a client; the
    forwarder would drop it and, if it were the only one, admit nobody. Refused instead, naming it,
    as the AWS provider refuses an IPv6 range on an IPv4 NLB."""
    for index, text in enumerate(ranges):
        network = ipaddress.ip_network(text, strict=False)
        if network.version not in families:
            wanted = " and ".join(_FAMILY_NAMES[f] for f in families)
            raise InvalidServiceError(
                f"{network} is an {_FAMILY_NAMES[network.version]} range but the Service gets {wanted} "
                "addresses only", field=f"spec.loadBalancerSourceRanges[{index}]",
                fix=f"remove the {_FAMILY_NAMES[network.version]} ranges, or make the Service dual-stack "
                    "(spec.ipFamilyPolicy: PreferDualStack)",
            )


# ---------------------------------------------------------------------------------------------
# Allocator
# ---------------------------------------------------------------------------------------------


def _buggy_up_to(n: int) -> int:
    """How many of the IPv4 addresses 0..n end in .0 or .255."""
    return 0 if n < 0 else n // 256 + 1 + (n + 1) // 256


def _make_ip(version: int, n: int) -> IPAddress:
    return ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n)


class _FreeSpace:
    """Free addresses of one family of one pool: sorted, disjoint, inclusive intervals.

    With `avoid_buggy`, .0/.255 addresses are never handed out and every interval kept holds at
    least one address that can be, so `lowest` is O(1); take/give are a bisect and a list splice."""

    __slots__ = ("_avoid_buggy", "_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]], avoid_buggy: bool) -> None:
        self._avoid_buggy = avoid_buggy
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in sorted(ranges):
            if self._first_usable(first, last) is not None:
                self._starts.append(first)
                self._ends.append(last)

    def _first_usable(self, lo: int, hi: int) -> int | None:
        if self._avoid_buggy:
            low_octet = lo & 255
            if low_octet == 255:
                lo += 2
            elif low_octet == 0:
                lo += 1
        return lo if lo <= hi else None

    def lowest(self) -> int | None:
        return self._first_usable(self._starts[0], self._ends[0]) if self._starts else None

    def is_free(self, n: int) -> bool:
        i = bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self._ends[i]

    def take(self, n: int) -> None:
        i = bisect_right(self._starts, n) - 1
        if i < 0 or n > self._ends[i]:
            raise ValueError(f"address {n} is not free")
        lo, hi = self._starts[i], self._ends[i]
        pieces = [(a, b) for a, b in ((lo, n - 1), (n + 1, hi)) if self._first_usable(a, b) is not None]
        self._starts[i : i + 1] = [a for a, _ in pieces]
        self._ends[i : i + 1] = [b for _, b in pieces]

    def give(self, n: int) -> None:
        i = bisect_right(self._starts, n) - 1
        if i >= 0 and n <= self._ends[i]:
            raise ValueError(f"address {n} is already free")
        joins_left = i >= 0 and self._ends[i] == n - 1
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == n + 1
        if joins_left and joins_right:
            self._ends[i] = self._ends[i + 1]
            del self._starts[i + 1], self._ends[i + 1]
        elif joins_left:
            self._ends[i] = n
        elif joins_right:
            self._starts[i + 1] = n
        else:
            self._starts.insert(i + 1, n)
            self._ends.insert(i + 1, n)


def may_serve(pool: Pool, request: ServiceRequest) -> bool:
    """Whether `pool` could give `request` its addresses by the allocator's own rules (the pool it
    names, the addresses it asks for, who the pool admits, autoAssign, address families), whatever is
    free in it now: which waiting Services a new or changed pool wakes."""
    if request.pool is not None and request.pool != pool.name:
        return False
    if not pool.admits(request.namespace, request.labels):
        return False
    if request.requested_ips:
        return all(pool.contains(ip) for ip in request.requested_ips)
    if request.pool is None and not pool.auto_assign:
        return False
    try:
        families = wanted_families(request.ip_families, request.ip_family_policy)
    except InvalidServiceError:
        return False  # only a change of the Service can help it
    if request.ip_family_policy == "PreferDualStack":
        return any(f in pool.families for f in families)
    return set(families) <= pool.families


def _address_in(states: Iterable[_PoolState]) -> Wait:
    """What a Service waits for when these pools are full: an address freed in any of them."""
    states = list(states)
    ranges: tuple[Range, ...] = tuple((r.version, r.first, r.last) for s in states for r in s.pool.ranges)
    return Wait(WaitFor.ADDRESS, pools=tuple(s.pool.name for s in states), ranges=ranges)


class _PoolState:
    __slots__ = ("free", "pool", "usable", "used")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.used = 0
        self.free: dict[int, _FreeSpace] = {}
        self.usable = 0
        for version in sorted(pool.families):
            spans = [(r.first, r.last) for r in pool.ranges if r.version == version]
            avoid = pool.avoid_buggy_ips and version == 4
            self.free[version] = _FreeSpace(spans, avoid)
            for first, last in spans:
                self.usable += last - first + 1
                if avoid:
                    self.usable -= _buggy_up_to(last) - _buggy_up_to(first - 1)


@dataclass
class _AddressUse:
    pool: str | None  # None while set_pools re-homes it
    sharing_key: str | None
    backend_key: str
    services: dict[str, frozenset[tuple[str, int]]] = field(default_factory=dict)  # key -> ports


@dataclass(frozen=True)
class Allocation:
    pool: str
    ips: tuple[IPAddress, ...]  # primary family first


class PoolUsage(NamedTuple):
    assigned: int  # addresses in use (a shared address counts once)
    free: int


@dataclass(frozen=True)
class _Holding:
    request: ServiceRequest
    allocation: Allocation


def _family_order(ips: Iterable[IPAddress], families: Sequence[int]) -> tuple[IPAddress, ...]:
    return tuple(sorted(ips, key=lambda ip: families.index(ip.version)))


def _preference(state: _PoolState) -> tuple[bool, int, bool, str]:
    pool = state.pool
    return (pool.priority == 0, pool.priority, not pool.restricted, pool.name)


class Allocator:
    """Pools and who holds which address; see the module docstring for the rules."""

    def __init__(self, pools: Iterable[Pool] = ()) -> None:
        self._pools: dict[str, _PoolState] = {}
        self._order: list[_PoolState] = []  # auto-assign preference
        self._rejected: dict[str, str] = {}  # pool name -> why it is not used
        self._holdings: dict[str, _Holding] = {}
        self._uses: dict[IPAddress, _AddressUse] = {}
        self._shared: dict[str, set[IPAddress]] = {}  # sharing key -> addresses shared under it
        self._waiting: dict[str, ServiceRequest] = {}  # whose last assign failed, as it asked
        self.set_pools(pools)

    # -- pools ---------------------------------------------------------------------------------

    def set_pools(self, pools: Iterable[Pool]) -> set[str]:
        pools = list(pools)
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise PoolError("metadata.name", "two pools have the same name")
        overlaps = overlapping_pools(pools)
        self._rejected = {o.rejected.name: o.message for o in overlaps}
        old = self._pools
        self._pools = {}
        for pool in pools:
            if pool.name in self._rejected:
                continue
            previous = old.get(pool.name)
            self._pools[pool.name] = previous if previous is not None and previous.pool == pool else _PoolState(pool)
        self._order = sorted(self._pools.values(), key=_preference)
        kept = {name for name, state in self._pools.items() if old.get(name) is state}

        # Addresses of changed or removed pools move to whichever pool now holds them, if any.
        for ip, use in self._uses.items():
            if use.pool in kept:
                continue
            state = self._state_containing(ip)
            use.pool = None if state is None else state.pool.name
            if state is not None:
                state.free[ip.version].take(int(ip))
                state.used += 1

        displaced = set()
        for key, holding in list(self._holdings.items()):
            if holding.allocation.pool in kept:
                continue
            homes = {self._uses[ip].pool for ip in holding.allocation.ips}
            home = homes.pop() if len(homes) == 1 else None
            request = holding.request
            if (
                home is None
                or not self._pools[home].pool.admits(request.namespace, request.labels)
                or (request.pool is not None and request.pool != home)
            ):
                self._drop(key)
                displaced.add(key)
            else:
                self._holdings[key] = _Holding(request, Allocation(home, holding.allocation.ips))
        changed = [state.pool for name, state in self._pools.items() if name not in kept]
        woken = {key for key, request in self._waiting.items() if any(may_serve(p, request) for p in changed)}
        return displaced | woken

    def pool_stats(self) -> dict[str, PoolUsage]:
        return {name: PoolUsage(s.used, s.usable - s.used) for name, s in sorted(self._pools.items())}

    def family_usage(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(pool, IP version) → (usable addresses, assigned); a shared address counts once."""
        assigned: Counter[tuple[str, int]] = Counter(
            (use.pool, ip.version) for ip, use in self._uses.items() if use.pool is not None)
        usage: dict[tuple[str, int], tuple[int, int]] = {}
        for name, state in self._pools.items():
            for version in state.free:
                usage[(name, version)] = (state.pool.usable_addresses(version), assigned[(name, version)])
        return usage

    # -- services ------------------------------------------------------------------------------

    def assign(self, request: ServiceRequest) -> tuple[IPAddress, ...]:
        try:
            ips, state = self._choose(request)
        except LoadBalancerError:
            self._waiting[request.key] = request
            raise
        self._commit(request, state, ips)
        self._waiting.pop(request.key, None)
        return ips

    def restore(self, requests: Iterable[ServiceRequest]) -> set[str]:
        lost = set()
        for request in sorted(requests, key=lambda r: (r.created, r.key)):
            if not request.current_ips or request.key in self._holdings:
                continue
            try:
                families = wanted_families(request.ip_families, request.ip_family_policy)
            except InvalidServiceError:
                lost.add(request.key)
                continue
            kept = self._keep(request, request.current_ips, families, extend=False)
            if kept is None:
                lost.add(request.key)
            else:
                self._commit(request, kept[1], kept[0])
        return lost

    def release(self, key: str) -> None:
        self._drop(key)
        self._waiting.pop(key, None)

    def allocation(self, key: str) -> Allocation | None:
        holding = self._holdings.get(key)
        return None if holding is None else holding.allocation

    def holders(self, ip: str | IPAddress) -> tuple[str, ...]:
        use = self._uses.get(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)
        return () if use is None else tuple(sorted(use.services))

    def waiting(self) -> frozenset[str]:
        return frozenset(self._waiting)

    # -- decisions -----------------------------------------------------------------------------

    def _choose(self, request: ServiceRequest) -> tuple[tuple[IPAddress, ...], _PoolState]:
        families = wanted_families(request.ip_families, request.ip_family_policy)
        if request.pool is not None and request.pool not in self._pools:
            why = self._rejected.get(request.pool)
            raise InvalidServiceError(
                f"pool {request.pool!r} is not usable: {why}" if why else f"there is no pool {request.pool!r}",
                field=request.pool_field,
                fix=f"name one of the pools ({', '.join(sorted(self._pools)) or 'none defined'}) or remove it",
            )
        holding = self._holdings.get(request.key)
        current = holding.allocation.ips if holding is not None else request.current_ips
        if current:
            kept = self._keep(request, current, families, extend=True)
            if kept is not None:
                return kept
        if request.requested_ips:
            return self._take_requested(request, families)
        if request.pool is not None:
            return self._from_pool(request, self._pools[request.pool], families)
        return self._auto(request, families)

    def _keep(
        self, request: ServiceRequest, ips: tuple[IPAddress, ...], families: tuple[int, ...], *, extend: bool
    ) -> tuple[tuple[IPAddress, ...], _PoolState] | None:
        versions = [ip.version for ip in ips]
        if len(set(versions)) != len(versions) or not set(versions) <= set(families):
            return None
        if request.ip_family_policy != "PreferDualStack" and len(ips) != len(families):
            return None
        if request.requested_ips and set(request.requested_ips) != set(ips):
            return None
        states = {self._state_containing(ip) for ip in ips}
        state = states.pop() if len(states) == 1 else None
        if (
            state is None
            or not state.pool.admits(request.namespace, request.labels)
            or (request.pool is not None and request.pool != state.pool.name)
            or any(self._conflict(ip, request, "") is not None for ip in ips)
        ):
            return None
        if extend and not request.requested_ips and len(ips) < len(families):
            for version in families:
                if version not in versions and version in state.free:
                    extra = self._candidate(state, version, request)
                    if extra is not None:
                        ips = (*ips, extra)
        return _family_order(ips, families), state

    def _take_requested(
        self, request: ServiceRequest, families: tuple[int, ...]
    ) -> tuple[tuple[IPAddress, ...], _PoolState]:
        where = request.requested_ips_field
        ips = request.requested_ips
        wanted = " and ".join(_FAMILY_NAMES[f] for f in families)
        for ip in ips:
            if ip.version not in families:
                raise InvalidServiceError(
                    f"{ip} is IPv{ip.version} but the Service is {wanted} ({request.ip_family_policy})",
                    field=where,
                    fix="request an address of the Service's family, or change spec.ipFamilies/ipFamilyPolicy",
                )
        versions = [ip.version for ip in ips]
        if len(set(versions)) != len(versions):
            raise InvalidServiceError(f"more than one IPv{versions[0]} address requested", field=where,
                                      fix="request at most one address per family")
        if request.ip_family_policy == "RequireDualStack" and len(ips) < len(families):
            raise InvalidServiceError(
                "RequireDualStack needs one IPv4 and one IPv6 address", field=where,
                fix="request an address of each family, or only name a pool",
            )
        states = []
        for ip in ips:
            state = self._state_containing(ip)
            if state is None:
                raise InvalidServiceError(f"{ip} is not in any address pool", field=where,
                                          fix=self._pick_from_hint(ip))
            states.append(state)
        names = sorted({s.pool.name for s in states})
        if len(names) > 1:
            raise InvalidServiceError(
                f"the addresses are in different pools ({', '.join(names)})", field=where,
                fix="request addresses of one pool (a Service's addresses come from one pool)",
            )
        state = states[0]
        if request.pool is not None and request.pool != state.pool.name:
            raise InvalidServiceError(
                f"{', '.join(map(str, ips))} is in pool {state.pool.name!r} but {request.pool_field} "
                f"asks for pool {request.pool!r}",
                field=where,
                fix=f"request an address of pool {request.pool!r}, or remove {request.pool_field}",
            )
        if not state.pool.admits(request.namespace, request.labels):
            raise InvalidServiceError(
                f"pool {state.pool.name!r} holding {ips[0]} is only for {state.pool.describe_admission()}",
                field=where,
                fix="request an address of a pool that serves this Service's namespace and labels",
            )
        for ip in ips:
            conflict = self._conflict(ip, request, where)
            if conflict is not None:
                raise conflict
        return _family_order(ips, families), state

    def _from_pool(
        self, request: ServiceRequest, state: _PoolState, families: tuple[int, ...]
    ) -> tuple[tuple[IPAddress, ...], _PoolState]:
        pool = state.pool
        where = request.pool_field
        if not pool.admits(request.namespace, request.labels):
            raise InvalidServiceError(
                f"pool {pool.name!r} is only for {pool.describe_admission()}", field=where,
                fix="name a pool that serves this Service's namespace and labels, or change the pool",
            )
        offered = [f for f in families if f in pool.families]
        # PreferDualStack takes whichever of its families the pool has; the others need all of them.
        missing = [] if request.ip_family_policy == "PreferDualStack" else [
            f for f in families if f not in pool.families
        ]
        if missing or not offered:
            family = _FAMILY_NAMES[(missing or list(families))[0]]
            raise InvalidServiceError(
                f"pool {pool.name!r} has no {family} addresses", field=where,
                fix=f"name a pool with {family} addresses, or add some to pool {pool.name!r}",
            )
        picks = [ip for ip in (self._candidate(state, f, request) for f in offered) if ip is not None]
        if not picks or (request.ip_family_policy == "RequireDualStack" and len(picks) < len(families)):
            raise PendingError(
                f"pool {pool.name!r} has no free address for this Service", field=where,
                fix=f"delete a Service that uses pool {pool.name!r}, or add addresses to it",
                wait=_address_in([state]),
            )
        return tuple(picks), state

    def _auto(
        self, request: ServiceRequest, families: tuple[int, ...]
    ) -> tuple[tuple[IPAddress, ...], _PoolState]:
        candidates = [
            s for s in self._order if s.pool.auto_assign and s.pool.admits(request.namespace, request.labels)
        ]
        if not candidates:
            raise PendingError(
                "no address pool with autoAssign serves this Service's namespace and labels",
                field=None,
                fix="create a LoadBalancerPool whose namespaces and serviceSelector match this Service, "
                f"or name a pool in {annotation_field(ANNOTATION_POOL)}",
                wait=Wait(WaitFor.POOL),
            )
        fallback: tuple[tuple[IPAddress, ...], _PoolState] | None = None
        fallback_rank = len(families)
        offering = False
        for state in candidates:
            picks = {}
            for version in families:
                if version in state.free:
                    offering = True
                    ip = self._candidate(state, version, request)
                    if ip is not None:
                        picks[version] = ip
            if len(picks) == len(families):
                return tuple(picks[f] for f in families), state
            if request.ip_family_policy == "PreferDualStack" and picks:
                rank = min(families.index(f) for f in picks)  # 0: has the primary family
                if rank < fallback_rank:
                    fallback, fallback_rank = ((picks[families[rank]],), state), rank
        if fallback is not None:
            return fallback
        wanted = " and ".join(_FAMILY_NAMES[f] for f in families)
        names = ", ".join(s.pool.name for s in candidates)
        if not offering or (request.ip_family_policy == "RequireDualStack" and not any(
            set(families) <= set(s.free) for s in candidates
        )):
            raise PendingError(
                f"no address pool that serves this Service has {wanted} addresses (pools: {names})",
                field="spec.ipFamilies",
                fix=f"add {wanted} addresses to a pool that serves this Service",
                wait=Wait(WaitFor.POOL),
            )
        if request.sharing_key:
            # The pools are full, but the Service asked to share: say why sharing did not work.
            # Pending, not invalid: it succeeds once the Service it clashes with goes away.
            for ip in sorted(self._shared.get(request.sharing_key, ()), key=lambda a: (a.version, int(a))):
                conflict = self._conflict(ip, request, request.sharing_key_field)
                if conflict is not None:
                    wait = conflict.wait if isinstance(conflict, PendingError) else None
                    raise PendingError(conflict.problem, field=conflict.field, fix=conflict.fix, wait=wait)
        raise PendingError(
            f"every address pool that serves this Service is exhausted ({names})", field=None,
            fix="delete a Service that holds an address, or add addresses to a pool",
            wait=_address_in(candidates),
        )

    def _candidate(self, state: _PoolState, version: int, request: ServiceRequest) -> IPAddress | None:
        """The address this Service would get from `state`: a shared one under its key, else the lowest free."""
        if request.sharing_key:
            joinable = [
                ip for ip in self._shared.get(request.sharing_key, ())
                if ip.version == version and self._uses[ip].pool == state.pool.name
                and self._conflict(ip, request, "") is None
            ]
            if joinable:
                return min(joinable)
        free = state.free[version].lowest()
        return None if free is None else _make_ip(version, free)

    def _conflict(self, ip: IPAddress, request: ServiceRequest, where: str) -> LoadBalancerError | None:
        """Why `request` cannot hold `ip` next to its other holders, or None when it can."""
        use = self._uses.get(ip)
        others = {k: ports for k, ports in use.services.items() if k != request.key} if use else {}
        if use is None or not others:
            return None
        holders = ", ".join(sorted(others))
        if not request.sharing_key or use.sharing_key != request.sharing_key:
            return PendingError(
                f"{ip} is already used by {holders}", field=where,
                fix=f"request another address, or give both Services the same {annotation_field(ANNOTATION_SHARING)} "
                "key (their ports must differ)",
                wait=Wait(WaitFor.ADDRESS, ranges=(address_range(str(ip)),), holders=tuple(sorted(others))),
            )
        if use.backend_key != request.backend_key:
            return InvalidServiceError(
                f"{ip} is shared under key {request.sharing_key!r} by {holders}, but Services with "
                "externalTrafficPolicy Local share an address only with Local Services of the same selector",
                field=request.sharing_key_field,
                fix="use the same spec.selector and externalTrafficPolicy on both, or a different sharing key",
            )
        for other, ports in sorted(others.items()):
            clash = sorted(request.ports & ports)
            if clash:
                taken = ", ".join(f"{proto}/{port}" for proto, port in clash)
                return InvalidServiceError(
                    f"{ip} is shared under key {request.sharing_key!r}, and {other} already uses {taken} on it",
                    field=request.sharing_key_field,
                    fix="give the Services sharing an address different ports, or use a different sharing key",
                )
        return None

    def _pick_from_hint(self, ip: IPAddress) -> str:
        for state in self._pools.values():
            if any(r.version == ip.version and r.first <= int(ip) <= r.last for r in state.pool.ranges):
                return f"pool {state.pool.name!r} has avoidBuggyIPs set, so it never hands out .0 or .255 addresses"
        pools = "; ".join(f"{s.pool.name}: {s.pool.describe_addresses()}" for s in self._order)
        return f"request an address inside a pool ({pools or 'no pools are defined'})"

    def _state_containing(self, ip: IPAddress) -> _PoolState | None:
        return next((s for s in self._pools.values() if s.pool.contains(ip)), None)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _commit(self, request: ServiceRequest, state: _PoolState, ips: tuple[IPAddress, ...]) -> None:
        self._drop(request.key)
        for ip in ips:
            use = self._uses.get(ip)
            if use is None:
                state.free[ip.version].take(int(ip))
                state.used += 1
                use = self._uses[ip] = _AddressUse(state.pool.name, request.sharing_key, request.backend_key)
                if request.sharing_key:
                    self._shared.setdefault(request.sharing_key, set()).add(ip)
            use.services[request.key] = request.ports
        self._holdings[request.key] = _Holding(request, Allocation(state.pool.name, ips))

    def _drop(self, key: str) -> None:
        holding = self._holdings.pop(key, None)
        if holding is None:
            return
        for ip in holding.allocation.ips:
            use = self._uses[ip]
            del use.services[key]
            if use.services:
                continue
            del self._uses[ip]
            if use.sharing_key:
                group = self._shared[use.sharing_key]
                group.discard(ip)
                if not group:
                    del self._shared[use.sharing_key]
            state = self._pools.get(use.pool) if use.pool is not None else None
            if state is not None:
                state.free[ip.version].give(int(ip))
                state.used -= 1
