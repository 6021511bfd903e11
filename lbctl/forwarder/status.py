"""The forwarder's own /healthz: 200 while it serves from a known state (also when the apiserver
is away: the last state is still served), 503 with the reason while it has none. The body names
the VIPs held and how each peer looks from here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Report = Callable[[Mapping[str, str]], tuple[int, dict[str, Any]]]  # query parameters → (status, body)


class StatusServer:
    def __init__(self, port: int, report: Report, bind: str = "0.0.0.0") -> None:
        self._port = port
        self._report = report
        self._bind = bind
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        status, body = self._report(request.query)
        return web.Response(status=status, text=json.dumps(body, indent=1) + "\n", content_type="application/json")

    async def start(self) -> None:
        if not self._port:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._bind, self._port, reuse_address=True).start()
        except OSError as exc:
            log.warning("cannot serve /healthz on port %d: %s", self._port, exc)
            await runner.cleanup()
            return
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
