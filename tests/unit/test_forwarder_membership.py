"""Peer liveness on the node network (lbctl.forwarder.membership): the wire format, and who counts
as alive, away (forwarder silent, kernel up) or dead, on a clock the tests drive."""

from __future__ import annotations

import zlib

import pytest

from lbctl.forwarder.membership import (
    MAX_DATAGRAM,
    TENTATIVE,
    Heartbeat,
    Membership,
    Timing,
    decode,
    encode,
    encode_all,
    format_claim,
    parse_claim,
)
from lbctl.forwarder.peering import echo_request, icmp_checksum, parse_echo_reply

T = Timing(interval=0.2, probe_after=0.5, dead_after=1.0, grace=15.0)


def beat(node: str = "b", claims: tuple[str, ...] = (), incarnation: str = "i1", seq: int = 1,
         sent: float = 0.0) -> Heartbeat:
    return Heartbeat(node, incarnation, seq, claims, sent=sent)


def test_wire_round_trip() -> None:
    message = Heartbeat("node-1", "abc", 7, ("198.18.0.1", TENTATIVE + "198.18.0.2"), sent=12.5)
    assert decode(encode(message)) == message


@pytest.mark.parametrize("garbage", [b"", b"hello", zlib.compress(b"[1,2]"), zlib.compress(b'{"v":2}'),
                                     zlib.compress(b'{"v":1,"n":"","i":"x","s":1,"c":[],"p":0,"P":1}'),
                                     zlib.compress(b'{"v":1,"n":"a","i":"x","s":1,"c":[],"p":1,"P":1}'),
                                     zlib.compress(b'{"v":1,"n":"a","i":"x","s":"q","c":[],"p":0,"P":1}')])
def test_anything_else_on_the_port_is_ignored(garbage: bytes) -> None:
    assert decode(garbage) is None


def test_many_claims_are_split_into_datagrams_that_fit_and_reassemble() -> None:
    claims = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(40_000)]
    datagrams = encode_all("b", "i1", 3, claims)
    assert len(datagrams) > 1 and all(len(d) <= MAX_DATAGRAM for d in datagrams)
    member = Membership("a", T)
    for datagram in reversed(datagrams[1:]):  # out of order, the first part last
        message = decode(datagram)
        assert message is not None
        member.heartbeat(message, "192.0.2.2", 0.0)
        assert member.claims(0.0)[0] == {}  # nothing until every part is in
    first = decode(datagrams[0])
    assert first is not None
    assert member.heartbeat(first, "192.0.2.2", 0.0)
    assert set(member.claims(0.0)[0]) == set(claims)


def test_a_small_heartbeat_is_one_datagram() -> None:
    assert len(encode_all("b", "i1", 1, [])) == 1
    assert len(encode_all("b", "i1", 1, ["198.18.0.1"] * 10)) == 1


# (seconds since the last heartbeat, seconds since the last echo reply or None) → state
@pytest.mark.parametrize(("silent", "echo_age", "state"), [
    (0.0, None, "alive"),
    (0.9, None, "alive"),
    (1.0, None, "dead"),  # link cut or node dead: no heartbeat, no echo
    (1.5, 0.1, "away"),  # forwarder restarting; kernel answers
    (14.9, 0.3, "away"),
    (15.0, 0.3, "dead"),  # the grace is over
    (5.0, 1.2, "dead"),  # the kernel stopped answering too
])
def test_peer_states(silent: float, echo_age: float | None, state: str) -> None:
    member = Membership("a", T)
    member.heartbeat(beat(), "192.0.2.2", 0.0)
    if echo_age is not None:
        member.echo_reply("192.0.2.2", silent - echo_age)
    [view] = member.view(silent)
    assert view.state == state
    assert ("b" in member.alive(silent)) is (state in ("alive", "away"))


def test_we_are_always_alive_to_ourselves_and_our_own_heartbeat_is_ignored() -> None:
    member = Membership("a", T)
    assert member.alive(0.0) == {"a"}
    assert not member.heartbeat(beat("a", ("198.18.0.1",)), "192.0.2.1", 0.0)
    assert member.claims(0.0) == ({}, {})


def test_claims_firm_and_tentative_from_live_peers_only() -> None:
    member = Membership("a", T)
    member.heartbeat(beat("b", ("198.18.0.1#3", TENTATIVE + "198.18.0.2#1")), "192.0.2.2", 0.0)
    member.heartbeat(beat("c", ("198.18.0.1#4",), sent=0.5), "192.0.2.3", 0.5)
    assert member.claims(0.6) == ({"198.18.0.1": {"b": 3, "c": 4}}, {"198.18.0.2": {"b"}})
    assert member.claims(1.2) == ({"198.18.0.1": {"c": 4}}, {})  # b is dead: its claims are void
    assert member.generation("198.18.0.1") == 4 and member.generation("198.18.0.2") == 1
    assert member.generation("198.18.9.9") == 0


@pytest.mark.parametrize(("raw", "parsed"), [
    ("198.18.0.1#7", ("198.18.0.1", 7, False)),
    ("~198.18.0.1#2", ("198.18.0.1", 2, True)),
    ("198.18.0.1", ("198.18.0.1", 0, False)),  # no generation: the lowest
    ("fd00::1#3", ("fd00::1", 3, False)),
    ("~2001:db8:5::80#12", ("2001:db8:5::80", 12, True)),  # ':' in IPv6 addresses is no separator
    ("2001:db8::", ("2001:db8::", 0, False)),
    ("::ffff:198.18.0.1#1", ("::ffff:198.18.0.1", 1, False)),
    ("198.18.0.1#x", ("198.18.0.1", 0, False)),
])
def test_claim_format(raw: str, parsed: tuple[str, int, bool]) -> None:
    assert parse_claim(raw) == parsed
    vip, generation, tentative = parsed
    assert parse_claim(format_claim(vip, generation, tentative)) == parsed


def test_heartbeat_reports_what_changed() -> None:
    member = Membership("a", T)
    assert member.heartbeat(beat(claims=("x",)), "192.0.2.2", 0.0)  # new peer
    version = member.claims_version
    assert not member.heartbeat(beat(claims=("x",), seq=2, sent=0.2), "192.0.2.2", 0.2)  # nothing new
    assert member.heartbeat(beat(claims=("y",), seq=3, sent=0.4), "192.0.2.2", 0.4)  # claims changed
    assert member.claims_version == version + 1
    assert member.heartbeat(beat(claims=("y",), seq=4, sent=5.0), "192.0.2.2", 5.0)  # back from the dead


def test_probe_only_silent_peers_and_stop_after_the_grace() -> None:
    member = Membership("a", T)
    member.heartbeat(beat("b"), "192.0.2.2", 0.0)
    member.heartbeat(beat("c"), "192.0.2.3", 0.3)
    assert member.to_probe(0.4) == []
    assert member.to_probe(0.6) == ["192.0.2.2"]
    assert member.to_probe(0.9) == ["192.0.2.2", "192.0.2.3"]
    assert member.to_probe(16.5) == []


def test_targets_are_node_addresses_and_peers_that_reached_us() -> None:
    member = Membership("a", T)
    member.set_addresses({"a": "192.0.2.1", "b": "192.0.2.2", "c": ""})
    member.heartbeat(beat("d"), "192.0.2.4", 0.0)
    assert member.targets() == ["192.0.2.2", "192.0.2.4"]


@pytest.mark.parametrize(("case", "peers", "now", "isolated"), [
    ("no peer known (a one-node cluster)", {}, 5.0, False),
    ("peers heard", {"b": 4.5}, 5.0, False),
    ("every peer silent and not answering", {"b": 0.0, "c": 0.1}, 5.0, True),
    ("one of them still heard", {"b": 0.0, "c": 4.9}, 5.0, False),
])
def test_isolation(case: str, peers: dict[str, float], now: float, isolated: bool) -> None:
    member = Membership("a", T)
    for index, (node, at) in enumerate(peers.items()):
        member.heartbeat(beat(node), f"192.0.2.{index + 2}", at)
    assert member.isolated(now) is isolated, case


def test_settled_once_every_known_node_was_heard_or_the_wait_is_over() -> None:
    member = Membership("a", T)
    member.set_addresses({"b": "192.0.2.2", "c": "192.0.2.3"})
    assert not member.settled(started=0.0, now=0.3)
    member.heartbeat(beat("b"), "192.0.2.2", 0.3)
    assert not member.settled(started=0.0, now=0.4)
    assert member.settled(started=0.0, now=T.dead_after + T.interval)  # c runs no forwarder, say
    member.heartbeat(beat("c"), "192.0.2.3", 0.5)
    assert member.settled(started=0.0, now=0.5)
    assert not member.settled(started=0.45, now=0.6)  # back from a cut: b not heard since


def test_a_restart_is_a_new_incarnation_with_fresh_claims() -> None:
    member = Membership("a", T)
    member.heartbeat(beat("b", ("x",), incarnation="i1"), "192.0.2.2", 0.0)
    member.heartbeat(beat("b", (TENTATIVE + "x",), incarnation="i2"), "192.0.2.2", 3.0)
    assert member.claims(3.0) == ({}, {"x": {"b"}})


@pytest.mark.parametrize("timing", [dict(interval=0.0), dict(probe_after=0.1), dict(dead_after=0.4),
                                    dict(grace=0.5)])
def test_impossible_timings_are_refused(timing: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Timing(**{**dict(interval=0.2, probe_after=0.5, dead_after=1.0, grace=15.0), **timing})


def test_icmp_echo_request_and_reply() -> None:
    request = echo_request(0x1234, 7)
    assert request[0] == 8 and icmp_checksum(request) == 0  # a valid checksum sums to zero
    reply_icmp = bytes([0]) + request[1:]
    ip_header = bytes([0x45]) + bytes(19)
    assert parse_echo_reply(ip_header + reply_icmp, 0x1234)
    assert not parse_echo_reply(ip_header + reply_icmp, 0x4321)  # someone else's ping
    assert not parse_echo_reply(ip_header + request, 0x1234)  # a request, not a reply
    assert not parse_echo_reply(b"\x45", 0x1234)


def test_a_peer_judged_gone_does_not_come_back_with_its_old_claims_by_answering_ping() -> None:
    member = Membership("a", T)
    member.heartbeat(beat("b", ("x",)), "192.0.2.2", 0.0)
    assert "b" not in member.alive(1.5)  # cut off: no heartbeat, no echo
    member.echo_reply("192.0.2.2", 2.0)  # its link is back, its kernel answers
    assert "b" not in member.alive(2.1) and member.claims(2.1) == ({}, {})
    member.heartbeat(beat("b", (), seq=2), "192.0.2.2", 2.2)  # it speaks for itself again
    assert "b" in member.alive(2.2) and member.claims(2.2) == ({}, {})


def test_heartbeats_that_waited_in_a_queue_or_come_out_of_order_are_ignored() -> None:
    member = Membership("a", T)
    # the sender's clock runs 1000 s ahead of ours; the path takes a few ms
    member.heartbeat(beat("b", ("x",), seq=1, sent=1000.0), "192.0.2.2", 0.002)
    member.heartbeat(beat("b", ("x",), seq=2, sent=1000.2), "192.0.2.2", 0.203)
    # its link went down; it gave x up; the link comes back and the queued heartbeat arrives late
    assert not member.heartbeat(beat("b", ("x",), seq=3, sent=1000.4), "192.0.2.2", 3.0)
    assert "b" not in member.alive(3.0)
    assert member.heartbeat(beat("b", (), seq=13, sent=1002.99), "192.0.2.2", 3.001)  # fresh: counts
    assert member.claims(3.001) == ({}, {})
    assert not member.heartbeat(beat("b", ("x",), seq=12, sent=1002.8), "192.0.2.2", 3.002)  # older than seen
    assert member.claims(3.002) == ({}, {})


def test_the_delay_base_tolerates_clock_drift() -> None:
    member = Membership("a", T)
    member.heartbeat(beat("b", seq=1, sent=0.0), "192.0.2.2", 0.001)
    # an hour later the sender's clock is 2 s behind ours relative to the start (0.06 % drift)
    seq = 2
    for minute in range(1, 61):
        now = minute * 60.0
        assert member.heartbeat(beat("b", seq=seq, sent=now - 2.0 * minute / 60), "192.0.2.2", now) or True
        seq += 1
        assert "b" in member.alive(now), minute


def test_signed_heartbeats_need_the_same_key() -> None:
    message = Heartbeat("b", "i1", 1, ("198.18.0.1",), sent=1.0)
    signed = encode(message, b"s3cret")
    assert decode(signed, b"s3cret") == message
    assert decode(signed, b"other") is None  # another cluster, or a guess
    assert decode(encode(message), b"s3cret") is None  # unsigned: refused when we have a key
    assert decode(signed[:-1] + bytes([signed[-1] ^ 1]), b"s3cret") is None  # tampered
    assert decode(b"x" * 10, b"s3cret") is None
    assert all(decode(d, b"k") is not None for d in encode_all("b", "i1", 1, ["198.18.0.1"], 1.0, b"k"))
