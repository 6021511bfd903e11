"""The one writer of nft syntax (lbctl.forwarder.nftables): each typed object and statement as
nft reads it, in `ip` and `inet` tables, and transactions with their owners line by line."""

from __future__ import annotations

from collections.abc import Callable

import pytest

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
    Verb,
    VerdictLookup,
    element_text,
    family_of,
    rule_body,
    staged,
    write,
)

IP, INET = Table("ip", "lbctl"), Table("inet", "lbctl")


@pytest.mark.parametrize(("statement", "ip", "inet"), [
    (Goto("svc/a"), "goto svc/a", "goto svc/a"),
    (Jump("services"), "jump services", "jump services"),
    (Drop(), "drop", "drop"),
    (Masquerade(), "masquerade", "masquerade"),
    (L4Proto("udp"), "meta l4proto udp", "meta l4proto udp"),
    (NfProto(6), "meta nfproto ipv6", "meta nfproto ipv6"),
    (LocalDestination(), "fib daddr type local", "fib daddr type local"),
    (TcpNotOpening(), "tcp flags & (syn | ack) != syn", "tcp flags & (syn | ack) != syn"),
    (Return(), "return", "return"),
    (DaddrNot("127.0.0.0/8"), "ip daddr != 127.0.0.0/8", "ip daddr != 127.0.0.0/8"),
    (DaddrNot("::1"), "ip6 daddr != ::1", "ip6 daddr != ::1"),
    (SaddrIn("203.0.113.0/24"), "ip saddr 203.0.113.0/24", "ip saddr 203.0.113.0/24"),
    (SaddrIn("2001:db8::/64"), "ip6 saddr 2001:db8::/64", "ip6 saddr 2001:db8::/64"),
    (SaddrInSet("aff", 6), "ip6 saddr @aff", "ip6 saddr @aff"),
    (DaddrInSet("lb-ips", 4), "ip daddr @lb-ips", "ip daddr @lb-ips"),
    (MarkAny(0x4000), "meta mark & 0x00004000 != 0", "meta mark & 0x00004000 != 0"),
    (SetMarkBits(0x4000), "meta mark set meta mark | 0x00004000", "meta mark set meta mark | 0x00004000"),
    (RandomVerdict(3, 8, "endpoint-chains/001"), "numgen random mod 3 offset 8 vmap @endpoint-chains/001",
     "numgen random mod 3 offset 8 vmap @endpoint-chains/001"),
    (DnatTo("10.0.0.1", 80), "dnat to 10.0.0.1:80", "dnat ip to 10.0.0.1:80"),
    (DnatTo("2001:db8::1", 80), "dnat to [2001:db8::1]:80", "dnat ip6 to [2001:db8::1]:80"),
    (DnatRandom(6, 2, 1, "endpoints6-tcp/003"), "dnat to numgen random mod 2 offset 1 map @endpoints6-tcp/003",
     "dnat ip6 to numgen random mod 2 offset 1 map @endpoints6-tcp/003"),
    (RecordSource("aff", 4), "update @aff { ip saddr }", "update @aff { ip saddr }"),
])
def test_each_statement_is_written_for_its_family(statement: Statement, ip: str, inet: str) -> None:
    assert rule_body(Rule("c", (statement,)), inet=False) == ip
    assert rule_body(Rule("c", (statement,)), inet=True) == inet


def test_lookups_concatenate_fields() -> None:
    rule = Rule("services", (VerdictLookup((Field.DADDR6, Field.L4PROTO, Field.DPORT), "service-ips6"),))
    assert write(INET, Verb.ADD, rule) == \
        "add rule inet lbctl services ip6 daddr . meta l4proto . th dport vmap @service-ips6"


@pytest.mark.parametrize(("verb", "obj", "text"), [
    (Verb.ADD, INET, "add table inet lbctl"),
    (Verb.FLUSH, INET, "flush table inet lbctl"),
    (Verb.DELETE, INET, "delete table inet lbctl"),
    (Verb.ADD, Chain("svc/a"), "add chain inet lbctl svc/a"),
    (Verb.ADD, Chain("pre", Hook("nat", "prerouting", "dstnat")),
     "add chain inet lbctl pre { type nat hook prerouting priority dstnat; policy accept; }"),
    (Verb.FLUSH, Chain("svc/a"), "flush chain inet lbctl svc/a"),
    (Verb.DELETE, Chain("pre", Hook("nat", "prerouting", "dstnat")), "delete chain inet lbctl pre"),
    (Verb.ADD, Map("m", (Datatype.IPV6_ADDR, Datatype.INET_PROTO, Datatype.INET_SERVICE), (Datatype.VERDICT,)),
     "add map inet lbctl m { type ipv6_addr . inet_proto . inet_service : verdict; }"),
    (Verb.ADD, Map("e", SlotKey(), EndpointValue(6, "udp")),
     "add map inet lbctl e { typeof numgen random mod 1 : ip6 daddr . udp dport; }"),
    (Verb.ADD, Map("v", SlotKey(), (Datatype.VERDICT,)),
     "add map inet lbctl v { typeof numgen random mod 1 : verdict; }"),
    (Verb.FLUSH, Map("v", SlotKey(), (Datatype.VERDICT,)), "flush map inet lbctl v"),
    (Verb.ADD, Set("s", Datatype.IPV4_ADDR), "add set inet lbctl s { type ipv4_addr; }"),
    (Verb.ADD, Set("a", Datatype.IPV6_ADDR, 60),
     "add set inet lbctl a { type ipv6_addr; flags dynamic,timeout; timeout 60s; }"),
    (Verb.DELETE, Set("a", Datatype.IPV6_ADDR, 60), "delete set inet lbctl a"),
    (Verb.ADD, Element("service-ips6", ("2001:db8::a", "tcp", 80), Goto("svc/x")),
     "add element inet lbctl service-ips6 { 2001:db8::a . tcp . 80 : goto svc/x }"),
    (Verb.ADD, Element("endpoints6-tcp/001", 7, ("2001:db8::1", 8080)),
     "add element inet lbctl endpoints6-tcp/001 { 7 : 2001:db8::1 . 8080 }"),
    (Verb.DELETE, Element("service-ips6", ("2001:db8::a", "tcp", 80), Goto("svc/x")),
     "delete element inet lbctl service-ips6 { 2001:db8::a . tcp . 80 }"),
    (Verb.ADD, Element("lb-ips", "192.0.2.1"), "add element inet lbctl lb-ips { 192.0.2.1 }"),
])
def test_each_operation_is_one_line(verb: Verb, obj: object, text: str) -> None:
    assert write(INET, verb, obj) == text  # type: ignore[arg-type]


def test_batched_elements_are_one_command_with_an_owner_per_line() -> None:
    tx = Transaction(IP, batch_elements=True)
    tx.add(None, Chain("c"))
    tx.add("a/x", Element("m", 1, ("10.0.0.1", 80)), Element("m", 2, ("10.0.0.2", 80)))
    tx.add("b/y", Element("m", 3, ("10.0.0.3", 80)), Element("s", "192.0.2.1"))
    tx.delete("b/y", Element("m", 9))
    assert list(tx.lines()) == [
        (None, "add chain ip lbctl c"),
        (None, "add element ip lbctl m {"),
        ("a/x", "\t1 : 10.0.0.1 . 80,"), ("a/x", "\t2 : 10.0.0.2 . 80,"), ("b/y", "\t3 : 10.0.0.3 . 80,"),
        (None, "}"),
        (None, "add element ip lbctl s {"), ("b/y", "\t192.0.2.1,"), (None, "}"),
        ("b/y", "delete element ip lbctl m { 9 }"),
    ]
    assert len(tx) == 6 and [op.owner for op in tx.ops] == [None, "a/x", "a/x", "b/y", "b/y", "b/y"]


def test_unbatched_transactions_write_one_element_per_command() -> None:
    tx = Transaction(IP)
    tx.add("a/x", Element("m", 1, ("10.0.0.1", 80)), Element("m", 2, ("10.0.0.2", 80)))
    assert tx.text() == ("add element ip lbctl m { 1 : 10.0.0.1 . 80 }\n"
                         "add element ip lbctl m { 2 : 10.0.0.2 . 80 }\n")


def test_family_and_element_text() -> None:
    assert (family_of("10.0.0.0/8"), family_of("2001:db8::/32"), family_of("::ffff:1.2.3.4")) == (4, 6, 6)
    assert element_text(Element("node-ports", ("udp", 30053), Goto("svc/d"))) == "udp . 30053 : goto svc/d"


# -- staged loads ---------------------------------------------------------------------------------
def _start_up() -> Transaction:
    """The shape of a start-up plan: the replace idiom, maps, a regular chain with a rule, base
    chains with their rules, elements of both kinds."""
    out = Transaction(Table("inet", "t"))
    table = out.table
    out.add(None, table)
    out.delete(None, table)
    out.add(None, table, Map("m", (Datatype.IPV4_ADDR,), (Datatype.VERDICT,)), Set("s", Datatype.IPV4_ADDR),
            Chain("services"), Chain("pre", Hook("nat", "prerouting", "dstnat")))
    out.add(None, Rule("pre", (Jump("services"),)), Rule("services", (Drop(),)))
    out.add("a/b", Chain("svc/a/b"), Rule("svc/a/b", (Drop(),)), Element("m", "192.0.2.1", Goto("svc/a/b")),
            Element("s", "192.0.2.1"))
    return out


def test_a_start_up_load_is_split_structure_elements_then_hooks() -> None:
    load = staged(_start_up())
    assert load is not None
    assert [o.object for o in load.hooks.ops] == [Chain("pre", Hook("nat", "prerouting", "dstnat")),
                                                   Rule("pre", (Jump("services"),))]
    assert load.elements == [Element("m", "192.0.2.1", Goto("svc/a/b")), Element("s", "192.0.2.1")]
    structure = [(o.verb, o.object) for o in load.structure.ops]
    assert structure[:3] == [(Verb.ADD, Table("inet", "t")), (Verb.DELETE, Table("inet", "t")),
                             (Verb.ADD, Table("inet", "t"))]
    assert not any(isinstance(obj, Element) or obj in [o.object for o in load.hooks.ops] for _, obj in structure)
    assert load.collections == [Map("m", (Datatype.IPV4_ADDR,), (Datatype.VERDICT,)), Set("s", Datatype.IPV4_ADDR)]
    # every operation lands in exactly one stage, owners kept
    assert len(load.structure) + len(load.elements) + len(load.hooks) == len(_start_up())
    assert ("a/b", "add rule inet t svc/a/b drop") in list(load.structure.lines())


@pytest.mark.parametrize(("what", "change"), [
    ("a chain flushed", lambda t: t.flush("a/b", Chain("svc/a/b"))),
    ("an element deleted", lambda t: t.delete("a/b", Element("s", "192.0.2.1"))),
    ("a map deleted", lambda t: t.delete(None, Map("m", (Datatype.IPV4_ADDR,), (Datatype.VERDICT,)))),
])
def test_only_additions_can_be_staged(what: str, change: Callable[[Transaction], None]) -> None:
    out = _start_up()
    change(out)
    assert staged(out) is None, what
