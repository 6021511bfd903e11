"""Which Services are lbctl's to handle (pure). Shared by the operator and the forwarder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.model.meta import FINALIZER, OWNER_ANNOTATION, default_class

__all__ = ["FINALIZER", "OWNER_ANNOTATION", "Scope", "default_class"]


@dataclass(frozen=True)
class Scope:
    """`lb_class` is ours; with `default_class`, class-less Services are ours too."""

    lb_class: str
    default_class: bool = False
    namespaces: frozenset[str] = frozenset()  # empty: every namespace

    def manages(self, service: Mapping[str, Any]) -> bool:
        """True when the Service should have a balancer from us right now."""
        meta = service.get("metadata") or {}
        spec = service.get("spec") or {}
        if self.namespaces and meta.get("namespace") not in self.namespaces:
            return False
        if spec.get("type") != "LoadBalancer" or meta.get("deletionTimestamp"):
            return False
        cls = spec.get("loadBalancerClass")
        return cls == self.lb_class if cls else self.default_class

    def holds(self, service: Mapping[str, Any]) -> bool:
        """True when we may have made a balancer for it earlier (our finalizer and mark are on it)."""
        meta = service.get("metadata") or {}
        if self.namespaces and meta.get("namespace") not in self.namespaces:
            return False
        marked = (meta.get("annotations") or {}).get(OWNER_ANNOTATION) == self.lb_class
        return marked and FINALIZER in (meta.get("finalizers") or ())

    def concerns(self, service: Mapping[str, Any]) -> bool:
        return self.manages(service) or self.holds(service)
