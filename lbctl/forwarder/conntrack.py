"""Flush UDP conntrack entries of endpoints that went away (the `conntrack` CLI).

A UDP "connection" lives on in conntrack as long as packets keep coming, so without this a client
that keeps sending would stay pinned to a removed endpoint forever. TCP needs nothing: the
endpoint's resets end the connection.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)


def flush_command(ip: str, port: int, conntrack: Sequence[str] = ("conntrack",)) -> list[str]:
    # entries whose reply comes from the endpoint: every DNATed flow to it
    return [*conntrack, "-D", "-p", "udp", "--reply-src", ip, "--reply-port-src", str(port)]


def flush_udp(backends: Iterable[tuple[str, int]], conntrack: Sequence[str] = ("conntrack",)) -> None:
    for ip, port in backends:
        try:
            proc = subprocess.run(flush_command(ip, port, conntrack), capture_output=True, text=True, check=False)
        except FileNotFoundError:
            log.warning("conntrack not found (Debian: apt-get install conntrack): UDP flows to %s:%d "
                        "stay until they go idle", ip, port)
            return
        # exit status 1 with "0 flow entries" just means there was nothing to delete
        if proc.returncode not in (0, 1):
            log.warning("conntrack -D for %s:%d failed: %s", ip, port, proc.stderr.strip())
