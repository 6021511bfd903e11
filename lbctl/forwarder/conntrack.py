"""Flush UDP conntrack entries of endpoints that went away (the `conntrack` CLI).

A UDP "connection" lives on in conntrack as long as packets keep coming, so without this a client
that keeps sending would stay pinned to a removed endpoint forever. TCP needs nothing: the
endpoint's resets end the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)


def flush_command(ip: str, port: int, conntrack: Sequence[str] = ("conntrack",)) -> list[str]:
    # entries whose reply comes from the endpoint: every DNATed flow to it (conntrack looks in the
    # IPv4 table unless told otherwise)
    family = ["-f", "ipv6"] if ":" in ip else []
    return [*conntrack, "-D", *family, "-p", "udp", "--reply-src", ip, "--reply-port-src", str(port)]


async def flush_udp(backends: Iterable[tuple[str, int]], conntrack: Sequence[str] = ("conntrack",)) -> None:
    """An asyncio subprocess per backend: the forwarder's event loop never waits on conntrack."""
    for ip, port in backends:
        try:
            proc = await asyncio.create_subprocess_exec(*flush_command(ip, port, conntrack),
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            log.warning("conntrack not found (Debian: apt-get install conntrack): UDP flows to %s:%d "
                        "stay until they go idle", ip, port)
            return
        _, stderr = await proc.communicate()
        # exit status 1 with "0 flow entries" just means there was nothing to delete
        if proc.returncode not in (0, 1):
            log.warning("conntrack -D for %s:%d failed: %s", ip, port, stderr.decode(errors="replace").strip())
