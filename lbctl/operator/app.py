"""Wires one operator process together: kopf runs it (start-up, login, liveness, cleanup), lbctl's
reflectors feed the reconciler, and with --leader-elect a Lease decides which replica acts."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from lbctl.kube.client import KubeClient
from lbctl.kube.election import Timing
from lbctl.kube.elector import LeaderElector, default_identity
from lbctl.kube.events import EventRecorder
from lbctl.model.scope import Scope, default_class
from lbctl.operator import defaults, metrics
from lbctl.operator.informers import Informers
from lbctl.operator.reconciler import MissingResourceError, Reconciler, ReconcilerSettings
from lbctl.operator.writer import KubeWriter
from providers import registry as provider_registry
from providers.base import ProviderSettings

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
    workers: int = defaults.WORKERS
    node_port_range: tuple[int, int] = defaults.NODE_PORT_RANGE
    gc_interval_s: float = defaults.GC_INTERVAL_S
    resync_interval_s: float = defaults.RESYNC_INTERVAL_S
    metrics_port: int = 0
    liveness_endpoint: str | None = None
    leader_elect: bool = False
    lease_name: str = defaults.LEASE_NAME
    lease_namespace: str = defaults.LEASE_NAMESPACE
    lease_duration_s: int = defaults.LEASE_DURATION_S
    renew_deadline_s: float = defaults.RENEW_DEADLINE_S
    retry_period_s: float = defaults.RETRY_PERIOD_S
    identity: str | None = None  # default: POD_NAME, else host_pid_random

    @property
    def election_timing(self) -> Timing:
        return Timing(self.lease_duration_s, self.renew_deadline_s, self.retry_period_s)

    @property
    def scope(self) -> Scope:
        return Scope(self.lb_class or default_class(self.provider), self.default_class, frozenset(self.namespaces))


class Operator:
    """The parts of one operator process and their order: reflectors fill the caches (leader or
    not), leader election (when on) decides when the reconciler may act, and a clean stop stops
    acting before it hands the Lease back."""

    def __init__(self, config: OperatorConfig, reconciler: Reconciler, informers: Informers,
                 elector: LeaderElector | None, client: KubeClient) -> None:
        self.config = config
        self.client = client
        self.reconciler = reconciler
        self.informers = informers
        self.elector = elector
        self._elector_task: asyncio.Task[None] | None = None
        self._lead_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.informers.check_served()
        self.informers.start()
        await self.informers.synced()
        if self.elector is None:
            metrics.LEADER.set(1)  # it acts from here on, as a replica that won the Lease does
            await self.reconciler.lead()
            return
        self.reconciler.may_act = self.elector.may_act
        log.info("standing by: caches filled (%d services, %d nodes); waiting for lease %s/%s as %s",
                 len(self.reconciler.services), len(self.reconciler.nodes), self.elector.namespace,
                 self.elector.name, self.elector.identity)
        self._elector_task = asyncio.create_task(self.elector.run(), name="leader election")

    def started_leading(self) -> None:
        metrics.LEADER.set(1)
        self._lead_task = asyncio.create_task(self._take_over(), name="take over")

    async def _take_over(self) -> None:
        try:
            await self.reconciler.lead(sweep_soon=True)
        except Exception:
            # holding the Lease without acting would stall every Service: let another replica lead
            log.exception("taking over failed")
            self.stopped_leading()

    @staticmethod
    def stopped_leading() -> None:
        """Stop acting at once, as kube-controller-manager does: exiting ends every sync, cloud
        call and thread in flight, which cancelling tasks could not (calls run in threads). The
        Deployment restarts the process, which comes back as a standby."""
        metrics.LEADER.set(0)
        log.critical("leader election lost: exiting so that nothing more is written")
        logging.shutdown()
        os._exit(1)

    async def stop(self) -> None:
        await self.informers.stop()
        await self.reconciler.stop()  # stop acting first (the Lease is still renewed meanwhile) ...
        if self._elector_task is not None:
            self._elector_task.cancel()
            await asyncio.gather(self._elector_task, return_exceptions=True)
        if self.elector is not None:
            await self.elector.release()  # ... then hand the Lease to a standby
        metrics.LEADER.set(0)


def build_registry(operator: Operator) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        # No resource handlers at all: the watches are lbctl's own reflectors (see
        # lbctl.operator.informers for why), so kopf adds no finalizer, watches nothing, and the
        # service controller's finalizer (FINALIZER) is added and removed by the reconciler.
        settings.posting.enabled = False  # our Events carry the service controller's reasons
        settings.scanning.disabled = True  # no CRD/namespace discovery: the RBAC stays minimal
        try:
            await operator.start()
        except MissingResourceError as exc:
            log.error("%s; retrying in 5s", exc)
            raise kopf.TemporaryError(str(exc), delay=5) from None

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf and our client use one configuration (kubeconfig or in-cluster)
        conf = operator.client.configuration
        token = conf.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
        scheme, _sep, value = token.partition(" ")
        return kopf.ConnectionInfo(
            server=conf.host, ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl,
            scheme=scheme or None, token=value or None,
            certificate_path=conf.cert_file, private_key_path=conf.key_file,
        )

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await operator.stop()

    return registry


async def run(
    config: OperatorConfig, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> None:
    provider = provider_registry.load(config.provider, ProviderSettings(config.cluster_name, config.provider_options))
    client = KubeClient.from_kubeconfig(config.kubeconfig, user_agent=f"lbctl-operator/{config.provider}")
    identity = config.identity or default_identity()
    # Events go through connections of their own: a status write never queues behind them
    events_client = KubeClient(client.configuration, user_agent=f"lbctl-operator/{config.provider}/events")
    reconciler = Reconciler(
        ReconcilerSettings(
            cluster_name=config.cluster_name, scope=config.scope, workers=config.workers,
            node_port_range=config.node_port_range, gc_interval_s=config.gc_interval_s,
            resync_interval_s=config.resync_interval_s,
        ),
        provider, KubeWriter(client), EventRecorder(events_client, instance=identity, namespaces=config.namespaces),
    )
    elector_client: KubeClient | None = None
    elector: LeaderElector | None = None
    operator = Operator(config, reconciler, Informers(client, reconciler, config.namespaces), None, client)
    if config.leader_elect:
        # its own connections: a renewal never queues behind the workers' requests
        elector_client = KubeClient(client.configuration, user_agent=f"lbctl-operator/{config.provider}/election")
        elector = LeaderElector(elector_client, config.lease_namespace, config.lease_name, identity,
                                config.election_timing, operator.started_leading, operator.stopped_leading)
        operator.elector = elector
    metrics.LEADER.set(0)
    metrics.watch(reconciler, config.scope.manages)
    if config.metrics_port:
        start_http_server(config.metrics_port)
    log.info("lbctl operator %s: provider %s, class %s%s, cluster %s", identity, config.provider,
             config.scope.lb_class, " (and class-less Services)" if config.default_class else "", config.cluster_name)
    try:
        await _run_kopf(config, operator, stop_flag, ready_flag)
    finally:
        await client.close()  # also when start-up never completed, so kopf's cleanup never ran
        await events_client.close()
        if elector_client is not None:
            await elector_client.close()


async def _run_kopf(config: OperatorConfig, operator: Operator, stop_flag: asyncio.Event | None,
                    ready_flag: asyncio.Event | None) -> None:
    await kopf.operator(
        registry=build_registry(operator),
        standalone=True,  # no kopf peering: one leader is chosen by lbctl's own Lease (--leader-elect)
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=config.liveness_endpoint,
    )
