"""Which cloud balancers have no Service any more (pure): the orphan sweep's decision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lbctl.model.names import load_balancer_name
from lbctl.model.scope import Scope
from lbctl.model.types import LoadBalancerRef


def orphans(
    refs: Iterable[LoadBalancerRef], services: Mapping[str, Mapping[str, Any]], scope: Scope
) -> list[LoadBalancerRef]:
    """Balancers tagged for this cluster whose Service is gone, was recreated under the same name
    (another UID), or is no longer ours and does not carry our finalizer (nothing will release it)."""
    found = []
    for ref in refs:
        service = services.get(ref.service_key)
        if service is None:
            found.append(ref)
            continue
        uid = (service.get("metadata") or {}).get("uid", "")
        recreated = ref.name != load_balancer_name(uid) or (ref.uid is not None and ref.uid != uid)
        if recreated or not scope.concerns(service):
            found.append(ref)
    return found
