"""ExaBGP as the forwarder's BGP speaker: its configuration, its API commands and events (pure),
and the child process (I/O).

Process model: the forwarder starts `exabgp` (the PyPI package, run by the forwarder's own Python)
with a configuration file of one `neighbor` block per peer and an API process, the relay
(lbctl.forwarder.bgp_relay), that connects back to a Unix socket the forwarder listens on.
Commands go down that socket (`neighbor A announce route P next-hop N …`), each acknowledged by
ExaBGP with `done`/`error`; session state comes up as JSON events (`neighbor-changes`, `fsm`).
A change of peers rewrites the file and sends SIGUSR1 (ExaBGP reloads it; changed neighbors
reconnect); the forwarder then sends every route again.

ExaBGP dies with the forwarder: PR_SET_PDEATHSIG kills it when the forwarder dies, and with
exabgp.api.terminate it also stops when its API process (the relay) ends. Its sessions then close
and the routers withdraw the node's routes (or keep them stale for the restart time when the
peer negotiated graceful restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import difflib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbctl.forwarder.bgp_decide import Route
from lbctl.forwarder.bgp_model import Peer

log = logging.getLogger(__name__)

GRACEFUL_RESTART_S = 120  # the restart time offered when a peer has gracefulRestart on
_ACK_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1
# ExaBGP's FSM names → the BGPPeer status states
_FSM_STATES = {"IDLE": "Idle", "ACTIVE": "Active", "CONNECT": "Connect", "OPENSENT": "OpenSent",
               "OPENCONFIRM": "OpenConfirm", "ESTABLISHED": "Established"}


@dataclass(frozen=True)
class Neighbor:
    """One peer as this node configures it."""

    peer: Peer
    local_address: str
    router_id: str
    password: str | None = None


def _quote(text: str) -> str:
    if any(c in text for c in "\"\n\r;{}\\"):
        raise ValueError("the password contains a quote, backslash, brace, semicolon or newline")
    return f'"{text}"'


def render_neighbor(neighbor: Neighbor) -> str:
    peer = neighbor.peer
    lines = [
        f"neighbor {peer.address} {{",
        f"    description \"{peer.name}\";",
        f"    router-id {neighbor.router_id};",
        f"    local-address {neighbor.local_address};",
        f"    local-as {peer.my_asn};",
        f"    peer-as {peer.asn};",
        f"    hold-time {peer.hold_s};",
        f"    connect {peer.port};",
        "    group-updates false;",
    ]
    if peer.multihop:
        lines.append("    outgoing-ttl 255;")
    if neighbor.password:
        lines.append(f"    md5-password {_quote(neighbor.password)};")
    if peer.graceful_restart:
        lines.append(f"    capability {{ graceful-restart {GRACEFUL_RESTART_S}; }}")
    lines += [
        "    family { ipv4 unicast; ipv6 unicast; }",
        "    api { processes [ lbctl ]; neighbor-changes; fsm; }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_config(neighbors: Sequence[Neighbor], relay: Sequence[str]) -> str:
    """The whole ExaBGP configuration: the API process, then one block per neighbor (by address)."""
    command = " ".join(relay)
    text = f"process lbctl {{\n    run {command};\n    encoder json;\n}}\n"
    for neighbor in sorted(neighbors, key=lambda n: (n.peer.address.version, int(n.peer.address))):
        text += render_neighbor(neighbor)
    return text


def announce_command(peer_address: str, route: Route) -> str:
    text = f"neighbor {peer_address} announce route {route.prefix} next-hop {route.next_hop}"
    if route.local_pref is not None:
        text += f" local-preference {route.local_pref}"
    if route.communities:
        text += f" community [ {' '.join(route.communities)} ]"
    if route.large_communities:
        text += f" large-community [ {' '.join(route.large_communities)} ]"
    return text


def withdraw_command(peer_address: str, route: Route) -> str:
    return f"neighbor {peer_address} withdraw route {route.prefix} next-hop {route.next_hop}"


@dataclass(frozen=True)
class StateEvent:
    peer_address: str
    state: str  # one of the BGPPeer status states
    message: str = ""


def parse_event(line: str) -> StateEvent | str | None:
    """An ExaBGP API line: a StateEvent, "done"/"error"/"shutdown" (command acknowledgements), or
    None for what the speaker does not follow."""
    text = line.strip()
    if text in ("done", "error", "shutdown"):
        return text
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in ("state", "fsm"):
        return None
    neighbor = event.get("neighbor")
    if not isinstance(neighbor, dict):
        return None
    where = neighbor.get("address")
    address = where.get("peer") if isinstance(where, dict) else None
    state = neighbor.get("state")
    if not isinstance(address, str) or not isinstance(state, str):
        return None
    if event["type"] == "fsm":
        mapped = _FSM_STATES.get(state.upper())
        return StateEvent(address, mapped) if mapped else None
    if state == "up":
        return StateEvent(address, "Established")
    if state == "connected":
        return StateEvent(address, "OpenSent")
    if state == "down":
        reason = str(neighbor.get("reason") or "")
        return StateEvent(address, "Active", f"session down: {reason}" if reason else "session down")
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the forwarder dies (kill -9 included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ExaBgp:
    """The ExaBGP child process and its API socket."""

    def __init__(self, workdir: Path, on_event: Callable[[StateEvent], None],
                 on_restart: Callable[[bool], None], python: str = sys.executable) -> None:
        self.workdir = workdir
        self._on_event = on_event
        # ExaBGP started (True: it has no routes) or reloaded (False: it may have some): send every route again
        self._on_restart = on_restart
        self._python = python
        self._config = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._acks: asyncio.Queue[str] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._readers: set[asyncio.Task[None]] = set()
        self.restarts = 0

    @property
    def socket_path(self) -> Path:
        return self.workdir / "api.sock"

    @property
    def config_path(self) -> Path:
        return self.workdir / "exabgp.conf"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "exabgp.pid"

    def relay_command(self) -> list[str]:
        return [self._python, "-m", "lbctl.forwarder.bgp_relay", str(self.socket_path)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._connected.is_set()

    def _prepare(self) -> None:
        """Blocking file work: run in a thread."""
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stop_leftover(self.workdir)
        self._remove_socket()

    def _write_config(self, text: str) -> None:
        """Blocking file work: run in a thread."""
        self.config_path.write_text(text)
        self.config_path.chmod(0o600)  # md5 passwords

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare)  # the event loop never waits on a file
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket_path))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        while not self._acks.empty():
            self._acks.get_nowait()
        self._connected.set()
        try:
            while line := await reader.readline():
                event = parse_event(line.decode(errors="replace"))
                if isinstance(event, StateEvent):
                    self._on_event(event)
                elif isinstance(event, str):
                    self._acks.put_nowait(event)
        finally:
            if self._writer is writer:
                self._writer = None
                self._connected.clear()

    async def configure(self, neighbors: Sequence[Neighbor]) -> None:
        """Run ExaBGP with these neighbors (start it, or reload it when they changed)."""
        text = render_config(neighbors, self.relay_command())
        if text == self._config and self.running:
            return
        await asyncio.to_thread(self._write_config, text)
        previous, self._config = self._config, text
        if self.running:
            assert self._proc is not None
            changed = [line[1:].strip() for line in difflib.unified_diff(previous.splitlines(), text.splitlines(),
                                                                          lineterm="", n=0)
                       if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            log.info("BGP peers changed (%s): ExaBGP reloads its configuration", "; ".join(changed)[:500])
            self._proc.send_signal(signal.SIGUSR1)
            self._on_restart(False)
            return
        await self._spawn()

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env.update({
            "exabgp.daemon.user": "root" if os.geteuid() == 0 else env.get("USER", "nobody"),
            "exabgp.daemon.drop": "false",
            "exabgp.daemon.daemonize": "false",
            "exabgp.daemon.pid": str(self.pid_path),
            "exabgp.tcp.bind": "",  # connect out only; never listen on the node
            "exabgp.api.cli": "false",
            "exabgp.api.ack": "true",
            "exabgp.api.respawn": "false",
            "exabgp.api.terminate": "true",
            "exabgp.log.destination": "stdout",
            "exabgp.log.level": "INFO",
            "exabgp.log.packets": "false",
            "exabgp.log.routes": "false",
            "exabgp.log.rib": "false",
            "exabgp.log.processes": "false",
        })
        self._connected.clear()
        self._proc = await asyncio.create_subprocess_exec(
            self._python, "-m", "exabgp", str(self.config_path), env=env, stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        self.restarts += 1
        log.info("ExaBGP started (pid %d)", self._proc.pid)
        self._on_restart(True)

    async def ensure_running(self) -> None:
        """Start ExaBGP again when it exited (after a configure)."""
        if self._config and not self.running:
            code = self._proc.returncode if self._proc else None
            log.warning("ExaBGP exited (status %s); starting it again", code)
            await self._spawn()

    async def send(self, commands: Sequence[str]) -> int:
        """Send commands in order, each acknowledged; returns how many were accepted (stops at the
        first that was not, or when ExaBGP is not connected)."""
        if not commands:
            return 0
        async with self._lock:
            if not self.connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), timeout=_ACK_TIMEOUT_S)
            writer = self._writer
            if writer is None:
                return 0
            accepted = 0
            for command in commands:
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    ack = await asyncio.wait_for(self._acks.get(), timeout=_ACK_TIMEOUT_S)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    log.warning("ExaBGP did not take %r: %s", command, exc or type(exc).__name__)
                    return accepted
                if ack != "done":
                    log.warning("ExaBGP answered %r to %r", ack, command)
                    return accepted
                accepted += 1
            return accepted

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM ExaBGP (it closes its sessions with a NOTIFICATION), SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._server is not None:
            self._server.close()
            self._server = None
        await asyncio.to_thread(self._remove_socket)

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def stop_leftover(workdir: Path) -> bool:
    """Stop an ExaBGP an earlier run left in `workdir` (by its pid file, only if it is ExaBGP);
    returns whether one was stopped. `lbctl forwarder --cleanup` uses it too."""
    pid_file = workdir / "exabgp.pid"
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"exabgp" not in cmdline or str(workdir / "exabgp.conf").encode() not in cmdline:
        return False
    try:  # only one of this network namespace (labs run several nodes on one machine)
        if os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
            return False
    except OSError:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return True


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
