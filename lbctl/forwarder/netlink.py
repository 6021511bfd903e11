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

`encode_additions` writes many additions as a series of batches, for a table that serves nothing
yet (the staged start-up load, lbctl.forwarder.apply.load_dark); `exists` asks whether a table or
chain is there.

Why by hand, with pyroute2 at hand: its generic message classes (pyroute2.netlink.nfnetlink.
nftsocket) encode a set element in about 110 µs here, against about 2 µs for the writers below,
compiled once per collection: a start-up load of 160,000 elements would take 18 s instead of 0.4.

Encodings, as nft itself writes them: integers of `typeof numgen` keys in host byte order;
addresses in network order; ports (inet_service) as two bytes in network order; protocols
(inet_proto) as one byte; in a concatenation every part padded to 4 bytes; a `goto` value as a
verdict with its chain's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from lbctl.forwarder.nftables import (
    Datatype,
    Element,
    EndpointValue,
    Goto,
    Map,
    Part,
    Set,
    SlotKey,
    Table,
    Transaction,
    Verb,
)

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE, _NFT_MSG_GETTABLE, _NFT_MSG_NEWCHAIN, _NFT_MSG_GETCHAIN = 0, 1, 3, 4
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
_NFTA_TABLE_NAME, _NFTA_CHAIN_TABLE, _NFTA_CHAIN_NAME = 1, 1, 3
_NFTA_SET_ELEM_LIST_TABLE, _NFTA_SET_ELEM_LIST_SET, _NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_NFTA_LIST_ELEM = 1
_NFTA_SET_ELEM_KEY, _NFTA_SET_ELEM_DATA = 1, 2
_NFTA_DATA_VALUE, _NFTA_DATA_VERDICT = 1, 2
_NFTA_VERDICT_CODE, _NFTA_VERDICT_CHAIN = 1, 2
_NFT_GOTO = -4
_FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}  # NFPROTO_*
_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_OPERATIONS = 4000
MAX_BATCH_BYTES = 128 * 1024  # well inside a netlink socket's default send buffer (208 KiB)
_MAX_MESSAGE_BYTES = 32 * 1024

Types = tuple[Datatype, ...]


class NetlinkError(RuntimeError):
    def __init__(self, code: int, what: str) -> None:
        self.code = code
        super().__init__(f"{what}: {os.strerror(code) if code > 0 else code}")


# -- encoding (pure) -----------------------------------------------------------------------------
# Written for speed as well as for clarity: a start-up load sends every element of the table
# (160,000 at 10,000 dual-stack Services), so each collection gets a writer compiled once from its
# types, with every attribute header of a fixed size prepared in advance.
_HEADER = struct.Struct("=HH")
_SLOT = struct.Struct("=I")
_GOTO = struct.pack("!i", _NFT_GOTO)


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _HEADER.pack(length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *attributes: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attributes))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


PartWriter: TypeAlias = Callable[[Part], bytes]


def _ipv4(part: Part) -> bytes:
    if not isinstance(part, str):
        raise TypeError(f"{part!r} is not an address")
    return socket.inet_pton(socket.AF_INET, part)


def _ipv6(part: Part) -> bytes:
    if not isinstance(part, str):
        raise TypeError(f"{part!r} is not an address")
    return socket.inet_pton(socket.AF_INET6, part)


def _port(part: Part) -> bytes:
    return int(part).to_bytes(2, "big")


def _protocol(part: Part) -> bytes:
    return bytes((_PROTOCOLS[part] if isinstance(part, str) else int(part),))


# each datatype's writer and its size in bytes
_PARTS: dict[Datatype, tuple[PartWriter, int]] = {
    Datatype.IPV4_ADDR: (_ipv4, 4),
    Datatype.IPV6_ADDR: (_ipv6, 16),
    Datatype.INET_SERVICE: (_port, 2),
    Datatype.INET_PROTO: (_protocol, 1),
}

DataWriter: TypeAlias = Callable[[Part | tuple[Part, ...]], bytes]


def _data_writer(types: Types) -> tuple[DataWriter, int]:
    """A writer of values of `types` and the size of what it writes. In a concatenation every part
    takes whole 4-byte registers; a single part is written as it is."""
    if any(t not in _PARTS for t in types):
        raise ValueError(f"no encoding for {types}")
    if len(types) == 1:
        write_one, size = _PARTS[types[0]]

        def single(value: Part | tuple[Part, ...]) -> bytes:
            if isinstance(value, tuple):
                if len(value) != 1:
                    raise ValueError(f"{value!r} does not match {types}")
                value = value[0]
            return write_one(value)
        return single, size
    writers = [(_PARTS[t][0], b"\0" * (-_PARTS[t][1] % 4)) for t in types]
    size = sum(_PARTS[t][1] + (-_PARTS[t][1] % 4) for t in types)
    if len(writers) == 2:  # address . port, the endpoint maps' values: 50,000 of them at start-up
        (write_first, first_pad), (write_second, second_pad) = writers

        def pair(value: Part | tuple[Part, ...]) -> bytes:
            if not isinstance(value, tuple) or len(value) != 2:
                raise ValueError(f"{value!r} does not match {types}")
            return write_first(value[0]) + first_pad + write_second(value[1]) + second_pad
        return pair, size

    def concatenation(value: Part | tuple[Part, ...]) -> bytes:
        if not isinstance(value, tuple) or len(value) != len(writers):
            raise ValueError(f"{value!r} does not match {types}")
        return b"".join([write(part) + pad for (write, pad), part in zip(writers, value, strict=True)])
    return concatenation, size


def _slot(value: Part | tuple[Part, ...]) -> bytes:
    if not isinstance(value, int):
        raise ValueError(f"{value!r}: a slot key is an integer")
    return _SLOT.pack(value)  # numgen's u32, host order


def _wrapped(kind: int, size: int) -> bytes:
    """The headers of `kind` holding one NFTA_DATA_VALUE of `size` bytes (a multiple of 4)."""
    return _HEADER.pack(8 + size, kind | _NLA_F_NESTED) + _HEADER.pack(4 + size, _NFTA_DATA_VALUE)


ElementWriter: TypeAlias = Callable[[Element], bytes]


@dataclass(frozen=True)
class _Writers:
    """How the elements of one collection are written: `add` with their values, `delete` by key."""

    add: ElementWriter
    delete: ElementWriter


def _writers(collection: Map | Set) -> _Writers | None:
    """None for a collection whose elements the packet path writes (a set with a timeout)."""
    if isinstance(collection, Set):
        if collection.dynamic:
            return None
        key_types: Types | None = (collection.key,)
        value_types: Types | None = None
    else:
        key_types = None if isinstance(collection.key, SlotKey) else collection.key
        value = collection.value
        value_types = (Datatype.IPV6_ADDR if value.family == 6 else Datatype.IPV4_ADDR, Datatype.INET_SERVICE) \
            if isinstance(value, EndpointValue) else value
    write_key, key_size = (_slot, 4) if key_types is None else _data_writer(key_types)
    key_padding = b"\0" * (-key_size % 4)
    key_size += len(key_padding)
    key_head = _wrapped(_NFTA_SET_ELEM_KEY, key_size)
    keyed_head = _HEADER.pack(4 + len(key_head) + key_size, _NFTA_LIST_ELEM | _NLA_F_NESTED) + key_head
    name = collection.name

    def by_key(element: Element) -> bytes:
        return keyed_head + write_key(element.key) + key_padding

    def as_set_member(element: Element) -> bytes:
        if element.value is not None:
            raise ValueError(f"{element!r} has a value but {name} is a set")
        return by_key(element)

    if value_types is None:
        return _Writers(as_set_member, by_key)
    if value_types == (Datatype.VERDICT,):
        def with_verdict(element: Element) -> bytes:
            if not isinstance(element.value, Goto):
                raise ValueError(f"{element!r} has no value its map can hold")
            verdict = _nested(_NFTA_DATA_VERDICT, _attr(_NFTA_VERDICT_CODE, _GOTO),
                              _string(_NFTA_VERDICT_CHAIN, element.value.chain))
            key = key_head + write_key(element.key) + key_padding
            data = _HEADER.pack(4 + len(verdict), _NFTA_SET_ELEM_DATA | _NLA_F_NESTED) + verdict
            return _HEADER.pack(4 + len(key) + len(data), _NFTA_LIST_ELEM | _NLA_F_NESTED) + key + data
        return _Writers(with_verdict, by_key)
    write_value, value_size = _data_writer(value_types)
    value_padding = b"\0" * (-value_size % 4)
    value_size += len(value_padding)
    value_head = _wrapped(_NFTA_SET_ELEM_DATA, value_size)
    valued_head = _HEADER.pack(4 + len(key_head) + key_size + len(value_head) + value_size,
                               _NFTA_LIST_ELEM | _NLA_F_NESTED) + key_head

    def with_value(element: Element) -> bytes:
        value = element.value
        if value is None or isinstance(value, Goto):
            raise ValueError(f"{element!r} has no value its map can hold")
        return (valued_head + write_key(element.key) + key_padding + value_head + write_value(value)
                + value_padding)
    return _Writers(with_value, by_key)


def _message(kind: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    header = struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, seq, 0)
    return header + struct.pack("=BBH", family, 0, 0) + body


@dataclass(frozen=True)
class Batch:
    data: bytes
    seqs: tuple[int, ...]  # the messages the kernel must acknowledge


def _frame(messages: list[bytes], first_seq: int, seq: int) -> bytes:
    """`messages` between the batch's begin and end: the kernel commits all of them or none."""
    subsystem = struct.pack("!H", _NFNL_SUBSYS_NFTABLES)
    begin = struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, first_seq - 1, 0) \
        + struct.pack("=BB", socket.AF_UNSPEC, 0) + subsystem
    end = struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq, 0) \
        + struct.pack("=BB", socket.AF_UNSPEC, 0) + subsystem
    return begin + b"".join(messages) + end


class _Encoder:
    """Element messages of one table: consecutive changes of one verb and collection share a
    message of up to _MAX_MESSAGE_BYTES. Raises ValueError (or TypeError, KeyError, OSError) for
    an element it cannot write."""

    def __init__(self, table: Table, known: Iterable[Map | Set]) -> None:
        family = _FAMILIES.get(table.family)
        if family is None:
            raise ValueError(f"no netlink family for {table}")
        self.family = family
        self.table = _string(_NFTA_SET_ELEM_LIST_TABLE, table.name)
        self.writers: dict[str, _Writers | None] = {c.name: _writers(c) for c in known}

    def declare(self, collection: Map | Set) -> None:
        self.writers[collection.name] = _writers(collection)

    def messages(self, verb: Verb, elements: Sequence[Element], seq: int,
                 limit: int = _MAX_MESSAGE_BYTES) -> Iterator[bytes]:
        """The messages for `elements` (of any collections, in order), numbered from `seq`, each
        closed once its elements reach `limit` bytes."""
        kind = (_NFNL_SUBSYS_NFTABLES << 8) | (_NFT_MSG_NEWSETELEM if verb is Verb.ADD else _NFT_MSG_DELSETELEM)
        flags = _NLM_F_REQUEST | _NLM_F_ACK | (_NLM_F_CREATE if verb is Verb.ADD else 0)
        index, count = 0, len(elements)
        while index < count:
            collection = elements[index].collection
            writers = self.writers.get(collection)
            if writers is None:
                raise ValueError(f"{collection}: not declared, or written by the packet path")
            write = writers.add if verb is Verb.ADD else writers.delete
            encoded: list[bytes] = []
            size = 0
            while index < count and size < limit and elements[index].collection == collection:
                data = write(elements[index])
                encoded.append(data)
                size += len(data)
                index += 1
            body = self.table + _string(_NFTA_SET_ELEM_LIST_SET, collection) \
                + _HEADER.pack(4 + size, _NFTA_SET_ELEM_LIST_ELEMENTS | _NLA_F_NESTED) + b"".join(encoded)
            yield _message(kind, flags, seq, self.family, body)
            seq += 1


_UNWRITABLE = (ValueError, TypeError, KeyError, OSError)  # OSError: inet_pton's word for a bad address


def encode(transaction: Transaction, known: Iterable[Map | Set] = (), first_seq: int = 1) -> Batch | None:
    """The transaction as one nfnetlink batch, or None when it is not element changes alone (see
    the module's docstring). `known` are collections that exist whatever the transaction says
    (the table's fixed maps and sets)."""
    if not transaction or len(transaction) > MAX_OPERATIONS:
        return None
    try:
        encoder = _Encoder(transaction.table, known)
    except ValueError:
        return None
    runs: list[tuple[Verb, list[Element]]] = []  # consecutive changes of one verb
    for op in transaction.ops:
        obj = op.object
        if isinstance(obj, Map | Set) and op.verb is Verb.ADD:
            encoder.declare(obj)
        elif isinstance(obj, Element) and op.verb in (Verb.ADD, Verb.DELETE):
            if runs and runs[-1][0] is op.verb:
                runs[-1][1].append(obj)
            else:
                runs.append((op.verb, [obj]))
        else:
            return None
    messages: list[bytes] = []
    try:
        for verb, elements in runs:
            messages.extend(encoder.messages(verb, elements, first_seq + len(messages)))
    except _UNWRITABLE:
        return None  # a part this module cannot write: nft can
    seq = first_seq + len(messages)
    return Batch(_frame(messages, first_seq, seq), tuple(range(first_seq, seq)))


def encode_additions(table: Table, elements: Sequence[Element], known: Iterable[Map | Set],
                     max_bytes: int = MAX_BATCH_BYTES) -> Iterator[Batch]:
    """Additions of many elements to collections that exist (`known`), as batches of at most
    `max_bytes` (what one send may carry), made as they are taken. Each batch is atomic, the
    whole is not: for a table that does not serve yet (lbctl.forwarder.apply.load_dark). Raises
    ValueError for an element it cannot write."""
    try:
        encoder = _Encoder(table, known)
        pending: list[bytes] = []
        size, first_seq, seq = 0, 1, 1
        # a message's names, headers and its last element may go past its limit: 1 KiB spare
        for message in encoder.messages(Verb.ADD, elements, 1, limit=min(_MAX_MESSAGE_BYTES, max_bytes - 1024)):
            if pending and size + len(message) > max_bytes:
                yield Batch(_frame(pending, first_seq, seq), tuple(range(first_seq, seq)))
                pending, size, first_seq = [], 0, seq
            pending.append(message)
            size += len(message)
            seq += 1
    except _UNWRITABLE as exc:
        raise ValueError(f"an element netlink cannot carry: {exc}") from exc
    if pending:
        yield Batch(_frame(pending, first_seq, seq), tuple(range(first_seq, seq)))


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


def exists(table: Table, chain: str | None = None, timeout_s: float = 5.0, sock: socket.socket | None = None) -> bool:
    """Whether `table` (or its chain `chain`) is in this thread's network namespace (or `sock`'s):
    one GET request, answered with the object or ENOENT."""
    family = _FAMILIES[table.family]
    if chain is None:
        kind, body = _NFT_MSG_GETTABLE, _string(_NFTA_TABLE_NAME, table.name)
    else:
        kind, body = _NFT_MSG_GETCHAIN, _string(_NFTA_CHAIN_TABLE, table.name) + _string(_NFTA_CHAIN_NAME, chain)
    found = (_NFNL_SUBSYS_NFTABLES << 8) | (_NFT_MSG_NEWTABLE if chain is None else _NFT_MSG_NEWCHAIN)
    with contextlib.nullcontext(sock) if sock is not None else open_socket() as sock:
        sock.settimeout(timeout_s)
        sock.send(_message((_NFNL_SUBSYS_NFTABLES << 8) | kind, _NLM_F_REQUEST, 1, family, body))
        data = sock.recv(1 << 16)
    if len(data) < 16:
        raise NetlinkError(errno.EPROTO, "a short answer from nf_tables")
    (answer,) = struct.unpack_from("=H", data, 4)
    if answer == found:
        return True
    code = acknowledgements(data).get(1)
    if code == errno.ENOENT:
        return False
    raise NetlinkError(code if code else errno.EPROTO, f"nf_tables did not say whether {table} exists")
