"""Service status: ingress in API form, the LoadBalancerReady condition, and the patch that
changes only what differs (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lbctl.model.types import Ingress, PortStatus

CONDITION_TYPE = "LoadBalancerReady"


def ingress_to_api(ingress: Iterable[Ingress]) -> list[dict[str, Any]]:
    result = []
    for entry in ingress:
        item: dict[str, Any] = {}
        if entry.ip:
            item["ip"] = entry.ip
        if entry.hostname:
            item["hostname"] = entry.hostname
        if entry.ip:  # ipMode is valid only beside an ip, and the apiserver stores VIP when unset
            item["ipMode"] = entry.ip_mode or "VIP"
        if entry.ports:
            item["ports"] = [
                {"port": p.port, "protocol": p.protocol, **({"error": p.error} if p.error else {})}
                for p in entry.ports
            ]
        result.append(item)
    return result


def ingress_from_api(items: Iterable[Mapping[str, Any]]) -> tuple[Ingress, ...]:
    return tuple(
        Ingress(
            ip=item.get("ip"),
            hostname=item.get("hostname"),
            ip_mode=item.get("ipMode"),
            ports=tuple(
                PortStatus(port=int(p["port"]), protocol=p.get("protocol", "TCP"), error=p.get("error"))
                for p in item.get("ports") or ()
            ),
        )
        for item in items
    )


def ready_condition(
    ready: bool, reason: str, message: str, generation: int | None, now: str, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    status = "True" if ready else "False"
    transition = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    condition: dict[str, Any] = {
        "type": CONDITION_TYPE, "status": status, "reason": reason, "message": message[:32000],
        "lastTransitionTime": transition or now,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def current_condition(service: Mapping[str, Any]) -> Mapping[str, Any] | None:
    conditions = (service.get("status") or {}).get("conditions") or ()
    return next((c for c in conditions if c.get("type") == CONDITION_TYPE), None)


def _same_condition(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    keys = ("status", "reason", "message", "observedGeneration")
    return a is not None and b is not None and all(a.get(k) == b.get(k) for k in keys)


def status_patch(
    service: Mapping[str, Any], ingress: list[dict[str, Any]] | None, condition: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """A merge patch for the status subresource, or None when the Service already shows this.

    `ingress` None leaves the ingress alone; `condition` None removes ours. Other controllers'
    conditions are kept (a merge patch replaces the whole list, so it is rebuilt here).
    """
    status = service.get("status") or {}
    patch: dict[str, Any] = {}
    if ingress is not None and ((status.get("loadBalancer") or {}).get("ingress") or []) != ingress:
        # a merge patch clears a field only by naming it with null
        patch["loadBalancer"] = {"ingress": ingress or None}
    existing = current_condition(service)
    removing = condition is None and existing is not None
    if removing or (condition is not None and not _same_condition(existing, condition)):
        others = [c for c in status.get("conditions") or () if c.get("type") != CONDITION_TYPE]
        patch["conditions"] = others + ([dict(condition)] if condition else [])
    return {"status": patch} if patch else None
