"""The interface every provider implements, modelled on Kubernetes' cloud-provider LoadBalancer
interface and Libcloud's uniform drivers. The operator knows only this module.

Cloud SDKs are synchronous: adapters run them with ``asyncio.to_thread`` and retry them with
``providers.retry``. Every method must be idempotent and safe to call again after a crash at any
point: the operator calls ``ensure`` again until it succeeds.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lbctl.model.types import EMPTY, LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus


@dataclass(frozen=True)
class ProviderSettings:
    """What the operator's command line hands a provider: the cluster name and its own options
    (``region``, ``endpoint_url``, ``project``, ``network`` …, all strings, unknown keys ignored)."""

    cluster_name: str
    options: Mapping[str, str] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True)
class WatchedResource:
    """A Kubernetes resource a provider reads its configuration from (the local provider's pools)."""

    group: str
    version: str
    plural: str


class Provider(abc.ABC):
    name: ClassVar[str]
    #: whether the cloud balancer sends traffic to nodes' NodePorts (aws: yes; gce, local: no)
    needs_node_ports: ClassVar[bool]
    #: whether the balancer targets nodes at all; when False, node changes never trigger an ensure
    uses_nodes: ClassVar[bool] = True
    #: resources the operator watches and hands to `resources_changed`
    watched_resources: ClassVar[tuple[WatchedResource, ...]] = ()
    #: the same, but only when the cluster serves them (their CRD is installed when the operator
    #: starts); `resources_changed` is never called for one that is not served
    optional_resources: ClassVar[tuple[WatchedResource, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def create(cls, settings: ProviderSettings) -> Provider:
        """Build the provider from settings; may raise InvalidServiceError-free ValueError for bad flags."""

    @abc.abstractmethod
    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        """Create or converge the balancer; raise lbctl.model.errors.* on failure."""

    @abc.abstractmethod
    async def delete(self, ref: LoadBalancerRef) -> None:
        """Remove the balancer and everything it made; success when already gone."""

    @abc.abstractmethod
    async def get(self, ref: LoadBalancerRef) -> LoadBalancerStatus | None:
        """The balancer's status, or None when it does not exist."""

    @abc.abstractmethod
    async def list_owned(self) -> list[LoadBalancerRef]:
        """Every balancer tagged as this cluster's (for orphan GC)."""

    async def restore(self, specs: Sequence[LoadBalancerSpec]) -> None:  # noqa: B027 - optional hook
        """Called once at start-up with every managed Service, before any `ensure`, so providers
        that keep no database (local) can rebuild their state from the Services' own status."""

    async def resources_changed(
        self, resource: WatchedResource, objects: Sequence[Mapping[str, Any]]
    ) -> set[str]:
        """The full current list of a watched resource; returns the keys ("ns/name") of Services
        whose balancer must be ensured again because of the change, and of the waiting Services a
        new or changed object may now serve (only those: the others keep waiting)."""
        return set()

    def resource_status(self, resource: WatchedResource) -> dict[str, dict[str, Any]]:
        """Status to write back on watched objects, by object name (e.g. a pool's free count)."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and threads."""
