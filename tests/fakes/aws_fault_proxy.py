"""An HTTP proxy in front of moto's server that records every AWS call by its Action and fails
chosen Actions on demand (throttling, 5xx), for tests where the AWS client runs in another process
(the operator) and botocore event hooks cannot reach it."""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import ClassVar

ERROR_XML = (
    '<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>'
    "<RequestId>lbctl-fault-proxy</RequestId></ErrorResponse>"
)
WRITE_PREFIXES = ("Create", "Delete", "Modify", "Register", "Deregister", "Add", "Remove", "Set", "Authorize",
                  "Revoke", "Allocate", "Release", "Associate", "Disassociate")


@dataclass
class Fault:
    status: int
    code: str
    remaining: int  # -1: until cleared


class AwsFaultProxy:
    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self.calls: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version: ClassVar[str] = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = urllib.parse.parse_qs(body.decode(errors="replace")).get("Action", [""])[0]
                fault = proxy._take(action)
                if fault is not None:
                    kind = "Sender" if fault.status < 500 else "Receiver"
                    payload = ERROR_XML.format(kind=kind, code=fault.code, message=f"injected {fault.code}").encode()
                    self._reply(fault.status, [("Content-Type", "text/xml")], payload)
                    return
                connection = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request("POST", self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                passed = [(k, v) for k, v in response.getheaders()
                          if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                connection.close()
                self._reply(response.status, passed, data)

            def _reply(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _take(self, action: str) -> Fault | None:
        with self._lock:
            self.calls.append(action)
            fault = self._faults.get(action)
            if fault is None:
                return None
            if fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    del self._faults[action]
            return fault

    def inject(self, action: str, *, status: int = 400, code: str = "Throttling", times: int = 1) -> None:
        """Fail the next `times` calls of `action` (-1: until cleared)."""
        with self._lock:
            self._faults[action] = Fault(status, code, times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def writes(self) -> list[str]:
        with self._lock:
            return [a for a in self.calls if a.startswith(WRITE_PREFIXES)]

    def __enter__(self) -> AwsFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
