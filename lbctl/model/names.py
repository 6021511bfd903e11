"""Deterministic cloud names (the Kubernetes cloud-provider convention)."""

from __future__ import annotations


def load_balancer_name(service_uid: str) -> str:
    """'a' + the Service UID without dashes, cut to 32 characters."""
    return ("a" + service_uid.replace("-", ""))[:32]
