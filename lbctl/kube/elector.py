"""Leader election's I/O: reads and writes one `coordination.k8s.io/v1` Lease and reports when this
replica starts and stops leading. Every decision is `lbctl.kube.election`'s.

Writes are `update`s carrying the resourceVersion that was read, so of two replicas racing for a
free Lease exactly one wins (the other gets 409). Each request is bounded by what is left of the
renew deadline, so a leader cut off from the apiserver notices in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from lbctl.kube.client import ApiError, KubeClient
from lbctl.kube.election import (
    UNKNOWN,
    Action,
    ElectorState,
    LeaseRecord,
    Timing,
    Unknown,
    deadline_passed,
    decide,
    observe,
    released,
    written,
)
from lbctl.model.meta import micro_time

log = logging.getLogger(__name__)


def default_identity() -> str:
    """The pod's name (POD_NAME from the downward API), else host, pid and a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}"


def lease_record(lease: Mapping[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(holder=spec.get("holderIdentity") or "", duration_s=int(spec.get("leaseDurationSeconds") or 0),
                       acquire_time=spec.get("acquireTime"), renew_time=spec.get("renewTime"),
                       transitions=int(spec.get("leaseTransitions") or 0))


def lease_spec(record: LeaseRecord) -> dict[str, Any]:
    return {"holderIdentity": record.holder, "leaseDurationSeconds": record.duration_s,
            "acquireTime": record.acquire_time, "renewTime": record.renew_time,
            "leaseTransitions": record.transitions}


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, timing: Timing,
                 on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None]) -> None:
        timing.check()
        self._client = client
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
        self._path = f"{self._collection}/{quote(name)}"
        self.namespace, self.name, self.identity, self.timing = namespace, name, identity, timing
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self.state = ElectorState(identity)
        self._lease: dict[str, Any] | None = None  # the object as last read or written
        self._stopped = False

    @property
    def leading(self) -> bool:
        return self.state.leading

    def may_act(self) -> bool:
        """True while this replica leads and its last renewal is within the renew deadline."""
        return self.state.leading and not deadline_passed(self.state, time.monotonic(), self.timing)

    def _request_timeout(self, now: float) -> float:
        if self.state.leading and self.state.renewed_at is not None:
            return max(0.05, self.state.renewed_at + self.timing.renew_deadline_s - now)
        return self.timing.lease_duration_s

    async def run(self) -> None:
        log.info("leader election: %s wants lease %s/%s (duration %ss, renew deadline %ss, retry %ss)",
                 self.identity, self.namespace, self.name, self.timing.lease_duration_s,
                 self.timing.renew_deadline_s, self.timing.retry_period_s)
        while not self._stopped:
            started = time.monotonic()
            record = await self._read(self._request_timeout(started))
            now = time.monotonic()
            self.state = observe(self.state, record, now)
            decision = decide(self.state, record, now, micro_time(), self.timing)
            if decision.action is Action.LOST:
                self._lose()
                return
            if decision.action is not Action.WAIT and decision.record is not None:
                was_leading = self.state.leading
                if await self._write(decision.action, decision.record) and not was_leading:
                    log.info("leader election: %s now leads (lease %s/%s)", self.identity, self.namespace, self.name)
                    self._on_started()
            if deadline_passed(self.state, time.monotonic(), self.timing):
                self._lose()
                return
            delay = decision.retry_in_s - (time.monotonic() - started)
            if self.state.leading and self.state.renewed_at is not None:
                # never sleep past the point where a failed renewal would have to be noticed
                delay = min(delay, self.state.renewed_at + self.timing.renew_deadline_s - time.monotonic())
            await asyncio.sleep(max(0.0, delay))

    def _lose(self) -> None:
        log.error("leader election: %s lost lease %s/%s (not renewed within %ss): stopping", self.identity,
                  self.namespace, self.name, self.timing.renew_deadline_s)
        self.state = ElectorState(self.identity, self.state.observed, self.state.observed_at)
        self._on_stopped()

    async def _read(self, timeout_s: float) -> LeaseRecord | Unknown | None:
        try:
            self._lease = await self._client.request("GET", self._path, timeout_s=timeout_s)
        except ApiError as exc:
            if exc.status == 404:
                self._lease = None
                return None
            log.warning("leader election: reading lease: %s", exc)
            return UNKNOWN
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("leader election: reading lease: %s: %s", type(exc).__name__, exc)
            return UNKNOWN
        return lease_record(self._lease)

    async def _write(self, action: Action, record: LeaseRecord) -> bool:
        started = time.monotonic()
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": {"name": self.name, "namespace": self.namespace},
                                "spec": lease_spec(record)}
        try:
            if action is Action.CREATE:
                self._lease = await self._client.request("POST", self._collection, body=body,
                                                         timeout_s=self._request_timeout(started))
            else:
                assert self._lease is not None
                body["metadata"] = {**self._lease.get("metadata", {}), "name": self.name, "namespace": self.namespace}
                self._lease = await self._client.request("PUT", self._path, body=body,
                                                         timeout_s=self._request_timeout(started))
        except ApiError as exc:
            if exc.status == 409:
                log.debug("leader election: %s lost a race for the lease", self.identity)
            else:
                log.warning("leader election: writing lease: %s", exc)
            return False
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("leader election: writing lease: %s: %s", type(exc).__name__, exc)
            return False
        self.state = written(self.state, record, started)
        return True

    async def release(self) -> None:
        """On a clean stop, once this replica has stopped acting and `run` has been cancelled: hand
        the Lease back so a standby takes it at once instead of waiting for it to expire."""
        self._stopped = True
        if not self.state.leading or self._lease is None or self.state.observed is None:
            return
        record = released(self.state.observed, micro_time())
        self.state = ElectorState(self.identity)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": self._lease.get("metadata", {}),
                "spec": lease_spec(record)}
        try:
            await self._client.request("PUT", self._path, body=body, timeout_s=self.timing.renew_deadline_s)
            log.info("leader election: %s released lease %s/%s", self.identity, self.namespace, self.name)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("leader election: could not release the lease (%s); it expires in %ss", exc,
                        self.timing.lease_duration_s)
