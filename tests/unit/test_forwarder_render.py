"""The renderer and planner (lbctl.forwarder.render): golden rulesets, incremental plans, claims.

Golden files live in tests/unit/golden/; after an intended change, regenerate them with
LBCTL_UPDATE_GOLDEN=1 python3 -m pytest tests/unit/test_forwarder_render.py and review the diff.
(tests/dataplane/test_forwarder_nft.py feeds the same rulesets to `nft -c` and to a kernel.)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from lbctl.forwarder.render import (
    ENDPOINTS,
    LB_IPS,
    NODE_PORTS,
    SERVICE_IPS,
    Planner,
    SlotAllocator,
    SlotRange,
    allocate,
    render_program,
)
from lbctl.forwarder.state import Backend, ServicePort, ServiceState

GOLDEN = Path(__file__).parent / "golden"


MARK = "meta mark set meta mark | 0x00004000"  # ETP=Cluster: masquerade later
MARK_RE = re.escape(MARK)

def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LBCTL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with LBCTL_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"rendering differs from {path}; if intended, LBCTL_UPDATE_GOLDEN=1"


def web(**changes: object) -> ServiceState:
    state = ServiceState(
        key="default/web", uid="u1", created="2024-01-01T00:00:00Z",
        ports=(ServicePort("http", "tcp", 80, 30080,
                           (Backend("10.244.1.2", 8080, "a"), Backend("10.244.2.3", 8080, "b"))),
               ServicePort("dns", "udp", 53, 30053, (Backend("10.244.1.2", 5353, "a"),))),
        lb_ips=("192.0.2.10",), source_ranges=("203.0.113.0/24", "198.51.100.7/32"),
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def api(**changes: object) -> ServiceState:
    state = ServiceState(
        key="prod/api", uid="u2", created="2024-01-02T00:00:00Z",
        ports=(ServicePort("", "tcp", 443, 31443, (Backend("10.244.1.5", 8443), Backend("10.244.1.6", 8443))),),
        lb_ips=("192.0.2.11",), local_only=True, affinity_timeout=600, health_check_node_port=31999,
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def empty(**changes: object) -> ServiceState:
    state = ServiceState(key="prod/empty", uid="u3", created="2024-01-03T00:00:00Z",
                         ports=(ServicePort("", "tcp", 8000, 30081, ()),), lb_ips=("192.0.2.10",))
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def committed(*states: ServiceState) -> Planner:
    planner = Planner()
    planner.commit(planner.plan_full(states, replace=True))
    return planner


def test_full_ruleset_golden() -> None:
    golden("forwarder_full.nft", Planner().plan_full([web(), api(), empty()], replace=True).text)


def test_full_resync_keeps_affinity_sets_and_drops_what_went_golden() -> None:
    planner = committed(web(), api(), empty())
    golden("forwarder_resync.nft", planner.plan_full([web(), api(affinity_timeout=None)]).text)


def test_incremental_endpoint_change_golden() -> None:
    planner = committed(web(), api(), empty())
    fewer = web(ports=(dataclasses.replace(web().ports[0], backends=(Backend("10.244.2.3", 8080),)), web().ports[1]))
    golden("forwarder_update.nft", planner.plan_update({"default/web": fewer, "prod/empty": None}).text)


def test_rules_dnat_to_every_backend_through_numgen() -> None:
    text = Planner().plan_full([web()]).text
    # ETP=Cluster: marked for masquerade by the same rule
    match = re.search(rf"svc/default/web/tcp/80 meta l4proto tcp {MARK_RE} dnat ip to "
                      r"numgen random mod 2 offset (\d+) map @(endpoints-tcp/\d+)", text)
    assert match, text
    base, shard = int(match.group(1)), match.group(2)
    elements = f"\n\t{base} : 10.244.1.2 . 8080,\n\t{base + 1} : 10.244.2.3 . 8080,\n}}"
    assert f"add element inet lbctl {shard} {{{elements}" in text
    assert f"svc/default/web/udp/53 meta l4proto udp {MARK} dnat ip to 10.244.1.2:5353" in text


def test_source_ranges_guard_the_lb_address_but_not_the_node_port() -> None:
    text = Planner().plan_full([web()]).text
    assert "lb/default/web/tcp/80 ip saddr 203.0.113.0/24 goto svc/default/web/tcp/80" in text
    assert "add rule inet lbctl lb/default/web/tcp/80 drop" in text
    assert "192.0.2.10 . tcp . 80 : goto lb/default/web/tcp/80" in text
    assert "tcp . 30080 : goto svc/default/web/tcp/80" in text


def test_local_policy_does_not_masquerade_and_no_endpoints_drops() -> None:
    text = Planner().plan_full([api(), empty()]).text
    assert not re.search(r"svc/prod/api/\S+ meta mark set", text)
    assert "add rule inet lbctl svc/prod/empty/tcp/8000 drop" in text


def test_unchanged_update_plans_nothing() -> None:
    planner = committed(web(), api())
    assert planner.plan_update({"default/web": web(), "prod/api": api()}).lines == []


def test_removing_a_service_deletes_its_elements_and_chains_only() -> None:
    planner = committed(web(), api())
    text = planner.plan_update({"prod/api": None}).text
    assert "delete element inet lbctl service-ips { 192.0.2.11 . tcp . 443 }" in text
    assert "delete element inet lbctl lb-ips { 192.0.2.11 }" in text
    assert "delete chain inet lbctl svc/prod/api/tcp/443" in text
    assert "delete set inet lbctl aff/prod/api/tcp/443/10.244.1.5/8443/600" in text
    assert "default/web" not in text
    # deletions of chains come after the elements that jump to them
    lines = text.splitlines()
    assert lines.index("delete chain inet lbctl svc/prod/api/tcp/443") > max(
        i for i, line in enumerate(lines) if line.startswith("delete element"))


def test_new_chains_come_before_elements_that_jump_to_them() -> None:
    planner = committed(web())
    lines = planner.plan_update({"prod/api": api()}).text.splitlines()
    chain = lines.index("add chain inet lbctl svc/prod/api/tcp/443")
    element = next(i for i, line in enumerate(lines) if "goto svc/prod/api/tcp/443" in line)
    assert chain < element


def test_shared_address_with_disjoint_ports_keeps_the_lb_ip_until_both_are_gone() -> None:
    planner = committed(web(), empty())
    text = planner.plan_update({"prod/empty": None}).text
    assert "lb-ips" not in text  # web still uses 192.0.2.10
    planner.commit(planner.plan_update({"prod/empty": None}))
    assert "delete element inet lbctl lb-ips { 192.0.2.10 }" in planner.plan_update({"default/web": None}).text


def test_clashing_address_goes_to_the_older_service_then_to_the_younger_when_it_leaves() -> None:
    older = empty(key="a/old", created="2024-01-01T00:00:00Z")
    younger = empty(key="b/new", created="2024-02-01T00:00:00Z",
                    ports=(ServicePort("", "tcp", 8000, 30082, (Backend("10.244.3.3", 80),)),))
    plan = Planner().plan_full([younger, older])
    assert "192.0.2.10 . tcp . 8000 : goto svc/a/old/tcp/8000" in plan.text
    assert "goto svc/b/new/tcp/8000 }" not in plan.text.replace("30082 : goto svc/b/new/tcp/8000", "")
    assert [(c.collection, c.winner, c.loser) for c in plan.conflicts] == [(SERVICE_IPS, "a/old", "b/new")]

    planner = Planner()
    planner.commit(plan)
    handover = planner.plan_update({"a/old": None}).text
    assert "delete element inet lbctl service-ips { 192.0.2.10 . tcp . 8000 }" in handover
    assert "add element inet lbctl service-ips { 192.0.2.10 . tcp . 8000 : goto svc/b/new/tcp/8000 }" in handover


def test_udp_backends_that_go_away_are_reported_for_conntrack() -> None:
    planner = committed(web())
    moved = web(ports=(web().ports[0], dataclasses.replace(web().ports[1], backends=(Backend("10.244.2.3", 5353),))))
    plan = planner.plan_update({"default/web": moved})
    assert plan.udp_backends_gone == [("10.244.1.2", 5353)]
    assert planner.plan_full([web()]).udp_backends_gone == []
    assert planner.plan_full([]).udp_backends_gone == [("10.244.1.2", 5353)]


def test_slot_ranges_are_kept_while_big_enough_and_reused_after_release() -> None:
    allocator = SlotAllocator()
    state = web()
    first = allocate(state, {}, allocator)
    assert first == {"default/web/tcp/80": SlotRange(1, 2)}
    assert allocate(state, first, allocator) == first
    more = web(ports=(dataclasses.replace(web().ports[0], backends=tuple(Backend(f"10.244.1.{i}", 80)
                                                                          for i in range(3, 8))),))
    grown = allocate(more, first, allocator)
    assert grown == {"default/web/tcp/80": SlotRange(3, 8)}
    assert allocator.take(2) == SlotRange(1, 2)  # the released range


def test_incremental_plans_follow_slot_moves() -> None:
    planner = committed(web())
    five = tuple(Backend(f"10.244.1.{i}", 8080) for i in range(10, 15))
    bigger = web(ports=(dataclasses.replace(web().ports[0], backends=five), web().ports[1]))
    text = planner.plan_update({"default/web": bigger}).text
    assert "flush chain inet lbctl svc/default/web/tcp/80" in text
    assert "numgen random mod 5 offset 3 map" in text
    assert re.search(r"delete element inet lbctl endpoints-tcp/\d+ \{ 1 \}", text)


def test_hundreds_of_ports_render_one_chain_each() -> None:
    ports = tuple(ServicePort(f"p{i}", "tcp", 1000 + i, 31000 + i, (Backend("10.244.1.3", 2000 + i),))
                  for i in range(400))
    program = render_program(web(ports=ports, source_ranges=None), {})
    assert len(program.chains) == 400
    assert sum(1 for el in program.elements if el.collection == NODE_PORTS) == 400


def test_lines_are_attributed_to_their_service() -> None:
    plan = Planner().plan_full([web(), api()], replace=True)
    for number, line in enumerate(plan.text.splitlines(), start=1):
        owner = plan.owner_of_line(number)
        if "prod/api" in line or "192.0.2.11" in line or "10.244.1.5" in line:
            assert owner == "prod/api", line
        elif "default/web" in line or "10.244.1.2" in line or "10.244.2.3" in line or "192.0.2.10" in line:
            assert owner == "default/web", line
        else:
            assert owner is None, line
    assert plan.owner_of_line(0) is None and plan.owner_of_line(10**6) is None


def test_full_resync_deletes_chains_the_new_state_lacks() -> None:
    planner = committed(web(), api())
    text = planner.plan_full([web()]).text
    assert "flush table inet lbctl" in text and "delete table" not in text
    assert "delete chain inet lbctl svc/prod/api/tcp/443" in text
    assert text.index("flush table inet lbctl") < text.index("delete chain inet lbctl svc/prod/api/tcp/443")


@pytest.mark.parametrize("collection", [SERVICE_IPS, NODE_PORTS, LB_IPS])
def test_every_fixed_collection_is_declared(collection: str) -> None:
    assert f"add {'set' if collection == LB_IPS else 'map'} inet lbctl {collection} " in Planner().plan_full([]).text
    assert ENDPOINTS == "endpoints"


def dual(**changes: object) -> ServiceState:
    """A dual-stack Service: endpoints and LB addresses of both families, ranges of both."""
    state = ServiceState(
        key="prod/dual", uid="u4", created="2024-01-04T00:00:00Z", families=(4, 6),
        ports=(ServicePort("http", "tcp", 80, 30090,
                           (Backend("10.244.1.7", 8080), Backend("10.244.2.7", 8080),
                            Backend("2001:db8:1:1::7", 8080), Backend("2001:db8:1:2::7", 8080))),
               ServicePort("dns", "udp", 53, 30053, (Backend("2001:db8:1:1::7", 5353),))),
        lb_ips=("192.0.2.20", "2001:db8::20"), source_ranges=("203.0.113.0/24", "2001:db8:ff::/48"),
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def test_dual_stack_ruleset_golden() -> None:
    v6_only = dual(key="prod/six", created="2024-01-05T00:00:00Z", families=(6,), lb_ips=("2001:db8::21",),
                   source_ranges=None, local_only=True, affinity_timeout=60,
                   ports=(ServicePort("http", "tcp", 80, 30091, (Backend("2001:db8:1:1::8", 8080),
                                                                  Backend("2001:db8:1:2::8", 8080))),))
    golden("forwarder_dual_stack.nft", Planner().plan_full([dual(), v6_only], replace=True).text)


def test_each_family_goes_to_endpoints_of_its_own_family() -> None:
    text = Planner().plan_full([dual()]).text
    assert re.search(rf"svc/prod/dual/tcp/80 meta nfproto ipv4 meta l4proto tcp {MARK_RE} dnat ip to numgen "
                     r"random mod 2 offset \d+ map @endpoints-tcp/\d+\n", text)
    match = re.search(rf"svc/prod/dual/tcp/80 meta nfproto ipv6 meta l4proto tcp {MARK_RE} dnat ip6 to numgen "
                      r"random mod 2 offset (\d+) map @(endpoints6-tcp/\d+)\n", text)
    assert match, text
    base, shard = int(match.group(1)), match.group(2)
    assert f"add element inet lbctl {shard} {{\n\t{base} : 2001:db8:1:1::7 . 8080,\n\t{base + 1} : " \
           "2001:db8:1:2::7 . 8080,\n}" in text
    assert f"svc/prod/dual/udp/53 meta nfproto ipv6 meta l4proto udp {MARK} dnat ip6 to [2001:db8:1:1::7]:5353" \
        in text
    assert "add rule inet lbctl svc/prod/dual/udp/53 meta nfproto ipv4 drop" in text  # no IPv4 endpoint for dns
    # one chain per port for both families: both addresses and both NodePort maps lead to it
    assert "\t192.0.2.20 . tcp . 80 : goto lb/prod/dual/tcp/80," in text
    assert "\t2001:db8::20 . tcp . 80 : goto lb/prod/dual/tcp/80," in text
    assert "lb/prod/dual/tcp/80 ip saddr 203.0.113.0/24 goto svc/prod/dual/tcp/80\n" in text
    assert "lb/prod/dual/tcp/80 ip6 saddr 2001:db8:ff::/48 goto svc/prod/dual/tcp/80\n" in text
    assert "ip saddr 2001" not in text and "ip6 saddr 203" not in text
    assert "add element inet lbctl node-ports6 {\n\ttcp . 30090 : goto svc/prod/dual/tcp/80," in text
    assert "add element inet lbctl node-ports {\n\ttcp . 30090 : goto svc/prod/dual/tcp/80," in text
    assert "add element inet lbctl lb-ips6 {\n\t2001:db8::20,\n}" in text
    assert text.count("add chain inet lbctl svc/") == 2


def test_a_family_without_listed_ranges_admits_no_one() -> None:
    text = Planner().plan_full([dual(source_ranges=("203.0.113.0/24",))]).text
    rules = [line for line in text.splitlines() if line.startswith("add rule inet lbctl lb/prod/dual/tcp/80 ")]
    assert rules == ["add rule inet lbctl lb/prod/dual/tcp/80 ip saddr 203.0.113.0/24 goto svc/prod/dual/tcp/80",
                     "add rule inet lbctl lb/prod/dual/tcp/80 drop"]


def test_ipv6_affinity_records_the_ipv6_client_in_names_without_colons() -> None:
    text = Planner().plan_full([dual(affinity_timeout=60, source_ranges=None)]).text
    assert "add set inet lbctl aff/prod/dual/tcp/80/ipv6/2001-db8-1-1--7/8080/60 " \
           "{ type ipv6_addr; flags dynamic,timeout; timeout 60s; }" in text
    assert "add rule inet lbctl ep/prod/dual/tcp/80/ipv6/2001-db8-1-1--7/8080 " \
           "update @aff/prod/dual/tcp/80/ipv6/2001-db8-1-1--7/8080/60 { ip6 saddr }" in text
    assert "ep/prod/dual/tcp/80/ipv6/2001-db8-1-1--7/8080 meta l4proto tcp dnat ip6 to [2001:db8:1:1::7]:8080" in text
    assert f"svc/prod/dual/tcp/80 ip6 saddr @aff/prod/dual/tcp/80/ipv6/2001-db8-1-1--7/8080/60 {MARK} goto" \
        in text
    # the random pick among endpoint chains is guarded by family: a chain of the other family would not NAT
    assert re.search(rf"svc/prod/dual/tcp/80 meta nfproto ipv6 {MARK_RE} numgen random mod 2 offset \d+ vmap", text)
    assert re.search(rf"svc/prod/dual/udp/53 meta nfproto ipv6 {MARK_RE} goto ep/prod/dual/udp/53/ipv6/", text)


def test_start_up_removes_the_table_of_earlier_versions() -> None:
    lines = Planner().plan_full([], replace=True).text.splitlines()
    assert lines[:4] == ["add table ip lbctl", "delete table ip lbctl",
                         "add table inet lbctl", "delete table inet lbctl"]
    assert "ip lbctl" not in Planner().plan_full([]).text  # a periodic resync leaves other tables alone


def test_udp_backends_of_both_families_are_reported_for_conntrack() -> None:
    planner = committed(dual())
    plan = planner.plan_update({"prod/dual": dual(ports=dual().ports[:1])})
    assert plan.udp_backends_gone == [("2001:db8:1:1::7", 5353)]
