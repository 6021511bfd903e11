"""Wires kopf to the reconciler: watch handlers stay one line each; start-up lists and restores
before kopf's watches begin; kopf's finalizer name is the service controller's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from lbctl.kube.client import KubeClient
from lbctl.model.scope import Scope, default_class
from lbctl.operator.reconciler import MissingResourceError, Reconciler, ReconcilerSettings
from providers import registry as provider_registry
from providers.base import ProviderSettings, WatchedResource

log = logging.getLogger("lbctl.operator")


@dataclass(frozen=True)
class OperatorConfig:
    provider: str
    cluster_name: str = "kubernetes"
    lb_class: str | None = None  # default: lbctl.io/<provider>
    default_class: bool = False
    namespaces: tuple[str, ...] = ()
    kubeconfig: str | None = None
    provider_options: Mapping[str, str] = field(default_factory=dict)
    workers: int = 32
    node_port_range: tuple[int, int] = (30000, 32767)
    gc_interval_s: float = 300.0
    resync_interval_s: float = 600.0
    metrics_port: int = 0
    liveness_endpoint: str | None = None

    @property
    def scope(self) -> Scope:
        return Scope(self.lb_class or default_class(self.provider), self.default_class, frozenset(self.namespaces))


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Only event handlers are registered, so kopf adds no finalizer of its own and the service
        # controller's (FINALIZER) is the only one on a Service; the reconciler adds and removes it.
        # It must not be kopf's configured finalizer too: kopf strips that one from objects for
        # which no handler needs a finalizer.
        settings.posting.enabled = False  # our Events carry the service controller's reasons
        settings.scanning.disabled = True  # no CRD/namespace discovery: the RBAC stays minimal
        settings.watching.server_timeout = 300
        try:
            await reconciler.start()
        except MissingResourceError as exc:
            log.error("%s; retrying in 5s", exc)
            raise kopf.TemporaryError(str(exc), delay=5) from None

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf's watches and our client use one configuration (kubeconfig or in-cluster)
        conf = reconciler.client.configuration
        token = conf.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
        scheme, _sep, value = token.partition(" ")
        return kopf.ConnectionInfo(
            server=conf.host, ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl,
            scheme=scheme or None, token=value or None,
            certificate_path=conf.cert_file, private_key_path=conf.key_file,
        )

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await reconciler.stop()

    # Handlers are coroutines: kopf runs plain functions in a thread pool, and the reconciler's
    # state belongs to the event loop.
    @kopf.on.event("v1", "services", registry=registry)
    async def service_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.service_event(event.get("type"), event["object"])

    if reconciler.provider.uses_nodes:
        @kopf.on.event("v1", "nodes", registry=registry)
        async def node_event(event: kopf.RawEvent, **_: Any) -> None:
            reconciler.node_event(event.get("type"), event["object"])

    for resource in reconciler.provider.watched_resources:
        _register_resource(registry, reconciler, resource)
    return registry


def _register_resource(registry: kopf.OperatorRegistry, reconciler: Reconciler, resource: WatchedResource) -> None:
    @kopf.on.event(resource.group, resource.version, resource.plural, registry=registry)
    async def resource_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.resource_event(resource, event.get("type"), event["object"])


async def run(
    config: OperatorConfig, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> None:
    provider = provider_registry.load(config.provider, ProviderSettings(config.cluster_name, config.provider_options))
    client = KubeClient.from_kubeconfig(config.kubeconfig, user_agent=f"lbctl-operator/{config.provider}")
    reconciler = Reconciler(
        ReconcilerSettings(
            cluster_name=config.cluster_name, scope=config.scope, workers=config.workers,
            node_port_range=config.node_port_range, gc_interval_s=config.gc_interval_s,
            resync_interval_s=config.resync_interval_s,
        ),
        provider, client,
    )
    if config.metrics_port:
        start_http_server(config.metrics_port)
    log.info("lbctl operator: provider %s, class %s%s, cluster %s", config.provider, config.scope.lb_class,
             " (and class-less Services)" if config.default_class else "", config.cluster_name)
    try:
        await _run_kopf(config, reconciler, stop_flag, ready_flag)
    finally:
        await client.close()  # also when start-up never completed, so kopf's cleanup never ran


async def _run_kopf(config: OperatorConfig, reconciler: Reconciler, stop_flag: asyncio.Event | None,
                    ready_flag: asyncio.Event | None) -> None:
    await kopf.operator(
        registry=build_registry(reconciler),
        standalone=True,  # one replica (Deployment strategy Recreate); no peering CRD needed
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=config.liveness_endpoint,
    )
