"""The forwarder's own /healthz: 200 while it serves from a known state (also when the apiserver
is away: the last state is still served), 503 with the reason while it has none. The body names
the VIPs held and how each peer looks from here."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from lbctl.forwarder.endpoint import HttpEndpoint

Report = Callable[[Mapping[str, str]], tuple[int, dict[str, Any]]]  # query parameters → (status, body)


class StatusServer(HttpEndpoint):
    def __init__(self, port: int, report: Report, bind: str = "0.0.0.0") -> None:
        super().__init__(port, "/healthz", self._handle, bind)
        self._report = report

    async def _handle(self, request: web.Request) -> web.Response:
        status, body = self._report(request.query)
        return web.Response(status=status, text=json.dumps(body, indent=1) + "\n", content_type="application/json")
