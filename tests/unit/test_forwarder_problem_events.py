"""Which forwarder posts a Service's problems, and which problems are still to post (pure)."""

from __future__ import annotations

import pytest

from lbctl.forwarder.ownership import choose_owner
from lbctl.forwarder.problem_events import to_post
from lbctl.forwarder.state import Problem

BAD_SLICE = Problem("ns/web", "EndpointSlice web-1: addressType", "IPv6 endpoints for an IPv4 Service")
BAD_RANGE = Problem("ns/web", "spec.loadBalancerSourceRanges[0]", "'x' is not a CIDR")
NODES = ("node-0", "node-1", "node-2")
REPORTER = choose_owner("ns/web", NODES)
OTHER = next(n for n in NODES if n != REPORTER)


@pytest.mark.parametrize(
    ("node", "alive", "posted", "expected"),
    [
        (REPORTER, NODES, {}, {"ns/web": {BAD_SLICE, BAD_RANGE}}),
        (OTHER, NODES, {}, {}),  # another node's job
        (REPORTER, NODES, {"ns/web": {BAD_SLICE}}, {"ns/web": {BAD_RANGE}}),  # posted already
        (REPORTER, NODES, {"ns/web": {BAD_SLICE, BAD_RANGE}}, {}),
        (OTHER, (OTHER,), {}, {"ns/web": {BAD_SLICE, BAD_RANGE}}),  # the reporter is gone: we are it
        (OTHER, (), {}, {"ns/web": {BAD_SLICE, BAD_RANGE}}),  # we count ourselves alive
    ],
)
def test_to_post(node: str, alive: tuple[str, ...], posted: dict[str, set[Problem]],
                 expected: dict[str, set[Problem]]) -> None:
    problems = {"ns/web": (BAD_SLICE, BAD_RANGE)}
    frozen = {k: frozenset(v) for k, v in posted.items()}
    assert to_post(problems, frozen, node, alive) == {k: frozenset(v) for k, v in expected.items()}


def test_every_node_agrees_on_one_reporter() -> None:
    keys = [f"ns/s{i}" for i in range(200)]
    for key in keys:
        posting = [n for n in NODES if to_post({key: (BAD_SLICE,)}, {}, n, NODES)]
        assert len(posting) == 1
