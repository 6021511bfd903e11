"""A TCP relay between one process and the apiserver, so a test can cut that process off (and only
it) and let it back: `cut()` drops every connection and refuses new ones, `restore()` accepts again;
`mute()` keeps the open connections open but passes nothing more from the apiserver on them (a
stream gone silent), while new ones work. TLS passes through untouched (the serving certificate
names 127.0.0.1, as the relay does)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import yaml


class ApiCut:
    def __init__(self, server: str) -> None:
        target = urlsplit(server)
        self._target = (target.hostname or "127.0.0.1", target.port or 443)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._muted: set[socket.socket] = set()  # upstream ends whose data is swallowed
        self._upstreams: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="apicut", daemon=True)
        self._thread.start()

    def kubeconfig(self, original: str, path: Path) -> str:
        """A copy of `original` that reaches the apiserver through this relay."""
        config = yaml.safe_load(Path(original).read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = self.url
        path.write_text(json.dumps(config))
        return str(path)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut or self._closed
            if refused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
                self._upstreams.add(upstream)
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    muted = source in self._muted
                if not muted:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                self._drop(end)

    def _drop(self, end: socket.socket) -> None:
        with self._lock:
            self._open.discard(end)
            self._muted.discard(end)
            self._upstreams.discard(end)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()

    def cut(self) -> None:
        """Drop every connection through the relay and refuse new ones until `restore()`."""
        with self._lock:
            self._cut = True
            ends = list(self._open)
        for end in ends:
            self._drop(end)

    def mute(self) -> None:
        """From now on nothing the apiserver sends on the connections open now reaches the
        process (they stay open: a silent stream, not a broken one); new connections work."""
        with self._lock:
            self._muted.update(self._upstreams)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ApiCut:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
