"""Where the apiserver is and how to authenticate, read without the `kubernetes` library.

Importing `kubernetes` costs every process about 40 MB and a quarter of a second; the forwarder
runs on every node and needs four things from it: the server, the CA, a bearer token or a client
certificate, and whether to verify TLS. `load` reads those from a kubeconfig (the current context)
or the in-cluster service account, and returns None for anything it does not handle — several
files in $KUBECONFIG, exec plugins, auth providers, basic auth, proxies — so that the caller falls
back to the library's loaders, which handle everything.

Tokens read from a file (`tokenFile`, the in-cluster account's projected token, which the kubelet
rotates) are read when the configuration is made and again once a minute, as client-go does, in a
thread (`Configuration.refresh`, which lbctl.kube.client awaits before each request).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_REREAD_S = 60.0
_CLUSTER_KEYS = frozenset({"server", "certificate-authority", "certificate-authority-data",
                           "insecure-skip-tls-verify", "extensions"})
_USER_KEYS = frozenset({"token", "tokenFile", "client-certificate", "client-certificate-data", "client-key",
                        "client-key-data", "extensions"})


class Configuration:
    """The attributes and the one method of kubernetes.client.Configuration that lbctl's clients
    use (lbctl.kube.client.KubeClient, kopf's login)."""

    def __init__(self, host: str, ssl_ca_cert: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, verify_ssl: bool = True, token: str | None = None,
                 token_file: str | None = None) -> None:
        self.host = host
        self.ssl_ca_cert = ssl_ca_cert
        self.cert_file = cert_file
        self.key_file = key_file
        self.verify_ssl = verify_ssl
        self._token = token
        self._token_file = token_file
        self._token_read_at = float("-inf")
        if token_file:
            self._read_token()  # at start-up, before any event loop runs

    def _read_token(self) -> None:
        if not self._token_file:
            return
        with contextlib.suppress(OSError):  # keep the last token; the apiserver says when it is no longer good
            self._token = Path(self._token_file).read_text().strip() or self._token
        self._token_read_at = time.monotonic()

    def token_due(self) -> bool:
        """Whether the token file is due to be read again (the kubelet rotates it)."""
        return bool(self._token_file) and time.monotonic() - self._token_read_at >= _TOKEN_REREAD_S

    async def refresh(self) -> None:
        """Read the token file again when due, in a thread: never on the event loop (a file read
        can stall on a slow disk or a busy node; every request of the forwarder passes here)."""
        if self.token_due():
            self._token_read_at = time.monotonic()  # one read at a time
            await asyncio.to_thread(self._read_token)

    def get_api_key_with_prefix(self, identifier: str, alias: str | None = None) -> str | None:
        """"Bearer <token>" (the library's spelling), or None without a token. No I/O: the file
        was read when this was made, and `refresh` reads it again."""
        return f"Bearer {self._token}" if self._token else None


_DATA_FILES: list[str] = []


def _remove_data_files() -> None:
    for path in _DATA_FILES:
        with contextlib.suppress(OSError):
            os.unlink(path)
    _DATA_FILES.clear()


atexit.register(_remove_data_files)


def _data_file(data: str, suffix: str) -> str:
    """Inline base64 data written to a private file (ssl and aiohttp read paths), removed when the
    process exits, as the library does (a client key must not pile up in /tmp)."""
    handle, path = tempfile.mkstemp(prefix="lbctl-kubeconfig-", suffix=suffix)
    _DATA_FILES.append(path)
    with os.fdopen(handle, "wb") as out:
        out.write(base64.standard_b64decode(data))
    return path


def _path(value: Any, base: Path) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return str(base / value) if not os.path.isabs(value) else value


def _named(items: Any, name: Any) -> dict[str, Any] | None:
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("name") == name:
            return item
    return None


def from_kubeconfig(path: Path) -> Configuration | None:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        return None
    context = _named(doc.get("contexts"), doc.get("current-context"))
    if context is None or not isinstance(context.get("context"), dict):
        return None
    cluster_entry = _named(doc.get("clusters"), context["context"].get("cluster"))
    user_entry = _named(doc.get("users"), context["context"].get("user"))
    cluster = cluster_entry.get("cluster") if cluster_entry else None
    user = (user_entry.get("user") if user_entry else None) or {}
    if not isinstance(cluster, dict) or not isinstance(user, dict) or not isinstance(cluster.get("server"), str):
        return None
    if set(cluster) - _CLUSTER_KEYS or set(user) - _USER_KEYS:
        return None  # something only the library knows (exec, auth-provider, proxy-url, tls-server-name, …)
    base = path.parent
    ca = _path(cluster.get("certificate-authority"), base)
    if cluster.get("certificate-authority-data"):
        ca = _data_file(cluster["certificate-authority-data"], ".crt")
    cert = _path(user.get("client-certificate"), base)
    if user.get("client-certificate-data"):
        cert = _data_file(user["client-certificate-data"], ".crt")
    key = _path(user.get("client-key"), base)
    if user.get("client-key-data"):
        key = _data_file(user["client-key-data"], ".key")
    token = user.get("token") if isinstance(user.get("token"), str) else None
    token_file = _path(user.get("tokenFile"), base) if not token else None
    return Configuration(host=cluster["server"].rstrip("/"), ssl_ca_cert=ca, cert_file=cert, key_file=key,
                         verify_ssl=not cluster.get("insecure-skip-tls-verify", False), token=token,
                         token_file=token_file)


def in_cluster(account: Path = SERVICE_ACCOUNT_DIR, environ: dict[str, str] | None = None) -> Configuration | None:
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not (account / "token").is_file():
        return None
    if ":" in host:
        host = f"[{host}]"
    return Configuration(host=f"https://{host}:{port}", ssl_ca_cert=str(account / "ca.crt"),
                         token_file=str(account / "token"))


def load(kubeconfig: str | None = None) -> Configuration | None:
    """kubeconfig (explicit, $KUBECONFIG or ~/.kube/config), else the in-cluster account — the
    library's order; None when the library should do it."""
    if kubeconfig:
        path: Path | None = Path(kubeconfig)
    elif os.environ.get("KUBECONFIG"):
        paths = [p for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
        if len(paths) != 1:
            return None  # the library merges several files
        path = Path(paths[0])
    else:
        path = Path("~/.kube/config").expanduser()
        if not path.exists():
            return in_cluster()
    try:
        return from_kubeconfig(path) if path is not None else None
    except (OSError, yaml.YAMLError, ValueError):
        return None  # the library reports what is wrong with it
