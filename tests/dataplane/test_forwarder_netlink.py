"""Element changes sent over netlink (lbctl.forwarder.netlink) against the real kernel: they leave
exactly the table nft leaves, a batch the kernel refuses changes nothing, and the forwarder falls
back to nft for what netlink cannot carry."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest

from lbctl.forwarder import main as forwarder_main
from lbctl.forwarder import netlink, nftables
from lbctl.forwarder.apply import Nft, load_dark
from lbctl.forwarder.main import KNOWN_COLLECTIONS, Forwarder, ForwarderConfig
from lbctl.forwarder.nftables import Element, EndpointValue, Map, SlotKey, Transaction
from lbctl.forwarder.render import LBCTL, Plan, Planner, shard_map
from lbctl.forwarder.state import Backend, ServiceState
from lbctl.lab.netns import Lab, call_in
from tests.dataplane.harness import require_root_tools
from tests.dataplane.test_forwarder_nft import api, dual, many_ports, nft_in, web
from tests.loopcheck import file_work_on_this_thread

pytestmark = pytest.mark.dataplane


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    require_root_tools()
    lab = Lab(prefix=f"lbxn{uuid.uuid4().hex[:3]}")
    try:
        yield lab.add_namespace("netlink"), lab.add_namespace("nft")
    finally:
        assert lab.close() == []


def moved(state: ServiceState, port: int, backends: tuple[Backend, ...]) -> ServiceState:
    ports = list(state.ports)
    ports[port] = dataclasses.replace(ports[port], backends=backends)
    return dataclasses.replace(state, ports=tuple(ports))


def test_netlink_element_batches_leave_the_table_nft_leaves(pair: tuple[str, str]) -> None:
    by_netlink, by_nft = pair
    planners = {by_netlink: Planner(), by_nft: Planner()}
    steps: list[Callable[[Planner], Plan]] = [
        lambda p: p.plan_full([web(), api(), dual()], replace=True),
        # endpoints moved, as many as before: element changes only
        lambda p: p.plan_update({"default/web": moved(web(), 0, (Backend("10.244.1.9", 8080),
                                                                 Backend("10.244.2.3", 8080)))}),
        lambda p: p.plan_update({"prod/dual": moved(dual(), 0, (Backend("10.244.1.7", 8080),
                                                                Backend("2001:db8:1:1::8", 8080),
                                                                Backend("2001:db8:1:2::9", 8080)))}),
        # a port with one endpoint has it in its rule (`dnat to`): nft
        lambda p: p.plan_update({"default/web": moved(web(), 1, (Backend("10.244.2.5", 5353),))}),
        # a new LB address and endpoints of a Service with affinity: chains too, so nft
        lambda p: p.plan_update({"default/web": web(lb_ips=("192.0.2.30",)),
                                 "prod/api": moved(api(), 0, (Backend("10.244.1.5", 8443),))}),
        lambda p: p.plan_update({"prod/dual": dual()}),
    ]
    over_netlink = 0
    for number, step in enumerate(steps):
        for namespace, planner in planners.items():
            plan = step(planner)
            batch = netlink.encode(plan.transaction, KNOWN_COLLECTIONS) if namespace == by_netlink else None
            if batch is not None:
                if number % 2:  # from a thread, and as the forwarder's event loop sends a small batch
                    call_in(namespace, lambda b=batch: netlink.send(b))  # type: ignore[misc]
                else:
                    call_in(namespace, lambda b=batch: asyncio.run(netlink.send_async(b)))  # type: ignore[misc]
                over_netlink += 1
            else:
                nft_in(namespace).apply(plan.transaction)
            planner.commit(plan)
        table = nft_in(by_netlink).list_table("inet", "lbctl")
        assert table == nft_in(by_nft).list_table("inet", "lbctl")
        assert ("2001:db8:1:2::9 . 8080" in table) == (2 <= number < 5)  # until dual() is back
    assert over_netlink == 3


def test_a_refused_batch_changes_nothing(pair: tuple[str, str]) -> None:
    namespace, _ = pair
    planner = Planner()
    plan = planner.plan_full([web()], replace=True)
    nft_in(namespace).apply(plan.transaction)
    planner.commit(plan)
    before = nft_in(namespace).list_table("inet", "lbctl")
    program = planner.program("default/web")
    assert program is not None
    # an element for an existing map, then one for a map that does not exist: all or nothing
    shard = next(el.collection for el in program.elements if el.collection.startswith("endpoints-tcp/"))
    out = Transaction(LBCTL)
    out.add("x", shard_map(shard), Map("endpoints-tcp/999", SlotKey(), EndpointValue(4, "tcp")))
    out.add("x", Element(shard, 4000, ("10.244.9.9", 80)), Element("endpoints-tcp/999", 1, ("10.244.9.9", 80)))
    batch = netlink.encode(out, KNOWN_COLLECTIONS)
    assert batch is not None
    with pytest.raises(netlink.NetlinkError):
        call_in(namespace, lambda: netlink.send(batch))
    assert nft_in(namespace).list_table("inet", "lbctl") == before
    with pytest.raises(netlink.NetlinkError):
        call_in(namespace, lambda: asyncio.run(netlink.send_async(batch)))
    assert nft_in(namespace).list_table("inet", "lbctl") == before


def test_the_forwarder_commits_endpoint_moves_over_netlink_and_the_rest_with_nft(
        pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, _ = pair
    sent: list[int] = []
    real_send, real_send_async = netlink.send, netlink.send_async
    staged: list[int] = []

    def blocking(batch: netlink.Batch, timeout_s: float = 5.0, sock: socket.socket | None = None) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread, where blocking sends belong (the start-up load)
            real_send(batch, timeout_s, sock)
            staged.append(len(batch.seqs))
            return
        raise AssertionError("a small batch is sent from the event loop without blocking it (send_async)")

    async def counted(batch: netlink.Batch, timeout_s: float = 5.0) -> None:  # the real one, counted
        await real_send_async(batch, timeout_s)
        sent.append(len(batch.seqs))
    monkeypatch.setattr(netlink, "send", blocking)
    monkeypatch.setattr(netlink, "send_async", counted)

    def run() -> None:
        with file_work_on_this_thread() as file_work:  # the loop runs in this thread: nft runs in another
            syncs()
        assert file_work == []

    def syncs() -> None:
        forwarder = Forwarder(ForwarderConfig(node="n1"))  # `nft` in this namespace: netlink is used
        assert forwarder.netlink_elements
        forwarder.states = {"default/web": web(), "prod/dual": dual(key="prod/dual", created="2024-01-05T00:00:00Z")}
        asyncio.run(forwarder._sync_kernel({"default/web", "prod/dual"}))
        assert staged and not sent  # no table yet: its elements went over netlink from a thread (a staged load)
        forwarder.states["prod/dual"] = moved(forwarder.states["prod/dual"], 0, (
            Backend("10.244.1.7", 8080), Backend("2001:db8:1:1::7", 8080), Backend("2001:db8:1:2::42", 8080)))
        asyncio.run(forwarder._sync_kernel({"prod/dual"}))
        assert len(sent) == 1
        forwarder.states["default/web"] = web(lb_ips=("192.0.2.31",))  # service-ips and lb-ips: still elements
        asyncio.run(forwarder._sync_kernel({"default/web"}))
        assert len(sent) == 2
        forwarder.states["default/web"] = web(lb_ips=("192.0.2.31",), source_ranges=None)  # its lb/ chain goes: nft
        asyncio.run(forwarder._sync_kernel({"default/web"}))
        assert len(sent) == 2
    call_in(namespace, run)
    table = nft_in(namespace).list_table("inet", "lbctl")
    assert "2001:db8:1:2::42 . 8080" in table and "2001:db8:1:2::7 . 8080" not in table
    assert "192.0.2.31 . tcp . 80" in table and "192.0.2.10" not in table
    assert "lb/default/web" not in table


def blocks(listing: str) -> list[str]:
    """A table's listing as its maps, sets and chains, sorted."""
    body = listing.strip().removeprefix("table inet lbctl {").removesuffix("}")
    return sorted(block.strip() for block in body.split("\n\n"))


def test_a_dark_load_leaves_the_table_one_nft_transaction_leaves(pair: tuple[str, str]) -> None:
    staged_in, whole_in = pair
    states = [web(), api(), dual(), many_ports(40)]
    plan = Planner().plan_full(states, replace=True)
    load = nftables.staged(plan.transaction)
    assert load is not None
    assert not call_in(staged_in, lambda: netlink.exists(LBCTL))
    call_in(staged_in, lambda: load_dark(nft_in(staged_in), load, KNOWN_COLLECTIONS))
    nft_in(whole_in).apply(Planner().plan_full(states, replace=True).transaction)
    # the same maps, sets and chains with the same contents (listed in creation order: hooks last)
    assert blocks(nft_in(staged_in).list_table("inet", "lbctl")) == blocks(nft_in(whole_in).list_table("inet", "lbctl"))
    assert call_in(staged_in, lambda: netlink.exists(LBCTL) and netlink.exists(LBCTL, "prerouting"))
    assert not call_in(staged_in, lambda: netlink.exists(LBCTL, "no-such-chain"))


def test_the_forwarder_loads_a_new_table_in_stages_and_replaces_an_existing_one_whole(
        pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, _ = pair
    staged_loads: list[int] = []

    def counted(nft: Nft, load: nftables.StagedLoad, known: Iterable[nftables.Map | nftables.Set]) -> None:
        load_dark(nft, load, known)  # the real load, counted
        staged_loads.append(len(load.elements))
    monkeypatch.setattr(forwarder_main, "load_dark", counted)

    def start_up(states: dict[str, ServiceState]) -> None:
        forwarder = Forwarder(ForwarderConfig(node="n1"))
        forwarder.states = states
        asyncio.run(forwarder._sync_kernel(set(states)))
    states = {"default/web": web(), "prod/dual": dual(key="prod/dual", created="2024-01-05T00:00:00Z")}
    call_in(namespace, lambda: start_up(states))
    assert len(staged_loads) == 1 and staged_loads[0] > 0  # no table yet: in stages
    first = blocks(nft_in(namespace).list_table("inet", "lbctl"))
    assert any("192.0.2.10 . tcp . 80 : goto lb/default/web/tcp/80" in block for block in first)
    # a restart finds the table: it is replaced in one transaction, and ends the same
    call_in(namespace, lambda: start_up(states))
    assert len(staged_loads) == 1
    assert blocks(nft_in(namespace).list_table("inet", "lbctl")) == first
