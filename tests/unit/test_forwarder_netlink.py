"""lbctl.forwarder.netlink's pure half: which transactions go over netlink, and their bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from lbctl.forwarder import netlink
from lbctl.forwarder.nftables import Chain, Element, Goto, Rule, Transaction
from lbctl.forwarder.render import FIXED_MAPS, FIXED_SETS, LBCTL, shard_map

KNOWN = (*FIXED_MAPS, *FIXED_SETS)
SHARD = "endpoints-tcp/007"
SHARD6 = "endpoints6-udp/001"


def transaction(build: Callable[[Transaction], None]) -> Transaction:
    out = Transaction(LBCTL)
    build(out)
    return out


@pytest.mark.parametrize(("what", "build", "eligible"), [
    ("endpoints moved in a declared shard",
     lambda t: (t.add(None, shard_map(SHARD)), t.delete("a/b", Element(SHARD, 3)),
                t.add("a/b", Element(SHARD, 3, ("10.0.0.9", 8080)))), True),
    ("an LB address: the fixed maps and sets",
     lambda t: t.add("a/b", Element("service-ips", ("192.0.2.1", "tcp", 80), Goto("svc/a/b/tcp/80")),
                     Element("lb-ips", "192.0.2.1")), True),
    ("an IPv6 shard", lambda t: (t.add(None, shard_map(SHARD6)),
                                 t.add("a/b", Element(SHARD6, 1, ("2001:db8::1", 53)))), True),
    ("a shard nobody declared", lambda t: t.add("a/b", Element(SHARD, 3, ("10.0.0.9", 8080))), False),
    ("a chain flushed", lambda t: (t.flush("a/b", Chain("svc/a/b/tcp/80")),
                                   t.add("a/b", Element("lb-ips", "192.0.2.1"))), False),
    ("a rule", lambda t: t.add("a/b", Rule("svc/a/b/tcp/80", ())), False),
    ("a map flushed", lambda t: t.flush(None, shard_map(SHARD)), False),
    ("a value the map cannot hold", lambda t: t.add("a/b", Element("lb-ips", "2001:db8::1")), False),
    ("a verdict in an endpoint map",
     lambda t: (t.add(None, shard_map(SHARD)), t.add("a/b", Element(SHARD, 1, Goto("x")))), False),
    ("nothing", lambda t: None, False),
])
def test_which_transactions_go_over_netlink(what: str, build: Callable[[Transaction], None], eligible: bool) -> None:
    assert (netlink.encode(transaction(build), KNOWN) is not None) == eligible, what


def test_too_large_a_transaction_goes_to_nft() -> None:
    out = transaction(lambda t: t.add(None, shard_map(SHARD)))
    for slot in range(netlink.MAX_OPERATIONS):
        out.add("a/b", Element(SHARD, slot, ("10.0.0.9", 8080)))
    assert netlink.encode(out, KNOWN) is None


@pytest.mark.parametrize(("element", "expected"), [
    # slot (numgen's u32, host order) : address . port, each part of the value in 4-byte registers
    (Element(SHARD, 3, ("10.0.0.9", 8080)),
     [struct.pack("=I", 3), bytes([10, 0, 0, 9]) + struct.pack("!H", 8080) + b"\0\0"]),
    (Element(SHARD6, 1, ("2001:db8::1", 53)),
     [struct.pack("=I", 1), bytes.fromhex("20010db8000000000000000000000001") + struct.pack("!H", 53) + b"\0\0"]),
    # address . protocol . port : goto chain
    (Element("service-ips", ("192.0.2.1", "udp", 53), Goto("svc/a/b/udp/53")),
     [bytes([192, 0, 2, 1]) + bytes([17, 0, 0, 0]) + struct.pack("!H", 53) + b"\0\0",
      struct.pack("!i", -4), b"svc/a/b/udp/53\0"]),
    # a plain set of addresses: four bytes, no padding
    (Element("lb-ips", "192.0.2.1"), [bytes([192, 0, 2, 1])]),
])
def test_elements_are_written_as_nft_writes_them(element: Element, expected: list[bytes]) -> None:
    batch = netlink.encode(transaction(lambda t: (t.add(None, shard_map(SHARD), shard_map(SHARD6)),
                                                  t.add("a/b", element))), KNOWN)
    assert batch is not None and len(batch.seqs) == 1
    for part in expected:
        assert part in batch.data
    assert b"lbctl\0" in batch.data and element.collection.encode() + b"\0" in batch.data


def test_one_message_per_run_of_one_verb_and_collection() -> None:
    batch = netlink.encode(transaction(lambda t: (
        t.add(None, shard_map(SHARD)),
        t.delete("a/b", Element(SHARD, 1), Element(SHARD, 2)),
        t.add("a/b", Element(SHARD, 1, ("10.0.0.1", 80)), Element(SHARD, 2, ("10.0.0.2", 80))),
        t.add("a/b", Element("lb-ips", "192.0.2.1")))), KNOWN, first_seq=10)
    assert batch is not None and batch.seqs == (10, 11, 12)


def test_acknowledgements_name_each_message_and_its_error() -> None:
    def error(seq: int, code: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", code) + bytes(16)
    assert netlink.acknowledgements(error(5, 0) + error(6, -2)) == {5: 0, 6: 2}


def test_many_additions_go_in_batches_no_larger_than_a_send_carries() -> None:
    elements = [Element(SHARD, slot, (f"10.0.{slot >> 8}.{slot & 255}", 8080)) for slot in range(5000)]
    elements += [Element("lb-ips", f"192.0.2.{n}") for n in range(200)]
    batches = list(netlink.encode_additions(LBCTL, elements, (*KNOWN, shard_map(SHARD)), max_bytes=16 * 1024))
    assert len(batches) > 5 and all(len(b.data) <= 16 * 1024 + 40 for b in batches)  # + batch begin and end
    seqs = [s for b in batches for s in b.seqs]
    assert seqs == list(range(1, len(seqs) + 1))  # every message answered by its own number
    data = b"".join(b.data for b in batches)
    for slot in (0, 4999):  # the first and the last endpoint: address . port, as nft writes them
        assert bytes([10, 0, slot >> 8, slot & 255]) + struct.pack("!H", 8080) + b"\0\0" in data
    assert data.count(b"lb-ips\0") >= 1 and bytes([192, 0, 2, 199]) in data


def test_additions_netlink_cannot_carry_are_refused_whole() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        list(netlink.encode_additions(LBCTL, [Element("lb-ips", "not-an-address")], KNOWN))
    with pytest.raises(ValueError, match="cannot carry"):
        list(netlink.encode_additions(LBCTL, [Element(SHARD, 1, ("10.0.0.1", 80))], KNOWN))  # undeclared
