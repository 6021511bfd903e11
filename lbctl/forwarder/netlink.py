"""Element-only nftables transactions sent to the kernel over netlink, without the nft CLI.

Why: nft 1.0.6 reads every chain of the ruleset before it runs any `add element` or `delete
element` (an element may jump to a chain), about 3.5 ms per 1,000 chains, on top of starting a
process: with 10,000 Services an endpoint change cost 35–50 ms in nft alone. Most changes are just
that — an endpoint moved, added or gone means element deletions and additions in endpoint maps
that exist already — and the kernel takes them as one nfnetlink batch, atomic exactly like `nft
-f`: all of it or none.

`encode` (pure) turns a Transaction into that batch, or says None when it cannot: any operation
other than an element addition or deletion, or an `add map`/`add set` (the planner re-declares the
shards it touches; declaring an existing map changes nothing, so those are left out), an element
of a collection whose types the transaction does not declare and that is not one of the table's
fixed maps and sets, or a transaction larger than a few thousand operations. The caller then uses
nft. `send` (I/O) writes the batch on a NETLINK_NETFILTER socket of the calling thread's network
namespace and waits for the kernel's answer to every message (`send_async` the same from an event
loop, without blocking it); if the kernel refuses (say the
shard map does not exist yet: `add map` was left out) nothing was changed and the caller gives the
same transaction to nft.

Encodings, as nft itself writes them: integers of `typeof numgen` keys in host byte order;
addresses in network order; ports (inet_service) as two bytes in network order; protocols
(inet_proto) as one byte; in a concatenation every part padded to 4 bytes; a `goto` value as a
verdict with its chain's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbctl.forwarder.nftables import (
    Datatype,
    Element,
    EndpointValue,
    Goto,
    Map,
    Part,
    Set,
    SlotKey,
    Transaction,
    Verb,
)

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWSETELEM = 12
_NFT_MSG_DELSETELEM = 14
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_CREATE = 0x400
_NLA_F_NESTED = 0x8000
# attributes
_NFTA_SET_ELEM_LIST_TABLE, _NFTA_SET_ELEM_LIST_SET, _NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_NFTA_LIST_ELEM = 1
_NFTA_SET_ELEM_KEY, _NFTA_SET_ELEM_DATA = 1, 2
_NFTA_DATA_VALUE, _NFTA_DATA_VERDICT = 1, 2
_NFTA_VERDICT_CODE, _NFTA_VERDICT_CHAIN = 1, 2
_NFT_GOTO = -4
_FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}  # NFPROTO_*
_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_OPERATIONS = 4000
_MAX_MESSAGE_BYTES = 32 * 1024

Types = tuple[Datatype, ...]


class NetlinkError(RuntimeError):
    def __init__(self, code: int, what: str) -> None:
        self.code = code
        super().__init__(f"{what}: {os.strerror(code) if code > 0 else code}")


# -- encoding (pure) -----------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *attributes: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attributes))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _part(datatype: Datatype, part: Part) -> bytes:
    if datatype is Datatype.IPV4_ADDR:
        return ipaddress.IPv4Address(part).packed
    if datatype is Datatype.IPV6_ADDR:
        return ipaddress.IPv6Address(part).packed
    if datatype is Datatype.INET_SERVICE:
        return struct.pack("!H", int(part))
    if datatype is Datatype.INET_PROTO:
        return bytes([_PROTOCOLS[part] if isinstance(part, str) else int(part)])
    raise ValueError(f"no encoding for {datatype}")


def _data(types: Types, value: Part | tuple[Part, ...]) -> bytes:
    parts = value if isinstance(value, tuple) else (value,)
    if len(parts) != len(types):
        raise ValueError(f"{value!r} does not match {types}")
    if len(types) == 1:
        return _part(types[0], parts[0])
    out = b""
    for datatype, part in zip(types, parts, strict=True):
        data = _part(datatype, part)
        out += data + b"\0" * (-len(data) % 4)  # each part of a concatenation takes whole 4-byte registers
    return out


@dataclass(frozen=True)
class _Layout:
    """How a collection's keys and values are written: `slot` keys are numgen integers."""

    key: Types | None  # None: a slot (u32, host order)
    value: Types | None  # None: a set (no value)


def _layout(collection: Map | Set) -> _Layout | None:
    if isinstance(collection, Set):
        return None if collection.dynamic else _Layout((collection.key,), None)
    key = None if isinstance(collection.key, SlotKey) else collection.key
    value = collection.value
    if isinstance(value, EndpointValue):
        value = (Datatype.IPV6_ADDR if value.family == 6 else Datatype.IPV4_ADDR, Datatype.INET_SERVICE)
    return _Layout(key, value)


def _element(layout: _Layout, element: Element, with_value: bool) -> bytes:
    if layout.key is None:  # a slot: numgen's u32
        if not isinstance(element.key, int):
            raise ValueError(f"{element!r}: a slot key is an integer")
        key = struct.pack("=I", element.key)
    else:
        key = _data(layout.key, element.key)
    attributes = [_nested(_NFTA_SET_ELEM_KEY, _attr(_NFTA_DATA_VALUE, key))]
    if with_value and layout.value is not None:
        value = element.value
        if isinstance(value, Goto):
            if layout.value != (Datatype.VERDICT,):
                raise ValueError(f"a verdict in {element.collection}, whose values are {layout.value}")
            verdict = _nested(_NFTA_DATA_VERDICT, _attr(_NFTA_VERDICT_CODE, struct.pack("!i", _NFT_GOTO)),
                              _string(_NFTA_VERDICT_CHAIN, value.chain))
            attributes.append(_nested(_NFTA_SET_ELEM_DATA, verdict))
        elif value is None or layout.value == (Datatype.VERDICT,):
            raise ValueError(f"{element!r} has no value its map can hold")
        else:
            attributes.append(_nested(_NFTA_SET_ELEM_DATA, _attr(_NFTA_DATA_VALUE, _data(layout.value, value))))
    elif with_value and element.value is not None:
        raise ValueError(f"{element!r} has a value but {element.collection} is a set")
    return _nested(_NFTA_LIST_ELEM, *attributes)


def _message(kind: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    header = struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, seq, 0)
    return header + struct.pack("=BBH", family, 0, 0) + body


@dataclass(frozen=True)
class Batch:
    data: bytes
    seqs: tuple[int, ...]  # the messages the kernel must acknowledge


def encode(transaction: Transaction, known: Iterable[Map | Set] = (), first_seq: int = 1) -> Batch | None:
    """The transaction as one nfnetlink batch, or None when it is not element changes alone (see
    the module's docstring). `known` are collections that exist whatever the transaction says
    (the table's fixed maps and sets)."""
    if not transaction or len(transaction) > MAX_OPERATIONS:
        return None
    family = _FAMILIES.get(transaction.table.family)
    if family is None:
        return None
    layouts: dict[str, _Layout | None] = {c.name: _layout(c) for c in known}
    changes: list[tuple[Verb, Element]] = []
    for op in transaction.ops:
        obj = op.object
        if isinstance(obj, Map | Set) and op.verb is Verb.ADD:
            layouts[obj.name] = _layout(obj)
        elif isinstance(obj, Element) and op.verb in (Verb.ADD, Verb.DELETE):
            changes.append((op.verb, obj))
        else:
            return None
    seq = first_seq
    messages: list[bytes] = []
    seqs: list[int] = []
    index = 0
    try:
        while index < len(changes):  # consecutive changes of one verb and collection: one message
            verb, first = changes[index]
            layout = layouts.get(first.collection)
            if layout is None:
                return None
            kind = _NFT_MSG_NEWSETELEM if verb is Verb.ADD else _NFT_MSG_DELSETELEM
            flags = _NLM_F_REQUEST | _NLM_F_ACK | (_NLM_F_CREATE if verb is Verb.ADD else 0)
            elements: list[bytes] = []
            size = 0
            while index < len(changes) and changes[index][0] is verb \
                    and changes[index][1].collection == first.collection and size < _MAX_MESSAGE_BYTES:
                encoded = _element(layout, changes[index][1], verb is Verb.ADD)
                elements.append(encoded)
                size += len(encoded)
                index += 1
            body = (_string(_NFTA_SET_ELEM_LIST_TABLE, transaction.table.name)
                    + _string(_NFTA_SET_ELEM_LIST_SET, first.collection)
                    + _nested(_NFTA_SET_ELEM_LIST_ELEMENTS, *elements))
            messages.append(_message((_NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, family, body))
            seqs.append(seq)
            seq += 1
    except (ValueError, TypeError, KeyError):
        return None  # a part this module cannot write: nft can
    subsystem = struct.pack("!H", _NFNL_SUBSYS_NFTABLES)
    begin = struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, first_seq - 1, 0) \
        + struct.pack("=BB", socket.AF_UNSPEC, 0) + subsystem
    end = struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq, 0) \
        + struct.pack("=BB", socket.AF_UNSPEC, 0) + subsystem
    return Batch(begin + b"".join(messages) + end, tuple(seqs))


def acknowledgements(data: bytes) -> Mapping[int, int]:
    """seq → error code (0: done) of each NLMSG_ERROR message in a datagram."""
    found: dict[int, int] = {}
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if kind == _NLMSG_ERROR and length >= 20:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            found[seq] = -code
        offset += (length + 3) & ~3
    return found


# -- I/O -----------------------------------------------------------------------------------------
def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in this thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock


class _Answers:
    """The kernel's answers to a batch, as they come."""

    def __init__(self, batch: Batch) -> None:
        self.waiting = set(batch.seqs)
        self.failure = 0

    def feed(self, data: bytes) -> None:
        for seq, code in acknowledgements(data).items():
            if seq in self.waiting:
                self.waiting.discard(seq)
                self.failure = self.failure or code

    def check(self) -> None:
        if self.failure:
            raise NetlinkError(self.failure, "nf_tables refused the element batch")


def send(batch: Batch, timeout_s: float = 5.0, sock: socket.socket | None = None) -> None:
    """Commit `batch` in this thread's network namespace (or `sock`'s); raises NetlinkError when
    the kernel refuses any of it (then none of it was applied) or does not answer. Blocking: for a
    thread (the event loop uses send_async)."""
    with contextlib.nullcontext(sock) if sock is not None else open_socket() as sock:
        sock.settimeout(timeout_s)
        sock.sendto(batch.data, (0, 0))
        answers = _Answers(batch)
        while answers.waiting:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                if answers.failure:
                    break  # the refusal is known; the kernel may not answer for the rest
                raise NetlinkError(errno.ETIMEDOUT, "no answer from nf_tables") from None
            answers.feed(data)
            if answers.failure:
                sock.settimeout(0.05)
        answers.check()


async def send_async(batch: Batch, timeout_s: float = 5.0) -> None:
    """`send` from the event loop, which never blocks on it: the socket is non-blocking and the
    answers are awaited (loop.sock_recv). The kernel handles the batch within the send and queues
    its answers before the call returns, so they are normally read at once."""
    loop = asyncio.get_running_loop()
    with open_socket() as sock:
        sock.setblocking(False)
        sock.sendto(batch.data, (0, 0))
        answers = _Answers(batch)
        deadline = loop.time() + timeout_s
        while answers.waiting:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                if answers.failure:
                    break  # the refusal is known; the kernel may not answer for the rest
                raise NetlinkError(errno.ETIMEDOUT, "no answer from nf_tables") from None
            answers.feed(data)
            if answers.failure:
                deadline = min(deadline, loop.time() + 0.05)
        answers.check()
