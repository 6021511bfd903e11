"""The renderer's output against the real nft and kernel, in a scratch network namespace:
`nft -c` accepts every ruleset the planner makes, transactions are all-or-nothing, and a Service
whose rules the kernel rejects is held back without holding back the others."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterator

import pytest

from lbctl.forwarder.apply import Nft, NftError
from lbctl.forwarder.main import Forwarder, ForwarderConfig
from lbctl.forwarder.render import Planner
from lbctl.forwarder.state import Backend, ServicePort, ServiceState
from lbctl.lab.netns import Lab
from tests.dataplane.harness import require_root_tools

pytestmark = pytest.mark.dataplane


@pytest.fixture
def scratch() -> Iterator[str]:
    require_root_tools()
    lab = Lab(prefix=f"lbxs{uuid.uuid4().hex[:3]}")
    try:
        yield lab.add_namespace("nft")
    finally:
        assert lab.close() == []


def nft_in(namespace: str) -> Nft:
    return Nft(("ip", "netns", "exec", namespace, "nft"))


def web(**changes: object) -> ServiceState:
    state = ServiceState(
        key="default/web", uid="u1", created="2024-01-01T00:00:00Z",
        ports=(ServicePort("http", "tcp", 80, 30080, (Backend("10.244.1.2", 8080), Backend("10.244.2.3", 8080))),
               ServicePort("dns", "udp", 53, 30053, (Backend("10.244.1.2", 5353),))),
        lb_ips=("192.0.2.10",), source_ranges=("203.0.113.0/24",))
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def api(**changes: object) -> ServiceState:
    state = ServiceState(
        key="prod/api", uid="u2", created="2024-01-02T00:00:00Z",
        ports=(ServicePort("", "tcp", 443, 31443, tuple(Backend(f"10.244.1.{i}", 8443) for i in range(5, 9))),),
        lb_ips=("192.0.2.11",), local_only=True, affinity_timeout=600)
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def dual(**changes: object) -> ServiceState:
    state = ServiceState(
        key="prod/dual", uid="u4", created="2024-01-04T00:00:00Z", families=(4, 6),
        ports=(ServicePort("http", "tcp", 80, 30090, (Backend("10.244.1.7", 8080), Backend("2001:db8:1:1::7", 8080),
                                                      Backend("2001:db8:1:2::7", 8080))),
               ServicePort("dns", "udp", 53, 30053, (Backend("2001:db8:1:1::7", 5353),))),
        lb_ips=("192.0.2.20", "2001:db8::20"), source_ranges=("203.0.113.0/24", "2001:db8:ff::/48"))
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def many_ports(count: int = 300) -> ServiceState:
    ports = tuple(ServicePort(f"p{i}", "tcp" if i % 2 else "udp", 1000 + i, 31000 + i,
                              tuple(Backend(f"10.244.3.{j}", 2000 + i) for j in range(1 + i % 4)))
                  for i in range(count))
    return ServiceState(key="big/many", uid="u3", created="2024-01-03T00:00:00Z", ports=ports,
                        lb_ips=("192.0.2.12", "192.0.2.13"), source_ranges=())


def test_every_planned_transaction_passes_nft_check_and_applies(scratch: str) -> None:
    nft = nft_in(scratch)
    planner = Planner()
    steps = [
        lambda: planner.plan_full([web(), api(), many_ports(), dual()], replace=True),
        lambda: planner.plan_update({"default/web": web(ports=web().ports[:1]), "prod/api": api(affinity_timeout=60),
                                     "prod/dual": dual(affinity_timeout=30, local_only=True)}),
        lambda: planner.plan_update({"big/many": None, "prod/api": api(affinity_timeout=None),
                                     "prod/dual": dual(families=(6,), lb_ips=("2001:db8::20",), source_ranges=None)}),
        lambda: planner.plan_full([web(), api(), dual()]),  # resync: flushes, keeps, deletes what went
        lambda: planner.plan_update({"prod/api": api(ports=(dataclasses.replace(api().ports[0], backends=()),))}),
        lambda: planner.plan_full([]),
    ]
    for step in steps:
        plan = step()
        nft.check(plan.text)
        nft.apply(plan.text)
        planner.commit(plan)
    assert "svc/" not in nft.list_table("inet", "lbctl")


def test_start_up_replaces_the_ip_table_of_an_earlier_version(scratch: str) -> None:
    """A forwarder upgraded in place: its first sync removes `ip lbctl` in the same transaction."""
    nft = nft_in(scratch)
    nft.apply("add table ip lbctl\nadd chain ip lbctl svc/old\n")
    forwarder = Forwarder(ForwarderConfig(node="n1", nft_command=("ip", "netns", "exec", scratch, "nft"),
                                          conntrack_command=("ip", "netns", "exec", scratch, "conntrack")))
    forwarder.states = {"prod/dual": dual()}
    asyncio.run(forwarder._sync_kernel({"prod/dual"}))
    with pytest.raises(NftError):
        nft.list_table("ip", "lbctl")
    assert "2001:db8::20 . tcp . 80" in nft.list_table("inet", "lbctl")


def test_a_rejected_transaction_leaves_the_previous_ruleset(scratch: str) -> None:
    nft = nft_in(scratch)
    planner = Planner()
    plan = planner.plan_full([web()], replace=True)
    nft.apply(plan.text)
    planner.commit(plan)
    before = nft.list_table("inet", "lbctl")
    broken = web(ports=(ServicePort("http", "tcp", 80, 30080, (Backend("10.244.1.2", 70000),)),))
    bad = planner.plan_update({"default/web": broken, "prod/api": api()})
    with pytest.raises(NftError) as caught:
        nft.apply(bad.text)
    (rejected,) = caught.value.rejected
    assert "10.244.1.2:70000" in rejected.text  # (a bad address would send nft to the resolver)
    assert bad.owner_of_line(rejected.number) == "default/web"
    assert nft.list_table("inet", "lbctl") == before  # prod/api's part did not go in either


def test_a_service_whose_rules_are_rejected_is_held_back_and_the_rest_goes_in(
        scratch: str, caplog: pytest.LogCaptureFixture) -> None:
    forwarder = Forwarder(ForwarderConfig(node="n1", nft_command=("ip", "netns", "exec", scratch, "nft"),
                                          conntrack_command=("ip", "netns", "exec", scratch, "conntrack")))
    nft = nft_in(scratch)
    broken = api(ports=(ServicePort("", "tcp", 443, 31443, (Backend("10.244.1.5", 70000),)),))
    forwarder.states = {"default/web": web(), "prod/api": broken}
    caplog.set_level(logging.ERROR, logger="lbctl.forwarder")
    asyncio.run(forwarder._sync_kernel({"default/web", "prod/api"}))
    table = nft.list_table("inet", "lbctl")
    assert "svc/default/web/tcp/80" in table and "prod/api" not in table
    assert any("10.244.1.5:70000" in r.getMessage() for r in caplog.records), caplog.text
    assert "prod/api" in forwarder._quarantine

    # others keep flowing while it waits; once fixed and its backoff is over it goes in
    forwarder.states["default/web"] = web(lb_ips=("192.0.2.20",))
    asyncio.run(forwarder._sync_kernel({"default/web"}))
    assert "192.0.2.20" in nft.list_table("inet", "lbctl")
    forwarder.states["prod/api"] = api()
    forwarder._quarantine["prod/api"].until = 0.0
    asyncio.run(forwarder._sync_kernel({"prod/api"}))
    assert "svc/prod/api/tcp/443" in nft.list_table("inet", "lbctl")
    assert forwarder._quarantine == {}


def test_incremental_failure_falls_back_to_a_full_sync(scratch: str) -> None:
    """Someone deleted our table under us: the next change must still land."""
    forwarder = Forwarder(ForwarderConfig(node="n1", nft_command=("ip", "netns", "exec", scratch, "nft"),
                                          conntrack_command=("ip", "netns", "exec", scratch, "conntrack")))
    forwarder.states = {"default/web": web()}
    asyncio.run(forwarder._sync_kernel({"default/web"}))
    nft_in(scratch).delete_table("inet", "lbctl")
    forwarder.states["default/web"] = web(lb_ips=("192.0.2.30",))
    asyncio.run(forwarder._sync_kernel({"default/web"}))
    table = nft_in(scratch).list_table("inet", "lbctl")
    assert "192.0.2.30 . tcp . 80" in table
