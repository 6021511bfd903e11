"""Text for `lbctl status` and `lbctl doctor`: aligned tables, colour only when asked (a TTY),
and JSON/YAML of the same data (pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

from lbctl.report.doctor import FAIL, PASS, SKIP, WARN, Check
from lbctl.report.facts import FAILED, PENDING, READY
from lbctl.report.status import Detail, Row

_COLOURS = {READY: "32", PASS: "32", PENDING: "33", WARN: "33", FAILED: "31", FAIL: "31", SKIP: "2"}


def _paint(text: str, key: str, colour: bool) -> str:
    code = _COLOURS.get(key)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def table(header: Sequence[str], body: Sequence[Sequence[str]], colour_column: int | None = None,
          colour: bool = False) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for index, cells in enumerate([header, *body]):
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        if index and colour_column is not None:
            padded[colour_column] = _paint(padded[colour_column], cells[colour_column], colour)
        lines.append("   ".join(padded).rstrip())
    return "\n".join(lines)


def _reason(row: Row) -> str:
    if not row.reason:
        return ""
    return f"{row.reason}; fix: {row.fix}" if row.fix else row.reason


def status_table(rows: Sequence[Row], all_namespaces: bool, colour: bool = False) -> str:
    header = ["NAME", "CLASS", "ADDRESSES", "POOL/BALANCER", "SERVED-BY", "STATE", "AGE", "REASON"]
    body = [[r.name, r.lb_class, ",".join(r.addresses) or "<pending>", r.balancer, r.served_by, r.state, r.age,
             _reason(r)] for r in rows]
    state_column = 5
    if all_namespaces:
        header.insert(0, "NAMESPACE")
        for cells, r in zip(body, rows, strict=True):
            cells.insert(0, r.namespace)
        state_column += 1
    return table(header, body, state_column, colour)


def detail_text(d: Detail, colour: bool = False) -> str:
    r = d.row
    lines = [
        f"Service:       {r.namespace}/{r.name}",
        f"Class:         {r.lb_class} (provider {r.provider})",
        f"State:         {_paint(r.state, r.state, colour)}",
    ]
    if d.condition:
        lines.append(f"Condition:     LoadBalancerReady={d.condition.get('status')} ({d.condition.get('reason')}): "
                     f"{d.condition.get('message')}")
    if r.reason:
        lines.append(f"Why:           {r.reason}")
    if r.fix:
        lines.append(f"Fix:           {r.fix}")
    lines += [
        f"Addresses:     {', '.join(r.addresses) or '<pending>'}",
        f"{'Pool:' if r.provider == 'local' else 'Balancer:':<15}{r.balancer}",
        f"Served by:     {r.served_by}",
        f"Ports:         {', '.join(d.spec.get('ports') or ()) or '-'}",
        f"Traffic:       externalTrafficPolicy {d.spec.get('externalTrafficPolicy')}, "
        f"{d.spec.get('ipFamilyPolicy')} {'/'.join(d.spec.get('ipFamilies') or ()) or '-'}",
    ]
    for name in ("loadBalancerIP", "loadBalancerSourceRanges", "healthCheckNodePort",
                 "allocateLoadBalancerNodePorts", "sessionAffinity"):
        if name in d.spec:
            lines.append(f"{name + ':':<15}{d.spec[name]}")
    for key, value in (d.spec.get("annotations") or {}).items():
        lines.append(f"Annotation:    {key}={value}")
    lines.append(f"Age:           {r.age}")
    if d.nodes:
        lines += ["", "Nodes:"]
        probed = any(n.healthz for n in d.nodes)
        checked = any(n.health_check for n in d.nodes)
        header = ["NODE", "FORWARDER", "ANNOUNCES", "READY-ENDPOINTS"] + (["HEALTH-CHECK"] if checked else []) + \
            (["HEALTHZ", "PROGRAMMED", "SEEN-ENDPOINTS"] if probed else [])
        body = []
        for n in d.nodes:
            how = "L2, BGP" if n.announcing and n.bgp else "yes" if n.announcing else "BGP" if n.bgp else ""
            cells = [n.node, n.forwarder, how, str(n.ready_endpoints)]
            if checked:
                cells.append(n.health_check)
            if probed:
                seen = "-" if n.seen_endpoints is None else str(n.seen_endpoints) + (
                    f" ({n.local_endpoints} local)" if n.local_endpoints is not None else "")
                cells += [n.healthz or "-", "-" if n.programmed is None else ("yes" if n.programmed else "no"), seen]
            body.append(cells)
        lines += ["  " + line for line in table(header, body).splitlines()]
        for n in d.nodes:
            lines += [f"  {n.node}: left out: {problem}" for problem in n.problems]
    lines += ["", "Events:"]
    if d.events:
        body = [[e["age"], e["type"], e["reason"], str(e["count"]), e["message"]] for e in d.events]
        lines += ["  " + line for line in table(["AGE", "TYPE", "REASON", "COUNT", "MESSAGE"], body).splitlines()]
    else:
        lines.append("  <none>")
    return "\n".join(lines)


def checks_text(checks: Sequence[Check], colour: bool = False) -> str:
    lines = []
    for check in checks:
        lines.append(f"{_paint(check.status.upper().ljust(4), check.status, colour)}  {check.name}: {check.message}")
        if check.fix and check.status in (FAIL, WARN, SKIP):
            lines.append(f"      fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)


def dump(data: Any, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()
