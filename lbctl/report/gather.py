"""The I/O of `lbctl status` and `lbctl doctor`: read-only calls with the user's kubeconfig (plus
SubjectAccessReviews, which change nothing), every failure turned into a one-line `ReadError`."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from lbctl.kube.client import ApiError, KubeClient, load_configuration
from lbctl.model import meta as model_meta
from lbctl.report import facts
from lbctl.report.doctor import (
    FORWARDER_ACCOUNT,
    FORWARDER_DAEMONSET,
    FORWARDER_PERMISSIONS,
    OPERATOR_ACCOUNT,
    OPERATOR_PERMISSIONS,
    Permission,
    Snapshot,
)

POOLS_PATH = f"/apis/{model_meta.API_VERSION}/loadbalancerpools"
PEERS_PATH = f"/apis/{model_meta.API_VERSION}/bgppeers"
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{facts.SYSTEM_NAMESPACE}/leases"
READ_ROLE_HINT = ("ask for read access to Services and Events (the `view` ClusterRole has them; nodes, leases in "
                  "lbctl-system and loadbalancerpools add the per-node view and the pools), or name a namespace "
                  "you may read with -n")


class ReadError(Exception):
    """Why the cluster could not be read, and what to do, in one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tls_culprit(configuration: Any) -> str:
    """Which of the kubeconfig's TLS files cannot be used (the CA is tried on its own first)."""
    ca = getattr(configuration, "ssl_ca_cert", None)
    if ca:
        try:
            ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, OSError, ValueError):
            return f"its certificate-authority ({ca}) is not a readable PEM certificate"
    cert, key = getattr(configuration, "cert_file", None), getattr(configuration, "key_file", None)
    return f"its client-certificate/client-key ({cert}, {key}) are not a readable PEM certificate and matching key"


def connect(kubeconfig: str | None) -> KubeClient:
    """A client for the user's kubeconfig, or a ReadError saying why there is none (a missing or
    empty file, an unknown context, a certificate file that is missing or not PEM …)."""
    where = kubeconfig or "$KUBECONFIG / ~/.kube/config"
    fix = "set KUBECONFIG or pass --kubeconfig"
    try:
        configuration = load_configuration(kubeconfig)
    except Exception as exc:
        raise ReadError(f"no usable kubeconfig ({where}: {_first_line(exc)}); {fix}") from None
    try:
        return KubeClient(configuration, user_agent="lbctl-status")
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ReadError(f"no usable kubeconfig ({where}: {_tls_culprit(configuration)}: {_first_line(exc)}); "
                        f"fix that file or the kubeconfig's certificate-authority / client-certificate entries, or "
                        f"{fix}") from None


class Reader:
    """GETs and LISTs with a deadline; errors become ReadError naming the fix."""

    def __init__(self, client: KubeClient, timeout_s: float = 10.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.notes: list[str] = []  # what could not be read but was not needed (say so, carry on)

    def _explain(self, exc: BaseException, what: str) -> ReadError:
        if isinstance(exc, ApiError):
            if exc.status == 401:
                return ReadError(f"the cluster at {self.client.base} refused your credentials (401) reading {what}; "
                                 "renew them (your kubeconfig's user) and try again")
            if exc.status == 403:
                return ReadError(f"your credentials may not read {what} (403 Forbidden); {READ_ROLE_HINT}")
            return ReadError(f"reading {what} failed: {exc}")
        reason = str(exc) or type(exc).__name__
        return ReadError(f"cannot reach the cluster at {self.client.base} ({reason}); check that it runs and that "
                         "your kubeconfig's current context points to it")

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One GET; a 429 (e.g. "storage is (re)initializing" right after a CRD is created, or
        API priority and fairness) is tried again for up to the request timeout."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.2
        while True:
            try:
                return await self.client.request("GET", path, params=params, timeout_s=self.timeout_s)
            except ApiError as exc:
                if exc.status != 429 or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def get(self, path: str, what: str, missing_ok: bool = True) -> dict[str, Any] | None:
        try:
            return await self._get(path)
        except ApiError as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise self._explain(exc, what) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._explain(exc, what) from None

    async def list(self, path: str, what: str, params: Mapping[str, str] | None = None,
                   missing_ok: bool = False, cached: bool = True, optional: str = "") -> list[dict[str, Any]]:
        """Every item. `cached`: from the apiserver's watch cache in one answer (resourceVersion=0,
        as informers list: milliseconds old, and far cheaper than pages read from etcd)."""
        query = dict(params or {}, resourceVersion="0") if cached else dict(params or {}, limit="500")
        items: list[dict[str, Any]] = []
        while True:
            try:
                page = await self._get(path, query)
            except ApiError as exc:
                if exc.status == 404 and missing_ok:
                    return []
                if exc.status == 403 and optional:  # e.g. the `view` role: no nodes, leases or pools
                    self.notes.append(f"your credentials may not read {what}: {optional}")
                    return []
                raise self._explain(exc, what) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._explain(exc, what) from None
            items += page.get("items") or ()
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token


def _ns_path(resource: str, namespace: str | None, group: str = "") -> str:
    base = f"/apis/{group}" if group else "/api/v1"
    return f"{base}/namespaces/{quote(namespace)}/{resource}" if namespace else f"{base}/{resource}"


async def status_table(reader: Reader, namespace: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                       list[dict[str, Any]]]:
    """Services, pools and Warning Events: three lists, read concurrently."""
    services, pools, events = await asyncio.gather(
        reader.list(_ns_path("services", namespace), "services"),
        reader.list(POOLS_PATH, "loadbalancerpools", missing_ok=True, optional="POOL/BALANCER shows - for them"),
        reader.list(_ns_path("events", namespace), "events", {"fieldSelector": "type=Warning"}),
    )
    return services, pools, events


async def service_story(reader: Reader, namespace: str, name: str) -> dict[str, Any]:
    service = await reader.get(_ns_path("services", namespace) + f"/{quote(name)}", f"service {namespace}/{name}")
    if service is None:
        raise ReadError(f"there is no Service {namespace}/{name} (kubectl get svc -n {namespace} lists them)")
    selector = {"fieldSelector": f"involvedObject.kind=Service,involvedObject.name={name}"}
    slices_params = {"labelSelector": f"{model_meta.SERVICE_NAME_LABEL}={name}"}
    pools, events, nodes, leases, slices = await asyncio.gather(
        reader.list(POOLS_PATH, "loadbalancerpools", missing_ok=True, optional="the pool is not named"),
        reader.list(_ns_path("events", namespace), "events", selector),
        reader.list("/api/v1/nodes", "nodes", optional="no per-node view"),
        reader.list(LEASES_PATH, "leases in lbctl-system", missing_ok=True, optional="forwarders show as none"),
        reader.list(_ns_path("endpointslices", namespace, "discovery.k8s.io/v1"), "endpointslices", slices_params),
    )
    return {"service": service, "pools": pools, "events": events, "nodes": nodes, "leases": leases,
            "slices": slices}


def node_address(node: Mapping[str, Any]) -> str | None:
    found = {a.get("type"): a.get("address") for a in (node.get("status") or {}).get("addresses") or ()}
    address = found.get("InternalIP") or found.get("ExternalIP")
    return str(address) if address else None


async def probe_forwarders(nodes: Sequence[Mapping[str, Any]], port: int, service_key: str,
                           timeout_s: float = 2.0) -> dict[str, Mapping[str, Any] | str]:
    """Each node's forwarder /healthz (its body, or why there is none)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, node: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | str]:
        name = str(facts.meta(node).get("name"))
        address = node_address(node)
        if address is None:
            return name, "no node address"
        host = f"[{address}]" if ":" in address else address
        try:
            async with session.get(f"http://{host}:{port}/healthz", params={"service": service_key}) as response:
                body = await response.json(content_type=None)
                return name, body if isinstance(body, dict) else f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return name, f"unreachable ({type(exc).__name__})"

    async with aiohttp.ClientSession(timeout=timeout) as session:
        return dict(await asyncio.gather(*(one(session, n) for n in nodes)))


def _review(account: tuple[str, str], permission: Permission) -> dict[str, Any]:
    namespace, name = account
    attributes = {"verb": permission.verb, "group": permission.group, "resource": permission.resource,
                  "subresource": permission.subresource, "namespace": permission.namespace, "name": permission.name}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": f"system:serviceaccount:{namespace}:{name}",
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
        "resourceAttributes": {k: v for k, v in attributes.items() if v},
    }}


async def access(reader: Reader) -> tuple[dict[str, dict[Permission, bool]], str]:
    """What the operator's and forwarder's ServiceAccounts may do (SubjectAccessReviews)."""
    results: dict[str, dict[Permission, bool]] = {}
    for account, needed in ((OPERATOR_ACCOUNT, OPERATOR_PERMISSIONS), (FORWARDER_ACCOUNT, FORWARDER_PERMISSIONS)):
        try:
            answers = await asyncio.gather(*(reader.client.request(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=_review(account, p),
                timeout_s=reader.timeout_s) for p in needed))
        except ApiError as exc:
            if exc.status == 403:
                return {}, "your credentials may not create subjectaccessreviews"
            raise reader._explain(exc, "subjectaccessreviews") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise reader._explain(exc, "subjectaccessreviews") from None
        results["/".join(account)] = {p: bool((a.get("status") or {}).get("allowed")) for p, a in
                                      zip(needed, answers, strict=True)}
    return results, ""


async def doctor_snapshot(reader: Reader, check_access: bool = True) -> Snapshot:
    crd, peer_crd, lease, deployment, daemonset = await asyncio.gather(
        reader.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{facts.POOL_CRD}",
                   "customresourcedefinitions"),
        reader.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{facts.BGP_PEER_CRD}",
                   "customresourcedefinitions"),
        reader.get(f"{LEASES_PATH}/{facts.OPERATOR_LEASE}", "leases in lbctl-system"),
        reader.get(f"/apis/apps/v1/namespaces/{facts.SYSTEM_NAMESPACE}/deployments/lbctl-operator",
                   "deployments in lbctl-system"),
        reader.get(f"/apis/apps/v1/namespaces/{facts.SYSTEM_NAMESPACE}/daemonsets/{FORWARDER_DAEMONSET}",
                   "daemonsets in lbctl-system"),
    )
    nodes, leases, pools, services, peers = await asyncio.gather(
        reader.list("/api/v1/nodes", "nodes"),
        reader.list(LEASES_PATH, "leases in lbctl-system", missing_ok=True),
        reader.list(POOLS_PATH, "loadbalancerpools", missing_ok=True),
        reader.list("/api/v1/services", "services"),
        reader.list(PEERS_PATH, "bgppeers", missing_ok=True),
    )
    results, problem = await access(reader) if check_access else ({}, "skipped (--no-rbac)")
    return Snapshot(now=time.time(), pool_crd=crd, operator_lease=lease, operator_deployment=deployment,
                    nodes=nodes, leases=leases, pools=pools, services=services, access=results,
                    access_problem=problem, peers=peers if peer_crd is not None else None,
                    forwarder_daemonset=daemonset, peer_crd=peer_crd)
