"""This node's entry in each BGPPeer's status.nodes[] (server-side apply on the status subresource,
field manager lbctl-forwarder-<node>, so the other nodes' entries stay theirs).

Written in the background and only when the entry changed, plus a slow refresh (at most one
write a minute, whatever the number of peers); the apiserver may be away, and the sessions and
routes never wait for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.forwarder.bgp_model import GROUP, PEER_KIND, PEERS_PATH, VERSION
from lbctl.kube.client import ApiError, KubeClient

log = logging.getLogger(__name__)

APPLY_PATCH = "application/apply-patch+yaml"
# Unchanged entries are written again every REFRESH_S (a BGPPeer recreated under the same name in a
# watch gap loses them), one at a time, REFRESH_SPACING_S apart: with the Lease every 15 s that
# keeps a node's steady-state writes at <= 5 a minute, under the 6 (one per 10 s) of issue 9.
REFRESH_S = 300.0
REFRESH_SPACING_S = 60.0
_WRITE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeEntry:
    state: str
    since: str  # RFC 3339: the last change of state
    routes: int
    message: str = ""

    def body(self, node: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"node": node, "state": self.state, "since": self.since,
                                 "routesAnnounced": self.routes}
        if self.message:
            entry["message"] = self.message[:1024]
        return entry


def apply_body(peer: str, node: str, entry: NodeEntry) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": PEER_KIND, "metadata": {"name": peer},
            "status": {"nodes": [entry.body(node)]}}


def writes_due(wanted: Mapping[str, NodeEntry], written: Mapping[str, tuple[NodeEntry, float]], now: float,
               refresh_s: float, refreshed_at: float, spacing_s: float) -> tuple[list[str], str | None]:
    """What to write now (pure): every peer whose entry differs from what was written last, and at
    most one entry written `refresh_s` ago or longer (the oldest) when the last refresh was
    `spacing_s` ago: refreshes add at most one write per node per `spacing_s` however many peers."""
    changed = [peer for peer, entry in sorted(wanted.items()) if peer not in written or written[peer][0] != entry]
    stale = sorted((written[peer][1], peer) for peer in wanted
                   if peer in written and peer not in changed and now - written[peer][1] >= refresh_s)
    refresh = stale[0][1] if stale and now - refreshed_at >= spacing_s else None
    return changed, refresh


class PeerStatus:
    def __init__(self, client: KubeClient, node: str, refresh_s: float = REFRESH_S, retry_s: float = 2.0,
                 refresh_spacing_s: float = REFRESH_SPACING_S) -> None:
        self._client = client
        self._node = node
        self._refresh_s = refresh_s
        self._refresh_spacing_s = refresh_spacing_s
        self._refreshed_at = float("-inf")
        self._retry_s = retry_s
        self.field_manager = f"lbctl-forwarder-{node}"
        self._wanted: dict[str, NodeEntry] = {}
        self._written: dict[str, tuple[NodeEntry, float]] = {}
        self._failed_at: dict[str, float] = {}
        self._wake = asyncio.Event()

    def update(self, wanted: Mapping[str, NodeEntry]) -> None:
        if dict(wanted) != self._wanted:
            self._wanted = dict(wanted)
            self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            now = time.monotonic()
            for peer in [p for p in self._written if p not in self._wanted]:
                self._written.pop(peer)  # the peer is gone (or no longer selects this node)
            changed, refresh = writes_due(self._wanted, self._written, now, self._refresh_s, self._refreshed_at,
                                          self._refresh_spacing_s)
            if refresh is not None:
                self._refreshed_at = now
            for peer in [*changed, *([refresh] if refresh else [])]:
                if now - self._failed_at.get(peer, float("-inf")) < self._retry_s:
                    continue
                await self._write(peer, self._wanted[peer])

    async def _write(self, peer: str, entry: NodeEntry) -> None:
        try:
            await self._client.request(
                "PATCH", f"{PEERS_PATH}/{peer}/status", body=apply_body(peer, self._node, entry),
                content_type=APPLY_PATCH, params={"fieldManager": self.field_manager, "force": "true"},
                timeout_s=_WRITE_TIMEOUT_S)
        except ApiError as exc:
            self._failed_at[peer] = time.monotonic()
            if exc.status == 404:
                log.debug("BGPPeer %s is gone; no status written", peer)
            else:
                log.warning("status of BGPPeer %s: %s", peer, exc)
            return
        except Exception as exc:  # the apiserver is away: try again later
            self._failed_at[peer] = time.monotonic()
            log.debug("status of BGPPeer %s not written: %s", peer, exc)
            return
        self._failed_at.pop(peer, None)
        self._written[peer] = (entry, time.monotonic())
