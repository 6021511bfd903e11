"""healthCheckNodePort for externalTrafficPolicy Local, with kube-proxy's contract: HTTP 200 and
the local endpoint count when this node has at least one ready endpoint, 503 otherwise, so an
external balancer sends traffic only to nodes that will not drop it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from lbctl.forwarder import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    namespace: str
    name: str
    local_endpoints: int


def health_response(check: HealthCheck) -> tuple[int, dict[str, str], str]:
    """Status, headers and body, as kube-proxy answers."""
    body = json.dumps({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": True,
    })
    headers = {
        "Content-Type": "application/json",
        "X-Content-Type-Options": "nosniff",
        "X-Load-Balancing-Endpoint-Weight": str(check.local_endpoints),
    }
    return (200 if check.local_endpoints > 0 else 503), headers, body


class HealthServers:
    """One listener per healthCheckNodePort; `update` opens and closes them to match."""

    def __init__(self, bind: str = "") -> None:
        self._bind = bind or None  # None: every address, IPv4 and IPv6
        self._checks: dict[int, HealthCheck] = {}
        self._sites: dict[int, web.TCPSite] = {}
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else 0
        check = self._checks.get(port)
        if check is None:
            metrics.HEALTH_CHECK_RESPONSES.labels("404").inc()
            return web.Response(status=404, text="no Service uses this health check port\n")
        status, headers, body = health_response(check)
        metrics.HEALTH_CHECK_RESPONSES.labels(str(status)).inc()
        return web.Response(status=status, headers=headers, text=body)

    async def _ensure_runner(self) -> web.AppRunner:
        if self._runner is None:
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
        return self._runner

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._sites)

    async def update(self, checks: Mapping[int, HealthCheck]) -> None:
        self._checks = dict(checks)
        for port in [p for p in self._sites if p not in checks]:
            await self._sites.pop(port).stop()
        if not checks:
            return
        runner = await self._ensure_runner()
        for port in checks:
            if port in self._sites:
                continue
            site = web.TCPSite(runner, self._bind, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                log.warning("cannot serve health check port %d: %s (retrying at the next sync)", port, exc)
                continue
            self._sites[port] = site

    async def close(self) -> None:
        for site in self._sites.values():
            await site.stop()
        self._sites.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
