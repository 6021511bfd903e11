"""The forwarder's run loop: watches feed caches; a sync task turns changed Services into one nft
transaction (full mode) and health-check listeners; peering tells which nodes are alive and who
holds which VIP; an announce task keeps this node's VIPs current.

Static stability: nothing here depends on the apiserver second by second. Without it the caches
keep their last state, the kernel keeps its rules, and VIP ownership is judged between the
forwarders on the node network. A stop (SIGTERM) or a crash leaves rules and VIPs in the kernel
for the next run to adopt; peers keep the node's VIPs where they are while its kernel answers.

Failure handling: a rejected transaction leaves the kernel as it was (nft transactions are atomic).
An incremental one is retried at once as a full sync (the kernel may have drifted); if the full
sync is rejected on lines that belong to certain Services, those Services keep their last good
rules and are retried with backoff, and everyone else's changes go in without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbctl import cyclic_gc
from lbctl.forwarder import bgp, conntrack, fields, fields_protobuf, metrics, netlink, nftables, uplink
from lbctl.forwarder.addresses import VipAddresses
from lbctl.forwarder.announce import Announcer, ServiceMarks
from lbctl.forwarder.apply import Nft, NftError, load_dark
from lbctl.forwarder.desired import BuildContext, build_service, service_key, slice_service_key
from lbctl.forwarder.health import HealthCheck, HealthServers
from lbctl.forwarder.isolation import Evidence, Verdict, Witnesses, judge
from lbctl.forwarder.leases import LEASE_NAMESPACE, NodeLease
from lbctl.forwarder.membership import Membership, Timing, format_claim
from lbctl.forwarder.metrics_http import MetricsServer
from lbctl.forwarder.ownership import VipOwner, excluded_nodes, newest_takes, node_addresses, vip_owners
from lbctl.forwarder.peering import DEFAULT_PORT, Peering
from lbctl.forwarder.problem_events import ProblemEvents
from lbctl.forwarder.render import FIXED_MAPS, FIXED_SETS, LBCTL, LEGACY_TABLES, Plan, Planner, base_check_lines
from lbctl.forwarder.state import Problem, ServiceState
from lbctl.forwarder.status import StatusServer
from lbctl.kube import kubeconfig
from lbctl.kube.client import ClientConfiguration, KubeClient, load_configuration
from lbctl.kube.reflector import Reflector
from lbctl.model.meta import LOCAL_CLASS, SERVICE_NAME_LABEL, object_key
from lbctl.model.scope import Scope

log = logging.getLogger("lbctl.forwarder")

MODES = ("announce", "full")
_MAX_QUARANTINE_S = 60.0
_MAX_SYNC_BACKOFF_S = 30.0
_INLINE_OPERATIONS = 200  # element operations sent over netlink from the event loop itself
# every table has them (the base of each full sync)
KNOWN_COLLECTIONS: tuple[nftables.Map | nftables.Set, ...] = (*FIXED_MAPS, *FIXED_SETS)


@dataclass(frozen=True)
class ForwarderConfig:
    node: str
    mode: str = "full"
    kubeconfig: str | None = None
    lb_class: str = LOCAL_CLASS
    default_class: bool = False
    announce_classes: tuple[str, ...] = (LOCAL_CLASS,)
    interface: str | None = None  # uplink for gratuitous ARP (default: the one whose subnet holds the VIP)
    vip_interface: str | None = None  # default: a dummy lbctl0 if the kernel can, else lo
    pod_networks: tuple[str, ...] = ()
    lease_namespace: str = LEASE_NAMESPACE
    lease_duration_s: int = 40
    renew_interval_s: float = 15.0  # the Lease; with BGP status refreshes <= 5 writes a minute (issue 9: <= 6)
    resync_interval_s: float = 300.0
    announce_interval_s: float = 0.2
    peer_port: int = DEFAULT_PORT
    heartbeat_interval_s: float = 0.2
    dead_after_s: float = 1.0  # a peer neither heard nor answering ping this long is gone
    restart_grace_s: float = 15.0  # a peer whose kernel answers keeps its VIPs this long
    status_port: int = 0  # /healthz (0: off)
    peer_secret_file: str | None = None  # a shared key: heartbeats are signed and checked with it
    lan_probes: tuple[str, ...] = ()  # LAN witnesses for a node that hears no peer (default: the default gateway)
    metrics_port: int = 0  # /metrics (0: off)
    health_bind: str = ""  # "": every address of both families
    nft_command: tuple[str, ...] = ("nft",)
    conntrack_command: tuple[str, ...] = ("conntrack",)
    garp_repeats: tuple[float, ...] = field(default=(0.3, 1.0, 2.0, 4.0))
    bgp_dir: str | None = None  # where the BGP speaker keeps ExaBGP's files (default: the temp directory)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.node:
            raise ValueError("the node name is empty: pass --node (in a DaemonSet: spec.nodeName via the downward API)")
        self.timing()  # raises for impossible timings
        for address in self.lan_probes:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ValueError(f"--lan-probe {address!r} is not an IPv4 address (a LAN host that answers ping, "
                                 "such as the default gateway)") from None

    def timing(self) -> Timing:
        return Timing(interval=self.heartbeat_interval_s, probe_after=min(2.5 * self.heartbeat_interval_s,
                                                                          self.dead_after_s * 0.6),
                      dead_after=self.dead_after_s, grace=self.restart_grace_s)


@dataclass
class _Quarantine:
    until: float
    backoff: float


class Forwarder:
    def __init__(self, config: ForwarderConfig) -> None:
        self.config = config
        self.full = config.mode == "full"
        self.context = BuildContext(
            node=config.node, scope=Scope(config.lb_class, config.default_class),
            announce_classes=frozenset(config.announce_classes),
            pod_networks=tuple(ipaddress.ip_network(n, strict=False) for n in config.pod_networks),
        )
        self.states: dict[str, ServiceState] = {}
        self.problems: dict[str, tuple[Problem, ...]] = {}
        self.planner = Planner()
        self.nft = Nft(config.nft_command)
        # netlink reaches this process's namespace: only when nft runs here too (not through a wrapper)
        self.netlink_elements = config.nft_command == ("nft",)
        self.health = HealthServers(config.health_bind)
        self.membership = Membership(config.node, config.timing())
        self.witnesses = Witnesses(config.lan_probes, window=config.dead_after_s)
        self._verdict: Verdict | None = None  # the last judgement while no peer answered (isolation.py)
        self._slices: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._dirty: set[str] = set()
        self._quarantine: dict[str, _Quarantine] = {}
        self._sync_wake = asyncio.Event()
        self._announce_wake = asyncio.Event()
        self._full_due = True
        self._replace_due = True
        self.synced_once = asyncio.Event()
        self._states_version = 0
        self._owners_inputs: tuple[object, ...] | None = None
        self._owners: dict[str, VipOwner] = {}
        self._nodes_dirty = True
        self._background: set[asyncio.Task[None]] = set()
        self.fenced = False
        self._rejoined_at: float | None = None
        self._api_checked: tuple[float, bool] = (float("-inf"), True)
        self.latency = metrics.ProgrammingLatency()
        self.bgp: bgp.BgpSpeaker | None = None  # set by run()
        self.problem_events: ProblemEvents | None = None  # set by run()

    # -- cache callbacks (run in the event loop, must be cheap) ---------------------------------
    def _service_changed(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        self._dirty.add(service_key(new or old or {}))
        self._sync_wake.set()

    def _slice_changed(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        for obj, present in ((old, False), (new, True)):
            if obj is None:
                continue
            key = slice_service_key(obj)
            if key is None:
                continue
            bucket = self._slices.setdefault(key, {})
            if present:
                bucket[object_key(obj)] = obj
            else:
                bucket.pop(object_key(obj), None)
                if not bucket:
                    self._slices.pop(key, None)
            self._dirty.add(key)
            self.latency.seen(key, metrics.change_time(old, new, time.time()))
        self._sync_wake.set()

    def _node_changed(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        self._nodes_dirty = True
        self._announce_wake.set()

    # -- building ------------------------------------------------------------------------------
    def _rebuild(self, keys: set[str], services: Mapping[str, Mapping[str, Any]]) -> None:
        with cyclic_gc.paused():  # all of them at start-up: ~10 objects per endpoint, no cycles
            self._rebuild_each(keys, services)

    def _rebuild_each(self, keys: set[str], services: Mapping[str, Mapping[str, Any]]) -> None:
        for key in keys:
            service = services.get(key)
            try:
                state, problems = (build_service(service, self._slices.get(key, {}).values(), self.context)
                                   if service is not None else (None, []))
            except Exception as exc:  # a bug, or data no check foresaw: never take the forwarder down
                log.exception("cannot build %s; keeping its previous rules", key)
                state, problems = self.states.get(key), [Problem(key, "(object)", f"unexpected: {exc}")]
            if self.states.get(key) != state:
                self._states_version += 1
                if self.bgp is not None:
                    self.bgp.wake()
            if state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = state
            new_problems = tuple(problems)
            if new_problems != self.problems.get(key, ()):
                for problem in new_problems:
                    log.warning("%s", problem)
                if new_problems:
                    self.problems[key] = new_problems
                else:
                    self.problems.pop(key, None)

    def _held(self, key: str, now: float) -> bool:
        """Whether `key` is in quarantine: its last good rules stay until `until`."""
        quarantine = self._quarantine.get(key)
        return quarantine is not None and quarantine.until > now

    def _state_for_kernel(self, key: str, now: float) -> ServiceState | None:
        return self.planner.committed_state(key) if self._held(key, now) else self.states.get(key)

    # -- nftables ------------------------------------------------------------------------------
    def _send_elements(self, plan: Plan) -> bool:
        """Element changes alone go to the kernel over netlink (nft reads the whole ruleset before
        any element command); whether the kernel took them. False for anything else, or for a
        batch the kernel refused (nothing of it applied): nft's turn."""
        batch = netlink.encode(plan.transaction, KNOWN_COLLECTIONS) if self.netlink_elements else None
        if batch is None:
            return False
        try:
            netlink.send(batch)
            return True
        except (OSError, netlink.NetlinkError) as exc:
            log.debug("element batch not taken over netlink (%s); giving it to nft", exc)
            return False

    def _load_dark(self, plan: Plan) -> bool:
        """A full sync with no table of ours in the kernel (a new node, or one cleaned up): nothing
        is served yet, so the table is built in stages, hooks last (nftables.StagedLoad), in about
        half nft's time at 10,000 Services. A table that is there (a restart) is replaced in one
        nft transaction instead: it keeps serving until its successor does. Whether it was loaded."""
        if not (self.netlink_elements and plan.full):
            return False
        try:
            if netlink.exists(LBCTL):
                return False
            load = nftables.staged(plan.transaction)
            if load is None:
                return False
            load_dark(self.nft, load, KNOWN_COLLECTIONS)
            return True
        except (NftError, OSError, ValueError, netlink.NetlinkError) as exc:
            log.warning("staged load of the table failed (%s); loading it in one nft transaction", exc)
            return False

    def _apply(self, plan: Plan, elements_tried: bool = False) -> None:
        """Blocking: run in a thread."""
        if plan.transaction and not self._load_dark(plan) and (elements_tried or not self._send_elements(plan)):
            self.nft.apply(plan.transaction)

    async def _send_elements_from_loop(self, plan: Plan) -> bool:
        """`_send_elements` on the event loop, never blocking it (a non-blocking socket, the
        kernel's answers awaited)."""
        batch = netlink.encode(plan.transaction, KNOWN_COLLECTIONS) if self.netlink_elements else None
        if batch is None:
            return False
        try:
            await netlink.send_async(batch)
            return True
        except (OSError, netlink.NetlinkError) as exc:
            log.debug("element batch not taken over netlink (%s); giving it to nft", exc)
            return False

    async def _apply_incremental(self, plan: Plan) -> None:
        """A small batch of element changes is sent from the event loop itself (well under a
        millisecond: the kernel answers within the send): handed to a thread it would wait for the
        GIL while the announce loop works on the same change. The socket is non-blocking, so the
        loop never waits for an answer; anything else goes to a thread."""
        small = len(plan.transaction) <= _INLINE_OPERATIONS
        if not (small and await self._send_elements_from_loop(plan)):
            await asyncio.to_thread(self._apply, plan, small)

    async def _sync_kernel(self, changed: set[str]) -> None:
        now = time.monotonic()
        if not self._full_due:
            keys = changed | {k for k, q in self._quarantine.items() if q.until <= now}
            plan = self.planner.plan_update({k: self._state_for_kernel(k, now) for k in keys})
            try:
                await self._apply_incremental(plan)
            except NftError as exc:
                metrics.TRANSACTION_FAILURES.labels("incremental").inc()
                log.warning("incremental sync rejected (%s); doing a full sync", exc)
                self._full_due = True
            else:
                self._committed(plan, now)
                metrics.SYNC_SECONDS.labels("incremental").observe(time.monotonic() - now)
                return
        for _attempt in range(5):
            keys = set(self.states) | self.planner.keys
            states = [s for s in (self._state_for_kernel(k, now) for k in sorted(keys)) if s is not None]
            plan = self.planner.plan_full(states, replace=self._replace_due)
            try:
                await asyncio.to_thread(self._apply, plan)
            except NftError as exc:
                metrics.TRANSACTION_FAILURES.labels("full").inc()
                owners = {plan.owner_of_line(r.number) for r in exc.rejected}
                for rejected in exc.rejected:
                    log.error("nft rejected line %d (%s): %s", rejected.number, rejected.error, rejected.text)
                if not exc.rejected or None in owners:
                    if not self._replace_due:
                        self._replace_due = True  # something in the table we did not expect: start over
                        continue
                    raise
                for key in owners:
                    assert key is not None
                    previous = self._quarantine.get(key)
                    backoff = min(previous.backoff * 2, _MAX_QUARANTINE_S) if previous else 1.0
                    self._quarantine[key] = _Quarantine(now + backoff, backoff)
                    log.error("%s: its rules were rejected; keeping its previous rules, retrying in %.0fs",
                              key, backoff)
                continue
            self._committed(plan, now)
            metrics.SYNC_SECONDS.labels("full").observe(time.monotonic() - now)
            self._full_due = self._replace_due = False
            return
        raise RuntimeError("full sync kept being rejected")

    def _committed(self, plan: Plan, now: float) -> None:
        self.planner.commit(plan)
        metrics.STATEMENTS.labels("full" if plan.full else "incremental").inc(len(plan.transaction))
        metrics.SERVICES_PROGRAMMED.set(len(self.planner.keys))
        for key in [k for k in self._quarantine if not self._held(k, now) and k in plan.changes]:
            self._quarantine.pop(key)  # its retry went in
        for conflict in plan.conflicts:
            log.warning("%s and %s both want %s %s; %s (the older Service) keeps it",
                        conflict.winner, conflict.loser, conflict.collection, conflict.key, conflict.winner)
        if plan.udp_backends_gone:
            self._in_background(conntrack.flush_udp(plan.udp_backends_gone, self.config.conntrack_command))

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sync_health(self) -> None:
        checks: dict[int, HealthCheck] = {}
        for state in self.states.values():
            if state.local_only and state.health_check_node_port:
                namespace, _, name = state.key.partition("/")
                checks[state.health_check_node_port] = HealthCheck(namespace, name, state.local_endpoints)
        await self.health.update(checks)

    async def _sync_loop(self, services: Reflector) -> None:
        backoff = 0.5
        next_full = time.monotonic() + self.config.resync_interval_s
        while True:
            now = time.monotonic()
            deadline = next_full
            if self._quarantine:
                deadline = min(deadline, min(q.until for q in self._quarantine.values()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_wake.wait(), timeout=max(deadline - now, 0.0))
            self._sync_wake.clear()
            # No debounce window: a burst batches by itself, because events that arrive while a
            # transaction runs wait for the next one; a window would only add its length to every change.
            await asyncio.sleep(0)
            now = time.monotonic()
            if now >= next_full:
                self._full_due = True
                next_full = now + self.config.resync_interval_s
            changed, self._dirty = self._dirty, set()
            self._rebuild(changed, services.cache)
            self._announce_wake.set()
            if not self.full:
                self._started()
                continue
            # taken before applying: a change that arrives meanwhile is the next transaction's
            latencies = self.latency.take(changed)
            try:
                started = time.monotonic()
                await self._sync_kernel(changed)
                self.latency.observe(latencies, self.planner.keys.__contains__, time.time())
                log.debug("synced %d change(s) in %.3fs", len(changed), time.monotonic() - started)
                backoff = 0.5
                if not self.synced_once.is_set():
                    self._started()
            except Exception as exc:
                self._dirty |= changed
                self.latency.give_back(latencies)
                log.error("sync failed: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_SYNC_BACKOFF_S)
                self._sync_wake.set()
                continue
            try:
                await self._sync_health()
            except Exception as exc:
                log.error("health-check listeners: %s", exc)

    def _started(self) -> None:
        """The first sync is done: the start-up's cycles are collected, and the caches and state
        built so far, which live long, are kept out of the cyclic GC's later scans."""
        if not self.synced_once.is_set():
            gc.collect()
            gc.freeze()
            gc.enable()
            self.synced_once.set()

    # -- ownership -----------------------------------------------------------------------------
    def owners(self, announcer: Announcer, nodes: Reflector, now: float) -> dict[str, VipOwner]:
        alive = self.membership.alive(now)
        excluded = excluded_nodes(nodes.cache.values())
        owned, adopted = frozenset(announcer.owned), frozenset(announcer.adopted)
        bgp_version = self.bgp.version if self.bgp is not None else 0
        inputs = (self._states_version, alive, excluded, self.membership.claims_version, owned, adopted, bgp_version)
        if inputs != self._owners_inputs:  # most wake-ups change nothing
            firm, tentative = self.membership.claims(now)
            for ip in owned - adopted:
                firm.setdefault(ip, {})[self.config.node] = announcer.generations.get(ip, 0)
            tentative_all = dict(tentative)
            for ip in adopted:
                tentative_all[ip] = tentative_all.get(ip, frozenset()) | {self.config.node}
            # addresses of pools advertised by BGP only are never held on an interface nor answered by ARP
            states = self.bgp.l2_states(self.states.values()) if self.bgp is not None else self.states.values()
            self._owners = vip_owners(states, alive, excluded, newest_takes(firm), tentative_all)
            self._owners_inputs = inputs
        return self._owners

    def claims(self, announcer: Announcer) -> frozenset[str]:
        """What our heartbeat says we hold: adopted VIPs only tentatively until the first decision."""
        return frozenset(format_claim(ip, announcer.generations.get(ip, 0), tentative=ip in announcer.adopted)
                         for ip in announcer.owned)

    async def _api_reachable(self, client: KubeClient) -> bool:
        """Asked only when no peer answers: are we cut off, or are they all gone? (cached 2 s)"""
        now = time.monotonic()
        checked_at, reachable = self._api_checked
        if now - checked_at < 2.0:
            return reachable
        try:
            await asyncio.wait_for(client.request("GET", "/version"), timeout=1.0)
            reachable = True
        except Exception:
            reachable = False
        self._api_checked = (time.monotonic(), reachable)
        return reachable

    async def _find_witnesses(self) -> None:
        if not self.config.lan_probes:
            try:
                self.witnesses.set_addresses(await asyncio.to_thread(uplink.default_gateways))
            except Exception as exc:
                log.warning("reading the default gateway: %s", exc)
        if self.witnesses.addresses:
            log.info("LAN witnesses when no peer answers: %s", ", ".join(self.witnesses.addresses))
        else:
            log.warning("no LAN witness (no IPv4 default gateway, no --lan-probe, or no raw ICMP socket): when no "
                        "peer and no apiserver answer, this node counts as cut off and gives up its VIPs, even "
                        "if it is the last node alive")

    async def _alone(self, client: KubeClient, now: float) -> Verdict:
        """No peer answers: are we cut off, or are they all gone? (isolation.py)"""
        api = await self._api_reachable(client)
        link: bool | None = None
        if not api:
            try:
                link = await asyncio.to_thread(uplink.link_up, self.membership.targets())
            except Exception as exc:
                log.warning("reading the node network's link state: %s", exc)
        verdict = judge(Evidence(api_reachable=api, link_up=link, witnesses=len(self.witnesses.addresses),
                                 witness_answered=self.witnesses.answered(now),
                                 witness_pending=self.witnesses.pending(now)))
        if verdict != self._verdict:
            self._verdict = verdict
            if verdict is Verdict.PEERS_GONE:
                log.warning("no peer answers, but %s does: the peers are gone; this node keeps its VIPs and "
                            "takes theirs", "the apiserver" if api else "a LAN witness")
            elif verdict is Verdict.UNDECIDED:
                log.info("no peer answers; asking the LAN witnesses before deciding (holding what we hold)")
        return verdict

    async def _announce_loop(self, announcer: Announcer, marks: ServiceMarks, nodes: Reflector,
                             client: KubeClient) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_wake.wait(), timeout=self.config.announce_interval_s)
            self._announce_wake.clear()
            try:
                await self._announce_once(announcer, marks, nodes, client)
            except Exception as exc:
                log.error("announce: %s", exc)

    async def _announce_once(self, announcer: Announcer, marks: ServiceMarks, nodes: Reflector,
                             client: KubeClient) -> None:
        if self._nodes_dirty:
            self._nodes_dirty = False
            self.membership.set_addresses(node_addresses(nodes.cache.values()))
        now = time.monotonic()
        verdict = await self._alone(client, now) if self.membership.isolated(now) else None
        if verdict is None:
            self._verdict = None
        if verdict is Verdict.UNDECIDED and not self.fenced:
            return  # keep what we hold, take nothing: the witnesses answer within a second or not at all
        if verdict is Verdict.CUT_OFF or (verdict is Verdict.UNDECIDED and self.fenced):
            # No peer answers, the apiserver does not, and our link is down or no LAN witness
            # answers: we are the ones cut off. Our VIPs have moved to nodes the clients can reach;
            # holding them would answer ARP for them next to the new holders once our link is back.
            if not self.fenced:
                log.warning("no peer and no apiserver answers, and the link is down or no LAN witness answers: "
                            "this node is cut off; giving up %d VIP(s)", len(announcer.owned))
                self.fenced = True
            await announcer.release_all()
            marks.update({}, set())
            return
        if self.fenced:
            # the peers we judged while cut off may hold VIPs we cannot know of yet: hear them all first
            if self._rejoined_at is None:
                self._rejoined_at = now
            if not self.membership.settled(self._rejoined_at, now):
                return
            log.info("peers answer again: this node takes part in VIP ownership again")
            self.fenced = False
            self._rejoined_at = None
        owners = self.owners(announcer, nodes, now)
        firm, tentative = self.membership.claims(now)
        peer_claims = {ip: frozenset(firm.get(ip, {})) | tentative.get(ip, frozenset())
                       for ip in {*firm, *tentative}}
        held = await announcer.reconcile(owners, peer_claims, self.membership.generation)
        marks.update(owners, held)
        if self.problem_events is not None:
            await self.problem_events.update(self.problems, self.membership.alive(now))

    # -- run -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, configuration: ClientConfiguration) -> None:
        client = KubeClient(configuration, user_agent="lbctl-forwarder")
        services = Reflector(client, "/api/v1/services", self._service_changed, name="services",
                             trim=fields.service, report_pages=True, protobuf_list=fields_protobuf.service_list)
        slices = Reflector(client, "/apis/discovery.k8s.io/v1/endpointslices", self._slice_changed,
                           name="endpointslices", params={"labelSelector": SERVICE_NAME_LABEL},
                           trim=fields.endpoint_slice, report_pages=True,
                           protobuf_list=fields_protobuf.endpoint_slice_list)
        nodes = Reflector(client, "/api/v1/nodes", self._node_changed, name="nodes")
        lease = NodeLease(client, self.config.node, namespace=self.config.lease_namespace,
                          duration_s=self.config.lease_duration_s, renew_s=self.config.renew_interval_s)
        addresses = VipAddresses(self.config.vip_interface, self.config.interface)
        announcer = Announcer(self.config.node, addresses, self.config.garp_repeats)
        marks = ServiceMarks(self.config.node, client, lambda key: services.cache.get(key))
        self.problem_events = problem_events = ProblemEvents(self.config.node, client,
                                                             lambda key: services.cache.get(key))
        secret = await asyncio.to_thread(peer_key, self.config.peer_secret_file)  # files: never on the loop
        peering = Peering(self.membership, lambda: self.claims(announcer), port=self.config.peer_port,
                          on_change=self._announce_wake.set, key=secret, witnesses=self.witnesses)
        status = StatusServer(self.config.status_port, lambda query: self.status_report(announcer, query))
        metrics_server = MetricsServer(self.config.metrics_port)
        self.bgp = speaker = bgp.BgpSpeaker(self.config.node, client, self.config.lease_namespace,
                                            self.states.values, lambda: self._states_version, nodes,
                                            await asyncio.to_thread(bgp.make_workdir, self.config.node,
                                                                    self.config.bgp_dir))
        metrics.VIPS.set_function(lambda: len(announcer.owned))
        metrics.PEERS.source = lambda: [p.state for p in self.membership.view(time.monotonic())]
        metrics.PROGRAMMED.rules = lambda: self.planner.rules
        metrics.PROGRAMMED.elements = lambda: self.planner.elements
        tasks: list[asyncio.Task[None]] = []
        try:
            # Until the first sync (_started), no cyclic GC: listing, building and planning 10,000
            # Services make millions of objects and no reference cycles, and each collection would
            # rescan all of them (a third of the start-up); the few cycles made are collected then.
            gc.disable()
            # the lists first: the apiserver serves them while the rest starts
            tasks += [asyncio.create_task(r.run(), name=r.name) for r in (services, slices, nodes)]
            await status.start()
            await metrics_server.start()
            await announcer.start()
            await peering.start()
            await self._find_witnesses()
            tasks.append(asyncio.create_task(peering.run(), name="peering"))
            if not self.full:
                # kube-proxy carries the traffic: rules an earlier full-mode run left would compete
                for table in (LBCTL, *LEGACY_TABLES):
                    await asyncio.to_thread(self.nft.delete_table, table.family, table.name)
            tasks.append(asyncio.create_task(lease.run(), name="lease"))
            await self._wait_for_state(services, slices, stop)
            if stop.is_set():
                return
            log.info("caches filled: %d Services, %d EndpointSlices", len(services.cache), len(slices.cache))
            self.latency.enabled = self.full  # changes from here on (announce mode programs no rules)
            self._sync_wake.set()
            tasks.append(asyncio.create_task(self._sync_loop(services), name="sync"))
            await _until(self.synced_once.wait(), stop)
            await _until(nodes.synced.wait(), stop)
            self.membership.set_addresses(node_addresses(nodes.cache.values()))
            settle_from = time.monotonic()
            while not stop.is_set() and not self.membership.settled(settle_from, time.monotonic()):
                await asyncio.sleep(self.config.heartbeat_interval_s / 2)
            tasks.append(asyncio.create_task(self._announce_loop(announcer, marks, nodes, client), name="announce"))
            tasks.append(asyncio.create_task(marks.run(), name="marks"))
            tasks.append(asyncio.create_task(speaker.run(), name="bgp"))
            log.info("forwarder on node %s running (%s mode, VIPs on %s, peers on UDP %d)", self.config.node,
                     self.config.mode, addresses.interface, self.config.peer_port)
            await stop.wait()
            log.info("stopping: rules and VIPs stay in the kernel for the next run (peers wait %.0fs for it)",
                     self.config.restart_grace_s)
        finally:
            gc.enable()  # a run that ends before its first sync (in-process, as tests run it) leaves it as it was
            with contextlib.suppress(Exception):
                await asyncio.wait_for(speaker.shutdown(), timeout=10.0)  # routes withdrawn before all else
            for task in [*tasks, *self._background]:
                task.cancel()
            await asyncio.gather(*tasks, *self._background, return_exceptions=True)
            peering.close()
            announcer.stop()
            with contextlib.suppress(Exception):
                await marks.close()
            with contextlib.suppress(Exception):
                await problem_events.close()
            await self.health.close()
            await status.close()
            await metrics_server.close()
            await client.close()

    async def _wait_for_state(self, services: Reflector, slices: Reflector, stop: asyncio.Event) -> None:
        """Until the first full list of each: before it we know nothing, so we change nothing (the
        kernel keeps what an earlier run left) and say so. Meanwhile the Services whose slices
        have come too are built, page by page, while the apiserver serves the next pages (both
        lists come in the same namespace order); what changes later is built again."""
        waiting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(services.synced.wait(),
                                                                            slices.synced.wait()))
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        started, warned = time.monotonic(), False
        built: set[str] = set()
        try:
            while not (waiting.done() or stopping.done()):
                woken: asyncio.Future[Any] = asyncio.ensure_future(self._sync_wake.wait())
                try:
                    await asyncio.wait({waiting, stopping, woken}, timeout=None if warned else 1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if self._sync_wake.is_set() and not waiting.done():
                    self._sync_wake.clear()
                    ready = {k for k in self._dirty if k in services.cache and k in self._slices}
                    self._dirty -= ready
                    self._rebuild(ready, services.cache)
                    built |= ready
                elif (not warned and time.monotonic() >= started + 3.0 and not (waiting.done() or stopping.done())
                      and (services.failing or slices.failing or not (services.cache and slices.cache))):
                    # (a list still coming in pages is not this: a big cluster's take seconds)
                    warned = True
                    gc.enable()  # no burst of objects to keep it from while the apiserver does not answer
                    log.warning("no state yet: the apiserver has not answered a list; programming nothing until it "
                                "does (the kernel keeps what an earlier run left)")
        finally:
            waiting.cancel()
            stopping.cancel()
        # built and not changed since: not again (a change put its key back in _dirty)
        self._dirty |= services.cache.keys() - built

    def status_report(self, announcer: Announcer, query: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        has_state = self.synced_once.is_set()
        body: dict[str, Any] = {
            "node": self.config.node, "mode": self.config.mode,
            "state": "serving" if has_state else "no-state",
            "message": ("rules and VIPs follow the cluster" if has_state else
                        "waiting for a first list from the apiserver: nothing is programmed until then"),
            "fenced": self.fenced, "vips": sorted(announcer.owned),
            "alone": self._verdict.value if self._verdict is not None else None,  # no peer answers: isolation.py
            "peers": [{"node": p.node, "address": p.address, "state": p.state, "heartbeatAgeSeconds": p.heartbeat_age_s}
                      for p in self.membership.view(now)],
        }
        key = (query or {}).get("service")
        if key:  # `lbctl status --probe NAME`: this node's view of one Service
            state = self.states.get(key)
            body["services"] = {key: {
                "known": state is not None,
                "programmed": key in self.planner.keys if self.full else None,
                "readyEndpoints": max((len(p.backends) for p in state.ports), default=0) if state else 0,
                "localEndpoints": state.local_endpoints if state else 0,
                "problems": [str(p) for p in self.problems.get(key, ())],
            }}
        return (200 if has_state else 503), body


def peer_key(path: str | None) -> bytes:
    """The heartbeats' shared key (every forwarder reads the same Secret), or b"" without one."""
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            log.warning("no peer secret at %s (%s): heartbeats are not signed", path, exc.strerror)
        else:
            if key:
                return key
            log.warning("the peer secret in %s is empty: heartbeats are not signed", path)
    else:
        log.warning("heartbeats are not signed: anyone who can send UDP to this node's peer port can claim "
                    "addresses (give every forwarder the same key with --peer-secret-file)")
    return b""


async def _until(waiter: Any, stop: asyncio.Event) -> None:
    """Await `waiter` unless `stop` is set first."""
    wait_task = asyncio.ensure_future(waiter)
    stop_task = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({wait_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait_task, stop_task):
            task.cancel()


async def cleanup(config: ForwarderConfig, configuration: ClientConfiguration | None) -> list[str]:
    """`lbctl forwarder --cleanup`: remove what a forwarder leaves on a node when it stops (its
    table, its VIPs, its Lease) — for a node that no longer runs one. Returns what failed."""
    problems = []
    if bgp.cleanup(config.node, config.bgp_dir):
        log.info("stopped the BGP speaker an earlier forwarder left: its routes are withdrawn")
    nft = Nft(config.nft_command)
    for table in (LBCTL, *LEGACY_TABLES):  # an upgraded node may still have an `ip lbctl`
        await asyncio.to_thread(nft.delete_table, table.family, table.name)
    announcer = Announcer(config.node, VipAddresses(config.vip_interface, config.interface))
    try:
        await announcer.start()
        await announcer.release_all()
    except Exception as exc:
        problems.append(f"VIPs: {exc}")
    if configuration is not None:
        client = KubeClient(configuration, user_agent="lbctl-forwarder")
        try:
            await NodeLease(client, config.node, namespace=config.lease_namespace).release()
        finally:
            await client.close()
    return problems


def check_tools(config: ForwarderConfig) -> str | None:
    """Why the forwarder cannot run here, or None."""
    if config.mode != "full":
        return None
    try:
        # a check-only transaction of the base table: proves nft runs, we may use it, and the
        # kernel has every expression we need (nat, fib, numgen, maps)
        Nft(config.nft_command).check(base_check_lines())
    except Exception as exc:
        return f"nftables is not usable here: {exc}"
    return None


def load_kube_configuration(path: str | None) -> ClientConfiguration:
    """Read without the kubernetes library when it can be (see lbctl.kube.kubeconfig: 40 MB less
    on every node), else with it."""
    return kubeconfig.load(path) or load_configuration(path)


def run(config: ForwarderConfig) -> int:
    """Run until SIGINT or SIGTERM; the exit status."""
    try:
        configuration = load_kube_configuration(config.kubeconfig)
    except Exception as exc:
        print(f"lbctl forwarder: no Kubernetes configuration ({type(exc).__name__}: {exc}); pass --kubeconfig, "
              "set KUBECONFIG, or run it in a pod", file=sys.stderr)
        return 1

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Forwarder(config).run(stop, configuration)

    asyncio.run(main())
    return 0


def run_cleanup(config: ForwarderConfig) -> int:
    try:
        configuration: ClientConfiguration | None = load_kube_configuration(config.kubeconfig)
    except Exception as exc:
        print(f"lbctl forwarder --cleanup: no Kubernetes configuration ({exc}); the Lease stays", file=sys.stderr)
        configuration = None
    problems = asyncio.run(cleanup(config, configuration))
    for problem in problems:
        print(f"lbctl forwarder --cleanup: {problem}", file=sys.stderr)
    return 1 if problems else 0
