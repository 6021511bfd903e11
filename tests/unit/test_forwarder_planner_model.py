"""The planner against a model of the kernel: random sequences of changes, applied as incremental
transactions, must end where a fresh full sync of the final state ends — with nothing left over.

The model interprets the plans' typed operations (lbctl.forwarder.nftables), not their text, with
the kernel's strictness: deleting a missing
element or chain fails, a chain still jumped to cannot be deleted, an element key cannot be added
twice. (tests/dataplane/test_forwarder_nft.py runs the real nft; this runs thousands of steps.)
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from lbctl.forwarder.nftables import (
    Chain,
    DnatRandom,
    Element,
    Goto,
    Jump,
    Map,
    Op,
    RandomVerdict,
    Rule,
    Set,
    Statement,
    Table,
    Verb,
)
from lbctl.forwarder.render import ELEMENT_COLLECTIONS, Plan, Planner, collection_label
from lbctl.forwarder.state import Backend, ServicePort, ServiceState

Key = object
Spelt = tuple[object, ...]


class ModelError(AssertionError):
    pass


@dataclass
class Kernel:
    chains: dict[str, list[tuple[Statement, ...]]] = field(default_factory=dict)
    collections: dict[str, dict[Key, object]] = field(default_factory=dict)

    def apply(self, ops: list[Op]) -> None:
        """All or nothing, like a transaction."""
        trial = Kernel({k: list(v) for k, v in self.chains.items()}, {k: dict(v) for k, v in self.collections.items()})
        for op in ops:
            trial._one(op)
        self.chains, self.collections = trial.chains, trial.collections

    def _one(self, op: Op) -> None:
        verb, obj = op.verb, op.object
        if isinstance(obj, Table):
            if verb is Verb.FLUSH:  # rules go; chains, maps and sets stay
                self.chains = {name: [] for name in self.chains}
            elif verb is Verb.DELETE:
                self.chains, self.collections = {}, {}
        elif isinstance(obj, Map | Set):
            if verb is Verb.ADD:
                self.collections.setdefault(obj.name, {})
            elif verb is Verb.FLUSH:
                self.collections[obj.name].clear()
            else:
                del self.collections[obj.name]
        elif isinstance(obj, Chain):
            if verb is Verb.ADD:
                self.chains.setdefault(obj.name, [])
            elif verb is Verb.FLUSH:
                self.chains[obj.name] = []
            else:
                self._delete_chain(obj.name)
        elif isinstance(obj, Rule):
            assert verb is Verb.ADD, op
            self.chains[obj.chain].append(obj.statements)
        elif isinstance(obj, Element):
            collection = self.collections[obj.collection]
            if verb is Verb.ADD:
                if obj.key in collection and collection[obj.key] != obj.value:
                    raise ModelError(f"{op}: {obj.key} exists")
                collection[obj.key] = obj.value
            elif obj.key not in collection:
                raise ModelError(f"{op}: no element {obj.key}")
            else:
                del collection[obj.key]
        else:
            raise AssertionError(f"unexpected operation {op}")

    def _delete_chain(self, name: str) -> None:
        if name not in self.chains:
            raise ModelError(f"delete chain {name}: no such chain")
        jumps = (Goto(name), Jump(name))
        users = [c for c, rules in self.chains.items() if c != name and any(
            rule and rule[-1] in jumps for rule in rules)]
        users += [m for m, els in self.collections.items() if Goto(name) in els.values()]
        if users:
            raise ModelError(f"delete chain {name}: still used by {users}")
        del self.chains[name]

    def canonical(self) -> tuple[dict[str, list[Spelt]], dict[str, dict[Key, object]]]:
        """Chains with each random pick spelt out (slot numbers differ between histories), and the
        shared maps; fails on endpoint elements no rule can reach."""
        reached: set[tuple[str, Key]] = set()

        def spell(statement: Statement) -> object:
            if not isinstance(statement, RandomVerdict | DnatRandom):
                return statement
            picked = []
            for slot in range(statement.offset, statement.offset + statement.size):
                reached.add((statement.map, slot))
                picked.append(self.collections[statement.map][slot])
            return ("pick", type(statement).__name__, picked)

        chains = {name: [tuple(spell(s) for s in rule) for rule in rules] for name, rules in self.chains.items()}
        for name, elements in self.collections.items():
            if name.startswith(("endpoints", "endpoint-chains")):
                leaked = {k for k in elements if (name, k) not in reached}
                assert not leaked, f"{name} keeps unreachable slots {leaked}"
        shared = {n: dict(e) for n, e in self.collections.items() if not n.startswith(("endpoints", "endpoint-"))}
        return chains, shared


IPS = [f"10.244.{n}.{h}" for n in range(2) for h in range(2, 6)] + [f"2001:db8:1:{n}::{h}" for n in range(2)
                                                                   for h in range(2, 5)]
FAMILY_SETS = [(4,), (4,), (6,), (4, 6)]


def random_state(rng: random.Random, key: str, created: str) -> ServiceState:
    families = rng.choice(FAMILY_SETS)
    ports = []
    for number in rng.sample([53, 80, 443, 8080], rng.randint(1, 3)):
        protocol = rng.choice(["tcp", "udp"])
        ips = [ip for ip in IPS if (6 if ":" in ip else 4) in families]
        backends = tuple(sorted(Backend(ip, rng.choice([8080, 9090])) for ip in rng.sample(ips, rng.randint(0, 5))))
        ports.append(ServicePort(f"p{number}", protocol, number, rng.choice([None, 30000 + number, 31000 + number]),
                                 tuple(sorted(set(backends)))))
    lb_ips = [ip for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2"]
              if (6 if ":" in ip else 4) in families]
    ranges = [("203.0.113.0/24",), ("203.0.113.0/24", "198.51.100.0/24"), ("2001:db8:ff::/48",),
              ("203.0.113.0/24", "2001:db8:ff::/48")]
    return ServiceState(
        key=key, uid=key, created=created, ports=tuple(ports), families=families,
        lb_ips=tuple(rng.sample(lb_ips, rng.randint(0, 2))),
        local_only=rng.random() < 0.3,
        source_ranges=rng.choice([None, (), *ranges]),
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
        kernel.apply(plan.ops)
        planner.commit(plan)
        # the gauges of what is programmed (lbctl_forwarder_nft_rules, _nft_elements) count what the kernel holds
        assert planner.rules == sum(len(rules) for rules in kernel.chains.values())
        held = Counter(collection_label(name) for name, elements in kernel.collections.items() for _ in elements)
        assert planner.elements == {label: held.get(label, 0) for label in ELEMENT_COLLECTIONS}
        assert set(held) <= set(ELEMENT_COLLECTIONS)

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
    fresh.apply(Planner().plan_full(current.values(), replace=True).ops)
    assert kernel.canonical() == fresh.canonical()
