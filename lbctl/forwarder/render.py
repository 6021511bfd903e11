"""ServiceState → typed nftables operations (pure).

This module decides *what* goes into the table; lbctl.forwarder.nftables writes it as nft syntax.

One table, `inet lbctl`, for both IP families. Packets are dispatched by verdict maps, not rule
lists, so the cost per packet does not grow with the number of Services:

  prerouting/output (nat) → chain services:
      tcp flags & (syn | ack) != syn return                      (no connection opened: no DNAT)
      ip daddr . meta l4proto . th dport vmap @service-ips       (IPv4 LB ingress IPs)
      ip6 daddr . meta l4proto . th dport vmap @service-ips6     (IPv6 LB ingress IPs)
      fib daddr type local … meta l4proto . th dport vmap @node-ports / @node-ports6
  svc/<ns>/<name>/<proto>/<port>:
      [meta nfproto ipv6] meta l4proto tcp [meta mark set … (masquerade)] dnat ip6 to numgen random mod N
          offset B map @endpoints6-tcp/<shard>
  lb/<ns>/<name>/<proto>/<port>:    ip[6] saddr <cidr> goto svc/…  …  drop   (loadBalancerSourceRanges)
  postrouting (nat): marked → masquerade (externalTrafficPolicy Cluster only)
  input (filter): an LB IP on a port no Service claims is dropped: the address sits on a local
      interface, and the node's own listeners must not answer on it.
  forward (filter): the same for an LB IP that is not local (BGP mode: the router sends it here);
      DNATed packets have the endpoint as destination by then and pass.

Why one `inet` table rather than an `ip` and an `ip6` one (kube-proxy's choice): a dual-stack
Service is then one program in one table, the hooks, the masquerade rule and the endpoint-chain
maps (verdicts, no address) exist once, and a node has one table to list and to remove. A
dual-stack port is one chain for both families, each family's rules behind `meta nfproto`: nft
1.0.6 reads every chain of the ruleset before any element command, so a chain per family would
double the cost of every endpoint change (measured: ~3.5 ms per 1,000 chains; separate tables
would not help, that read is not filtered by table). What must differ per family differs in both
layouts: maps keyed or valued by addresses (`service-ips6`, `node-ports6`, `lb-ips6`,
`endpoints6-<proto>/<shard>`), and statements that name the family (`ip6 saddr`, `dnat ip6 to`),
which lbctl.forwarder.nftables writes from the address itself. Traffic of each family goes only to
endpoints of that family (no NAT between families); slot ranges, endpoint chains and affinity
sets of the IPv6 half carry `/ipv6` after the port. Earlier versions had an `ip lbctl` table: the
start-up sync removes it in the same transaction (LEGACY_TABLES).

Endpoints live in named maps keyed by an integer slot; each service port owns a slot range and
picks `numgen random mod N offset B`. Anonymous maps (one per rule, `numgen … vmap { 0 : …, 1 :
… }`) read better but the kernel names each one by scanning the table's sets: a 10,000-Service
ruleset took 11 s to load. One shared named map instead cost O(elements × rules bound to it)
(8 s), hence 64 shards per protocol and family, declared when first used (see SHARDS).

ClientIP affinity: one chain and one timeout set per endpoint; `ip saddr @aff… goto ep…` first,
then the random pick through @endpoint-chains/<shard>; the endpoint chain records the client.
(nft names cannot hold ':', so an IPv6 address in a chain or set name is written with '-'.)

Changes are planned per Service ("program"): chains rewritten with `flush chain` + rules, map
elements deleted/added by key, all in one transaction. A full sync either replaces the table
(start-up) or flushes every rule and map of it (the periodic resync: affinity sets keep their
entries) and writes everything again, one `add element` per map with one element per line.
"""
from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from lbctl import cyclic_gc
from lbctl.forwarder import nftables as nft
from lbctl.forwarder.nftables import (
    Chain,
    DaddrInSet,
    DaddrNot,
    Datatype,
    DnatRandom,
    DnatTo,
    Drop,
    Element,
    EndpointValue,
    Field,
    Goto,
    Hook,
    Jump,
    L4Proto,
    LocalDestination,
    Map,
    MarkAny,
    Masquerade,
    NfProto,
    RandomVerdict,
    RecordSource,
    Return,
    Rule,
    SaddrIn,
    SaddrInSet,
    Set,
    SetMarkBits,
    SlotKey,
    Statement,
    Table,
    TcpNotOpening,
    Transaction,
    VerdictLookup,
)
from lbctl.forwarder.state import IPV4, IPV6, PROTOCOLS, UDP, Backend, ServicePort, ServiceState, family_of

FAMILY = "inet"
TABLE = "lbctl"
LBCTL = Table(FAMILY, TABLE)
# tables of earlier versions, removed at start-up, on --cleanup and in announce mode
LEGACY_TABLES = (Table("ip", TABLE),)
MASQUERADE_MARK = 0x00004000  # the bit kube-proxy uses for the same purpose
SERVICE_IPS = "service-ips"
NODE_PORTS = "node-ports"
ENDPOINTS = "endpoints"
ENDPOINT_CHAINS = "endpoint-chains"
LB_IPS = "lb-ips"
# The endpoint maps are split in shards: the kernel checks each element added to a map against
# every rule bound to it, and each rule bound to a map against its elements, so one map shared by
# 10,000 Services cost O(elements × rules) (8 s for 10,000 Services × 5 endpoints).
SHARDS = 64
# Per protocol: a map typed "ip daddr . th dport" is rejected by nft 1.0.6 next to `meta l4proto
# tcp` once it is read back from the kernel ("conflicting protocols specified: tcp vs. th").
ENDPOINT_MAPS = {proto: tuple(f"{ENDPOINTS}-{proto}/{n:03d}" for n in range(SHARDS)) for proto in PROTOCOLS}
ENDPOINT_MAPS6 = {proto: tuple(f"{ENDPOINTS}6-{proto}/{n:03d}" for n in range(SHARDS)) for proto in PROTOCOLS}
ENDPOINT_CHAIN_MAPS = tuple(f"{ENDPOINT_CHAINS}/{n:03d}" for n in range(SHARDS))  # verdicts: both families


class Family(NamedTuple):
    """What differs between the IPv4 and the IPv6 half of the table."""

    version: int
    address: Datatype
    daddr: Field
    service_ips: str
    node_ports: str
    lb_ips: str
    endpoint_maps: Mapping[str, tuple[str, ...]]
    loopback: str
    suffix: str  # of port ids, hence chain names


V4 = Family(IPV4, Datatype.IPV4_ADDR, Field.DADDR4, SERVICE_IPS, NODE_PORTS, LB_IPS, ENDPOINT_MAPS, "127.0.0.0/8", "")
V6 = Family(IPV6, Datatype.IPV6_ADDR, Field.DADDR6, SERVICE_IPS + "6", NODE_PORTS + "6", LB_IPS + "6",
            ENDPOINT_MAPS6, "::1", "/ipv6")
FAMILIES = {IPV4: V4, IPV6: V6}

_VERDICT = (Datatype.VERDICT,)
FIXED_MAPS = tuple(m for f in (V4, V6) for m in (
    Map(f.service_ips, (f.address, Datatype.INET_PROTO, Datatype.INET_SERVICE), _VERDICT),
    Map(f.node_ports, (Datatype.INET_PROTO, Datatype.INET_SERVICE), _VERDICT),
))
FIXED_SETS = tuple(Set(f.lb_ips, f.address) for f in (V4, V6))
MAPS = tuple(m.name for m in FIXED_MAPS)  # the shards are declared when first used
SETS = tuple(s.name for s in FIXED_SETS)



def collection_label(name: str) -> str:
    """A map's or set's name without its shard number (`endpoints-tcp/007` → `endpoints-tcp`): the
    label of lbctl_forwarder_nft_elements, a handful of values whatever the table's size."""
    return name.partition("/")[0]


ELEMENT_COLLECTIONS = tuple(sorted({collection_label(name) for name in (
    *MAPS, *SETS, *ENDPOINT_CHAIN_MAPS,
    *(n for maps in (ENDPOINT_MAPS, ENDPOINT_MAPS6) for names in maps.values() for n in names))}))

# `dstnat` is only a name in prerouting; -100 is the same priority
BASE_OBJECTS: tuple[nft.Object, ...] = (
    LBCTL,
    *FIXED_MAPS,
    *FIXED_SETS,
    Chain("services"),
    Chain("prerouting", Hook("nat", "prerouting", "dstnat")),
    Chain("output", Hook("nat", "output", "-100")),
    Chain("postrouting", Hook("nat", "postrouting", "srcnat")),
    Chain("input", Hook("filter", "input", "filter")),
    Chain("forward", Hook("filter", "forward", "filter")),
)
BASE_RULES = (
    Rule("prerouting", (Jump("services"),)),
    Rule("output", (Jump("services"),)),
    # These nat chains see the first packet of each connection conntrack tracks. A TCP one that
    # is no bare SYN is conntrack picking up a connection it did not see begin: one the node made
    # before this table turned conntrack on in its namespace (the forwarder's own apiserver
    # watches, the kubelet's). Its local port may be a NodePort (a range that overlaps the
    # ephemeral ports): DNATed, the node's own connection would go silent.
    Rule("services", (TcpNotOpening(), Return())),
    *(Rule("services", (VerdictLookup((f.daddr, Field.L4PROTO, Field.DPORT), f.service_ips),)) for f in (V4, V6)),
    # NodePorts answer on every local address but loopback (route_localnet stays off)
    *(Rule("services", (LocalDestination(), DaddrNot(f.loopback),
                        VerdictLookup((Field.L4PROTO, Field.DPORT), f.node_ports))) for f in (V4, V6)),
    Rule("postrouting", (MarkAny(MASQUERADE_MARK), Masquerade())),
    *(Rule("input", (L4Proto(proto), DaddrInSet(f.lb_ips, f.version), Drop()))
      for f in (V4, V6) for proto in PROTOCOLS),
    # An LB address that is not local (announced by BGP) on a port no Service claims is not DNATed:
    # forwarded, it would go back to the router by the default route and loop until its TTL ran out.
    *(Rule("forward", (L4Proto(proto), DaddrInSet(f.lb_ips, f.version), Drop()))
      for f in (V4, V6) for proto in PROTOCOLS),
)


def base_check_lines() -> list[str]:
    """The base table as `nft -c` input: proves nft runs and the kernel has what we need."""
    out = Transaction(LBCTL)
    out.add(None, *BASE_OBJECTS, *BASE_RULES)
    return list(out.texts())


class SlotRange(NamedTuple):
    base: int
    size: int


Body = tuple[Statement, ...]  # one rule without its chain


@dataclass(frozen=True)
class Program:
    """What one Service puts into the table."""

    key: str
    priority: tuple[str, str]  # (creationTimestamp, key): the older Service keeps a clashing address
    chains: Mapping[str, tuple[Body, ...]]  # chain name → its rules
    sets: Mapping[str, Set]  # set name → the set
    elements: tuple[Element, ...]
    slots: Mapping[str, SlotRange] = field(default_factory=dict)  # port id → its range in @endpoints
    udp_backends: frozenset[tuple[str, int]] = frozenset()


class Line(NamedTuple):
    """One command of a transaction and the Service it belongs to (None: the table itself)."""

    owner: str | None
    text: str


@dataclass(frozen=True)
class Conflict:
    """A map key two Services both want; `winner` keeps it."""

    collection: str
    key: str
    winner: str
    loser: str


class SlotAllocator:
    """Slot ranges in @endpoints: powers of two, reused after release (no I/O; copy before planning)."""

    def __init__(self, start: int = 1) -> None:
        self._next = start
        self._free: dict[int, list[int]] = {}

    def copy(self) -> SlotAllocator:
        other = SlotAllocator(self._next)
        other._free = {size: list(bases) for size, bases in self._free.items()}
        return other

    @staticmethod
    def size_for(count: int) -> int:
        return max(2, 1 << (count - 1).bit_length())

    def take(self, count: int) -> SlotRange:
        size = self.size_for(count)
        free = self._free.get(size)
        if free:
            return SlotRange(free.pop(), size)
        base, self._next = self._next, self._next + size
        return SlotRange(base, size)

    def give(self, slots: SlotRange) -> None:
        self._free.setdefault(slots.size, []).append(slots.base)


def port_id(state: ServiceState, port: ServicePort, family: Family = V4) -> str:
    # namespace and name are DNS labels, so '/' cannot occur inside them: ids are unambiguous
    return f"{state.key}/{port.protocol}/{port.port}{family.suffix}"


def _backends(port: ServicePort, family: Family) -> tuple[Backend, ...]:
    backends = port.backends
    if family.version == IPV4:
        return backends if all(":" not in b.ip for b in backends) else tuple(b for b in backends if ":" not in b.ip)
    return tuple(b for b in backends if ":" in b.ip)


def _families(state: ServiceState) -> tuple[Family, ...]:
    return tuple(FAMILIES[f] for f in state.families)


def slot_needs(state: ServiceState) -> dict[str, int]:
    """Ports (of one family) whose endpoints are picked at random need a slot range of this many slots."""
    needs = {}
    for family in _families(state):
        for port in state.ports:
            count = len(_backends(port, family))
            if count > 1:
                needs[port_id(state, port, family)] = count
    return needs


def allocate(state: ServiceState, previous: Mapping[str, SlotRange], allocator: SlotAllocator) -> dict[str, SlotRange]:
    """Keep a port's range while it is big enough; release the rest to `allocator`."""
    needs = slot_needs(state)
    slots: dict[str, SlotRange] = {}
    for pid, old in previous.items():
        if pid in needs and old.size >= needs[pid]:
            slots[pid] = old
        else:
            allocator.give(old)
    for pid, count in sorted(needs.items()):
        if pid not in slots:
            slots[pid] = allocator.take(count)
    return slots


_SHARD_PREFIXES = (*(f"{ENDPOINTS}{v}-{proto}/" for v in ("", "6") for proto in PROTOCOLS), f"{ENDPOINT_CHAINS}/")


def shard_map(name: str) -> Map:
    """An endpoint shard (`add map` of it is harmless when the map exists)."""
    if name.startswith(ENDPOINT_CHAINS):
        return Map(name, SlotKey(), _VERDICT)
    kind, _, _ = name.partition("/")  # endpoints-tcp, endpoints6-udp, …
    family, _, proto = kind.removeprefix(ENDPOINTS).partition("-")
    return Map(name, SlotKey(), EndpointValue(IPV6 if family == "6" else IPV4, proto))


def _shards(programs: Iterable[Program | None]) -> list[str]:
    names = {el.collection for p in programs if p is not None for el in p.elements
             if el.collection.startswith(_SHARD_PREFIXES)}
    return sorted(names)


def shard(pid: str) -> int:
    """The endpoint map shard of a port id (stable across runs: crc32, not hash())."""
    return zlib.crc32(pid.encode()) % SHARDS


def _endpoint_chain(pid: str, ip: str, port: int) -> str:
    return f"ep/{pid}/{ip.replace(':', '-')}/{port}"


def _affinity_set(pid: str, ip: str, port: int, timeout: int) -> str:
    return f"aff/{pid}/{ip.replace(':', '-')}/{port}/{timeout}"


_DROP: Body = (Drop(),)
_L4 = {proto: L4Proto(proto) for proto in PROTOCOLS}


def render_program(state: ServiceState, slots: Mapping[str, SlotRange]) -> Program:
    chains: dict[str, tuple[Body, ...]] = {}
    sets: dict[str, Set] = {}
    elements: list[Element] = []
    udp: set[tuple[str, int]] = set()
    families = _families(state)
    # A dual-stack Service's port is one chain for both families, each family's rules behind a
    # `meta nfproto` match: nft reads every chain before any element command, so a chain per
    # family would double the cost of each endpoint change.
    guards = {f.version: ((NfProto(f.version),) if len(families) > 1 else ()) for f in families}
    lb_ips = {f.version: [ip for ip in state.lb_ips if family_of(ip) == f.version] for f in families}
    # ETP=Cluster: the rule that picks an endpoint marks the packet for masquerade too (a rule of
    # its own for the mark was a third of the rules nft loads at start-up)
    mark: Body = (SetMarkBits(MASQUERADE_MARK),) if state.masquerade else ()
    for port in state.ports:
        svc = f"svc/{port_id(state, port)}"
        proto = port.protocol
        picks: list[Body] = []
        for family in families:
            version, guard = family.version, guards[family.version]
            pid = port_id(state, port, family)
            backends = _backends(port, family)
            if proto == UDP:
                udp.update((b.ip, b.port) for b in backends)
            if not backends:
                picks.append((*guard, Drop()))  # no endpoint (for ETP=Local: none on this node)
            elif state.affinity_timeout is not None:
                timeout = state.affinity_timeout
                for b in backends:
                    ep = _endpoint_chain(pid, b.ip, b.port)
                    aff = _affinity_set(pid, b.ip, b.port, timeout)
                    sets[aff] = Set(aff, family.address, timeout)
                    chains[ep] = ((RecordSource(aff, version),), (_L4[proto], DnatTo(b.ip, b.port)))
                    picks.append((SaddrInSet(aff, version), *mark, Goto(ep)))
                if len(backends) == 1:
                    picks.append((*guard, *mark, Goto(_endpoint_chain(pid, backends[0].ip, backends[0].port))))
                else:
                    base = slots[pid].base
                    vmap = ENDPOINT_CHAIN_MAPS[shard(pid)]
                    picks.append((*guard, *mark, RandomVerdict(len(backends), base, vmap)))
                    elements.extend(Element(vmap, base + i, Goto(_endpoint_chain(pid, b.ip, b.port)))
                                    for i, b in enumerate(backends))
            elif len(backends) == 1:
                picks.append((*guard, _L4[proto], *mark, DnatTo(backends[0].ip, backends[0].port)))
            else:
                base = slots[pid].base
                dmap = family.endpoint_maps[proto][shard(pid)]
                picks.append((*guard, _L4[proto], *mark, DnatRandom(version, len(backends), base, dmap)))
                elements.extend(Element(dmap, base + i, (b.ip, b.port)) for i, b in enumerate(backends))
        chains[svc] = tuple(picks)

        entry = svc
        if state.source_ranges is not None:
            # a family none of whose ranges is listed admits no one (fails closed)
            entry = f"lb/{port_id(state, port)}"
            chains[entry] = (*((SaddrIn(cidr), Goto(svc)) for family in families for cidr in state.source_ranges
                               if family_of(cidr) == family.version), _DROP)
        target = Goto(entry)
        for family in families:
            for ip in lb_ips[family.version]:
                elements.append(Element(family.service_ips, (ip, proto, port.port), target))
            if port.node_port is not None:
                elements.append(Element(family.node_ports, (proto, port.node_port), Goto(svc)))
    if state.ports:
        for family in families:
            elements.extend(Element(family.lb_ips, ip) for ip in lb_ips[family.version])
    return Program(key=state.key, priority=(state.created, state.key), chains=chains, sets=sets,
                   elements=tuple(elements), slots=dict(slots), udp_backends=frozenset(udp))


# Keys two Services may both want (a clash: the older Service keeps it). Slot keys are handed out
# by the planner itself and so are never shared.
SHARED = frozenset(name for f in (V4, V6) for name in (f.service_ips, f.node_ports, f.lb_ips))
ElementKey = tuple[str, nft.Part | tuple[nft.Part, ...]]  # (collection, key)
ElementValue = nft.Part | tuple[nft.Part, ...] | Goto | None


@dataclass(frozen=True)
class Committed:
    """What the kernel holds for one Service: its state and slot ranges (its Program is rendered
    again from them when needed, rather than kept: at 10,000 Services that saves ~60 MB)."""

    state: ServiceState
    slots: Mapping[str, SlotRange]

    @property
    def priority(self) -> tuple[str, str]:
        return (self.state.created, self.state.key)

    def program(self) -> Program:
        return render_program(self.state, self.slots)


@dataclass
class Plan:
    """A transaction and what the planner becomes once the kernel has taken it."""

    transaction: Transaction
    changes: dict[str, Committed | None]  # changed keys → new committed state (None: removed)
    allocator: SlotAllocator
    full: bool
    conflicts: list[Conflict] = field(default_factory=list)
    udp_backends_gone: list[tuple[str, int]] = field(default_factory=list)
    # full plans: all shared keys' winners and claimants; updates: only the keys touched (None: gone)
    winners: dict[ElementKey, str | None] = field(default_factory=dict)
    contested: dict[ElementKey, tuple[str, ...] | None] = field(default_factory=dict)
    udp: Counter[tuple[str, int]] = field(default_factory=Counter)  # full: all; update: the change
    # rules and map/set elements in the kernel once it takes the plan: full plans the totals,
    # updates the change (elements by collection_label)
    rules: int = 0
    elements: Counter[str] = field(default_factory=Counter)

    @property
    def ops(self) -> list[nft.Op]:
        return self.transaction.ops

    @property
    def lines(self) -> list[Line]:
        return [Line(owner, text) for owner, text in self.transaction.lines()]

    @property
    def texts(self) -> list[str]:
        return list(self.transaction.texts())

    @property
    def text(self) -> str:
        return self.transaction.text()

    def owner_of_line(self, number: int) -> str | None:
        """The Service of 1-based line `number` of `text`."""
        if number < 1:
            return None
        for index, (owner, _) in enumerate(self.transaction.lines(), start=1):
            if index == number:
                return owner
        return None


class Planner:
    """Keeps what the kernel holds and plans the transaction to the next state.

    No I/O: `plan_*` returns a Plan, `commit` records it once `nft` has accepted it. A rejected
    Plan is simply dropped; the committed state still matches the kernel (transactions are atomic).
    """

    def __init__(self) -> None:
        self._committed: dict[str, Committed] = {}
        self._allocator = SlotAllocator()
        self._winners: dict[ElementKey, str] = {}  # shared key → the Service whose element is installed
        self._contested: dict[ElementKey, tuple[str, ...]] = {}  # shared keys with several claimants
        self._udp = Counter[tuple[str, int]]()
        self.synced = False  # whether a full sync has been committed
        self.rules = 0  # rules in the kernel's table (what the committed state put there)
        self._elements = Counter[str]()  # map and set elements in it, by collection_label

    def committed_state(self, key: str) -> ServiceState | None:
        committed = self._committed.get(key)
        return committed.state if committed else None

    def program(self, key: str) -> Program | None:
        committed = self._committed.get(key)
        return committed.program() if committed else None

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self._committed)

    @property
    def elements(self) -> dict[str, int]:
        """Map and set elements in the kernel's table by collection_label (every label, 0 included;
        the affinity sets the packet path fills are not counted)."""
        return {label: self._elements.get(label, 0) for label in ELEMENT_COLLECTIONS}

    # -- full ---------------------------------------------------------------------------------
    def plan_full(self, states: Iterable[ServiceState], replace: bool = False) -> Plan:
        """Everything from scratch. `replace` deletes the table first (start-up: nothing is known
        about what an earlier run left); otherwise rules and maps are flushed but affinity sets kept."""
        with cyclic_gc.paused():  # ~10 objects per endpoint, no reference cycles
            return self._plan_full(states, replace)

    def _plan_full(self, states: Iterable[ServiceState], replace: bool) -> Plan:
        # Each Service is rendered, written out and dropped in turn (oldest first, so the first
        # claimant of a shared key is the one that keeps it): at 10,000 Services holding every
        # Program at once would cost ~60 MB more at the peak.
        ordered = sorted(states, key=lambda s: s.key)
        allocator = SlotAllocator()
        changes: dict[str, Committed | None] = {}
        for state in ordered:
            changes[state.key] = Committed(state, {pid: allocator.take(count)
                                                   for pid, count in sorted(slot_needs(state).items())})
        stale: list[Program] = []  # what the kernel may hold that the new state lacks
        if not replace:
            changes.update({k: None for k in self._committed if k not in changes})
            stale = [c.program() for k, c in self._committed.items() if changes.get(k) != c]

        out = Transaction(LBCTL, batch_elements=True)
        if replace:  # adding first: deleting a table that is not there would fail
            for table in (*LEGACY_TABLES, LBCTL):
                out.add(None, table)
                out.delete(None, table)
        out.add(None, *BASE_OBJECTS)
        declared: set[str] = set()

        def declare(shards: Iterable[str]) -> None:
            for name in shards:
                if name not in declared:
                    declared.add(name)
                    out.add(None, shard_map(name))
                    if not replace:
                        out.flush(None, shard_map(name))

        if not replace:
            out.flush(None, LBCTL, *FIXED_MAPS, *FIXED_SETS)
            declare(_shards(stale))
        out.add(None, *BASE_RULES)

        winners: dict[ElementKey, str | None] = {}
        values: dict[ElementKey, object] = {}
        contested: dict[ElementKey, tuple[str, ...] | None] = {}
        conflicts: list[Conflict] = []
        udp = Counter[tuple[str, int]]()
        rule_count = len(BASE_RULES)
        kept_chains: dict[str, frozenset[str]] = {}
        kept_sets: dict[str, frozenset[str]] = {}
        # elements are gathered per collection and written as one `add element` each
        elements: dict[str, tuple[list[Element], list[str]]] = {}
        for state in sorted(ordered, key=lambda s: (s.created, s.key)):
            key = state.key
            committed = changes[key]
            assert committed is not None
            program = render_program(state, committed.slots)
            declare(_shards([program]))
            rule_count += _rule_count(program)
            out.add(key, *(Chain(name) for name in program.chains))
            out.add(key, *program.sets.values())
            for name, rules in program.chains.items():
                out.add(key, *(Rule(name, body) for body in rules))
            for el in program.elements:
                if el.collection in SHARED:
                    ck = (el.collection, el.key)
                    winner = winners.get(ck)
                    if winner is not None:
                        contested[ck] = (*(contested.get(ck) or (winner,)), key)
                        if values[ck] != el.value:
                            conflicts.append(Conflict(el.collection, _key_text(el), winner, key))
                        continue
                    winners[ck] = key
                    values[ck] = el.value
                listed = elements.get(el.collection)
                if listed is None:
                    listed = elements[el.collection] = ([], [])
                listed[0].append(el)
                listed[1].append(key)
            udp.update(program.udp_backends)
            if not replace and key in self._committed:
                kept_chains[key], kept_sets[key] = frozenset(program.chains), frozenset(program.sets)
        for objects, owners in elements.values():
            out.add_owned(objects, owners)
        for program in stale:  # chains and sets the new state has no more
            chains, sets = kept_chains.get(program.key, frozenset()), kept_sets.get(program.key, frozenset())
            out.delete(program.key, *(Chain(n) for n in program.chains if n not in chains))
            out.delete(program.key, *(s for n, s in program.sets.items() if n not in sets))
        gone = sorted(b for b in self._udp if b not in udp)
        counts = Counter[str]()
        for name, (objects, _) in elements.items():
            counts[collection_label(name)] += len(objects)
        return Plan(transaction=out, changes=changes, allocator=allocator, full=True,
                    conflicts=conflicts, udp_backends_gone=gone, winners=winners, contested=contested, udp=udp,
                    rules=rule_count, elements=counts)

    # -- incremental --------------------------------------------------------------------------
    def plan_update(self, states: Mapping[str, ServiceState | None]) -> Plan:
        """Only the given Services (None: gone) change; the rest of the table is untouched."""
        allocator = self._allocator.copy()
        old: dict[str, Program | None] = {}
        new: dict[str, Program | None] = {}
        changes: dict[str, Committed | None] = {}
        for key in sorted(states):
            state, committed = states[key], self._committed.get(key)
            if state is None:
                if committed is not None:
                    for released in committed.slots.values():
                        allocator.give(released)
                    old[key], new[key], changes[key] = committed.program(), None, None
                continue
            if committed is not None and committed.state == state:
                continue
            slots = allocate(state, committed.slots if committed else {}, allocator)
            old[key] = committed.program() if committed else None
            new[key] = render_program(state, slots)
            changes[key] = Committed(state, slots)

        out = Transaction(LBCTL)
        # 1. new chains, sets and shards (rules and elements below refer to them)
        out.add(None, *(shard_map(name) for name in _shards(new.values())))
        for key, program in new.items():
            if program is not None:
                before = old[key]
                out.add(key, *(Chain(n) for n in program.chains if not _has_chain(before, n)))
                out.add(key, *(s for n, s in program.sets.items() if not _has_set(before, n)))
        # 2. rules of new and changed chains
        for key, program in new.items():
            if program is None:
                continue
            before = old[key]
            for name, rules in program.chains.items():
                if before is not None and before.chains.get(name) == rules:
                    continue
                if _has_chain(before, name):
                    out.flush(key, Chain(name))
                out.add(key, *(Rule(name, body) for body in rules))
        # 3. elements: deletions first (a slot or key may pass to another Service in this plan)
        deletes = Transaction(LBCTL)
        adds = Transaction(LBCTL)
        for key in changes:
            before_own = _own_elements(old[key])
            after_own = _own_elements(new[key])
            for ck, value in before_own.items():
                if after_own.get(ck, _MISSING) != value:
                    deletes.delete(key, Element(ck[0], ck[1]))
            for ck, value in after_own.items():
                if before_own.get(ck, _MISSING) != value:
                    adds.add(key, Element(ck[0], ck[1], value))
        winners, contested, conflicts = self._shared_changes(changes, old, new, deletes, adds)
        element_change = Counter[str]()
        for change, ops in ((-1, deletes), (1, adds)):
            for op in ops.ops:
                element_change[collection_label(cast(Element, op.object).collection)] += change
        out.extend(deletes)
        out.extend(adds)
        # 4. chains and sets no longer used: emptied first, as they may jump to one another
        going = [(key, n) for key, program in old.items() if program is not None
                 for n in program.chains if not _has_chain(new[key], n)]
        for key, name in going:
            out.flush(key, Chain(name))
        for key, name in going:
            out.delete(key, Chain(name))
        for key, program in old.items():
            if program is not None:
                out.delete(key, *(s for n, s in program.sets.items() if not _has_set(new[key], n)))

        udp = Counter[tuple[str, int]]()
        for key in changes:
            udp.subtract(old[key].udp_backends if old[key] else ())  # type: ignore[union-attr]
            udp.update(new[key].udp_backends if new[key] else ())  # type: ignore[union-attr]
        gone = sorted(b for b, n in udp.items() if n < 0 and self._udp.get(b, 0) + n <= 0)
        rule_change = sum(_rule_count(new[key]) - _rule_count(old[key]) for key in changes)
        return Plan(transaction=out, changes=changes, allocator=allocator, full=False, conflicts=conflicts,
                    udp_backends_gone=gone, winners=winners, contested=contested, udp=udp,
                    rules=rule_change, elements=element_change)

    def _shared_changes(
        self, changes: Mapping[str, Committed | None], old: Mapping[str, Program | None],
        new: Mapping[str, Program | None], deletes: Transaction, adds: Transaction,
    ) -> tuple[dict[ElementKey, str | None], dict[ElementKey, tuple[str, ...] | None], list[Conflict]]:
        """Shared keys touched by the changed Services: who holds each now, and the element operations."""
        touched: set[ElementKey] = set()
        for key in changes:
            for program in (old[key], new[key]):
                touched.update(_shared_elements(program))
        rendered: dict[str, Program] = {}

        def program_of(owner: str, after: bool) -> Program | None:
            if owner in changes:
                return new[owner] if after else old[owner]
            if owner not in rendered:
                rendered[owner] = self._committed[owner].program()
            return rendered[owner]

        def priority(owner: str) -> tuple[str, str]:
            committed = changes[owner] if owner in changes else self._committed[owner]
            return committed.priority if committed else ("", owner)

        winners: dict[ElementKey, str | None] = {}
        contested: dict[ElementKey, tuple[str, ...] | None] = {}
        conflicts: list[Conflict] = []
        for ck in sorted(touched, key=_sort_key):
            before = self._contested.get(ck) or ((self._winners[ck],) if ck in self._winners else ())
            after = [c for c in before if c not in changes]
            after += [k for k in changes if ck in _shared_elements(new[k])]
            winner_before = self._winners.get(ck)
            winner_after = min(after, key=priority) if after else None
            value_before = _value(program_of(winner_before, False), ck) if winner_before else _MISSING
            value_after = _value(program_of(winner_after, True), ck) if winner_after else _MISSING
            for claimant in after:
                if claimant != winner_after and claimant in changes \
                        and _value(new[claimant], ck) != value_after:
                    conflicts.append(Conflict(ck[0], _key_text(Element(*ck)), winner_after or "", claimant))
            winners[ck] = winner_after
            contested[ck] = tuple(after) if len(after) > 1 else None
            if winner_before == winner_after and value_before == value_after:
                continue
            if value_before is not _MISSING and value_after is not _MISSING and value_before == value_after:
                continue  # another Service holds it now, with the same element
            if winner_before is not None:
                deletes.delete(winner_before, Element(*ck))
            if winner_after is not None and value_after is not _MISSING:
                adds.add(winner_after, Element(ck[0], ck[1], cast(ElementValue, value_after)))
        return winners, contested, conflicts

    def commit(self, plan: Plan) -> None:
        """Record that the kernel took `plan`."""
        if plan.full:
            self._committed = {k: c for k, c in plan.changes.items() if c is not None}
            self._winners = {k: w for k, w in plan.winners.items() if w is not None}
            self._contested = {k: c for k, c in plan.contested.items() if c is not None}
            self._udp = +plan.udp
            self.rules, self._elements = plan.rules, +plan.elements
            self.synced = True
        else:
            for key, committed in plan.changes.items():
                if committed is None:
                    self._committed.pop(key, None)
                else:
                    self._committed[key] = committed
            for ck, winner in plan.winners.items():
                if winner is None:
                    self._winners.pop(ck, None)
                else:
                    self._winners[ck] = winner
            for ck, claimants in plan.contested.items():
                if claimants is None:
                    self._contested.pop(ck, None)
                else:
                    self._contested[ck] = claimants
            self._udp.update(plan.udp)
            self._udp = +self._udp  # drop zero and negative counts
            self.rules += plan.rules
            self._elements.update(plan.elements)
            self._elements = +self._elements
        self._allocator = plan.allocator


_MISSING: object = object()  # no element (a set's element has the value None)


def _key_text(element: Element) -> str:
    return nft.element_text(Element(element.collection, element.key))


def _sort_key(ck: ElementKey) -> tuple[str, str]:
    return ck[0], _key_text(Element(*ck))


def _own_elements(program: Program | None) -> dict[ElementKey, ElementValue]:
    if program is None:
        return {}
    return {(el.collection, el.key): el.value for el in program.elements if el.collection not in SHARED}


def _shared_elements(program: Program | None) -> set[ElementKey]:
    if program is None:
        return set()
    return {(el.collection, el.key) for el in program.elements if el.collection in SHARED}


def _value(program: Program | None, ck: ElementKey) -> object:
    for el in program.elements if program else ():
        if el.collection == ck[0] and el.key == ck[1]:
            return el.value
    return _MISSING


def _rule_count(program: Program | None) -> int:
    return sum(len(bodies) for bodies in program.chains.values()) if program is not None else 0


def _has_chain(program: Program | None, name: str) -> bool:
    return program is not None and name in program.chains


def _has_set(program: Program | None, name: str) -> bool:
    return program is not None and name in program.sets
