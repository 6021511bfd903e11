"""The forwarders' direct line to each other on the node network (I/O; decisions in membership.py).

A UDP socket sends our heartbeat to every peer each `interval` and feeds the peers' heartbeats to
`Membership`; a raw ICMP socket pings the kernels of peers whose heartbeats stopped, so that a
restarting forwarder (kernel up) is told from a dead node (no answer), and, while a peer is silent
or none answers, the LAN witnesses (isolation.py), so a node that hears no peer can tell "cut off"
from "the peers are gone". Both are non-blocking sockets on the event loop: nothing here waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable

from lbctl.forwarder.isolation import Witnesses
from lbctl.forwarder.membership import Membership, decode, encode_all

log = logging.getLogger(__name__)

DEFAULT_PORT = 7475
_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(identifier: int, sequence: int) -> bytes:
    header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, identifier, sequence)
    payload = b"lbctl-peer-probe"
    checksum = icmp_checksum(header + payload)
    return struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, checksum, identifier, sequence) + payload


def parse_echo_reply(packet: bytes, identifier: int) -> bool:
    """Whether a raw IPv4 packet is an ICMP echo reply to one of our requests."""
    if len(packet) < 20:
        return False
    header_length = (packet[0] & 0x0F) * 4
    icmp = packet[header_length:header_length + 8]
    if len(icmp) < 8:
        return False
    kind, _code, _checksum, ident, _seq = struct.unpack("!BBHHH", icmp)
    return bool(kind == _ICMP_ECHO_REPLY and ident == identifier)


class _HeartbeatProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, str], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a node without a forwarder, and the like: expected
        log.debug("heartbeat socket: %s", exc)


class Peering:
    """Runs the heartbeat and probe sockets for `membership`; `claims()` gives what we hold now."""

    def __init__(self, membership: Membership, claims: Callable[[], frozenset[str]], *, port: int = DEFAULT_PORT,
                 bind: str = "0.0.0.0", on_change: Callable[[], None] = lambda: None, key: bytes = b"",
                 witnesses: Witnesses | None = None) -> None:
        self.membership = membership
        self.witnesses = witnesses if witnesses is not None else Witnesses()
        self._key = key
        self._claims = claims
        self._port = port
        self._bind = bind
        self._on_change = on_change
        self.incarnation = secrets.token_hex(6)
        self._seq = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._icmp: socket.socket | None = None
        self._icmp_id = os.getpid() & 0xFFFF
        self._icmp_seq = 0
        self.sent = 0
        self.received = 0
        self.rejected = 0  # datagrams that were no heartbeat of ours (or not signed with our key)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _HeartbeatProtocol(self._datagram), local_addr=(self._bind, self._port),
            family=socket.AF_INET, reuse_port=False)
        self._transport = transport
        try:
            icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError as exc:
            log.warning("no raw ICMP socket (%s): a peer whose forwarder stops counts as gone after %.1fs, "
                        "without the restart grace, and no LAN witness can be asked (grant NET_RAW)", exc,
                        self.membership.timing.dead_after)
            self.witnesses.set_addresses(())
        else:
            icmp.setblocking(False)
            loop.add_reader(icmp.fileno(), self._icmp_readable)
            self._icmp = icmp

    def _datagram(self, data: bytes, address: str) -> None:
        message = decode(data, self._key)
        if message is None:
            self.rejected += 1
            return
        self.received += 1
        if self.membership.heartbeat(message, address, time.monotonic()):
            self._on_change()

    def _icmp_readable(self) -> None:
        assert self._icmp is not None
        while True:
            try:
                packet, addr = self._icmp.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("icmp socket: %s", exc)
                return
            if parse_echo_reply(packet, self._icmp_id):
                now = time.monotonic()
                self.membership.echo_reply(str(addr[0]), now)
                self.witnesses.echo_reply(str(addr[0]), now)

    def send_heartbeats(self) -> None:
        if self._transport is None:
            return
        self._seq += 1
        datagrams = encode_all(self.membership.node, self.incarnation, self._seq, self._claims(), time.monotonic(),
                               self._key)
        for address in self.membership.targets():
            if ":" in address:
                continue  # the heartbeat socket is IPv4
            for datagram in datagrams:
                self._transport.sendto(datagram, (address, self._port))
                self.sent += 1

    def send_probes(self, now: float) -> None:
        if self._icmp is None:
            return
        peers = self.membership.to_probe(now)
        witnesses = self.witnesses.to_probe(bool(peers) or self.membership.isolated(now), now)
        for address in (*peers, *witnesses):
            self._icmp_seq = (self._icmp_seq + 1) & 0xFFFF
            with contextlib.suppress(OSError):  # unreachable right now: that is the answer
                self._icmp.sendto(echo_request(self._icmp_id, self._icmp_seq), (address, 0))

    async def run(self) -> None:
        interval = self.membership.timing.interval
        while True:
            self.send_heartbeats()
            self.send_probes(time.monotonic())
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._icmp is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._icmp.fileno())
            self._icmp.close()
            self._icmp = None
