"""The planner against a model of the kernel: random sequences of changes, applied as incremental
transactions, must end where a fresh full sync of the final state ends — with nothing left over.

The model interprets our subset of nft commands with the kernel's strictness: deleting a missing
element or chain fails, a chain still jumped to cannot be deleted, an element key cannot be added
twice. (tests/dataplane/test_forwarder_nft.py runs the real nft; this runs thousands of steps.)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import pytest

from lbctl.forwarder.render import Plan, Planner
from lbctl.forwarder.state import Backend, ServicePort, ServiceState

_ELEMENTS = re.compile(r"^(add|delete) element ip lbctl (\S+) \{ (.*) \}$")
_PICK = re.compile(r"numgen random mod (\d+) offset (\d+) (v?map) @(\S+)")


class ModelError(AssertionError):
    pass


@dataclass
class Kernel:
    chains: dict[str, list[str]] = field(default_factory=dict)
    collections: dict[str, dict[str, str]] = field(default_factory=dict)

    def apply(self, text: str) -> None:
        """All or nothing, like a transaction."""
        trial = Kernel({k: list(v) for k, v in self.chains.items()}, {k: dict(v) for k, v in self.collections.items()})
        pending: list[str] = []
        for line in text.splitlines():
            if pending or line.endswith("{"):  # a list of elements, one per line
                pending.append(line.strip().rstrip(","))
                if line == "}":
                    trial._one(f"{pending[0]} {', '.join(pending[1:-1])} }}")
                    pending = []
                continue
            trial._one(line)
        assert not pending, "unterminated element list"
        self.chains, self.collections = trial.chains, trial.collections

    def _one(self, line: str) -> None:
        words = line.split()
        verb, kind = words[0], words[1]
        if (verb, kind) in (("add", "table"), ("flush", "table")):
            if verb == "flush":  # rules go; chains, maps and sets stay
                self.chains = {name: [] for name in self.chains}
            return
        if (verb, kind) == ("delete", "table"):
            self.chains, self.collections = {}, {}
            return
        name = words[4] if kind in ("map", "set", "chain") else ""
        if kind in ("map", "set"):
            if verb == "add":
                self.collections.setdefault(name, {})
            elif verb == "flush":
                self.collections[name].clear()
            else:
                del self.collections[name]
        elif kind == "chain":
            if verb == "add":
                self.chains.setdefault(name, [])
            elif verb == "flush":
                self.chains[name] = []
            else:
                if name not in self.chains:
                    raise ModelError(f"{line}: no such chain")
                users = [c for c, rules in self.chains.items() if c != name and any(
                    re.search(rf"(goto|jump) {re.escape(name)}$", r) for r in rules)]
                users += [m for m, els in self.collections.items() if f"goto {name}" in els.values()]
                if users:
                    raise ModelError(f"{line}: still used by {users}")
                del self.chains[name]
        elif kind == "rule":
            self.chains[words[4]].append(" ".join(words[5:]))
        elif kind == "element":
            match = _ELEMENTS.match(line)
            assert match, line
            collection = self.collections[match.group(2)]
            for item in match.group(3).split(", "):
                key, _, value = item.partition(" : ")
                if verb == "add":
                    if key in collection and collection[key] != value:
                        raise ModelError(f"{line}: {key} exists")
                    collection[key] = value
                elif key not in collection:
                    raise ModelError(f"{line}: no element {key}")
                else:
                    del collection[key]

    def canonical(self) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
        """Chains with each random pick spelt out (slot numbers differ between histories), and the
        shared maps; fails on endpoint elements no rule can reach."""
        reached: set[tuple[str, str]] = set()

        def spell(rule: str) -> str:
            match = _PICK.search(rule)
            if not match:
                return rule
            count, base, kind, name = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            picked = []
            for slot in range(base, base + count):
                reached.add((name, str(slot)))
                picked.append(self.collections[name][str(slot)])
            return rule[:match.start()] + f"pick {kind} {picked}" + rule[match.end():]

        chains = {name: [spell(r) for r in rules] for name, rules in self.chains.items()}
        for name, elements in self.collections.items():
            if name.startswith(("endpoints-", "endpoint-chains/")):
                leaked = {k for k in elements if (name, k) not in reached}
                assert not leaked, f"{name} keeps unreachable slots {leaked}"
        shared = {n: dict(e) for n, e in self.collections.items() if not n.startswith(("endpoints-", "endpoint-"))}
        return chains, shared


IPS = [f"10.244.{n}.{h}" for n in range(2) for h in range(2, 6)]


def random_state(rng: random.Random, key: str, created: str) -> ServiceState:
    ports = []
    for number in rng.sample([53, 80, 443, 8080], rng.randint(1, 3)):
        protocol = rng.choice(["tcp", "udp"])
        backends = tuple(sorted(Backend(ip, rng.choice([8080, 9090])) for ip in rng.sample(IPS, rng.randint(0, 5))))
        ports.append(ServicePort(f"p{number}", protocol, number, rng.choice([None, 30000 + number, 31000 + number]),
                                 tuple(sorted(set(backends)))))
    return ServiceState(
        key=key, uid=key, created=created, ports=tuple(ports),
        lb_ips=tuple(rng.sample(["192.0.2.1", "192.0.2.2", "192.0.2.3"], rng.randint(0, 2))),
        local_only=rng.random() < 0.3,
        source_ranges=rng.choice([None, (), ("203.0.113.0/24",), ("203.0.113.0/24", "198.51.100.0/24")]),
        affinity_timeout=rng.choice([None, None, 60, 600]),
    )


@pytest.mark.parametrize("seed", range(40))
def test_incremental_history_ends_where_a_full_sync_ends(seed: int) -> None:
    rng = random.Random(seed)
    keys = [f"ns{i % 2}/svc{i}" for i in range(6)]
    created = {k: f"2024-01-0{i + 1}T00:00:00Z" for i, k in enumerate(keys)}
    current: dict[str, ServiceState] = {k: random_state(rng, k, created[k]) for k in rng.sample(keys, 3)}
    planner, kernel = Planner(), Kernel()

    def run(plan: Plan) -> None:
        kernel.apply(plan.text)
        planner.commit(plan)

    run(planner.plan_full(current.values(), replace=True))
    for step in range(30):
        changes: dict[str, ServiceState | None] = {}
        for key in rng.sample(keys, rng.randint(1, 3)):
            changes[key] = None if rng.random() < 0.25 else random_state(rng, key, created[key])
        for key, state in changes.items():
            if state is None:
                current.pop(key, None)
            else:
                current[key] = state
        if step % 10 == 9:
            run(planner.plan_full(current.values()))  # the periodic resync, in between
        else:
            run(planner.plan_update(changes))

    fresh = Kernel()
    fresh.apply(Planner().plan_full(current.values(), replace=True).text)
    assert kernel.canonical() == fresh.canonical()
