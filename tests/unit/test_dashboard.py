"""The Grafana dashboard and the README use exactly the metrics lbctl exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.registry import REGISTRY

import lbctl.forwarder.metrics
import lbctl.kube.client
import lbctl.operator.metrics
import providers.local_metrics
import providers.retry

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "examples" / "grafana" / "lbctl-dashboard.json"
MODULES = (lbctl.forwarder.metrics, lbctl.kube.client, lbctl.operator.metrics, providers.local_metrics, providers.retry)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("_sum", "_count", "_created")}


def exported() -> dict[str, str]:
    """Every lbctl series name a scrape can hold → its metric family."""
    assert all(MODULES)  # imported for their registrations
    names = {}
    for family in REGISTRY.collect():
        if family.name.startswith("lbctl_"):
            for suffix in _SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = family.name
    return names


def expressions(panels: list[dict[str, object]]) -> list[str]:
    found = []
    for panel in panels:
        found += [str(t["expr"]) for t in panel.get("targets") or () if isinstance(t, dict) and "expr" in t]
        found += expressions(list(panel.get("panels") or ()))  # type: ignore[call-overload]
    return found


def test_every_dashboard_expression_references_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard["panels"]) + [str(v.get("query", "")) for v in dashboard["templating"]["list"]]
    names = exported()
    used = set()
    for expr in exprs:
        for name in re.findall(r"\blbctl_[a-z0-9_]+", expr):
            assert name in names, f"{name} in {expr!r} is not exported (exported: {sorted(names)})"
            used.add(names[name])
    assert len([e for e in exprs if "lbctl_" in e]) >= 20
    # and every family is on the dashboard
    assert set(names.values()) <= used, sorted(set(names.values()) - used)


def test_the_readme_documents_every_metric_with_one_line() -> None:
    readme = (REPO / "README.md").read_text()
    for family in set(exported().values()):
        documented = [line for line in readme.splitlines() if f"`{family}" in line]
        assert documented, f"{family} is not documented in the README"
