"""The forwarder's BGP speaker: BGPPeers and pools (watched here) and the Services' states (built by
the forwarder) → the routes this node announces (bgp_decide, pure) → ExaBGP (bgp_exabgp), by
difference with what ExaBGP has acknowledged; session states → each BGPPeer's status (bgp_status).

Static stability: without the apiserver the caches keep their last state, so the routes stay as
they are (as layer 2 keeps its VIPs). Graceful shutdown (SIGTERM): every route is withdrawn, then
ExaBGP stops and closes its sessions. A forwarder killed with -9 takes ExaBGP with it (see
bgp_exabgp); the routers then drop the node's routes (at once when they see the TCP session
close, after the hold time when the node is unreachable, after the restart time with graceful
restart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import glob
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lbctl.forwarder.bgp_decide import NodeView, Route, announcements, bgp_only_addresses, next_hop
from lbctl.forwarder.bgp_exabgp import (
    ExaBgp,
    Neighbor,
    StateEvent,
    announce_command,
    remove_workdir,
    render_neighbor,
    stop_leftover,
    withdraw_command,
)
from lbctl.forwarder.bgp_model import (
    PEERS_PATH,
    POOLS_PATH,
    Peer,
    PoolAdvert,
    node_ips,
    node_labels,
    parse_all,
    parse_peer,
    parse_pool_advert,
)
from lbctl.forwarder.bgp_status import NodeEntry, PeerStatus
from lbctl.forwarder.ownership import excluded_nodes
from lbctl.forwarder.state import ServiceState
from lbctl.kube.client import ApiError, KubeClient
from lbctl.kube.reflector import Reflector
from lbctl.model.meta import timestamp

log = logging.getLogger(__name__)

WORKDIR_PREFIX = "lbctl-bgp-"
OWNER_FILE = "forwarder.pid"
_TICK_S = 0.2
_SERVED_RECHECK_S = 30.0
_NO_SESSION_S = 10.0  # a session not up this long gets a message saying what to check


def no_session_message(peer: Peer, node: str) -> str:
    """What to check when a session does not come up (ExaBGP reports no reason while the TCP
    connection itself fails: refused, unreachable, or dropped for a TCP-MD5 password mismatch)."""
    password = "the same TCP-MD5 password (spec.passwordSecretRef)" if peer.password_secret else "no password"
    return (f"no BGP session with {peer.address}:{peer.port}: check that the router has node {node} as a neighbor "
            f"with remote AS {peer.my_asn} and {password}, that it runs AS {peer.asn} (spec.peerASN), and that "
            f"{peer.address} is reachable from the node")


def workdir_pattern(base: str, node: str) -> str:
    return str(Path(base) / f"{WORKDIR_PREFIX}{node}-*")


def l2_states(states: Iterable[ServiceState], bgp_only: frozenset[str]) -> list[ServiceState]:
    """The states as layer 2 sees them: without the addresses announced by BGP only (pure)."""
    result = []
    for state in states:
        if state.announce and bgp_only and any(ip in bgp_only for ip in state.lb_ips):
            state = dataclasses.replace(state, lb_ips=tuple(ip for ip in state.lb_ips if ip not in bgp_only))
        result.append(state)
    return result


def unique_peers(peers: list[Peer]) -> tuple[list[Peer], dict[str, str]]:
    """One peer per address (the first by name); the others are skipped with a reason."""
    seen: dict[str, str] = {}
    kept, skipped = [], {}
    for peer in peers:
        address = str(peer.address)
        if address in seen:
            skipped[peer.name] = (f"spec.peerAddress: {address} is also the address of BGPPeer {seen[address]}; "
                                  "this one is not used (give each peer its own address)")
            continue
        seen[address] = peer.name
        kept.append(peer)
    return kept, skipped


@dataclasses.dataclass
class Session:
    state: str = "Connect"
    since: str = ""
    message: str = ""
    changed_at: float = dataclasses.field(default_factory=time.monotonic)


class BgpSpeaker:
    def __init__(self, node: str, client: KubeClient, namespace: str,
                 states: Callable[[], Iterable[ServiceState]], states_version: Callable[[], int],
                 nodes: Reflector, workdir: Path) -> None:
        self.node = node
        self._client = client
        self._namespace = namespace
        self._states = states
        self._states_version = states_version
        self._nodes = nodes
        self.peers_cache = Reflector(client, PEERS_PATH, self._changed, name="bgppeers")
        self.pools_cache = Reflector(client, POOLS_PATH, self._changed, name="loadbalancerpools")
        self.workdir = workdir  # from make_workdir (file work: the caller runs it in a thread)
        self.exabgp = ExaBgp(self.workdir, self._event, self._restarted)
        self.status = PeerStatus(client, node)
        self.peers: list[Peer] = []
        self.pools: list[PoolAdvert] = []
        self.skipped: dict[str, str] = {}  # peer name → why it is not configured
        self.bgp_only: frozenset[str] = frozenset()
        self.version = 0  # bumps when peers or pools change (layer 2 then looks again)
        self.desired: dict[str, frozenset[Route]] = {}  # peer name → routes
        self.announced: dict[str, dict[str, Route]] = {}  # peer address → prefix → route ExaBGP took
        self.sessions: dict[str, Session] = {}  # peer address → its session
        self._resend: set[str] = set()  # peer addresses whose routes are sent again
        self._passwords: dict[tuple[str, str], str] = {}
        self._skipped_since: dict[str, str] = {}
        self._password_retry = 0.0  # when to read a password Secret that could not be read again
        self._objects_version = 0
        self._inputs: tuple[object, ...] | None = None
        self._wake = asyncio.Event()
        self._stopped = False

    # -- inputs ---------------------------------------------------------------------------------
    def _changed(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        self._objects_version += 1
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _event(self, event: StateEvent) -> None:
        session = self.sessions.setdefault(event.peer_address, Session())
        if event.state == "Established" and session.state != "Established":
            self._resend.add(event.peer_address)  # a new session: the peer has none of our routes
        if event.state != session.state:
            session.since, session.changed_at = timestamp(), time.monotonic()
        session.state = event.state
        session.message = event.message if event.state != "Established" else ""
        log.info("BGP session with %s: %s%s", event.peer_address, event.state,
                 f" ({event.message})" if event.message else "")
        self._wake.set()

    def _restarted(self, fresh: bool) -> None:
        if fresh:
            self.announced.clear()
            for session in self.sessions.values():
                session.state, session.since, session.message = "Connect", timestamp(), ""
                session.changed_at = time.monotonic()
        self._resend |= set(self.announced) | {str(p.address) for p in self.peers}
        self._wake.set()

    def node_view(self) -> NodeView:
        obj = self._nodes.cache.get(f"/{self.node}")
        return NodeView(self.node, node_labels(obj), node_ips(obj),
                        eligible=self.node not in excluded_nodes(self._nodes.cache.values()))

    def l2_states(self, states: Iterable[ServiceState]) -> list[ServiceState]:
        return l2_states(states, self.bgp_only)

    # -- run ------------------------------------------------------------------------------------
    async def _served(self) -> bool:
        """Whether the cluster serves BGPPeers (their CRD is installed)."""
        try:
            group = await self._client.request("GET", PEERS_PATH.rsplit("/", 1)[0], timeout_s=10.0)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == "bgppeers" for r in group.get("resources") or ())

    async def _wait_until_served(self) -> None:
        said = False
        while True:
            try:
                if await self._served():
                    return
                if not said:
                    log.info("BGP off: this cluster does not serve BGPPeers (their CRD is not installed); "
                             "looking again every %.0fs", _SERVED_RECHECK_S)
                    said = True
            except Exception as exc:  # the apiserver is away: the next look decides
                log.debug("BGP: cannot tell whether BGPPeers are served: %s", exc)
            await asyncio.sleep(_SERVED_RECHECK_S)

    async def run(self) -> None:
        await self._wait_until_served()
        tasks = [asyncio.create_task(r.run(), name=r.name) for r in (self.peers_cache, self.pools_cache)]
        tasks.append(asyncio.create_task(self.status.run(), name="bgp-status"))
        try:
            await self.exabgp.start()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=_TICK_S)
                self._wake.clear()
                try:
                    await self.reconcile()
                except Exception as exc:  # never take the forwarder down
                    log.exception("BGP: %s", exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _neighbors(self, node: NodeView, peers: list[Peer]) -> list[Neighbor]:
        router_id = next((a for a in node.addresses if ":" not in a), "0.0.0.1")
        neighbors = []
        for peer in peers:
            local = next_hop(peer, node, peer.address.version)
            if local is None:
                self.skipped[peer.name] = (f"node {self.node} has no IPv{peer.address.version} address to reach "
                                           f"{peer.address} from (set spec.sourceAddress)")
                continue
            password = None
            if peer.password_secret is not None:
                password = await self._password(peer)
                if password is None:
                    continue
            neighbor = Neighbor(peer, local, router_id, password)
            try:
                render_neighbor(neighbor)
            except ValueError as exc:  # a password ExaBGP's configuration cannot carry
                self.skipped[peer.name] = f"spec.passwordSecretRef: {exc}; this peer is not configured"
                continue
            neighbors.append(neighbor)
        return neighbors

    async def _password(self, peer: Peer) -> str | None:
        assert peer.password_secret is not None
        name, key = peer.password_secret
        if (name, key) not in self._passwords:
            try:
                secret = await self._client.request("GET", f"/api/v1/namespaces/{self._namespace}/secrets/{name}",
                                                    timeout_s=5.0)
                raw = (secret.get("data") or {}).get(key)
                if not isinstance(raw, str):
                    self.skipped[peer.name] = (f"spec.passwordSecretRef: Secret {self._namespace}/{name} has no key "
                                               f"{key!r}")
                    self._password_retry = time.monotonic() + 10.0
                    return None
                self._passwords[(name, key)] = base64.b64decode(raw).decode().strip()
            except Exception as exc:
                self.skipped[peer.name] = (f"spec.passwordSecretRef: cannot read Secret {self._namespace}/{name} "
                                           f"({exc})")
                self._password_retry = time.monotonic() + 10.0  # Secrets are not watched: look again later
                return None
        return self._passwords[(name, key)]

    async def reconcile(self) -> None:
        if self._stopped or not (self.peers_cache.synced.is_set() and self.pools_cache.synced.is_set()):
            return  # nothing known yet: change nothing (an earlier run's routes went with its ExaBGP)
        node = self.node_view()
        if self._password_retry and time.monotonic() >= self._password_retry:
            self._password_retry = 0.0
            self._inputs = None
        inputs = (self._objects_version, self._states_version(), node)
        if inputs != self._inputs:
            if self._objects_version != (self._inputs or (None,))[0]:
                self._passwords.clear()  # a peer change may mean a new password: read the Secrets again
            parsed, bad = parse_all(self.peers_cache.cache.values(), parse_peer)
            pools, bad_pools = parse_all(self.pools_cache.cache.values(), parse_pool_advert)
            for name, why in bad_pools.items():
                log.debug("pool %s is not advertised: %s", name, why)
            peers, duplicates = unique_peers(parsed)
            self.skipped = {**bad, **duplicates}
            mine = [p for p in peers if p.node_selector.matches(node.labels)]
            neighbors = await self._neighbors(node, mine)
            configured = {n.peer.name for n in neighbors}
            self.peers = [p for p in mine if p.name in configured]
            bgp_only = bgp_only_addresses({ip for s in self._states() for ip in s.lb_ips}, pools)
            if pools != self.pools or bgp_only != self.bgp_only:
                self.pools, self.bgp_only = pools, bgp_only
                self.version += 1
            wanted = announcements(node, self.peers, pools, self._states())
            self.desired = {name: routes for name, routes in wanted.items() if name in configured}
            addresses = {str(p.address) for p in self.peers}
            for gone in set(self.sessions) - addresses:
                self.sessions.pop(gone)
            for gone in set(self.announced) - addresses:
                self.announced.pop(gone)  # its neighbor block is gone: ExaBGP closed the session
            if neighbors or self.exabgp.running:
                await self.exabgp.configure(neighbors)
            self._inputs = inputs
        if self.peers:
            await self.exabgp.ensure_running()
            await self._apply()
        self._report()

    async def _apply(self) -> None:
        commands: list[tuple[str, str, Route, bool]] = []  # (command, peer address, route, announce?)
        for peer in self.peers:
            address = str(peer.address)
            have = self.announced.get(address, {})
            want = {r.prefix: r for r in self.desired.get(peer.name, frozenset())}
            resend = address in self._resend
            for prefix in sorted(set(have) - set(want)):
                commands.append((withdraw_command(address, have[prefix]), address, have[prefix], False))
            for prefix, route in sorted(want.items()):
                if resend or have.get(prefix) != route:
                    commands.append((announce_command(address, route), address, route, True))
        if not commands:
            self._resend.clear()
            return
        started = time.monotonic()
        accepted = await self.exabgp.send([c for c, _, _, _ in commands])
        for _command, address, route, announce in commands[:accepted]:
            table = self.announced.setdefault(address, {})
            if announce:
                table[route.prefix] = route
            else:
                table.pop(route.prefix, None)
        if accepted == len(commands):
            self._resend.clear()
        log.info("BGP: %d of %d update(s) taken by ExaBGP in %.3fs", accepted, len(commands),
                 time.monotonic() - started)
        if accepted < len(commands):
            self._inputs = None  # try again at the next tick

    def _report(self) -> None:
        entries: dict[str, NodeEntry] = {}
        now = time.monotonic()
        for peer in self.peers:
            session = self.sessions.setdefault(str(peer.address), Session(since=timestamp()))
            routes = len(self.announced.get(str(peer.address), {})) if session.state == "Established" else 0
            message = session.message
            if session.state != "Established" and now - session.changed_at > _NO_SESSION_S:
                message = no_session_message(peer, self.node) + (f" (last: {message})" if message else "")
            entries[peer.name] = NodeEntry(session.state, session.since or timestamp(), routes, message)
        for name in set(self._skipped_since) - set(self.skipped):
            self._skipped_since.pop(name)
        for name, why in self.skipped.items():
            entries[name] = NodeEntry("Idle", self._skipped_since.setdefault(name, timestamp()), 0, why)
        self.status.update(entries)

    def report(self) -> dict[str, Any]:
        """For /healthz: each peer's session and routes."""
        return {str(p.name): {"address": str(p.address), "state": self.sessions.get(str(p.address), Session()).state,
                              "routes": sorted(r.prefix for r in self.desired.get(p.name, ()))}
                for p in self.peers}

    # -- stop -----------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Graceful: withdraw every route, then stop ExaBGP (it closes its sessions)."""
        self._stopped = True
        try:
            if self.exabgp.running and self.exabgp.connected:
                commands = [withdraw_command(address, route)
                            for address, table in sorted(self.announced.items()) for route in table.values()]
                if commands:
                    taken = await self.exabgp.send(commands)
                    log.info("stopping: withdrew %d of %d BGP route(s)", taken, len(commands))
                    self.announced.clear()
            await self.exabgp.stop()
        finally:
            await asyncio.to_thread(remove_workdir, self.workdir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_workdir(node: str, workdir_base: str | None = None) -> Path:
    """A fresh private directory for this run's ExaBGP files (those of dead runs removed first).
    Blocking: the forwarder runs it in a thread."""
    base = workdir_base or tempfile.gettempdir()
    remove_stale(base, node)
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{node}-", dir=base))
    (workdir / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return workdir


def remove_stale(base: str, node: str) -> None:
    """Remove the directories of this node's forwarders that died without cleaning up (kill -9):
    their ExaBGP died with them (PR_SET_PDEATHSIG). A directory whose forwarder still runs (another
    lab's node of the same name) is left alone."""
    for path in glob.glob(workdir_pattern(base, node)):
        try:
            owner = int((Path(path) / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            stop_leftover(Path(path))
            remove_workdir(Path(path))


def cleanup(node: str, workdir_base: str | None = None) -> int:
    """`lbctl forwarder --cleanup`: stop an ExaBGP a forwarder of this node left (its sessions close,
    so the routers withdraw its routes); returns how many were stopped."""
    stopped = 0
    for path in glob.glob(workdir_pattern(workdir_base or tempfile.gettempdir(), node)):
        if stop_leftover(Path(path)):
            stopped += 1
            remove_workdir(Path(path))
    return stopped
