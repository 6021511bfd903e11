"""GCE passthrough load balancers through google-cloud-compute: a thin adapter.

`providers.gce_plan` decides (validation, desired state, diffs); this module reads GCE into plain
values, asks the plan, and applies what it says in dependency order. Every SDK call goes through
`providers.retry.CloudCaller` (a thread, a rate limit, jittered retries on throttling and 5xx only);
write calls wait for their operation. Every name is deterministic, so `ensure` after a crash between
any two steps finds what exists and carries on, and `delete` succeeds when pieces are gone.

What GCE holds is cached for `cache-ttl-s` (default 300 s), updated by our own writes and dropped
on any error, so a resync of unchanged Services makes no call at all and a node change costs one
membership write per balancer; a change made behind lbctl's back is repaired once the entry
expires. Legacy HTTP health checks (the only kind target pools accept) have no client in
google-cloud-compute, so they go through its REST API with the same credentials.

Options (ProviderSettings.options, '-' or '_'): project, region (required; project may come from
Application Default Credentials), network, subnetwork, node-tags, endpoint (or env
LBCTL_GCE_ENDPOINT: a stand-in API, reached with anonymous credentials), cache-ttl-s, page-size,
rate-per-s, burst.

Shared pieces: the cluster's node health check (and its firewall) and its per-zone instance groups
belong to no Service; a delete removes them once GCE says nothing uses them any more. The shared
health-check firewall opens to the nodes' tags as the last balancer ensured saw them: balancers of
one cluster are expected to share one node set (the operator computes eligibility once).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import compute_v1

from lbctl.model.errors import CloudRefusalError, LoadBalancerError, TransientProviderError
from lbctl.model.types import Ingress, LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus, PortStatus
from providers.base import Provider, ProviderSettings
from providers.gce_plan import (
    COMPUTE_URL,
    IPV4,
    IPV6,
    PROTOCOLS,
    AddressPlan,
    BackendServiceState,
    Change,
    FirewallState,
    GceConfig,
    GroupState,
    HealthCheckState,
    Intent,
    Names,
    ObservedAddress,
    ObservedInstance,
    PoolState,
    RuleState,
    Scheme,
    SubnetworkState,
    backend_service_change,
    backend_services_for,
    bare_ip,
    check_subnetwork_for_ipv6,
    describe_shared,
    firewall_change,
    firewall_for,
    group_change,
    group_members,
    health_check_change,
    health_check_firewall_for,
    health_check_firewall_name,
    health_check_for,
    last_segment,
    owned_by,
    owner_of,
    plan_address,
    plan_address_v6,
    pool_change,
    pool_for,
    read_config,
    read_intent,
    resource_path,
    rule_change,
    rules_for,
    status_for,
    target_tags,
    zone_of,
)
from providers.retry import CloudCaller

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://compute.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TIMEOUT_S = 60.0
OPERATION_DEADLINE_S = 600.0
_RETRY_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"})
_QUOTA_REASONS = frozenset({"quotaExceeded", "QUOTA_EXCEEDED"})
_IN_USE_REASONS = frozenset({"resourceInUseByAnotherResource", "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"})
_RETRY_TYPES = (api_exceptions.TooManyRequests, api_exceptions.InternalServerError, api_exceptions.BadGateway,
                api_exceptions.ServiceUnavailable, api_exceptions.GatewayTimeout, api_exceptions.DeadlineExceeded)


def _reasons(exc: api_exceptions.GoogleAPICallError) -> set[str]:
    out = set()
    for error in exc.errors:
        if isinstance(error, Mapping):
            out |= {str(error[key]) for key in ("reason", "code") if error.get(key)}
    return out


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx and broken connections; never 4xx validation or quota errors."""
    if isinstance(exc, _RETRY_TYPES):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return bool(_reasons(exc) & _RETRY_REASONS)
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def _in_use(exc: api_exceptions.GoogleAPICallError) -> bool:
    return bool(_reasons(exc) & _IN_USE_REASONS)


def cloud_error(exc: api_exceptions.GoogleAPICallError, what: str) -> LoadBalancerError:
    """A GCE refusal as the operator reports it; all are retried with backoff by the operator."""
    message = exc.message or str(exc)
    if _reasons(exc) & _QUOTA_REASONS or "quota" in message.lower():
        return CloudRefusalError(
            f"GCE quota exceeded while {what}: {message}",
            fix="raise the quota named above in the project's IAM & Admin > Quotas, or free unused resources; "
                "lbctl retries and reuses what it already made",
        )
    if isinstance(exc, api_exceptions.Forbidden):
        return CloudRefusalError(
            f"GCE denied {what}: {message}",
            fix="grant the operator's service account roles/compute.loadBalancerAdmin and "
                "roles/compute.securityAdmin",
        )
    return TransientProviderError(f"GCE failed {what}: {message}")


def _operation_error(op: compute_v1.Operation) -> api_exceptions.GoogleAPICallError | None:
    errors = [{"reason": error.code, "message": error.message} for error in op.error.errors] if "error" in op else []
    status = op.http_error_status_code if "http_error_status_code" in op else 0
    if not errors and status < 400:
        return None
    message = "; ".join(error["message"] for error in errors) or op.http_error_message
    error: api_exceptions.GoogleAPICallError = api_exceptions.from_http_status(  # type: ignore[no-untyped-call]
        status if status >= 400 else 400, message, errors=errors)
    return error


class Outcome(StrEnum):
    """How a tolerant call ended."""

    DONE = "done"
    ABSENT = "absent"  # 404
    EXISTS = "exists"  # 409 on insert: made earlier (a retried call, or before a crash)
    IN_USE = "in use"  # 400 resourceInUseByAnotherResource on delete


class _TtlCache:
    """What GCE held when last read or written, per resource key, for a while."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[str, ...]) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, key: tuple[str, ...], value: Any) -> None:
        if self._ttl > 0:
            self._entries[key] = (time.monotonic() + self._ttl, value)

    def drop(self, key: tuple[str, ...]) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class _LegacyHttpHealthChecks:
    """global/httpHealthChecks over REST: target pools accept only these legacy checks, and
    google-cloud-compute generates no client for them."""

    def __init__(self, credentials: Credentials, endpoint: str, project: str, page_size: int) -> None:
        self._session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        self._base = f"{endpoint.rstrip('/')}/compute/v1/projects/{project}/global/httpHealthChecks"
        self._page_size = page_size

    def _send(self, method: str, url: str, body: Mapping[str, Any] | None = None,
              params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response: requests.Response = self._session.request(  # type: ignore[no-untyped-call]
            method, url, json=body, params=params, timeout=TIMEOUT_S)
        if response.status_code >= 400:
            raise api_exceptions.from_http_response(response)  # type: ignore[no-untyped-call]
        data = response.json()
        return data if isinstance(data, dict) else {}

    def get(self, name: str) -> dict[str, Any]:
        return self._send("GET", f"{self._base}/{name}")

    def list(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"maxResults": str(self._page_size)} | ({"pageToken": token} if token else {})
            page = self._send("GET", self._base, params=params)
            items += page.get("items", [])
            token = page.get("nextPageToken", "")
            if not token:
                return items

    def _operation(self, data: Mapping[str, Any]) -> compute_v1.Operation:
        op: compute_v1.Operation = compute_v1.Operation.from_json(json.dumps(data), ignore_unknown_fields=True)
        return op

    def insert(self, body: Mapping[str, Any]) -> compute_v1.Operation:
        return self._operation(self._send("POST", self._base, body))

    def patch(self, name: str, body: Mapping[str, Any]) -> compute_v1.Operation:
        return self._operation(self._send("PATCH", f"{self._base}/{name}", body))

    def delete(self, name: str) -> compute_v1.Operation:
        return self._operation(self._send("DELETE", f"{self._base}/{name}"))

    def close(self) -> None:
        self._session.close()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Placement:
    """Whether one thing the options name exists in the project (`lbctl doctor`)."""

    what: str  # region, network or subnetwork
    name: str
    found: bool


@dataclass
class _Clients:
    addresses: compute_v1.AddressesClient
    firewalls: compute_v1.FirewallsClient
    http_health_checks: _LegacyHttpHealthChecks
    region_health_checks: compute_v1.RegionHealthChecksClient
    target_pools: compute_v1.TargetPoolsClient
    forwarding_rules: compute_v1.ForwardingRulesClient
    backend_services: compute_v1.RegionBackendServicesClient
    instance_groups: compute_v1.InstanceGroupsClient
    instances: compute_v1.InstancesClient
    regions: compute_v1.RegionsClient
    subnetworks: compute_v1.SubnetworksClient
    networks: compute_v1.NetworksClient
    zone_operations: compute_v1.ZoneOperationsClient
    region_operations: compute_v1.RegionOperationsClient
    global_operations: compute_v1.GlobalOperationsClient

    def close(self) -> None:
        self.http_health_checks.close()
        for client in (self.addresses, self.firewalls, self.region_health_checks, self.target_pools,
                       self.forwarding_rules, self.backend_services, self.instance_groups, self.instances,
                       self.regions, self.subnetworks, self.networks, self.zone_operations, self.region_operations,
                       self.global_operations):
            client.transport.close()  # type: ignore[no-untyped-call]

    @classmethod
    def build(cls, credentials: Credentials, endpoint: str | None, project: str, page_size: int) -> _Clients:
        kwargs: dict[str, Any] = {"credentials": credentials, "transport": "rest"}
        if endpoint:
            kwargs["client_options"] = {"api_endpoint": endpoint}
        return cls(
            addresses=compute_v1.AddressesClient(**kwargs),
            firewalls=compute_v1.FirewallsClient(**kwargs),
            http_health_checks=_LegacyHttpHealthChecks(credentials, endpoint or DEFAULT_ENDPOINT, project, page_size),
            region_health_checks=compute_v1.RegionHealthChecksClient(**kwargs),
            target_pools=compute_v1.TargetPoolsClient(**kwargs),
            forwarding_rules=compute_v1.ForwardingRulesClient(**kwargs),
            backend_services=compute_v1.RegionBackendServicesClient(**kwargs),
            instance_groups=compute_v1.InstanceGroupsClient(**kwargs),
            instances=compute_v1.InstancesClient(**kwargs),
            regions=compute_v1.RegionsClient(**kwargs),
            subnetworks=compute_v1.SubnetworksClient(**kwargs),
            networks=compute_v1.NetworksClient(**kwargs),
            zone_operations=compute_v1.ZoneOperationsClient(**kwargs),
            region_operations=compute_v1.RegionOperationsClient(**kwargs),
            global_operations=compute_v1.GlobalOperationsClient(**kwargs),
        )


# -- SDK messages to plain observed values -------------------------------------------------------


def _address(item: compute_v1.Address) -> ObservedAddress:
    return ObservedAddress(name=item.name, ip=item.address, address_type=item.address_type or "EXTERNAL",
                           tier=item.network_tier, purpose=item.purpose, description=item.description,
                           users=tuple(item.users), ip_version=item.ip_version)


def _firewall(item: compute_v1.Firewall) -> FirewallState:
    allowed = frozenset((entry.I_p_protocol.lower(), frozenset(entry.ports)) for entry in item.allowed)
    return FirewallState(name=item.name, source_ranges=frozenset(item.source_ranges), allowed=allowed,
                         target_tags=frozenset(item.target_tags), network=item.network)


def _legacy_check(item: Mapping[str, Any]) -> HealthCheckState:
    return HealthCheckState(
        name=str(item.get("name", "")), port=int(item.get("port", 80)), path=str(item.get("requestPath", "/")),
        interval_s=int(item.get("checkIntervalSec", 5)), timeout_s=int(item.get("timeoutSec", 5)),
        healthy=int(item.get("healthyThreshold", 2)), unhealthy=int(item.get("unhealthyThreshold", 2)),
    )


def _region_check(item: compute_v1.HealthCheck) -> HealthCheckState:
    http = item.http_health_check if item.type_ == "HTTP" else None
    return HealthCheckState(
        name=item.name, port=http.port if http else 0, path=http.request_path if http else "",
        interval_s=item.check_interval_sec, timeout_s=item.timeout_sec, healthy=item.healthy_threshold,
        unhealthy=item.unhealthy_threshold,
    )


def _pool(item: compute_v1.TargetPool) -> PoolState:
    return PoolState(name=item.name, instances=frozenset(item.instances), health_checks=tuple(item.health_checks),
                     session_affinity=item.session_affinity or "NONE")


def _rule(item: compute_v1.ForwardingRule) -> RuleState:
    return RuleState(
        name=item.name, ip=bare_ip(item.I_p_address), protocol=item.I_p_protocol,
        scheme=item.load_balancing_scheme or "EXTERNAL", port_range=item.port_range, ports=frozenset(item.ports),
        all_ports=item.all_ports, target=item.target, backend_service=item.backend_service, tier=item.network_tier,
        ip_version=item.ip_version,
    )


def _backend_service(item: compute_v1.BackendService) -> BackendServiceState:
    return BackendServiceState(
        name=item.name, protocol=item.protocol, groups=frozenset(backend.group for backend in item.backends),
        health_checks=tuple(item.health_checks), session_affinity=item.session_affinity or "NONE",
    )


class GceProvider(Provider):
    name = "gce"
    needs_node_ports = False

    def __init__(self, config: GceConfig, clients: _Clients, *, caller: CloudCaller | None = None,
                 cache_ttl_s: float = 300.0, page_size: int = 500) -> None:
        self._config = config
        self._project = config.project
        self._region = config.region
        self._clients = clients
        self._caller = caller or CloudCaller(is_retryable, provider="gce")
        self._cache = _TtlCache(cache_ttl_s)
        self._page_size = page_size
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._zones: tuple[str, ...] | None = None  # the region's zones, read once
        self._surprises = 0

    @classmethod
    def create(cls, settings: ProviderSettings) -> GceProvider:
        options = {key.replace("-", "_"): value for key, value in settings.options.items()}
        endpoint = options.get("endpoint") or options.get("endpoint_url") or os.environ.get("LBCTL_GCE_ENDPOINT")
        credentials: Credentials
        if endpoint:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]  # a local stand-in for the API
        else:
            try:
                credentials, adc_project = google.auth.default(scopes=list(SCOPES))
            except auth_exceptions.DefaultCredentialsError as exc:
                raise ValueError(f"gce provider: no Application Default Credentials: {exc}") from exc
            if not options.get("project") and adc_project:
                options["project"] = adc_project
        config = read_config(settings.cluster_name, options)
        try:
            ttl = float(options.get("cache_ttl_s", "300"))
            page_size = int(options.get("page_size", "500"))
            rate = float(options.get("rate_per_s", "20"))
            burst = int(options.get("burst", "40"))
        except ValueError as exc:
            raise ValueError(f"gce provider: bad numeric option: {exc}") from exc
        if not 1 <= page_size <= 500 or rate <= 0 or burst < 1 or ttl < 0:
            raise ValueError("gce provider: page-size must be 1..500, rate-per-s and burst positive, cache-ttl-s >= 0")
        clients = _Clients.build(credentials, endpoint, config.project, page_size)
        return cls(config, clients, caller=CloudCaller(is_retryable, rate_per_s=rate, burst=burst, provider="gce"),
                   cache_ttl_s=ttl, page_size=page_size)

    # -- calling GCE ---------------------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[[], T], *, absent_ok: bool = False, exists_ok: bool = False,
                   in_use_ok: bool = False) -> T | Outcome:
        """One SDK call (with its operation) through the caller; GCE errors become lbctl errors,
        except those the caller tolerates, which come back as an Outcome."""
        try:
            return await self._caller.call_as(what, fn)
        except api_exceptions.GoogleAPICallError as exc:
            if absent_ok and isinstance(exc, api_exceptions.NotFound):
                return Outcome.ABSENT
            if exists_ok and isinstance(exc, api_exceptions.Conflict):
                return Outcome.EXISTS
            if in_use_ok and _in_use(exc):
                return Outcome.IN_USE
            raise cloud_error(exc, what) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientProviderError(f"GCE unreachable while {what}: {exc}") from exc

    async def _read(self, what: str, fn: Callable[[], T]) -> T | None:
        """A get: None when the resource does not exist."""
        result = await self._run(what, fn, absent_ok=True)
        return None if isinstance(result, Outcome) else result

    async def _list(self, what: str, fn: Callable[[], list[T]]) -> list[T]:
        result = await self._run(what, fn)
        return [] if isinstance(result, Outcome) else result

    def _finish(self, op: compute_v1.Operation) -> None:
        """Wait for an operation (the fake and most deletes answer DONE at once) and raise its error.
        Polls through our own operations clients: the SDK's poller ignores a custom endpoint."""
        deadline = time.monotonic() + OPERATION_DEADLINE_S
        delay = 0.1
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise api_exceptions.DeadlineExceeded(  # type: ignore[no-untyped-call]
                    f"operation {op.name} did not finish")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            project = self._config.project
            if op.zone:
                op = self._clients.zone_operations.get(project=project, zone=last_segment(op.zone),
                                                       operation=op.name, retry=None, timeout=TIMEOUT_S)
            elif op.region:
                op = self._clients.region_operations.get(project=project, region=last_segment(op.region),
                                                         operation=op.name, retry=None, timeout=TIMEOUT_S)
            else:
                op = self._clients.global_operations.get(project=project, operation=op.name, retry=None,
                                                         timeout=TIMEOUT_S)
        error = _operation_error(op)
        if error is not None:
            raise error

    async def _write(self, what: str, send: Callable[[], compute_v1.Operation], **tolerate: bool) -> Outcome:
        """A write and its operation."""
        def call() -> Outcome:
            self._finish(send())
            return Outcome.DONE

        outcome = await self._run(what, call, **tolerate)
        if outcome is Outcome.EXISTS:
            self._surprises += 1  # made by a retried call or a concurrent one: what is cached may be off
        return outcome

    def _lock(self, *key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _observe(self, key: tuple[str, ...], load: Callable[[], Awaitable[T]]) -> T:
        hit, value = self._cache.get(key)
        if hit:
            return value  # type: ignore[no-any-return]
        loaded = await load()
        self._cache.put(key, loaded)
        return loaded

    # -- request helpers: one SDK method bound to our project (and region or zone) -------------

    def _regional(self, method: Callable[..., T], **fields: Any) -> Callable[[], T]:
        return partial(method, project=self._project, region=self._region, retry=None, timeout=TIMEOUT_S, **fields)

    def _global(self, method: Callable[..., T], **fields: Any) -> Callable[[], T]:
        return partial(method, project=self._project, retry=None, timeout=TIMEOUT_S, **fields)

    def _zonal(self, method: Callable[..., T], zone: str, **fields: Any) -> Callable[[], T]:
        return partial(method, project=self._project, zone=zone, retry=None, timeout=TIMEOUT_S, **fields)

    def _listing(self, method: Callable[..., Iterable[T]], request: Any) -> Callable[[], list[T]]:
        """Every page of a list call (the pager fetches the next pages)."""
        return lambda: list(method(request=request, retry=None, timeout=TIMEOUT_S))

    # -- reads ---------------------------------------------------------------------------------

    async def _read_address(self, name: str) -> ObservedAddress | None:
        async def load() -> ObservedAddress | None:
            item = await self._read(f"reading address {name}",
                                    self._regional(self._clients.addresses.get, address=name))
            return None if item is None else _address(item)
        return await self._observe(("address", name), load)

    async def _address_with_ip(self, ip: str) -> ObservedAddress | None:
        async def load() -> ObservedAddress | None:
            request = compute_v1.ListAddressesRequest(project=self._project, region=self._region,
                                                      max_results=self._page_size)
            items = await self._list("listing addresses", self._listing(self._clients.addresses.list, request))
            return next((_address(item) for item in items if item.address == ip), None)
        return await self._observe(("address-ip", ip), load)

    async def _read_rule(self, name: str) -> RuleState | None:
        async def load() -> RuleState | None:
            item = await self._read(f"reading forwarding rule {name}",
                                    self._regional(self._clients.forwarding_rules.get, forwarding_rule=name))
            return None if item is None else _rule(item)
        return await self._observe(("rule", name), load)

    async def _read_pool(self, name: str) -> PoolState | None:
        async def load() -> PoolState | None:
            item = await self._read(f"reading target pool {name}",
                                    self._regional(self._clients.target_pools.get, target_pool=name))
            return None if item is None else _pool(item)
        return await self._observe(("pool", name), load)

    async def _read_backend_service(self, name: str) -> BackendServiceState | None:
        async def load() -> BackendServiceState | None:
            item = await self._read(f"reading backend service {name}",
                                    self._regional(self._clients.backend_services.get, backend_service=name))
            return None if item is None else _backend_service(item)
        return await self._observe(("backend", name), load)

    async def _read_health_check(self, scheme: Scheme, name: str) -> HealthCheckState | None:
        async def load() -> HealthCheckState | None:
            if scheme is Scheme.EXTERNAL:
                legacy = await self._read(f"reading HTTP health check {name}",
                                          partial(self._clients.http_health_checks.get, name))
                return None if legacy is None else _legacy_check(legacy)
            item = await self._read(f"reading health check {name}",
                                    self._regional(self._clients.region_health_checks.get, health_check=name))
            return None if item is None else _region_check(item)
        return await self._observe(("check", scheme, name), load)

    async def _read_subnetwork(self) -> SubnetworkState | None:
        """The subnetwork internal rules and addresses use (the gce subnetwork option)."""
        url = self._config.subnetwork_url
        parts = resource_path(url).split("/")  # projects/P/regions/R/subnetworks/S

        async def load() -> SubnetworkState | None:
            if len(parts) != 6 or parts[2] != "regions" or parts[4] != "subnetworks":
                return None
            item = await self._read(f"reading subnetwork {parts[5]}", partial(
                self._clients.subnetworks.get, project=parts[1], region=parts[3], subnetwork=parts[5], retry=None,
                timeout=TIMEOUT_S))
            return None if item is None else SubnetworkState(name=item.name, stack_type=item.stack_type,
                                                             ipv6_access_type=item.ipv6_access_type)
        return await self._observe(("subnetwork", url), load)

    async def _read_firewall(self, name: str) -> FirewallState | None:
        async def load() -> FirewallState | None:
            item = await self._read(f"reading firewall {name}", self._global(self._clients.firewalls.get,
                                                                             firewall=name))
            return None if item is None else _firewall(item)
        return await self._observe(("firewall", name), load)

    async def _read_group(self, zone: str) -> GroupState | None:
        name = self._config.instance_group_name
        groups = self._clients.instance_groups

        def read() -> GroupState | None:
            try:
                self._zonal(groups.get, zone, instance_group=name)()
            except api_exceptions.NotFound:
                return None
            request = compute_v1.ListInstancesInstanceGroupsRequest(
                project=self._project, zone=zone, instance_group=name, max_results=self._page_size,
                instance_groups_list_instances_request_resource=compute_v1.InstanceGroupsListInstancesRequest(),
            )
            members = self._listing(groups.list_instances, request)()
            return GroupState(zone=zone, name=name, members=frozenset(item.instance for item in members))

        async def load() -> GroupState | None:
            result = await self._run(f"reading instance group {zone}/{name}", read)
            return None if isinstance(result, Outcome) else result
        return await self._observe(("group", zone), load)

    async def _zone_instances(self, zone: str) -> dict[str, ObservedInstance]:
        async def load() -> dict[str, ObservedInstance]:
            request = compute_v1.ListInstancesRequest(project=self._project, zone=zone, max_results=self._page_size)
            items = await self._list(f"listing instances in {zone}",
                                     self._listing(self._clients.instances.list, request))
            return {COMPUTE_URL + resource_path(item.self_link): ObservedInstance(url=item.self_link,
                                                                                  tags=tuple(item.tags.items))
                    for item in items}
        return await self._observe(("instances", zone), load)

    async def _instances(self, intent: Intent) -> dict[str, ObservedInstance]:
        """The nodes' instances, listed per zone; a zone is listed again when a node is new to it."""
        found: dict[str, ObservedInstance] = {}
        for zone in intent.zones:
            wanted = [ref.url for ref in intent.instances if ref.zone == zone]
            async with self._lock("instances", zone):
                listing = await self._zone_instances(zone)
                if any(url not in listing for url in wanted):
                    self._cache.drop(("instances", zone))
                    listing = await self._zone_instances(zone)
            found.update(listing)
        return found

    async def _region_zones(self) -> tuple[str, ...]:
        if self._zones is None:
            region = await self._read(f"reading region {self._region}", self._regional(self._clients.regions.get))
            if region is None:
                raise TransientProviderError(f"GCE has no region {self._region} in project {self._project}",
                                             fix="set the gce region option to the nodes' region")
            self._zones = tuple(sorted(last_segment(url) for url in region.zones))
        return self._zones

    # -- ensure --------------------------------------------------------------------------------

    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        intent = read_intent(spec, self._config)  # bad input fails here, before any call
        async with self._lock("balancer", spec.name):
            surprises = self._surprises
            try:
                status = await self._ensure(intent)
            except BaseException:
                self._cache.clear()  # whatever happened, read GCE afresh next time
                raise
            if self._surprises != surprises:
                self._cache.clear()
            return status

    async def _ensure(self, intent: Intent) -> LoadBalancerStatus:
        config, names = self._config, intent.names
        instances = await self._instances(intent)
        tags = target_tags(intent, config, instances)
        rule_names = [names.rule(p) for p in PROTOCOLS] + [names.rule_v6(p) for p in PROTOCOLS]
        own, own_v6, pool, *found = await asyncio.gather(
            self._read_address(names.address), self._read_address(names.address_v6),
            self._read_pool(names.target_pool), *(self._read_rule(name) for name in rule_names),
            *(self._read_backend_service(names.backend_service(protocol)) for protocol in PROTOCOLS),
        )
        assert own is None or isinstance(own, ObservedAddress)
        assert own_v6 is None or isinstance(own_v6, ObservedAddress)
        assert pool is None or isinstance(pool, PoolState)
        rules = {rule.name: rule for rule in found if isinstance(rule, RuleState)}
        services = {svc.name: svc for svc in found if isinstance(svc, BackendServiceState)}
        address: AddressPlan | None = None
        if intent.ipv4:
            requested = await self._address_with_ip(intent.requested_ip) if intent.requested_ip else None
            rule_urls = [config.regional_url("forwardingRules", name) for name in rules]
            address = plan_address(intent, config, own, requested, rule_urls)
        address_v6: AddressPlan | None = None
        if intent.ipv6:
            check_subnetwork_for_ipv6(intent, config, await self._read_subnetwork())
            address_v6 = plan_address_v6(intent, config, own_v6)
        # Everything is validated: writes start here.

        ip = await self._settle_address(intent, address, own, rules) if address is not None else None
        ip_v6 = await self._settle_address_v6(intent, address_v6, own_v6, rules) if address_v6 is not None else None
        check_url = await self._ensure_health_check(intent, tags)
        for family in (IPV4, IPV6):
            if family in intent.families and intent.ranges(family):
                await self._ensure_firewall(firewall_for(intent, config, tags, family), intent.description)
            elif await self._read_firewall(names.firewall_of(family)) is not None:
                await self._delete_firewall(names.firewall_of(family))  # that family is no longer served
        desired_rules = rules_for(intent, config, ip, ip_v6)
        if intent.scheme is Scheme.EXTERNAL:
            await self._converge_external(intent, check_url, pool, rules, desired_rules)
            await self._drop_internal(services)
        else:
            await self._converge_internal(intent, check_url, services, rules, desired_rules)
            if pool is not None:
                await self._delete_pool(names.target_pool)
        await self._drop_unused_checks(intent)
        if address is not None and address.release_own_after and own is not None:
            await self._delete_address(names.address)
        for served, held, name in ((intent.ipv4, own, names.address), (intent.ipv6, own_v6, names.address_v6)):
            if not served and held is not None and owned_by(held.description, config.cluster_name, intent.name):
                await self._delete_address(name)  # its rules went in the converge above
        return status_for(intent, ip, ip_v6)

    async def _settle_address(self, intent: Intent, plan: AddressPlan, own: ObservedAddress | None,
                              rules: dict[str, RuleState]) -> str:
        names = intent.names
        if plan.release_own_first and own is not None:
            for name in [name for name, rule in rules.items() if rule.ip == own.ip]:
                await self._delete_rule(name)
                rules.pop(name)
            await self._delete_address(names.address)
        if plan.ip is not None:
            return plan.ip
        body = compute_v1.Address(name=names.address, description=intent.description)
        if intent.scheme is Scheme.INTERNAL:
            body.address_type = "INTERNAL"
            body.purpose = "SHARED_LOADBALANCER_VIP"  # TCP and UDP rules share it
            body.subnetwork = self._config.subnetwork_url
        else:
            body.address_type = "EXTERNAL"
            body.network_tier = intent.tier
        return await self._reserve(names.address, body)

    async def _settle_address_v6(self, intent: Intent, plan: AddressPlan, own: ObservedAddress | None,
                                 rules: dict[str, RuleState]) -> str:
        """The balancer's internal IPv6 address, reserved so it outlives rule re-creation."""
        names = intent.names
        if plan.release_own_first and own is not None:
            for name in [name for name, rule in rules.items() if rule.ip == bare_ip(own.ip)]:
                await self._delete_rule(name)
                rules.pop(name)
            await self._delete_address(names.address_v6)
        if plan.ip is not None:
            return plan.ip
        body = compute_v1.Address(name=names.address_v6, description=intent.description, address_type="INTERNAL",
                                  ip_version="IPV6", subnetwork=self._config.subnetwork_url)
        return bare_ip(await self._reserve(names.address_v6, body))

    async def _reserve(self, name: str, body: compute_v1.Address) -> str:
        await self._write(f"reserving address {name}",
                          self._regional(self._clients.addresses.insert_unary, address_resource=body),
                          exists_ok=True)
        self._cache.drop(("address", name))
        reserved = await self._read_address(name)
        if reserved is None:
            raise TransientProviderError(f"address {name} vanished right after it was reserved")
        return reserved.ip

    async def _ensure_health_check(self, intent: Intent, tags: tuple[str, ...]) -> str:
        config, check = self._config, intent.health_check
        desired = health_check_for(intent)
        description = describe_shared(config, "node-health-check") if check.shared else intent.description
        async with self._lock("check", intent.scheme, check.name):
            change = health_check_change(desired, await self._read_health_check(intent.scheme, check.name))
            if intent.scheme is Scheme.EXTERNAL:
                url = config.global_url("httpHealthChecks", check.name)
                legacy = {"name": check.name, "description": description, "port": desired.port,
                          "requestPath": desired.path, "checkIntervalSec": desired.interval_s,
                          "timeoutSec": desired.timeout_s, "healthyThreshold": desired.healthy,
                          "unhealthyThreshold": desired.unhealthy}
                if change is Change.CREATE:
                    await self._write(f"creating HTTP health check {check.name}",
                                      partial(self._clients.http_health_checks.insert, legacy), exists_ok=True)
                elif change is not Change.NONE:
                    await self._write(f"updating HTTP health check {check.name}",
                                      partial(self._clients.http_health_checks.patch, check.name, legacy))
            else:
                url = config.regional_url("healthChecks", check.name)
                body = compute_v1.HealthCheck(
                    name=check.name, description=description, type_="HTTP",
                    http_health_check=compute_v1.HTTPHealthCheck(port=desired.port, request_path=desired.path),
                    check_interval_sec=desired.interval_s, timeout_sec=desired.timeout_s,
                    healthy_threshold=desired.healthy, unhealthy_threshold=desired.unhealthy,
                )
                checks = self._clients.region_health_checks
                if change is Change.CREATE:
                    await self._write(f"creating health check {check.name}",
                                      self._regional(checks.insert_unary, health_check_resource=body), exists_ok=True)
                elif change is not Change.NONE:
                    await self._write(f"updating health check {check.name}", self._regional(
                        checks.patch_unary, health_check=check.name, health_check_resource=body))
            self._cache.put(("check", intent.scheme, check.name), desired)
            await self._ensure_firewall(health_check_firewall_for(intent, config, tags), description)
            if intent.ipv6:  # the checkers probe IPv6 backends from their own IPv6 range
                await self._ensure_firewall(health_check_firewall_for(intent, config, tags, IPV6), description)
        return url

    async def _ensure_firewall(self, desired: FirewallState, description: str) -> None:
        firewalls = self._clients.firewalls
        async with self._lock("firewall", desired.name):
            change = firewall_change(desired, await self._read_firewall(desired.name))
            body = compute_v1.Firewall(
                name=desired.name, description=description, network=desired.network, direction="INGRESS",
                source_ranges=sorted(desired.source_ranges), target_tags=sorted(desired.target_tags),
                allowed=[compute_v1.Allowed(I_p_protocol=protocol, ports=sorted(ports, key=int))
                         for protocol, ports in sorted(desired.allowed)],
            )
            if change is Change.RECREATE:
                await self._delete_firewall(desired.name)
            if change in (Change.CREATE, Change.RECREATE):
                await self._write(f"creating firewall {desired.name}",
                                  self._global(firewalls.insert_unary, firewall_resource=body), exists_ok=True)
            elif change is Change.PATCH:
                patch = compute_v1.Firewall(source_ranges=body.source_ranges, target_tags=body.target_tags,
                                            allowed=body.allowed)  # only what may change in place
                await self._write(f"updating firewall {desired.name}", self._global(
                    firewalls.patch_unary, firewall=desired.name, firewall_resource=patch))
            self._cache.put(("firewall", desired.name), desired)

    async def _converge_external(self, intent: Intent, check_url: str, pool: PoolState | None,
                                 rules: dict[str, RuleState], desired_rules: tuple[RuleState, ...]) -> None:
        name = intent.names.target_pool
        pools = self._clients.target_pools
        desired_pool = pool_for(intent, check_url)
        change = pool_change(desired_pool, pool)
        wanted = {rule.name: rule for rule in desired_rules}
        for rule_name, rule in list(rules.items()):
            stale = rule_name not in wanted or rule_change(wanted[rule_name], rule) is not Change.NONE
            if stale or change.change is Change.RECREATE:  # a rule is in the way of its pool's recreation
                await self._delete_rule(rule_name)
                rules.pop(rule_name)
        if change.change is Change.RECREATE:
            await self._delete_pool(name)
        if change.change in (Change.CREATE, Change.RECREATE):
            body = compute_v1.TargetPool(
                name=name, description=intent.description, instances=sorted(desired_pool.instances),
                health_checks=list(desired_pool.health_checks), session_affinity=desired_pool.session_affinity,
            )
            await self._write(f"creating target pool {name}",
                              self._regional(pools.insert_unary, target_pool_resource=body), exists_ok=True)
        elif change.change is Change.PATCH:
            if change.health_checks_remove:
                detach = compute_v1.TargetPoolsRemoveHealthCheckRequest(health_checks=[
                    compute_v1.HealthCheckReference(health_check=url) for url in change.health_checks_remove])
                await self._write(f"detaching a health check from target pool {name}", self._regional(
                    pools.remove_health_check_unary, target_pool=name,
                    target_pools_remove_health_check_request_resource=detach))
            if change.health_checks_add:
                attach = compute_v1.TargetPoolsAddHealthCheckRequest(health_checks=[
                    compute_v1.HealthCheckReference(health_check=url) for url in change.health_checks_add])
                await self._write(f"attaching a health check to target pool {name}", self._regional(
                    pools.add_health_check_unary, target_pool=name,
                    target_pools_add_health_check_request_resource=attach))
            if change.add:
                add = compute_v1.TargetPoolsAddInstanceRequest(instances=[
                    compute_v1.InstanceReference(instance=url) for url in sorted(change.add)])
                await self._write(f"adding nodes to target pool {name}", self._regional(
                    pools.add_instance_unary, target_pool=name, target_pools_add_instance_request_resource=add))
            if change.remove:
                remove = compute_v1.TargetPoolsRemoveInstanceRequest(instances=[
                    compute_v1.InstanceReference(instance=url) for url in sorted(change.remove)])
                await self._write(f"removing nodes from target pool {name}", self._regional(
                    pools.remove_instance_unary, target_pool=name,
                    target_pools_remove_instance_request_resource=remove))
        self._cache.put(("pool", name), desired_pool)
        await self._create_rules(intent, rules, desired_rules)

    async def _converge_internal(self, intent: Intent, check_url: str, services: dict[str, BackendServiceState],
                                 rules: dict[str, RuleState], desired_rules: tuple[RuleState, ...]) -> None:
        backends = self._clients.backend_services
        for zone, members in sorted(group_members(intent).items()):
            await self._ensure_group(zone, members)
        wanted = {rule.name: rule for rule in desired_rules}
        for rule_name, rule in list(rules.items()):
            if rule_name not in wanted or rule_change(wanted[rule_name], rule) is not Change.NONE:
                await self._delete_rule(rule_name)
                rules.pop(rule_name)
        desired_services = backend_services_for(intent, self._config, check_url)
        for desired in desired_services:
            change = backend_service_change(desired, services.get(desired.name))
            groups = [compute_v1.Backend(group=url, balancing_mode="CONNECTION") for url in sorted(desired.groups)]
            if change is Change.CREATE:
                body = compute_v1.BackendService(
                    name=desired.name, description=intent.description, load_balancing_scheme="INTERNAL",
                    protocol=desired.protocol, session_affinity=desired.session_affinity,
                    health_checks=list(desired.health_checks), backends=groups,
                )
                await self._write(f"creating backend service {desired.name}",
                                  self._regional(backends.insert_unary, backend_service_resource=body),
                                  exists_ok=True)
            elif change is not Change.NONE:
                patch = compute_v1.BackendService(
                    protocol=desired.protocol, session_affinity=desired.session_affinity,
                    health_checks=list(desired.health_checks), backends=groups,
                )
                await self._write(f"updating backend service {desired.name}", self._regional(
                    backends.patch_unary, backend_service=desired.name, backend_service_resource=patch))
            self._cache.put(("backend", desired.name), desired)
        await self._create_rules(intent, rules, desired_rules)
        keep = {svc.name for svc in desired_services}
        before: set[str] = set()
        for service in services.values():
            before |= service.groups
            if service.name not in keep:
                await self._delete_backend_service(service.name)
        still = {resource_path(url) for svc in desired_services for url in svc.groups}
        await self._drop_groups(url for url in before if resource_path(url) not in still)

    async def _ensure_group(self, zone: str, members: frozenset[str]) -> None:
        config, groups = self._config, self._clients.instance_groups
        name = config.instance_group_name
        async with self._lock("group", zone):
            change = group_change(members, await self._read_group(zone))
            if change.create:
                body = compute_v1.InstanceGroup(name=name, description=describe_shared(config, "instance-group"),
                                                network=config.network_url)
                await self._write(f"creating instance group {zone}/{name}",
                                  self._zonal(groups.insert_unary, zone, instance_group_resource=body),
                                  exists_ok=True)
            if change.add:
                add = compute_v1.InstanceGroupsAddInstancesRequest(instances=[
                    compute_v1.InstanceReference(instance=url) for url in sorted(change.add)])
                await self._write(f"adding nodes to instance group {zone}/{name}", self._zonal(
                    groups.add_instances_unary, zone, instance_group=name,
                    instance_groups_add_instances_request_resource=add))
            if change.remove:
                remove = compute_v1.InstanceGroupsRemoveInstancesRequest(instances=[
                    compute_v1.InstanceReference(instance=url) for url in sorted(change.remove)])
                await self._write(f"removing nodes from instance group {zone}/{name}", self._zonal(
                    groups.remove_instances_unary, zone, instance_group=name,
                    instance_groups_remove_instances_request_resource=remove))
            self._cache.put(("group", zone), GroupState(zone=zone, name=name, members=members))

    async def _create_rules(self, intent: Intent, existing: Mapping[str, RuleState],
                            desired_rules: tuple[RuleState, ...]) -> None:
        config = self._config
        for desired in desired_rules:
            if desired.name in existing:
                continue
            body = compute_v1.ForwardingRule(
                name=desired.name, description=intent.description, I_p_address=desired.ip,
                I_p_protocol=desired.protocol, load_balancing_scheme=desired.scheme,
            )
            if desired.ip_version:
                body.ip_version = desired.ip_version
            if desired.scheme == Scheme.EXTERNAL:
                body.port_range = desired.port_range
                body.target = desired.target
                body.network_tier = desired.tier
            else:
                body.backend_service = desired.backend_service
                body.network = config.network_url
                body.subnetwork = config.subnetwork_url
                if desired.all_ports:
                    body.all_ports = True
                else:
                    body.ports = sorted(desired.ports, key=int)
            await self._write(f"creating forwarding rule {desired.name}", self._regional(
                self._clients.forwarding_rules.insert_unary, forwarding_rule_resource=body), exists_ok=True)
            self._cache.put(("rule", desired.name), desired)

    # -- removing pieces -----------------------------------------------------------------------

    async def _delete_rule(self, name: str) -> Outcome:
        outcome = await self._write(f"deleting forwarding rule {name}", self._regional(
            self._clients.forwarding_rules.delete_unary, forwarding_rule=name), absent_ok=True)
        self._cache.put(("rule", name), None)
        return outcome

    async def _delete_address(self, name: str) -> None:
        await self._write(f"releasing address {name}", self._regional(
            self._clients.addresses.delete_unary, address=name), absent_ok=True)
        self._cache.put(("address", name), None)

    async def _delete_backend_service(self, name: str) -> None:
        await self._write(f"deleting backend service {name}", self._regional(
            self._clients.backend_services.delete_unary, backend_service=name), absent_ok=True)
        self._cache.put(("backend", name), None)

    async def _delete_pool(self, name: str) -> Outcome:
        outcome = await self._write(f"deleting target pool {name}", self._regional(
            self._clients.target_pools.delete_unary, target_pool=name), absent_ok=True)
        self._cache.put(("pool", name), None)
        return outcome

    async def _delete_firewall(self, name: str) -> None:
        await self._write(f"deleting firewall {name}", self._global(
            self._clients.firewalls.delete_unary, firewall=name), absent_ok=True)
        self._cache.put(("firewall", name), None)

    async def _delete_check(self, scheme: Scheme, name: str, *, in_use_ok: bool = False) -> bool:
        """True when the check is gone (deleted now or before); False when something still uses it."""
        send: Callable[[], compute_v1.Operation]
        if scheme is Scheme.EXTERNAL:
            send = partial(self._clients.http_health_checks.delete, name)
        else:
            send = self._regional(self._clients.region_health_checks.delete_unary, health_check=name)
        outcome = await self._write(f"deleting health check {name}", send, absent_ok=True, in_use_ok=in_use_ok)
        if outcome is Outcome.IN_USE:
            self._cache.drop(("check", scheme, name))
            return False
        self._cache.put(("check", scheme, name), None)
        return True

    async def _drop_groups(self, urls: Iterable[str]) -> None:
        """The cluster's shared groups this balancer no longer uses: gone once no backend uses them."""
        for url in sorted(set(urls)):
            zone, name = zone_of(url), last_segment(url)
            if not zone:
                continue
            async with self._lock("group", zone):
                await self._write(f"deleting instance group {zone}/{name}", self._zonal(
                    self._clients.instance_groups.delete_unary, zone, instance_group=name),
                    absent_ok=True, in_use_ok=True)
                self._cache.drop(("group", zone))

    async def _drop_internal(self, services: Mapping[str, BackendServiceState]) -> None:
        """What an internal balancer of this name left (the Service became external)."""
        groups: set[str] = set()
        for name, service in services.items():
            groups |= service.groups
            await self._delete_backend_service(name)
        await self._drop_groups(groups)

    async def _drop_unused_checks(self, intent: Intent) -> None:
        """Own health checks (and their firewall) the balancer no longer uses, e.g. after
        externalTrafficPolicy went from Local to Cluster or the scheme changed."""
        names = intent.names
        for scheme in Scheme:
            if not intent.health_check.shared and scheme is intent.scheme:
                continue
            if await self._read_health_check(scheme, names.own_health_check) is not None:
                await self._delete_check(scheme, names.own_health_check)
        if intent.health_check.shared and await self._read_firewall(names.own_health_check_firewall) is not None:
            await self._delete_firewall(names.own_health_check_firewall)
        if ((intent.health_check.shared or not intent.ipv6)
                and await self._read_firewall(names.own_health_check_firewall_v6) is not None):
            await self._delete_firewall(names.own_health_check_firewall_v6)

    # -- delete, get, list ---------------------------------------------------------------------

    async def delete(self, ref: LoadBalancerRef) -> None:
        names = Names(ref.name)
        async with self._lock("balancer", ref.name):
            self._cache.clear()  # act on what GCE holds now
            try:
                await self._delete(ref, names)
            finally:
                self._cache.clear()

    async def _delete(self, ref: LoadBalancerRef, names: Names) -> None:
        """In dependency order; every step succeeds when its piece is already gone."""
        found = [await self._delete_rule(name) for protocol in PROTOCOLS
                 for name in (names.rule(protocol), names.rule_v6(protocol))]
        found.append(await self._delete_pool(names.target_pool))
        groups: set[str] = set()
        for protocol in PROTOCOLS:
            service = await self._read_backend_service(names.backend_service(protocol))
            if service is not None:
                groups |= service.groups
                await self._delete_backend_service(service.name)
        for scheme in Scheme:
            await self._delete_check(scheme, names.own_health_check)
        await self._release_shared_checks()
        if not groups and all(outcome is Outcome.ABSENT for outcome in found):
            # Nothing left to say which groups this balancer used (a delete that stopped midway):
            # try the cluster's group in every zone; those still in use stay.
            groups = {self._config.zonal_url(zone, "instanceGroups", self._config.instance_group_name)
                      for zone in await self._region_zones()}
        await self._drop_groups(groups)
        for firewall in (names.firewall, names.firewall_v6, names.own_health_check_firewall,
                         names.own_health_check_firewall_v6):
            await self._delete_firewall(firewall)
        for address in (names.address, names.address_v6):
            own = await self._read_address(address)
            if own is not None and owned_by(own.description, self._config.cluster_name, ref.name):
                await self._delete_address(address)

    async def _release_shared_checks(self) -> None:
        """The cluster's node health checks go with the last balancer using them, then their firewall."""
        name = self._config.shared_health_check_name
        gone = True
        for scheme in Scheme:
            async with self._lock("check", scheme, name):
                gone = await self._delete_check(scheme, name, in_use_ok=True) and gone
        if gone:
            await self._delete_firewall(health_check_firewall_name(name))
            await self._delete_firewall(health_check_firewall_name(name, IPV6))

    async def get(self, ref: LoadBalancerRef) -> LoadBalancerStatus | None:
        names = Names(ref.name)
        found = []
        for name in [names.rule(p) for p in PROTOCOLS] + [names.rule_v6(p) for p in PROTOCOLS]:
            item = await self._read(f"reading forwarding rule {name}",
                                    self._regional(self._clients.forwarding_rules.get, forwarding_rule=name))
            if item is not None:
                found.append(_rule(item))
        if not found:
            return None
        firewall = await self._read(f"reading firewall {names.firewall}",
                                    self._global(self._clients.firewalls.get, firewall=names.firewall))
        ports: list[PortStatus] = []
        for entry in firewall.allowed if firewall is not None else []:
            ports += [PortStatus(port=int(port), protocol=entry.I_p_protocol.upper())
                      for port in sorted(entry.ports, key=int) if port.isdigit()]
        ips = list(dict.fromkeys(rule.ip for rule in found))  # IPv4 first, then IPv6
        return LoadBalancerStatus(ingress=tuple(Ingress(ip=ip, ports=tuple(ports)) for ip in ips))

    async def list_owned(self) -> list[LoadBalancerRef]:
        clients, size = self._clients, self._page_size
        regional = {"project": self._project, "region": self._region, "max_results": size}
        sources: list[tuple[str, Callable[[], list[Any]]]] = [
            ("forwarding rules", self._listing(clients.forwarding_rules.list,
                                               compute_v1.ListForwardingRulesRequest(**regional))),
            ("target pools", self._listing(clients.target_pools.list, compute_v1.ListTargetPoolsRequest(**regional))),
            ("backend services", self._listing(clients.backend_services.list,
                                               compute_v1.ListRegionBackendServicesRequest(**regional))),
            ("addresses", self._listing(clients.addresses.list, compute_v1.ListAddressesRequest(**regional))),
            ("health checks", self._listing(clients.region_health_checks.list,
                                            compute_v1.ListRegionHealthChecksRequest(**regional))),
            ("firewalls", self._listing(clients.firewalls.list,
                                        compute_v1.ListFirewallsRequest(project=self._project, max_results=size))),
            ("HTTP health checks", clients.http_health_checks.list),
        ]
        refs: dict[str, LoadBalancerRef] = {}
        for what, fn in sources:
            for item in await self._list(f"listing {what}", fn):
                description = item.get("description", "") if isinstance(item, dict) else item.description
                owner = owner_of(str(description), self._config.cluster_name)
                if owner is not None:
                    refs.setdefault(owner.name, owner)
        return sorted(refs.values(), key=lambda ref: (ref.namespace, ref.service_name, ref.name))

    async def placement(self) -> list[Placement]:
        """For `lbctl doctor`: whether the region, network and subnetwork the options name exist
        (read-only gets, uncached; the subnetwork matters only to internal balancers)."""
        config = self._config
        network = resource_path(config.network_url).split("/")  # projects/P/global/networks/N
        subnetwork = resource_path(config.subnetwork_url).split("/")  # projects/P/regions/R/subnetworks/S
        region = await self._read(f"reading region {self._region}", self._regional(self._clients.regions.get))
        found = [Placement("region", f"{self._region} (project {self._project})", region is not None)]
        if len(network) == 5 and network[2:4] == ["global", "networks"]:
            item = await self._read(f"reading network {network[4]}", partial(
                self._clients.networks.get, project=network[1], network=network[4], retry=None, timeout=TIMEOUT_S))
            found.append(Placement("network", network[4], item is not None))
        else:
            found.append(Placement("network", config.network, False))
        if len(subnetwork) == 6 and subnetwork[2] == "regions" and subnetwork[4] == "subnetworks":
            item = await self._read(f"reading subnetwork {subnetwork[5]}", partial(
                self._clients.subnetworks.get, project=subnetwork[1], region=subnetwork[3],
                subnetwork=subnetwork[5], retry=None, timeout=TIMEOUT_S))
            found.append(Placement("subnetwork", f"{subnetwork[5]} (region {subnetwork[3]})", item is not None))
        else:
            found.append(Placement("subnetwork", config.subnetwork, False))
        return found

    async def close(self) -> None:
        self._clients.close()
