"""The node's record in the apiserver: Lease lbctl-forwarder-<node> in lbctl-system, renewed every
`renew_s` (15 s; 40 s duration), so tools can tell which nodes run a forwarder.

It is a record, not the liveness that moves VIPs: that is judged between the forwarders directly
(membership.py), so an apiserver outage moves nothing. The budget is the kubelet's Lease rate, one
write per node per 10 s for *all* of a forwarder's writes: the Lease takes 4 a minute, BGPPeer
status refreshes at most one more (bgp_status.py), whatever the cluster's size."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from lbctl.kube.client import MERGE_PATCH, ApiError, KubeClient
from lbctl.model.meta import FORWARDER_LEASE_LABEL, SYSTEM_NAMESPACE, micro_time

log = logging.getLogger(__name__)

LEASE_NAMESPACE = SYSTEM_NAMESPACE
LEASE_PREFIX = "lbctl-forwarder-"


def lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"


def leases_path(namespace: str, name: str = "") -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{path}/{name}" if name else path


def lease_body(node: str, duration_s: int) -> dict[str, Any]:
    now = micro_time()
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": lease_name(node), "labels": {FORWARDER_LEASE_LABEL: node}},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": duration_s, "acquireTime": now, "renewTime": now},
    }


class NodeLease:
    def __init__(self, client: KubeClient, node: str, *, namespace: str = LEASE_NAMESPACE, duration_s: int = 40,
                 renew_s: float = 15.0) -> None:
        self._client = client
        self._node = node
        self._namespace = namespace
        self.duration_s = duration_s
        self._renew_s = renew_s
        self.last_renewed: float | None = None  # monotonic time of the last successful renewal
        self.renewed = asyncio.Event()

    async def _ensure_namespace(self) -> None:
        try:
            await self._client.request("POST", "/api/v1/namespaces", body={
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self._namespace}})
        except ApiError as exc:
            if exc.status not in (403, 409):  # exists, or we may not create it (it exists in a real deploy)
                raise

    async def renew_once(self) -> None:
        path = leases_path(self._namespace, lease_name(self._node))
        started = time.monotonic()
        try:
            await self._client.request("PATCH", path, content_type=MERGE_PATCH, body={
                "spec": {"holderIdentity": self._node, "leaseDurationSeconds": self.duration_s,
                         "renewTime": micro_time()}})
        except ApiError as exc:
            if exc.status != 404:
                raise
            try:
                await self._client.request("POST", leases_path(self._namespace),
                                           body=lease_body(self._node, self.duration_s))
            except ApiError as create_exc:
                if create_exc.status != 404:
                    raise
                await self._ensure_namespace()
                await self._client.request("POST", leases_path(self._namespace),
                                           body=lease_body(self._node, self.duration_s))
        self.last_renewed = started
        self.renewed.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.renew_once(), timeout=max(self.duration_s - self._renew_s, 0.5))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # nothing depends on it second by second: try again at the next renewal
                log.warning("lease %s/%s not renewed: %s", self._namespace, lease_name(self._node), exc)
            await asyncio.sleep(self._renew_s)

    async def release(self) -> None:
        """`lbctl forwarder --cleanup`: the node no longer runs a forwarder."""
        try:
            await self._client.request("DELETE", leases_path(self._namespace, lease_name(self._node)))
        except (ApiError, OSError) as exc:
            log.info("could not delete lease on exit: %s", exc)
