"""Warning Events for what the forwarder had to leave out of a Service's rules: an endpoint of a
family the Service lacks, an address or source range it cannot use, a timeout out of range (the
Problems of lbctl.forwarder.desired). The log of one node is no place for them: users read Events.

Every forwarder sees the same objects and finds the same problems, so one node posts them: the
rendezvous choice among the live nodes for the Service's key (as for VIP owners), which every node
computes alike, with no coordination. When that node dies, the next choice posts on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lbctl.forwarder.ownership import choose_owner
from lbctl.forwarder.state import Problem
from lbctl.kube.client import KubeClient
from lbctl.kube.events import EventRecorder

REASON = "ForwardingProblem"


def to_post(problems: Mapping[str, tuple[Problem, ...]], posted: Mapping[str, frozenset[Problem]], node: str,
            alive: Iterable[str]) -> dict[str, frozenset[Problem]]:
    """Per Service this node reports for: the problems it has not posted yet (pure)."""
    candidates = frozenset(alive) | {node}
    fresh = {}
    for key, found in problems.items():
        if choose_owner(key, candidates) != node:
            continue
        new = frozenset(found) - posted.get(key, frozenset())
        if new:
            fresh[key] = new
    return fresh


class ProblemEvents:
    """Posts each problem once while it lasts (the recorder folds repeats into one Event's count and
    writes in the background: the apiserver may be away)."""

    def __init__(self, node: str, client: KubeClient,
                 service_lookup: Callable[[str], Mapping[str, Any] | None]) -> None:
        self._node = node
        # the reporting node is the Event's source host: `kubectl describe` says who saw it
        self._events = EventRecorder(client, component="lbctl-forwarder", instance=node)
        self._lookup = service_lookup
        self._posted: dict[str, frozenset[Problem]] = {}

    async def update(self, problems: Mapping[str, tuple[Problem, ...]], alive: Iterable[str]) -> None:
        # what was fixed is forgotten, so that it is posted again if it comes back
        self._posted = {k: v & frozenset(problems[k]) for k, v in self._posted.items() if k in problems}
        for key, new in to_post(problems, self._posted, self._node, alive).items():
            service = self._lookup(key)
            if service is None:
                continue
            for problem in sorted(new, key=lambda p: (p.field, p.message)):
                await self._events.warning(service, REASON, f"{problem.field}: {problem.message}")
            self._posted[key] = self._posted.get(key, frozenset()) | new

    async def close(self) -> None:
        await self._events.close(timeout_s=1.0)
