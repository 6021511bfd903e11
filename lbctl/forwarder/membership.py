"""Which peers are alive, judged on the node network itself (pure; time is passed in).

Forwarders send each other a heartbeat datagram every `interval` on the node network; the
heartbeat names the sender, its process incarnation, and the VIPs it holds now (its claims). A
peer is alive while its heartbeats arrive. When they stop, the peer is probed with ICMP echo: a
node whose kernel still answers is up and only its forwarder is away (a restart, a crash, a
rolling update) — it keeps its VIPs for `grace`, since its kernel keeps serving them. A peer that
neither heartbeats nor answers for `dead_after` is gone.

A restarted forwarder finds the VIPs its predecessor left on the interface and keeps them, but
claims them only tentatively until it has heard every peer: a tentative claim keeps others from
taking the VIP, and yields to a firm claim (a peer that took the VIP over while we were gone).

The apiserver plays no part, so losing it changes nobody's view: the data plane stays as it was.
A node that hears no peer at all cannot tell "I am cut off" from "everyone else died" from
heartbeats alone: `isolated` is only the first half of that judgement; isolation.py makes the rest
(the apiserver, the link's carrier, LAN witnesses answering ping).
"""

from __future__ import annotations

import hmac
import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WIRE_VERSION = 1
TENTATIVE = "~"
# Each take of a VIP has a generation one above the highest claim of it ever seen: when two nodes
# claim one VIP (a healed partition, a late heartbeat from before a cut), the newer take wins.
GENERATION = "#"
MAX_DATAGRAM = 60_000  # below the 65,507-byte UDP limit, with room for headers
_DRIFT = 1e-3
_SIGNATURE = 32  # bytes of HMAC-SHA256


@dataclass(frozen=True)
class Heartbeat:
    node: str
    incarnation: str  # new for every process start, so a restart is visible
    seq: int
    claims: tuple[str, ...]  # "VIP#generation" it holds; "~VIP#generation": only tentatively (see below)
    part: int = 0  # a large claim set goes in several datagrams of one (incarnation, seq)
    parts: int = 1
    sent: float = 0.0  # the sender's monotonic clock: tells a heartbeat that sat in a queue


def encode(heartbeat: Heartbeat, key: bytes = b"") -> bytes:
    """zlib-compressed JSON; with a key, followed by its HMAC-SHA256 (peers without the key, or a
    spoofer on the node network, cannot claim addresses)."""
    payload = {"v": WIRE_VERSION, "n": heartbeat.node, "i": heartbeat.incarnation, "s": heartbeat.seq,
               "c": list(heartbeat.claims), "p": heartbeat.part, "P": heartbeat.parts, "t": heartbeat.sent}
    body = zlib.compress(json.dumps(payload, separators=(",", ":")).encode())
    return body + hmac.digest(key, body, "sha256") if key else body


def encode_all(node: str, incarnation: str, seq: int, claims: Iterable[str], sent: float = 0.0,
               key: bytes = b"") -> list[bytes]:
    """The datagrams of one heartbeat: the claims split so that each datagram fits."""
    ordered = sorted(claims)
    chunks = 1
    while True:
        size = -(-len(ordered) // chunks) if ordered else 0
        parts = [tuple(ordered[i:i + size]) for i in range(0, len(ordered), size)] if ordered else [()]
        encoded = [encode(Heartbeat(node, incarnation, seq, part, index, len(parts), sent), key)
                   for index, part in enumerate(parts)]
        if all(len(datagram) <= MAX_DATAGRAM for datagram in encoded) or chunks >= len(ordered):
            return encoded
        chunks *= 2


def decode(datagram: bytes, key: bytes = b"") -> Heartbeat | None:
    """A heartbeat, or None for anything else (another version, garbage, a stray packet, a wrong
    or missing signature when we have a key)."""
    if key:
        datagram, signature = datagram[:-_SIGNATURE], datagram[-_SIGNATURE:]
        if len(signature) != _SIGNATURE or not hmac.compare_digest(signature, hmac.digest(key, datagram, "sha256")):
            return None
    try:
        payload = json.loads(zlib.decompress(datagram, bufsize=MAX_DATAGRAM))
        if not isinstance(payload, dict) or payload.get("v") != WIRE_VERSION:
            return None
        claims = payload["c"]
        heartbeat = Heartbeat(str(payload["n"]), str(payload["i"]), int(payload["s"]),
                              tuple(str(c) for c in claims), int(payload["p"]), int(payload["P"]),
                              float(payload.get("t", 0.0)))
    except (zlib.error, ValueError, KeyError, TypeError):
        return None
    if not heartbeat.node or not 0 <= heartbeat.part < heartbeat.parts or not isinstance(claims, list):
        return None
    return heartbeat


def format_claim(vip: str, generation: int, tentative: bool = False) -> str:
    return f"{TENTATIVE if tentative else ''}{vip}{GENERATION}{generation}"


def parse_claim(raw: str) -> tuple[str, int, bool]:
    """(VIP, generation, tentative) of a claim as sent."""
    tentative = raw.startswith(TENTATIVE)
    body = raw[len(TENTATIVE):] if tentative else raw
    vip, sep, number = body.rpartition(GENERATION)
    if not sep:
        return body, 0, tentative
    try:
        return vip, int(number), tentative
    except ValueError:
        return vip, 0, tentative


@dataclass(frozen=True)
class Timing:
    interval: float = 0.2  # between heartbeats
    probe_after: float = 0.5  # a peer silent this long is probed with ICMP echo
    dead_after: float = 1.0  # neither heartbeat nor echo reply for this long: the node is gone
    grace: float = 15.0  # the forwarder may be away this long while its kernel answers

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.probe_after < self.dead_after <= self.grace:
            raise ValueError("peer timing must satisfy 0 < interval < probe_after < dead_after <= grace")


@dataclass
class _Peer:
    address: str
    incarnation: str = ""
    last_heartbeat: float | None = None
    last_echo: float | None = None
    claims: frozenset[str] = frozenset()  # with TENTATIVE prefixes as sent
    assembling: dict[tuple[str, int], dict[int, tuple[str, ...]]] = field(default_factory=dict)
    gone: bool = False  # judged dead since its last heartbeat
    last_seq: int = -1
    delay_base: float | None = None  # the least (arrival - sent) seen: the clocks' offset + fastest path
    delay_base_at: float = 0.0


@dataclass(frozen=True)
class PeerView:
    """One peer as `Membership.view` reports it (for logs and the health endpoint)."""

    node: str
    address: str
    state: str  # alive | away (forwarder silent, kernel answers) | dead | unknown (never heard)
    heartbeat_age_s: float | None
    claims: tuple[str, ...]


class Membership:
    def __init__(self, node: str, timing: Timing = Timing()) -> None:
        self.node = node
        self.timing = timing
        self._peers: dict[str, _Peer] = {}
        self._addresses: dict[str, str] = {}  # node → address from the Node objects
        self.claims_version = 0  # bumped whenever a peer's claims change
        self._generations: dict[str, int] = {}

    # -- inputs ---------------------------------------------------------------------------------
    def set_addresses(self, addresses: Mapping[str, str]) -> None:
        """Every node's address on the node network (from the Node objects), ours included."""
        self._addresses = {n: a for n, a in addresses.items() if n != self.node and a}
        for node, address in self._addresses.items():
            peer = self._peers.get(node)
            if peer is not None and peer.last_heartbeat is None:
                peer.address = address

    def heartbeat(self, message: Heartbeat, address: str, now: float) -> bool:
        """Record a peer's heartbeat; whether it changed anything ownership depends on (the peer
        came alive, or its claims changed)."""
        if message.node == self.node:
            return False
        peer = self._peers.setdefault(message.node, _Peer(address))
        was_alive, had = self._state(peer, now) == "alive", peer.claims
        if message.incarnation != peer.incarnation:
            peer.incarnation = message.incarnation
            peer.assembling.clear()
            peer.last_seq, peer.delay_base = -1, None
        elif self._stale(peer, message, now):
            return False
        peer.address = address  # where it really sends from
        peer.last_seq = max(peer.last_seq, message.seq)
        peer.last_heartbeat = now
        peer.gone = False
        if message.parts == 1:
            peer.claims = frozenset(message.claims)
            peer.assembling.clear()
        else:
            key = (message.incarnation, message.seq)
            parts = peer.assembling.setdefault(key, {})
            parts[message.part] = message.claims
            if len(parts) == message.parts:
                peer.claims = frozenset(c for chunk in parts.values() for c in chunk)
                peer.assembling = {}
            elif len(peer.assembling) > 4:  # parts of old heartbeats that never completed
                for stale in sorted(peer.assembling, key=lambda k: k[1])[:-1]:
                    del peer.assembling[stale]
        if peer.claims != had:
            self.claims_version += 1
            for raw in peer.claims - had:
                vip, generation, _ = parse_claim(raw)
                if generation > self._generations.get(vip, 0):
                    self._generations[vip] = generation
        return not was_alive or peer.claims != had

    def _stale(self, peer: _Peer, message: Heartbeat, now: float) -> bool:
        """An older heartbeat than one already seen, or one that waited in a queue (a link that was
        down holds what was sent meanwhile and delivers it when it comes back up): it would tell
        of claims the sender has since given up."""
        if message.seq < peer.last_seq:
            return True
        delay = now - message.sent
        if peer.delay_base is not None:
            # let the base creep up (clock drift between nodes, 1 ms/s at most) rather than trust
            # a first sample for ever
            base = peer.delay_base + _DRIFT * (now - peer.delay_base_at)
            if delay - base > self.timing.dead_after / 2:
                return True
            delay = min(delay, base)
        peer.delay_base, peer.delay_base_at = delay, now
        return False

    def echo_reply(self, address: str, now: float) -> None:
        for peer in self._peers.values():
            if peer.address == address:
                peer.last_echo = now

    # -- judgements -----------------------------------------------------------------------------
    def _state(self, peer: _Peer, now: float) -> str:
        if peer.last_heartbeat is None:
            return "unknown"
        silent = now - peer.last_heartbeat
        if silent < self.timing.dead_after:
            return "alive"
        echoed = peer.last_echo is not None and now - peer.last_echo < self.timing.dead_after
        if echoed and silent < self.timing.grace and not peer.gone:
            return "away"
        # Once judged gone, its VIPs went to others: an echo reply (its link is back) does not
        # bring its old claims back; only its own heartbeat, with what it holds now, does.
        peer.gone = True
        return "dead"

    def alive(self, now: float) -> frozenset[str]:
        """Nodes that keep their VIPs: us, peers heard lately, and peers whose forwarder is away
        within the grace period while their kernel answers."""
        return frozenset({self.node} | {n for n, p in self._peers.items() if self._state(p, now) in ("alive", "away")})

    def claims(self, now: float) -> tuple[dict[str, dict[str, int]], dict[str, frozenset[str]]]:
        """(firm, tentative) claims of the live peers (ours not included): VIP → {node: generation}
        and VIP → nodes."""
        firm: dict[str, dict[str, int]] = {}
        tentative: dict[str, set[str]] = {}
        for node, peer in self._peers.items():
            if self._state(peer, now) in ("alive", "away"):
                for raw in peer.claims:
                    vip, generation, is_tentative = parse_claim(raw)
                    if is_tentative:
                        tentative.setdefault(vip, set()).add(node)
                    else:
                        firm.setdefault(vip, {})[node] = generation
        return firm, {vip: frozenset(nodes) for vip, nodes in tentative.items()}

    def generation(self, vip: str) -> int:
        """The highest generation any peer ever claimed `vip` with (dead peers' included)."""
        return self._generations.get(vip, 0)

    def targets(self) -> list[str]:
        """Where to send heartbeats: every node's known address, and peers that reached us."""
        addresses = set(self._addresses.values()) | {p.address for p in self._peers.values()}
        return sorted(addresses)

    def to_probe(self, now: float) -> list[str]:
        """Peers silent for `probe_after` (but not given up for good): ping their kernels."""
        found = []
        for peer in self._peers.values():
            if peer.last_heartbeat is None:
                continue
            silent = now - peer.last_heartbeat
            if self.timing.probe_after <= silent < self.timing.grace + self.timing.dead_after:
                found.append(peer.address)
        return sorted(found)

    def isolated(self, now: float) -> bool:
        """We know peers, and none of them is alive or answering: either we are cut off or they are
        all gone; the caller decides which (isolation.judge)."""
        states = [self._state(p, now) for p in self._peers.values()]
        return bool(states) and all(s in ("dead", "unknown") for s in states)

    def settled(self, started: float, now: float) -> bool:
        """Whether we have heard, since `started`, from every node we know an address of (or waited
        long enough for those that stay silent to count as gone): before that, our picture of who
        holds what may lack someone's claims (at start-up, or back from being cut off)."""
        if now - started >= self.timing.dead_after + self.timing.interval:
            return True

        def heard(node: str) -> bool:
            peer = self._peers.get(node)
            return peer is not None and peer.last_heartbeat is not None and peer.last_heartbeat >= started
        return all(heard(n) for n in self._addresses)

    def view(self, now: float) -> list[PeerView]:
        names = sorted(set(self._peers) | set(self._addresses))
        result = []
        for name in names:
            peer = self._peers.get(name)
            if peer is None:
                result.append(PeerView(name, self._addresses[name], "unknown", None, ()))
                continue
            age = None if peer.last_heartbeat is None else round(now - peer.last_heartbeat, 3)
            result.append(PeerView(name, peer.address, self._state(peer, now), age, tuple(sorted(peer.claims))))
        return result
