"""A small asyncio client for the few calls lbctl makes on its hot path (patches, events, lists).

Configuration (kubeconfig or in-cluster service account, token refresh) comes from the
`kubernetes` library's own loaders; transport is aiohttp, which kopf already uses, because the
synchronous client in threads cannot carry hundreds of writes per second on two cores.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import aiohttp
from prometheus_client import Counter

from lbctl.kube import kubeconfig

if TYPE_CHECKING:
    from kubernetes import client as k8s_client

REQUESTS = Counter("lbctl_kube_requests_total", "Kubernetes API requests sent (watches not counted)", ["verb"])

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: Mapping[str, Any] | str) -> None:
        self.status = status
        self.body = body
        message = body.get("message", "") if isinstance(body, Mapping) else str(body)[:500]
        super().__init__(f"{method} {path}: {status} {message}")


class ClientConfiguration(Protocol):
    """What KubeClient reads of a configuration: kubernetes.client.Configuration, or
    lbctl.kube.kubeconfig.Configuration (the same, without importing the library)."""

    host: str
    ssl_ca_cert: str | None
    cert_file: str | None
    key_file: str | None
    verify_ssl: bool

    def get_api_key_with_prefix(self, identifier: str, alias: str | None = None) -> str | None: ...


def load_configuration(kubeconfig: str | None = None) -> k8s_client.Configuration:
    """kubeconfig (explicit, $KUBECONFIG or ~/.kube/config), else the in-cluster service account."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (k8s_config.ConfigException, FileNotFoundError, TypeError):
        if kubeconfig:
            raise
        k8s_config.load_incluster_config(client_configuration=configuration)
    return configuration


class KubeClient:
    def __init__(self, configuration: ClientConfiguration, user_agent: str = "lbctl") -> None:
        self._configuration = configuration
        self.base = str(configuration.host).rstrip("/")
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._ssl = context
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, user_agent: str = "lbctl") -> KubeClient:
        return cls(load_configuration(kubeconfig), user_agent)

    @property
    def configuration(self) -> ClientConfiguration:
        return self._configuration

    async def refresh_credentials(self) -> None:
        """Before a request: a token file due to be read again is read in a thread (lbctl's own
        configuration; the library's refreshes inside get_api_key_with_prefix, as it always did)."""
        if isinstance(self._configuration, kubeconfig.Configuration):
            await self._configuration.refresh()

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        # refreshes when due; the loaders store "Bearer <token>" under BearerToken
        token = self._configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        await self.refresh_credentials()
        session = self.session()
        REQUESTS.labels(verb=method).inc()
        if body is not None and content_type is None:
            content_type = "application/json"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else session.timeout
        async with session.request(
            method, self.base + path, json=body, params=params, headers=self.headers(content_type), timeout=timeout,
        ) as response:
            try:
                payload = await response.json(content_type=None)
            except (aiohttp.ContentTypeError, ValueError):
                payload = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, method, path, payload)
            return payload if isinstance(payload, dict) else {}

    async def list_all(self, path: str, params: Mapping[str, str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every item of a list, following `continue` tokens (pages of 500)."""
        query = dict(params or {}, limit="500")
        while True:
            page = await self.request("GET", path, params=query)
            for item in page.get("items") or ():
                yield item
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            query["continue"] = token

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def json_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """A watch stream's events, one JSON object per line; lines may be far longer than aiohttp's
    readline limit (64 KiB), so the stream is split here."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")  # all at once: splitting one by one copies the rest each time
        for line in lines:
            if line.strip():
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


def service_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/services/{quote(name)}"
    return f"{path}/{subresource}" if subresource else path

