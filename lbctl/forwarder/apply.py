"""Runs nftables transactions with the `nft` CLI: `nft -f -` is one atomic transaction (all or
nothing), `nft -c -f -` checks one without applying it. A rejected transaction raises NftError
naming the offending lines; the kernel keeps the previous ruleset untouched."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lbctl.forwarder import netlink
from lbctl.forwarder.nftables import Map, Set, StagedLoad, Table, Transaction

_CHUNK_LINES = 2000
_LOCATION = re.compile(r"^(?:/dev/stdin|<cmdline>):(\d+):\d+(?:-\d+)?: Error: (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class RejectedLine:
    number: int  # 1-based line of the transaction text
    text: str
    error: str


class NftError(RuntimeError):
    def __init__(self, stderr: str, transaction: str | Sequence[str]) -> None:
        self.stderr = stderr.strip()
        lines = transaction.splitlines() if isinstance(transaction, str) else transaction
        self.rejected = tuple(
            RejectedLine(int(m.group(1)), lines[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(lines) else "",
                         m.group(2))
            for m in _LOCATION.finditer(stderr)
        )
        if self.rejected:
            first = self.rejected[0]
            summary = f"line {first.number}: {first.error}: {first.text}"
            if len(self.rejected) > 1:
                summary += f" (and {len(self.rejected) - 1} more)"
        else:
            summary = self.stderr.splitlines()[0] if self.stderr else "nft failed without a message"
        super().__init__(f"nft rejected the transaction: {summary}")


class NftNotFoundError(RuntimeError):
    pass


class Running:
    """An nft that has read its transaction and is applying it."""

    def __init__(self, proc: subprocess.Popen[bytes], transaction: str | Sequence[str] | Transaction) -> None:
        self._proc = proc
        self._transaction = transaction

    def wait(self) -> str:
        """nft's output once it is done; NftError naming the rejected lines if it refused."""
        assert self._proc.stdout is not None and self._proc.stderr is not None
        stdout, stderr = self._proc.stdout.read(), self._proc.stderr.read()
        if self._proc.wait() != 0:
            transaction = self._transaction
            lines = list(transaction.texts()) if isinstance(transaction, Transaction) else transaction
            raise NftError((stderr or stdout).decode(errors="replace"), lines)
        return stdout.decode(errors="replace")


class Nft:
    """`command` is how to call nft, e.g. ("nft",) or ("ip", "netns", "exec", NS, "nft")."""

    def __init__(self, command: Sequence[str] = ("nft",)) -> None:
        self.command = tuple(command)

    def _run(self, args: Sequence[str], transaction: str | Sequence[str] | Transaction) -> str:
        return self.start(args, transaction).wait()

    def start(self, args: Sequence[str], transaction: str | Sequence[str] | Transaction) -> Running:
        """Feed `transaction` (text, lines without their newline, or typed operations written
        line by line as nft reads them) to nft on stdin; nft goes on checking and committing it
        while the caller does other work, until Running.wait."""
        try:
            proc = subprocess.Popen([*self.command, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise NftNotFoundError(f"{self.command[0]} not found: install nftables (Debian: apt-get install "
                                   "nftables)") from exc
        assert proc.stdin is not None
        # nft reads all of stdin before it writes anything, so writing first cannot deadlock
        try:
            if isinstance(transaction, str):
                proc.stdin.write(transaction.encode())
            elif isinstance(transaction, Transaction):  # written in slices: never all the text at once
                pending: list[str] = []
                for text in transaction.texts():
                    pending.append(text)
                    if len(pending) == _CHUNK_LINES:
                        proc.stdin.write(("\n".join(pending) + "\n").encode())
                        pending = []
                proc.stdin.write(("\n".join(pending) + "\n").encode() if pending else b"")
            else:  # in slices: no copy of a whole large transaction
                for start in range(0, len(transaction), _CHUNK_LINES):
                    chunk = transaction[start:start + _CHUNK_LINES]
                    proc.stdin.write(("\n".join(chunk) + "\n").encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # nft stopped reading: its exit status and stderr say why
        return Running(proc, transaction)

    def apply(self, transaction: str | Sequence[str] | Transaction) -> None:
        self._run(("-f", "-"), transaction)

    def check(self, transaction: str | Sequence[str] | Transaction) -> None:
        self._run(("-c", "-f", "-"), transaction)

    def list_table(self, family: str, table: str) -> str:
        return self._run(("list", "table", family, table), "")

    def delete_table(self, family: str, table: str) -> None:
        """Remove the table if it exists (leaving: nothing of ours stays in the kernel)."""
        gone = Transaction(Table(family, table))
        gone.add(None, gone.table)  # adding first: deleting a missing table would fail
        gone.delete(None, gone.table)
        with contextlib.suppress(NftError, NftNotFoundError):
            self._run(("-f", "-"), gone)

    async def apply_async(self, transaction: str) -> None:
        await asyncio.to_thread(self.apply, transaction)


def load_dark(nft: Nft, load: StagedLoad, known: Iterable[Map | Set]) -> None:
    """Build a table that is not in the kernel yet, hooks last (see StagedLoad): nft for the
    structure, netlink batches for the elements, nft for the base chains. Raises NftError,
    NetlinkError, OSError or ValueError; a table left half-built by a failure has no hooks, so
    it serves nothing, and the caller's one-transaction load replaces it."""
    structure = nft.start(("-f", "-"), load.structure)
    # encoded while nft builds the structure (another process: the two share the machine's cores)
    batches = list(netlink.encode_additions(load.structure.table, load.elements, [*known, *load.collections]))
    structure.wait()
    with netlink.open_socket() as sock:
        for batch in batches:
            netlink.send(batch, sock=sock)
    nft.apply(load.hooks)
