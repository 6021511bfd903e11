"""BGPPeer and LoadBalancerPool.spec.advertisement as the forwarder's speaker reads them (pure).

The objects are validated by their CRDs (OpenAPI + CEL) and by the operator, which reports bad
input on the objects themselves; here every field is still read defensively: what cannot be used
is skipped with a reason (a peer that does not parse is not configured; a pool advertisement that
does not parse is not announced) and the forwarder never raises on it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbctl.model import selectors
from lbctl.model.meta import API_GROUP, API_VERSION_NAME
from lbctl.model.selectors import EVERYTHING, LabelSelector

GROUP = API_GROUP
VERSION = API_VERSION_NAME
PEERS_PATH = f"/apis/{GROUP}/{VERSION}/bgppeers"
POOLS_PATH = f"/apis/{GROUP}/{VERSION}/loadbalancerpools"
PEER_KIND = "BGPPeer"

MODES = ("l2", "bgp", "both")
DEFAULT_HOLD_S = 90
_MAX_ASN = 4294967295
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BadField(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def parse_selector(value: Any, where: str) -> LabelSelector:
    try:
        return selectors.parse_selector(value, where)
    except selectors.SelectorError as exc:
        raise BadField(exc.field, exc.problem) from None


def parse_duration(value: Any, where: str) -> int:
    """Whole seconds of a Go-style duration ("90s", "1m30s")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _DURATION.match(value) if isinstance(value, str) and value else None
    if not match:
        raise BadField(where, f"{value!r} is not a duration like \"90s\"")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _asn(spec: Mapping[str, Any], name: str) -> int:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_ASN:
        raise BadField(f"spec.{name}", f"{value!r} is not an AS number 1..{_MAX_ASN}")
    return value


def _address(value: Any, where: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        raise BadField(where, f"{value!r} is not an IP address") from None


@dataclass(frozen=True)
class Peer:
    name: str
    address: IPAddress
    asn: int
    my_asn: int
    port: int = 179
    hold_s: int = DEFAULT_HOLD_S
    keepalive_s: int = DEFAULT_HOLD_S // 3
    node_selector: LabelSelector = EVERYTHING
    labels: tuple[tuple[str, str], ...] = ()
    password_secret: tuple[str, str] | None = None  # (Secret name, key)
    multihop: bool = False
    source: IPAddress | None = None
    graceful_restart: bool = False

    @property
    def ibgp(self) -> bool:
        return self.asn == self.my_asn


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_peer(obj: Mapping[str, Any]) -> Peer:
    """A Peer from a BGPPeer object; BadField names the field at fault."""
    meta = _map(obj.get("metadata"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise BadField("metadata.name", "a BGPPeer needs a name")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise BadField("spec", "a BGPPeer needs a spec with peerAddress, peerASN and myASN")
    port = spec.get("peerPort", 179)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise BadField("spec.peerPort", f"{port!r} is not a port 1..65535")
    hold = parse_duration(spec.get("holdTime", f"{DEFAULT_HOLD_S}s"), "spec.holdTime")
    if hold != 0 and not 3 <= hold <= 65535:
        raise BadField("spec.holdTime", f"{hold}s is neither 0s nor 3s..65535s")
    keepalive = parse_duration(spec["keepaliveTime"], "spec.keepaliveTime") if "keepaliveTime" in spec \
        else hold // 3
    secret = spec.get("passwordSecretRef")
    password: tuple[str, str] | None = None
    if secret is not None:
        if not isinstance(secret, Mapping) or not isinstance(secret.get("name"), str) or not secret.get("name"):
            raise BadField("spec.passwordSecretRef.name", "names the Secret that holds the password")
        password = (secret["name"], str(secret.get("key") or "password"))
    labels = _map(meta.get("labels"))
    return Peer(
        name=name, address=_address(spec.get("peerAddress"), "spec.peerAddress"),
        asn=_asn(spec, "peerASN"), my_asn=_asn(spec, "myASN"), port=port, hold_s=hold, keepalive_s=keepalive,
        node_selector=parse_selector(spec.get("nodeSelector"), "spec.nodeSelector"),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        password_secret=password, multihop=spec.get("ebgpMultiHop") is True,
        source=_address(spec["sourceAddress"], "spec.sourceAddress") if spec.get("sourceAddress") else None,
        graceful_restart=spec.get("gracefulRestart") is True,
    )


# -- pools ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Advertisement:
    mode: str = "l2"
    communities: tuple[str, ...] = ()  # "A:B"
    large_communities: tuple[str, ...] = ()  # "A:B:C"
    local_pref: int | None = None
    aggregation_v4: int = 32
    aggregation_v6: int = 128
    node_selector: LabelSelector = EVERYTHING
    peer_selector: LabelSelector = EVERYTHING

    @property
    def bgp(self) -> bool:
        return self.mode in ("bgp", "both")

    @property
    def l2(self) -> bool:
        return self.mode in ("l2", "both")


@dataclass(frozen=True)
class PoolAdvert:
    name: str
    ranges: tuple[tuple[int, int, int], ...]  # (version, first, last) as integers
    advertisement: Advertisement = field(default_factory=Advertisement)

    def contains(self, address: IPAddress) -> bool:
        value = int(address)
        return any(v == address.version and first <= value <= last for v, first, last in self.ranges)


def parse_range(entry: str) -> tuple[int, int, int]:
    text = entry.strip()
    if "-" in text:
        first_text, last_text = (part.strip() for part in text.split("-", 1))
        first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
        if first.version != last.version or int(last) < int(first):
            raise ValueError(f"{entry!r} is not a range a-b of one family with a <= b")
        return first.version, int(first), int(last)
    network = ipaddress.ip_network(text, strict=False)
    return network.version, int(network.network_address), int(network.broadcast_address)


def _community(text: Any, where: str) -> tuple[str, bool]:
    """("A:B", False) for a standard community, ("A:B:C", True) for a large one."""
    if not isinstance(text, str):
        raise BadField(where, f"{text!r} is not a community")
    parts = text.split(":")
    large = parts[0] == "large"
    if large:
        parts = parts[1:]
    limit = _MAX_ASN if large else 65535
    if len(parts) != (3 if large else 2) or not all(p.isdigit() and int(p) <= limit for p in parts):
        raise BadField(where, f"{text!r} is not \"A:B\" (16-bit each) or \"large:A:B:C\" (32-bit each)")
    return ":".join(str(int(p)) for p in parts), large


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadField(where, f"{value!r} is not a whole number {low}..{high}")
    return value


def parse_advertisement(spec: Mapping[str, Any]) -> Advertisement:
    raw = spec.get("advertisement")
    if raw is None:
        return Advertisement()
    if not isinstance(raw, Mapping):
        raise BadField("spec.advertisement", "must be an object with mode (l2, bgp or both) and bgp")
    mode = raw.get("mode", "l2")
    if mode not in MODES:
        raise BadField("spec.advertisement.mode", f"{mode!r} is not l2, bgp or both")
    bgp = raw.get("bgp") or {}
    if not isinstance(bgp, Mapping):
        raise BadField("spec.advertisement.bgp", "must be an object")
    where = "spec.advertisement.bgp"
    standard: list[str] = []
    large: list[str] = []
    for index, text in enumerate(bgp.get("communities") or ()):
        value, is_large = _community(text, f"{where}.communities[{index}]")
        (large if is_large else standard).append(value)
    local_pref = bgp.get("localPref")
    return Advertisement(
        mode=mode, communities=tuple(dict.fromkeys(standard)), large_communities=tuple(dict.fromkeys(large)),
        local_pref=None if local_pref is None else _int(local_pref, f"{where}.localPref", 0, _MAX_ASN),
        aggregation_v4=_int(bgp.get("aggregationLength", 32), f"{where}.aggregationLength", 0, 32),
        aggregation_v6=_int(bgp.get("aggregationLengthV6", 128), f"{where}.aggregationLengthV6", 0, 128),
        node_selector=parse_selector(bgp.get("nodeSelector"), f"{where}.nodeSelector"),
        peer_selector=parse_selector(bgp.get("peerSelector"), f"{where}.peerSelector"),
    )


def parse_pool_advert(obj: Mapping[str, Any]) -> PoolAdvert:
    meta = _map(obj.get("metadata"))
    name = str(meta.get("name") or "")
    spec = _map(obj.get("spec"))
    ranges = []
    for index, entry in enumerate(spec.get("addresses") or ()):
        try:
            ranges.append(parse_range(str(entry)))
        except ValueError as exc:
            raise BadField(f"spec.addresses[{index}]", str(exc)) from None
    return PoolAdvert(name, tuple(ranges), parse_advertisement(spec))


def parse_all(objects: Iterable[Mapping[str, Any]], parse: Any) -> tuple[list[Any], dict[str, str]]:
    """Each object parsed with `parse`; (the good ones sorted by name, name → why the others were skipped)."""
    good, bad = [], {}
    for obj in objects:
        try:
            good.append(parse(obj))
        except (BadField, ValueError, TypeError) as exc:
            meta = obj.get("metadata") if isinstance(obj, Mapping) else None
            bad[str(meta.get("name") if isinstance(meta, Mapping) else "?")] = str(exc)
    good.sort(key=lambda item: item.name)
    return good, bad


def node_labels(node: Mapping[str, Any] | None) -> dict[str, str]:
    meta = node.get("metadata") if isinstance(node, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def node_ips(node: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The node's InternalIPs (then ExternalIPs), in the order the Node lists them."""
    status = node.get("status") if isinstance(node, Mapping) else None
    addresses: Sequence[Any] = status.get("addresses") or () if isinstance(status, Mapping) else ()
    found = []
    for kind in ("InternalIP", "ExternalIP"):
        for item in addresses:
            if isinstance(item, Mapping) and item.get("type") == kind and isinstance(item.get("address"), str):
                found.append(item["address"])
    return tuple(found)
