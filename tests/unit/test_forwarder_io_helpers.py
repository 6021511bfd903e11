"""The pure parts of the forwarder's I/O modules: health answers, ARP frames, nft error parsing,
conntrack commands."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import time

import pytest

from lbctl.demo import kubectl_get_svc
from lbctl.forwarder.addresses import canonical, family_of, gratuitous_arp_frame, label_for, unsolicited_na
from lbctl.forwarder.apply import NftError
from lbctl.forwarder.conntrack import flush_command, flush_udp
from lbctl.forwarder.health import HealthCheck, health_response


@pytest.mark.parametrize(("count", "status"), [(0, 503), (1, 200), (3, 200)])
def test_health_answer_follows_kube_proxy(count: int, status: int) -> None:
    code, headers, body = health_response(HealthCheck("ns", "web", count))
    assert code == status
    assert json.loads(body) == {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": count,
                                "serviceProxyHealthy": True}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == str(count)


def test_gratuitous_arp_frame() -> None:
    frame = gratuitous_arp_frame("02:00:00:00:00:0a", "198.18.0.200")
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("02000000000a")
    assert frame[12:14] == b"\x08\x06"
    arp = frame[14:]
    assert arp[:8] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4, request
    assert arp[8:14] == bytes.fromhex("02000000000a")
    assert arp[14:18] == bytes([198, 18, 0, 200]) == arp[24:28]  # sender and target: the VIP
    assert arp[18:24] == b"\x00" * 6
    with pytest.raises(ValueError):
        gratuitous_arp_frame("02:00", "198.18.0.200")


@pytest.mark.parametrize("router", [False, True])
def test_unsolicited_neighbour_advertisement(router: bool) -> None:
    body = unsolicited_na("02:00:00:00:00:0a", "2001:db8:5::80", router=router)
    assert len(body) == 32
    assert body[0] == 136 and body[1] == 0  # neighbour advertisement, code 0
    assert body[2:4] == b"\x00\x00"  # the kernel fills in the checksum
    assert body[4] == (0x80 if router else 0) | 0x20  # override; never solicited (it is unsolicited)
    assert body[5:8] == b"\x00" * 3
    assert body[8:24] == bytes.fromhex("20010db8000500000000000000000080")  # the target: the VIP
    assert body[24:26] == b"\x02\x01"  # target link-layer address option, 8 bytes
    assert body[26:32] == bytes.fromhex("02000000000a")
    with pytest.raises(ValueError):
        unsolicited_na("02:00", "2001:db8:5::80")
    with pytest.raises(ValueError):
        unsolicited_na("02:00:00:00:00:0a", "198.18.0.200")


def test_address_families_and_spelling() -> None:
    assert family_of("198.18.0.1") == socket.AF_INET
    assert family_of("2001:db8::1") == socket.AF_INET6
    assert canonical("2001:DB8:0:0::1") == "2001:db8::1"


def test_address_label_fits_ifnamsiz() -> None:
    assert label_for("lo") == "lo:lbctl"
    assert len(label_for("enp0s31f6verylong")) == 15


def test_nft_error_names_the_offending_lines() -> None:
    transaction = "add table ip lbctl\nadd chain ip lbctl ok\nadd rule ip lbctl ok ip daddr 1.2.3.4 gotoo x\n"
    stderr = ("/dev/stdin:3:39-43: Error: No symbol type information\n"
              "add rule ip lbctl ok ip daddr 1.2.3.4 gotoo x\n"
              "                                      ^^^^^\n")
    error = NftError(stderr, transaction)
    assert [(r.number, r.text, r.error) for r in error.rejected] == [
        (3, "add rule ip lbctl ok ip daddr 1.2.3.4 gotoo x", "No symbol type information")]
    assert "line 3: No symbol type information: add rule ip lbctl ok ip daddr 1.2.3.4 gotoo x" in str(error)


def test_nft_error_without_location() -> None:
    error = NftError("netlink: Error: cache initialization failed: Operation not permitted\n", "x\n")
    assert error.rejected == ()
    assert "Operation not permitted" in str(error)


def test_conntrack_flush_targets_the_endpoint_as_reply_source() -> None:
    assert flush_command("10.244.1.2", 53) == [
        "conntrack", "-D", "-p", "udp", "--reply-src", "10.244.1.2", "--reply-port-src", "53"]
    assert flush_command("2001:db8:1:1::a", 53) == [
        "conntrack", "-D", "-f", "ipv6", "-p", "udp", "--reply-src", "2001:db8:1:1::a", "--reply-port-src", "53"]


def test_demo_prints_the_service_like_kubectl() -> None:
    service = {
        "metadata": {"name": "hello", "creationTimestamp": "2024-05-01T12:00:00Z"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                 "ports": [{"port": 80, "nodePort": 31234, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.7.200"}]}},
    }
    now = dt.datetime(2024, 5, 1, 12, 0, 42, tzinfo=dt.UTC).timestamp()
    assert kubectl_get_svc(service, now).splitlines() == [
        "NAME    TYPE           CLUSTER-IP   EXTERNAL-IP    PORT(S)               AGE",
        "hello   LoadBalancer   10.96.0.10   198.18.7.200   80:31234/TCP,53/UDP   42s",
    ]
    pending = {**service, "status": {}}
    assert "<pending>" in kubectl_get_svc(pending, now)


def test_conntrack_flushes_never_block_the_event_loop() -> None:
    """Three flushes of 0.3 s each (a stand-in command that sleeps) while a ticker runs every 10 ms:
    the loop keeps ticking throughout, and the flushes really ran one after the other."""
    async def scenario() -> tuple[int, float]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await flush_udp([("198.19.1.10", 53), ("198.19.1.11", 53), ("198.19.1.12", 53)],
                        ("sh", "-c", "sleep 0.3", "conntrack-stand-in"))
        elapsed = time.monotonic() - started
        done.set()
        await task
        return ticks, elapsed

    ticks, elapsed = asyncio.run(scenario())
    assert elapsed >= 0.9
    assert ticks >= 30  # a blocking subprocess.run would have allowed about one tick


def test_a_missing_conntrack_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(flush_udp([("198.19.1.10", 53)], ("/nonexistent/conntrack",)))
    assert "conntrack not found" in caplog.text
