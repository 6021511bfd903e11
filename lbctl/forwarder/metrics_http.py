"""The forwarder's /metrics endpoint (--metrics-port)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY

from lbctl.forwarder.endpoint import HttpEndpoint


class MetricsServer(HttpEndpoint):
    """/metrics in the forwarder's own event loop: the gauges read at scrape time see its state
    between two steps, never half-way through one (a scrape thread could)."""

    def __init__(self, port: int, bind: str = "0.0.0.0") -> None:
        super().__init__(port, "/metrics", self._handle, bind)

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
