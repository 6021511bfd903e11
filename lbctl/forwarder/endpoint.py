"""One GET path on its own port, served by aiohttp in the forwarder's event loop (so a handler sees
the forwarder's state between two steps, never half-way through one). A port already in use is
logged, not fatal: the forwarder's job is the data path, not its side doors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.Response]]


class HttpEndpoint:
    def __init__(self, port: int, path: str, handler: Handler, bind: str = "0.0.0.0") -> None:
        self._port = port
        self._path = path
        self._handler = handler
        self._bind = bind
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if not self._port:
            return
        app = web.Application()
        app.router.add_get(self._path, self._handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._bind, self._port, reuse_address=True).start()
        except OSError as exc:
            log.warning("cannot serve %s on port %d: %s", self._path, self._port, exc)
            await runner.cleanup()
            return
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
