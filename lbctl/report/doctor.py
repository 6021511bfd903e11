"""`lbctl doctor`: checks of an installation, each pass/warn/fail with the fix (pure: a Snapshot
of what the cluster holds in, checks out; lbctl.report.gather reads the cluster)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lbctl.model.bgp import (
    BgpConfigError,
    BGPPeer,
    advertisement_problem,
    check_aggregation,
    conflicting_peers,
    parse_advertisement,
    parse_peer,
)
from lbctl.model.nodes import daemon_pod_misfit, ineligibility
from lbctl.model.status import current_condition
from lbctl.report import facts
from providers.local_pools import Pool, PoolError, overlapping_pools, parse_pool

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
PENDING_AFTER_S = 60.0
NEARLY_EXHAUSTED = 0.10  # a pool with less than this share free is about to run out
# the operator renews every 0.5 s with a 3 s lease; the reader's clock may differ from the writer's
OPERATOR_LEASE_SLACK_S = 10.0
INSTALL = "kubectl apply -k examples/deploy (or helm install lbctl charts/lbctl)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Permission:
    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    def describe(self) -> str:
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        if self.group:
            what += f".{self.group}"
        if self.name:
            what += f" {self.name}"
        return f"{self.verb} {what}" + (f" in {self.namespace}" if self.namespace else "")


# What each component needs: exactly what examples/deploy (operator-rbac.yaml, forwarder-daemonset.yaml) and
# the chart grant (tests/unit/test_report.py::test_doctor_permissions_are_the_shipped_rbac)
OPERATOR_ACCOUNT = ("lbctl-system", "lbctl-operator")
OPERATOR_PERMISSIONS = (
    *(Permission(v, "services") for v in ("get", "list", "watch", "patch")),
    Permission("patch", "services", subresource="status"),
    *(Permission(v, "nodes") for v in ("get", "list", "watch")),
    Permission("create", "events"), Permission("patch", "events"), Permission("list", "events"),
    *(Permission(v, "loadbalancerpools", "lbctl.io") for v in ("get", "list", "watch")),
    Permission("patch", "loadbalancerpools", "lbctl.io", subresource="status"),
    *(Permission(v, "bgppeers", "lbctl.io") for v in ("get", "list", "watch")),
    Permission("patch", "bgppeers", "lbctl.io", subresource="status"),
    *(Permission(v, "endpointslices", "discovery.k8s.io") for v in ("list", "watch")),
    Permission("create", "leases", "coordination.k8s.io", namespace=facts.SYSTEM_NAMESPACE),
    *(Permission(v, "leases", "coordination.k8s.io", namespace=facts.SYSTEM_NAMESPACE, name=facts.OPERATOR_LEASE)
      for v in ("get", "update")),
)
FORWARDER_ACCOUNT = ("lbctl-system", "lbctl-forwarder")
FORWARDER_PERMISSIONS = (
    *(Permission(v, "services") for v in ("get", "list", "watch", "patch")),
    *(Permission(v, "endpointslices", "discovery.k8s.io") for v in ("list", "watch")),
    *(Permission(v, "nodes") for v in ("list", "watch")),
    Permission("create", "events"), Permission("patch", "events"),
    *(Permission(v, "leases", "coordination.k8s.io", namespace=facts.SYSTEM_NAMESPACE)
      for v in ("create", "patch", "delete")),  # delete: `lbctl forwarder --cleanup` gives its Lease up
    *(Permission(v, "bgppeers", "lbctl.io") for v in ("get", "list", "watch")),
    Permission("patch", "bgppeers", "lbctl.io", subresource="status"),
    *(Permission(v, "loadbalancerpools", "lbctl.io") for v in ("get", "list", "watch")),
    Permission("get", "secrets", namespace=facts.SYSTEM_NAMESPACE),
)


@dataclass
class Snapshot:
    """What doctor reads; None where the object does not exist."""

    now: float
    pool_crd: Mapping[str, Any] | None
    operator_lease: Mapping[str, Any] | None
    operator_deployment: Mapping[str, Any] | None
    nodes: Sequence[Mapping[str, Any]]
    leases: Sequence[Mapping[str, Any]]  # in lbctl-system
    pools: Sequence[Mapping[str, Any]]
    services: Sequence[Mapping[str, Any]]  # every Service (doctor picks lbctl's)
    # account ("ns/name") → permission → allowed (None: could not be checked, with why in access_problem)
    access: Mapping[str, Mapping[Permission, bool]] = field(default_factory=dict)
    access_problem: str = ""
    extra: Sequence[Check] = ()  # provider checks (credentials, tags, subnets)
    peers: Sequence[Mapping[str, Any]] | None = ()  # BGPPeers (None: their CRD is not installed)
    forwarder_daemonset: Mapping[str, Any] | None = None  # lbctl-system/lbctl-forwarder, when installed
    peer_crd: Mapping[str, Any] | None = None
    classes: tuple[str, ...] = ()  # loadBalancerClasses counted as lbctl's besides lbctl.io/* (--class)


CRD_REVISION_ANNOTATION = "lbctl.io/crd-revision"


@dataclass(frozen=True)
class ExpectedCrd:
    """A CRD as this lbctl ships it: its revision (the lbctl.io/crd-revision annotation on both
    copies, raised with every schema change) and schema fields an older copy lacks."""

    name: str
    file: str  # in examples/deploy
    revision: int
    fields: tuple[str, ...]  # dotted paths under the served version's openAPIV3Schema
    required: bool  # False: only BGP needs it


POOL_CRD = ExpectedCrd(facts.POOL_CRD, "crd-loadbalancerpool.yaml", 1,
                       ("spec.addresses", "spec.advertisement", "spec.serviceSelector", "status.free"), True)
PEER_CRD = ExpectedCrd(facts.BGP_PEER_CRD, "crd-bgppeer.yaml", 1,
                       ("spec.peerAddress", "spec.passwordSecretRef", "spec.nodeSelector", "status.nodes"), False)


def _schema_lacks(version: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    missing = []
    for path in fields:
        node = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        for part in path.split("."):
            node = (node.get("properties") or {}).get(part) or {}
            if not node:
                missing.append(path)
                break
    return missing


def check_crd(crd: Mapping[str, Any] | None, expected: ExpectedCrd = POOL_CRD) -> Check:
    """Installed, serving v1alpha1, Established, and at the schema revision this lbctl ships."""
    name = f"crd {expected.name.split('.')[0]}"
    apply = f"kubectl apply -f examples/deploy/{expected.file}, or {INSTALL}"
    if crd is None:
        if not expected.required:
            return Check(name, WARN, f"CustomResourceDefinition {expected.name} is not installed: BGP "
                         "advertisement cannot be used", f"install it: {apply}")
        return Check(name, FAIL, f"CustomResourceDefinition {expected.name} is not installed", f"install it: {apply}")
    versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions") or ()}
    version = versions.get(facts.POOL_CRD_VERSION)
    if version is None or not version.get("served"):
        return Check(name, FAIL, f"{expected.name} does not serve {facts.POOL_CRD_VERSION} (it serves "
                     f"{', '.join(sorted(str(v) for v in versions)) or 'nothing'})", f"upgrade it: {apply}")
    conditions = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or ()}
    if conditions.get("Established") != "True":
        return Check(name, FAIL, f"{expected.name} is not Established yet",
                     "wait a few seconds; if it stays so, kubectl describe crd " + expected.name)
    written = str((facts.meta(crd).get("annotations") or {}).get(CRD_REVISION_ANNOTATION) or "")
    revision = int(written) if written.isdigit() else None
    lacks = _schema_lacks(version, expected.fields)
    upgrade = f"apply this lbctl's CRD: {apply}"
    if revision is not None and revision > expected.revision:
        return Check(name, WARN, f"{expected.name} is newer than this lbctl (revision {revision}, it knows "
                     f"{expected.revision})", "use the lbctl release that installed it")
    if lacks or (revision is not None and revision < expected.revision):
        have = f"revision {revision}" if revision is not None else f"no {CRD_REVISION_ANNOTATION}"
        why = f"; its schema lacks {', '.join(lacks)}" if lacks else ""
        return Check(name, FAIL, f"{expected.name} is outdated ({have}, this lbctl expects revision "
                     f"{expected.revision}){why}", upgrade)
    if revision is None:
        return Check(name, WARN, f"{expected.name} records no {CRD_REVISION_ANNOTATION} (applied by an older "
                     f"lbctl; this one expects revision {expected.revision})", upgrade)
    return Check(name, PASS, f"{expected.name} {facts.POOL_CRD_VERSION} installed (revision {revision})")


def check_operator(lease: Mapping[str, Any] | None, deployment: Mapping[str, Any] | None, now: float) -> Check:
    view = facts.lease_view(lease, now, slack_s=OPERATOR_LEASE_SLACK_S)
    if view is not None and view.fresh:
        return Check("operator", PASS, f"leader {view.holder} (Lease {facts.SYSTEM_NAMESPACE}/{facts.OPERATOR_LEASE} "
                     f"renewed {facts.age(view.renewed_age_s)} ago)")
    ready = int((deployment or {}).get("status", {}).get("readyReplicas") or 0) if deployment else 0
    if view is not None:
        why = "held by nobody" if not view.holder else \
            f"last renewed by {view.holder} {facts.age(view.renewed_age_s)} ago"
        return Check("operator", FAIL, f"no leader: Lease {facts.SYSTEM_NAMESPACE}/{facts.OPERATOR_LEASE} is {why}"
                     f"{f'; {ready} operator pod(s) ready' if deployment else ''}",
                     "kubectl -n lbctl-system get pods -l app.kubernetes.io/name=lbctl-operator; read the logs of "
                     "the pods that are not Running")
    if deployment is not None:
        if ready:
            return Check("operator", WARN, f"{ready} operator pod(s) ready but no leader Lease: it runs without "
                         "--leader-elect", "run it with --leader-elect (LBCTL_LEADER_ELECT=true), as the shipped "
                         "Deployment does, so that one replica acts")
        return Check("operator", FAIL, "the operator Deployment lbctl-system/lbctl-operator has no ready pod",
                     "kubectl -n lbctl-system describe deployment lbctl-operator")
    return Check("operator", FAIL, f"no operator seen: no Lease {facts.SYSTEM_NAMESPACE}/{facts.OPERATOR_LEASE} "
                 "and no Deployment lbctl-system/lbctl-operator", f"install it: {INSTALL}")


def check_access(name: str, account: tuple[str, str], needed: Sequence[Permission],
                 results: Mapping[Permission, bool] | None, problem: str) -> Check:
    who = f"ServiceAccount {account[0]}/{account[1]}"
    if results is None:
        return Check(name, SKIP, f"could not check the RBAC of {who}: {problem or 'not asked'}",
                     "run lbctl doctor with credentials that may create subjectaccessreviews")
    missing = [p for p in needed if not results.get(p, False)]
    if missing:
        return Check(name, FAIL, f"{who} may not: " + "; ".join(p.describe() for p in missing),
                     f"apply the shipped RBAC again: {INSTALL}")
    return Check(name, PASS, f"{who} has the {len(needed)} permissions it needs")


FORWARDER_DAEMONSET = "lbctl-forwarder"
FORWARDERS_FIX = ("kubectl -n lbctl-system get pods -l app.kubernetes.io/name=lbctl-forwarder -o wide: the DaemonSet "
                  "must run on every eligible node it selects (its tolerations, nodeSelector, pod status)")


def forwarders_expected(daemonset: Mapping[str, Any] | None, services: Sequence[Mapping[str, Any]],
                        pools: Sequence[Mapping[str, Any]]) -> str | None:
    """Why this cluster needs forwarders (None: it does not, e.g. an aws or gce install, whose
    balancers send traffic to NodePorts that kube-proxy serves)."""
    if daemonset is not None:
        return f"DaemonSet {facts.SYSTEM_NAMESPACE}/{FORWARDER_DAEMONSET} installed"
    local = sum(1 for s in services if facts.is_lbctls(s) and facts.provider_of(s) == "local")
    if local:
        return f"{local} local-provider Service(s)"
    if pools:
        return f"{len(pools)} LoadBalancerPool(s)"
    return None


def check_forwarders(nodes: Sequence[Mapping[str, Any]], leases: Sequence[Mapping[str, Any]], now: float,
                     daemonset: Mapping[str, Any] | None = None, services: Sequence[Mapping[str, Any]] = (),
                     pools: Sequence[Mapping[str, Any]] = ()) -> Check:
    """A live forwarder on every eligible node that needs one: the nodes the forwarder DaemonSet
    selects (nodeSelector, tolerations), or every eligible node when local-provider Services or pools
    exist without it. Not used at all without the DaemonSet, local Services or pools."""
    why = forwarders_expected(daemonset, services, pools)
    if why is None:
        return Check("forwarders", PASS, f"not used: no DaemonSet {facts.SYSTEM_NAMESPACE}/{FORWARDER_DAEMONSET}, "
                     "no local-provider Service and no LoadBalancerPool (aws and gce balancers need no forwarder)")
    by_node = facts.forwarder_leases(leases)
    eligible = sorted(str(facts.meta(n).get("name")) for n in nodes if ineligibility(n) is None)
    if not eligible:
        return Check("forwarders", WARN, "no eligible node (every node is not Ready or excluded)",
                     "see the nodes check")
    pod_spec = (((daemonset or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    by_name = {str(facts.meta(n).get("name")): n for n in nodes}
    skipped = {name: misfit for name in eligible if (misfit := daemon_pod_misfit(pod_spec, by_name[name]))}
    wanted = [name for name in eligible if name not in skipped]
    not_selected = (f"; {len(skipped)} eligible node(s) the DaemonSet does not select: " +
                    ", ".join(f"{name} ({misfit})" for name, misfit in sorted(skipped.items()))) if skipped else ""
    if not wanted:
        return Check("forwarders", WARN, f"the forwarder DaemonSet selects none of the {len(eligible)} eligible "
                     f"nodes{not_selected}", "give the DaemonSet a nodeSelector and tolerations that match the "
                     "nodes that should serve local-provider addresses")
    missing, stale = [], []
    for node in wanted:
        view = facts.lease_view(by_node.get(node), now)
        if view is None:
            missing.append(node)
        elif not view.fresh:
            stale.append(f"{node} (renewed {facts.age(view.renewed_age_s)} ago)")
    problems = ([f"no forwarder on {', '.join(missing)}"] if missing else []) + \
        ([f"forwarder not renewing its Lease on {', '.join(stale)}"] if stale else [])
    if problems:
        fix = FORWARDERS_FIX if daemonset is not None else (
            f"install the forwarder ({why} need it): kubectl apply -f examples/deploy/forwarder-daemonset.yaml, "
            "or helm upgrade with forwarder.enabled=true")
        return Check("forwarders", FAIL, "; ".join(problems) + f" ({len(wanted)} eligible nodes){not_selected}", fix)
    return Check("forwarders", PASS, f"a live forwarder on each of the {len(wanted)} eligible nodes{not_selected}")


def family_usage(pool: Pool, services: Sequence[Mapping[str, Any]]) -> dict[int, tuple[int, int]]:
    """IP version → (usable, assigned) for one pool: its addresses against the distinct addresses
    the operator recorded in lbctl local Services' status.loadBalancer.ingress (a shared address
    counts once, as in the pool's status)."""
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for service in services:
        if not facts.is_lbctls(service) or facts.provider_of(service) != "local":
            continue
        for ingress in facts.ingress_of(service):
            try:
                ip = ipaddress.ip_address(str(ingress.get("ip") or ""))
            except ValueError:
                continue
            if pool.contains(ip):
                taken.add(ip)
    return {version: (pool.usable_addresses(version), sum(1 for ip in taken if ip.version == version))
            for version in sorted(pool.families)}


def _usage_check(name: str, free: int, assigned: int, family: str = "") -> Check:
    total = free + assigned
    what = f"{family} addresses" if family else "addresses"
    usage = f"{assigned} of {total} {what} assigned, {free} free"
    if free <= 0:
        return Check(f"pool {name}", FAIL, f"exhausted{f' for {family}' if family else ''}: {usage}",
                     f"add {family + ' ' if family else ''}addresses to spec.addresses of pool {name}, or delete "
                     "Services that use it")
    if free < NEARLY_EXHAUSTED * total:
        return Check(f"pool {name}", WARN, f"nearly exhausted{f' for {family}' if family else ''}: {usage}",
                     f"add {family + ' ' if family else ''}addresses to spec.addresses of pool {name}")
    return Check(f"pool {name}", PASS, usage)


def check_pools(pools: Sequence[Mapping[str, Any]], services: Sequence[Mapping[str, Any]] = ()) -> list[Check]:
    """Each pool: valid, not overlapping another, and not (nearly) exhausted. A dual-stack pool is
    judged per family (its IPv4 half can run out while IPv6 has plenty): the pool status holds only
    the sums, so the per-family counts come from its addresses and the Services' ingress."""
    checks = []
    parsed: dict[str, Pool] = {}
    for obj in pools:
        name = str(facts.meta(obj).get("name"))
        try:
            parsed[name] = parse_pool(obj)
        except PoolError as exc:
            checks.append(Check(f"pool {name}", FAIL, f"invalid: {exc}", "fix the pool's spec"))
    overlapping = {o.rejected.name: o for o in overlapping_pools(parsed.values())}
    for obj in pools:
        name = str(facts.meta(obj).get("name"))
        if name in overlapping:
            o = overlapping[name]
            checks.append(Check(f"pool {name}", FAIL, o.message,
                                f"give each pool its own addresses (pool {o.kept.name} keeps them)"))
            continue
        if name not in parsed:
            continue
        status = obj.get("status") or {}
        if "free" not in status:
            checks.append(Check(f"pool {name}", SKIP, "no usage recorded yet (the operator writes it)"))
            continue
        pool = parsed[name]
        if len(pool.families) < 2:
            checks.append(_usage_check(name, int(status.get("free") or 0), int(status.get("assigned") or 0)))
            continue
        by_family = {f"IPv{v}": _usage_check(name, usable - assigned, assigned, f"IPv{v}")
                     for v, (usable, assigned) in family_usage(pool, services).items()}
        worst = min(by_family.values(), key=lambda c: (FAIL, WARN, PASS).index(c.status))
        if worst.status == PASS:
            checks.append(Check(f"pool {name}", PASS, "; ".join(c.message for c in by_family.values())))
        else:
            others = "; ".join(c.message for c in by_family.values() if c is not worst)
            checks.append(Check(worst.name, worst.status, f"{worst.message} ({others})", worst.fix))
    if not pools:
        checks.append(Check("pools", SKIP, "no LoadBalancerPool (needed only by the local provider)"))
    return checks


BGP_SESSION_FIX = ("on the router: the peer address, both ASNs and the password must match the BGPPeer; on the "
                   "node: kubectl -n lbctl-system logs -l app.kubernetes.io/name=lbctl-forwarder (status.nodes[]."
                   "message of kubectl get bgpp NAME -o yaml says the last error)")


def _session_text(peer: BGPPeer, node: str) -> str:
    session = peer.session(node)
    if session is None:
        return f"{node}: no session reported"
    return f"{node}: {session.state}" + (f" ({session.message})" if session.message else "")


def check_bgp(peers: Sequence[Mapping[str, Any]] | None, pools: Sequence[Mapping[str, Any]],
              nodes: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Each BGPPeer: an Established session on its selected nodes; each pool advertised by BGP: a
    valid advertisement and a peer that takes it. `peers` None: the BGPPeer CRD is not installed."""
    checks: list[Check] = []
    parsed: list[BGPPeer] = []
    for obj in peers or ():
        name = str(facts.meta(obj).get("name"))
        try:
            parsed.append(parse_peer(obj))
        except BgpConfigError as exc:
            checks.append(Check(f"bgppeer {name}", FAIL, f"invalid: {exc.field}: {exc.problem}",
                                exc.fix or "fix the peer's spec"))
    rejected = {c.rejected.name: c for c in conflicting_peers(parsed)}
    eligible = [n for n in nodes if ineligibility(n) is None]
    valid = []
    for peer in parsed:
        if peer.name in rejected:
            conflict = rejected[peer.name]
            checks.append(Check(f"bgppeer {peer.name}", FAIL, f"same address and nodes as peer {conflict.kept.name}",
                                "delete one of them, or give them node selectors that choose different nodes"))
            continue
        valid.append(peer)
        selected = sorted(str(facts.meta(n).get("name")) for n in eligible
                          if peer.node_selector.matches(facts.meta(n).get("labels") or {}))
        up = [n for n in selected if peer.established_on(n)]
        where = f"{peer.peer_address} AS{peer.peer_asn}"
        if not selected:
            checks.append(Check(f"bgppeer {peer.name}", WARN, f"{where}: its spec.nodeSelector chooses no eligible "
                                "node", "label the nodes that should peer with it, or change spec.nodeSelector"))
        elif not up:
            checks.append(Check(f"bgppeer {peer.name}", FAIL, f"{where}: no Established session on any of its "
                                f"{len(selected)} node(s): " + "; ".join(_session_text(peer, n) for n in selected),
                                BGP_SESSION_FIX))
        elif len(up) < len(selected):
            down = [n for n in selected if n not in up]
            checks.append(Check(f"bgppeer {peer.name}", WARN, f"{where}: Established on {len(up)} of {len(selected)} "
                                "node(s); not on " + "; ".join(_session_text(peer, n) for n in down), BGP_SESSION_FIX))
        else:
            checks.append(Check(f"bgppeer {peer.name}", PASS, f"{where}: Established on all {len(up)} node(s)"))
    for obj in pools:
        name = str(facts.meta(obj).get("name"))
        try:
            pool = parse_pool(obj)
            advertisement = parse_advertisement((obj.get("spec") or {}).get("advertisement"))
            check_aggregation(advertisement, ((r.version, r.first, r.last) for r in pool.ranges))
        except PoolError:
            continue  # the pools check reports it
        except BgpConfigError as exc:
            checks.append(Check(f"pool {name} bgp", FAIL, f"invalid advertisement: {exc.field}: {exc.problem}",
                                exc.fix or "fix the pool's spec.advertisement"))
            continue
        problem = advertisement_problem(advertisement, None if peers is None else valid)
        if problem is None:
            if advertisement.bgp:
                checks.append(Check(f"pool {name} bgp", PASS, f"advertised by BGP ({advertisement.mode})"))
            continue
        message, _, fix = problem.message.partition("; fix: ")
        status = WARN if problem.reason == "LocalPrefIgnored" else FAIL
        checks.append(Check(f"pool {name} bgp", status, f"{problem.reason}: {message}", fix))
    return checks


def check_services(services: Sequence[Mapping[str, Any]], now: float, limit: int = 10,
                   classes: tuple[str, ...] = ()) -> Check:
    ours = [s for s in services if facts.is_lbctls(s, classes)]
    late = []
    for service in ours:
        state = facts.service_state(service)
        if state.state == facts.READY:
            continue
        condition = current_condition(service)
        since = facts.parse_time((condition or {}).get("lastTransitionTime")) if condition else None
        created = facts.parse_time(facts.meta(service).get("creationTimestamp"))
        # waiting since it last stopped being ready (or first failed), else since its creation
        start = since if since is not None else created if created is not None else now
        if now - start >= PENDING_AFTER_S:
            why = state.problem or state.reason
            late.append(f"{facts.key_of(service)} ({facts.age(now - start)}): {why}" +
                        (f"; fix: {state.fix}" if state.fix else ""))
    if late:
        shown = late[:limit] + ([f"… and {len(late) - limit} more"] if len(late) > limit else [])
        return Check("services", FAIL, f"{len(late)} Service(s) without a balancer for over a minute: " +
                     " | ".join(shown), "lbctl status -n NAMESPACE NAME for each")
    return Check("services", PASS, f"{len(ours)} lbctl Service(s), none waiting for over a minute")


def check_nodes(nodes: Sequence[Mapping[str, Any]]) -> Check:
    excluded = [(str(facts.meta(n).get("name")), why) for n in nodes if (why := ineligibility(n)) is not None]
    if excluded:
        return Check("nodes", WARN, f"{len(excluded)} of {len(nodes)} node(s) get no balancer traffic: " +
                     ", ".join(f"{name} ({why})" for name, why in sorted(excluded)),
                     "expected for nodes being drained or removed; otherwise make them Ready or drop the "
                     "label/taint")
    return Check("nodes", PASS, f"all {len(nodes)} node(s) eligible")


def run_checks(snapshot: Snapshot) -> list[Check]:
    s = snapshot
    operator_account = "/".join(OPERATOR_ACCOUNT)
    forwarder_account = "/".join(FORWARDER_ACCOUNT)
    return [
        check_crd(s.pool_crd, POOL_CRD),
        check_crd(s.peer_crd, PEER_CRD),
        check_operator(s.operator_lease, s.operator_deployment, s.now),
        check_access("operator-rbac", OPERATOR_ACCOUNT, OPERATOR_PERMISSIONS, s.access.get(operator_account),
                     s.access_problem),
        check_access("forwarder-rbac", FORWARDER_ACCOUNT, FORWARDER_PERMISSIONS, s.access.get(forwarder_account),
                     s.access_problem),
        check_forwarders(s.nodes, s.leases, s.now, s.forwarder_daemonset, s.services, s.pools),
        *check_pools(s.pools, s.services),
        *check_bgp(s.peers, s.pools, s.nodes),
        check_services(s.services, s.now, classes=s.classes),
        check_nodes(s.nodes),
        *s.extra,
    ]


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status == FAIL for c in checks)
