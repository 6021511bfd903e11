"""Typed nftables objects and the one place that writes nft syntax (pure).

The renderer (lbctl.forwarder.render) decides *what* goes into the table and says it with the
objects here — tables, chains, maps, sets, rules made of typed statements, elements — and the
operations add, flush and delete on them, collected in a Transaction that records which Service
each operation belongs to (kube-proxy does the same with knftables). `Transaction.lines()` writes
the text `nft -f` reads; nothing else in lbctl spells nft commands.

Addresses decide their family: a statement about an IPv6 address or CIDR is written with `ip6`,
an IPv4 one with `ip`, and in an `inet` table NAT statements name their family (`dnat ip6 to`).

Element keys and values are tuples of parts (joined with ` . `), or a single part; a value may
also be a verdict (Goto). NamedTuples, not dataclasses: a full sync of 10,000 Services makes
~150,000 of these.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import StrEnum
from typing import NamedTuple, TypeAlias


class Table(NamedTuple):
    family: str  # "ip", "ip6" or "inet"
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


class Hook(NamedTuple):
    """What makes a chain a base chain."""

    type: str  # "nat", "filter"
    hook: str  # "prerouting", "output", …
    priority: str  # a number or a name ("dstnat", "srcnat", "filter")
    policy: str = "accept"


class Chain(NamedTuple):
    name: str
    hook: Hook | None = None


class Datatype(StrEnum):
    IPV4_ADDR = "ipv4_addr"
    IPV6_ADDR = "ipv6_addr"
    INET_PROTO = "inet_proto"
    INET_SERVICE = "inet_service"
    VERDICT = "verdict"


class SlotKey(NamedTuple):
    """`typeof numgen random mod 1`: the key of a map indexed by a random pick."""


class EndpointValue(NamedTuple):
    """`typeof ip[6] daddr . <proto> dport`: an endpoint address and port, as `dnat … map` reads them."""

    family: int  # 4 or 6
    protocol: str  # "tcp" or "udp"


MapKey: TypeAlias = tuple[Datatype, ...] | SlotKey
MapValue: TypeAlias = tuple[Datatype, ...] | EndpointValue


class Map(NamedTuple):
    name: str
    key: MapKey
    value: MapValue


class Set(NamedTuple):
    name: str
    key: Datatype
    timeout: int | None = None  # seconds; sets with a timeout are updated from the packet path

    @property
    def dynamic(self) -> bool:
        return self.timeout is not None


# -- statements ----------------------------------------------------------------------------------
class Field(StrEnum):
    """Packet fields a lookup concatenates."""

    DADDR4 = "ip daddr"
    DADDR6 = "ip6 daddr"
    L4PROTO = "meta l4proto"
    DPORT = "th dport"


class Jump(NamedTuple):
    chain: str


class Goto(NamedTuple):
    chain: str


class Drop(NamedTuple):
    pass


class Return(NamedTuple):
    pass


class Masquerade(NamedTuple):
    pass


class L4Proto(NamedTuple):
    """`meta l4proto tcp`"""

    protocol: str


class NfProto(NamedTuple):
    """`meta nfproto ipv4`: the packet is of this family (in an inet table)."""

    family: int


class LocalDestination(NamedTuple):
    """`fib daddr type local`: addressed to this host."""


class TcpNotOpening(NamedTuple):
    """`tcp flags & (syn | ack) != syn`: a TCP packet that opens no connection (not a bare SYN)."""


class DaddrNot(NamedTuple):
    """The destination is outside `cidr`."""

    cidr: str


class SaddrIn(NamedTuple):
    """The source is in `cidr`."""

    cidr: str


class SaddrInSet(NamedTuple):
    set: str
    family: int


class DaddrInSet(NamedTuple):
    set: str
    family: int


class MarkAny(NamedTuple):
    """Some bit of `mask` is set in the packet mark."""

    mask: int


class SetMarkBits(NamedTuple):
    """OR `mask` into the packet mark."""

    mask: int


class VerdictLookup(NamedTuple):
    """`<fields> vmap @map`"""

    fields: tuple[Field, ...]
    map: str


class RandomVerdict(NamedTuple):
    """`numgen random mod N offset B vmap @map`: one of the N verdicts at slots B…B+N-1."""

    size: int
    offset: int
    map: str


class DnatTo(NamedTuple):
    """`dnat to ADDRESS:PORT`"""

    address: str
    port: int


class DnatRandom(NamedTuple):
    """`dnat to numgen random mod N offset B map @map`: one of the N endpoints at slots B…B+N-1."""

    family: int
    size: int
    offset: int
    map: str


class RecordSource(NamedTuple):
    """`update @set { ip saddr }`: remember the client (with the set's timeout)."""

    set: str
    family: int


Statement: TypeAlias = (Jump | Goto | Drop | Return | Masquerade | L4Proto | NfProto | LocalDestination
                        | TcpNotOpening | DaddrNot | SaddrIn | SaddrInSet | DaddrInSet | MarkAny | SetMarkBits
                        | VerdictLookup | RandomVerdict | DnatTo | DnatRandom | RecordSource)


class Rule(NamedTuple):
    chain: str
    statements: tuple[Statement, ...]


Part: TypeAlias = str | int


class Element(NamedTuple):
    """One element of a named map or set; `value` is None for a set."""

    collection: str
    key: Part | tuple[Part, ...]
    value: Part | tuple[Part, ...] | Goto | None = None


Object: TypeAlias = Table | Chain | Map | Set | Rule | Element


class Verb(StrEnum):
    ADD = "add"
    FLUSH = "flush"  # tables (their rules), chains, maps and sets
    DELETE = "delete"


class Op(NamedTuple):
    verb: Verb
    object: Object
    owner: str | None  # the Service it belongs to; None: the table itself


# -- writing -------------------------------------------------------------------------------------
def family_of(address: str) -> int:
    """4 or 6 for an address or CIDR (no parsing: a colon means IPv6)."""
    return 6 if ":" in address else 4


_ADDR_FAMILY = {4: "ip", 6: "ip6"}


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _statement(stmt: Statement, inet: bool) -> str:
    match stmt:  # the statements of every Service's rules first: 20,000 rules at start-up
        case L4Proto(protocol):
            return f"meta l4proto {protocol}"
        case SetMarkBits(mask):
            return f"meta mark set meta mark | 0x{mask:08x}"
        case DnatRandom(family, count, offset, name):
            nat = f"dnat {_ADDR_FAMILY[family]} to" if inet else "dnat to"
            return f"{nat} numgen random mod {count} offset {offset} map @{name}"
        case DnatTo(address, port):
            nat = f"dnat {_ADDR_FAMILY[family_of(address)]} to" if inet else "dnat to"
            return f"{nat} {_bracketed(address)}:{port}"
        case Drop():
            return "drop"
        case NfProto(family):
            return f"meta nfproto ipv{family}"
        case Goto(chain):
            return f"goto {chain}"
        case Jump(chain):
            return f"jump {chain}"
        case Return():
            return "return"
        case Masquerade():
            return "masquerade"
        case LocalDestination():
            return "fib daddr type local"
        case TcpNotOpening():
            return "tcp flags & (syn | ack) != syn"
        case DaddrNot(cidr):
            return f"{_ADDR_FAMILY[family_of(cidr)]} daddr != {cidr}"
        case SaddrIn(cidr):
            return f"{_ADDR_FAMILY[family_of(cidr)]} saddr {cidr}"
        case SaddrInSet(name, family):
            return f"{_ADDR_FAMILY[family]} saddr @{name}"
        case DaddrInSet(name, family):
            return f"{_ADDR_FAMILY[family]} daddr @{name}"
        case MarkAny(mask):
            return f"meta mark & 0x{mask:08x} != 0"
        case VerdictLookup(fields, name):
            return f"{' . '.join(f.value for f in fields)} vmap @{name}"
        case RandomVerdict(count, offset, name):
            return f"numgen random mod {count} offset {offset} vmap @{name}"
        case RecordSource(name, family):
            return f"update @{name} {{ {_ADDR_FAMILY[family]} saddr }}"
    raise TypeError(f"not a statement: {stmt!r}")


def rule_body(rule: Rule, inet: bool = True) -> str:
    return " ".join(_statement(s, inet) for s in rule.statements)


def _parts(value: Part | tuple[Part, ...]) -> str:
    return " . ".join(map(str, value)) if type(value) is tuple else str(value)


def element_text(element: Element) -> str:
    """`key : value` (or `key` for a set element), as it sits between the braces."""
    key, value = element.key, element.value
    text = " . ".join(map(str, key)) if type(key) is tuple else str(key)
    if value is None:
        return text
    if type(value) is tuple:
        return f"{text} : {' . '.join(map(str, value))}"
    if type(value) is Goto:
        return f"{text} : goto {value.chain}"
    return f"{text} : {value}"


def _map_declaration(m: Map) -> str:
    if isinstance(m.key, SlotKey):
        if isinstance(m.value, EndpointValue):
            value = f"{_ADDR_FAMILY[m.value.family]} daddr . {m.value.protocol} dport"
        else:
            value = " . ".join(d.value for d in m.value)
        return f"{{ typeof numgen random mod 1 : {value}; }}"
    assert not isinstance(m.value, EndpointValue), "an endpoint value needs a slot key"
    return f"{{ type {' . '.join(d.value for d in m.key)} : {' . '.join(d.value for d in m.value)}; }}"


def _set_declaration(s: Set) -> str:
    if s.timeout is None:
        return f"{{ type {s.key.value}; }}"
    return f"{{ type {s.key.value}; flags dynamic,timeout; timeout {s.timeout}s; }}"


def _chain_declaration(c: Chain) -> str:
    if c.hook is None:
        return ""
    h = c.hook
    return f" {{ type {h.type} hook {h.hook} priority {h.priority}; policy {h.policy}; }}"


def write(table: Table, op: Verb, obj: Object) -> str:
    """One operation as one line of `nft -f` input."""
    verb = op.value
    inet = table.family == "inet"
    match obj:
        case Element():
            text = element_text(obj) if op is Verb.ADD else _parts(obj.key)
            return f"{verb} element {table} {obj.collection} {{ {text} }}"
        case Rule():
            return f"{verb} rule {table} {obj.chain} {rule_body(obj, inet)}"
        case Chain():
            return f"{verb} chain {table} {obj.name}{_chain_declaration(obj) if op is Verb.ADD else ''}"
        case Map():
            return f"{verb} map {table} {obj.name}{' ' + _map_declaration(obj) if op is Verb.ADD else ''}"
        case Set():
            return f"{verb} set {table} {obj.name}{' ' + _set_declaration(obj) if op is Verb.ADD else ''}"
        case Table():
            return f"{verb} table {obj}"
    raise TypeError(f"not an nftables object: {obj!r}")


class Transaction:
    """Operations in order, each with the Service it belongs to. `lines()` writes them; with
    `batch_elements`, consecutive element additions to one collection become one `add element`
    with one element per line (nft then names the line of a bad element; 40,000 one-element
    commands took nft half a second and 50 MB more).

    Kept as three parallel lists rather than Op tuples: a full sync of 10,000 Services holds
    ~150,000 operations, and a tuple each would cost ~10 MB more at the peak."""

    def __init__(self, table: Table, batch_elements: bool = False) -> None:
        self.table = table
        self.batch_elements = batch_elements
        self._verbs: list[Verb] = []
        self._objects: list[Object] = []
        self._owners: list[str | None] = []

    def __len__(self) -> int:
        return len(self._objects)

    def __bool__(self) -> bool:
        return bool(self._objects)

    @property
    def ops(self) -> list[Op]:
        return [Op(v, o, w) for v, o, w in zip(self._verbs, self._objects, self._owners, strict=True)]

    def _record(self, verb: Verb, owner: str | None, objects: Sequence[Object]) -> None:
        self._verbs.extend([verb] * len(objects))
        self._objects.extend(objects)
        self._owners.extend([owner] * len(objects))

    def add(self, owner: str | None, *objects: Object) -> None:
        self._record(Verb.ADD, owner, objects)

    def flush(self, owner: str | None, *objects: Table | Chain | Map | Set) -> None:
        self._record(Verb.FLUSH, owner, objects)

    def delete(self, owner: str | None, *objects: Object) -> None:
        self._record(Verb.DELETE, owner, objects)

    def add_owned(self, objects: Sequence[Object], owners: Sequence[str | None]) -> None:
        """Additions, each with its own owner."""
        self._verbs.extend([Verb.ADD] * len(objects))
        self._objects.extend(objects)
        self._owners.extend(owners)

    def extend(self, other: Transaction) -> None:
        self._verbs.extend(other._verbs)
        self._objects.extend(other._objects)
        self._owners.extend(other._owners)

    def lines(self) -> Iterator[tuple[str | None, str]]:
        """(owner, text) per line of `nft -f` input, without newlines."""
        table, verbs, objects, owners, batch = self.table, self._verbs, self._objects, self._owners, self.batch_elements
        add = Verb.ADD
        index, count = 0, len(objects)
        while index < count:
            obj = objects[index]
            if batch and type(obj) is Element and verbs[index] is add:
                collection = obj.collection
                yield None, f"add element {table} {collection} {{"
                while index < count:
                    obj = objects[index]
                    if type(obj) is not Element or verbs[index] is not add or obj.collection != collection:
                        break
                    yield owners[index], f"\t{element_text(obj)},"
                    index += 1
                yield None, "}"
                continue
            yield owners[index], write(table, verbs[index], obj)
            index += 1

    def texts(self) -> Iterator[str]:
        return (text for _, text in self.lines())

    def text(self) -> str:
        return "".join(text + "\n" for _, text in self.lines())


# -- loading a table that does not serve yet ----------------------------------------------------
class StagedLoad(NamedTuple):
    """A transaction that builds a table from nothing, in the order that keeps it dark until it is
    whole: `structure` (the table, its maps and sets, its regular chains and their rules) first,
    then the `elements` (over netlink: nft parses each of them, ~10 µs apiece, which was most of a
    10,000-Service start-up), then `hooks` — the base chains and their rules — last, so no packet
    meets the table before every element is in. `collections` are the maps and sets `structure`
    declares."""

    structure: Transaction
    elements: list[Element]
    collections: list[Map | Set]
    hooks: Transaction


def staged(transaction: Transaction) -> StagedLoad | None:
    """`transaction` split for a staged load, or None when it is not made of additions alone (a
    table added and deleted first — the replace idiom — is fine: it goes with the structure)."""
    table = transaction.table
    structure, hooks = Transaction(table), Transaction(table)
    elements: list[Element] = []
    collections: list[Map | Set] = []
    base_chains: set[str] = set()
    for verb, obj, owner in zip(transaction._verbs, transaction._objects, transaction._owners, strict=True):
        if isinstance(obj, Table):
            structure._record(verb, owner, (obj,))
        elif verb is not Verb.ADD:
            return None
        elif isinstance(obj, Element):
            elements.append(obj)
        elif isinstance(obj, Chain) and obj.hook is not None:
            base_chains.add(obj.name)
            hooks._record(verb, owner, (obj,))
        elif isinstance(obj, Rule) and obj.chain in base_chains:
            hooks._record(verb, owner, (obj,))
        else:
            if isinstance(obj, Map | Set):
                collections.append(obj)
            structure._record(verb, owner, (obj,))
    return StagedLoad(structure, elements, collections, hooks)
