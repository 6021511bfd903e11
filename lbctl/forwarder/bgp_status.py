"""This node's entry in each BGPPeer's status.nodes[] (server-side apply on the status subresource,
field manager lbctl-forwarder-<node>, so the other nodes' entries stay theirs).

Written in the background and only when the entry changed, plus a slow refresh; the apiserver may
be away, and the sessions and routes never wait for it."""

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


def due(written: NodeEntry | None, written_at: float, wanted: NodeEntry, now: float, refresh_s: float) -> bool:
    """Whether to write `wanted` now: it differs from what was written last, or the refresh is due."""
    return written != wanted or now - written_at >= refresh_s


class PeerStatus:
    def __init__(self, client: KubeClient, node: str, refresh_s: float = 300.0, retry_s: float = 2.0) -> None:
        self._client = client
        self._node = node
        self._refresh_s = refresh_s
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
            for peer, entry in sorted(self._wanted.items()):
                written, written_at = self._written.get(peer, (None, float("-inf")))
                if not due(written, written_at, entry, now, self._refresh_s):
                    continue
                if now - self._failed_at.get(peer, float("-inf")) < self._retry_s:
                    continue
                await self._write(peer, entry)

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
