"""Alone: cut off, or the last one standing? (pure; time is passed in)

When no peer answers (`Membership.isolated`), a forwarder either lost its own link to the node
network (it must give up its VIPs: they have moved to nodes the clients can reach, and holding them
would answer ARP next to the new holders once the link is back), or every peer died (it must keep
its VIPs and take theirs: it is the only node left to serve). The apiserver can tell the two apart,
but it may be gone too, or run on a node that died; so the judgement first uses what needs no
apiserver:

1. the apiserver answers: the peers are gone (we reach the network, they do not);
2. the link to the node network is down (no carrier, or no route to the peers any more): cut off;
3. a LAN witness (the default gateway of the node network, or the `--lan-probe` addresses) answers
   ICMP echo: we are on the LAN and the peers are gone;
4. the witnesses have been probed for less than `window` and none answered yet: undecided, so keep
   what we hold and take nothing until the next look;
5. otherwise (no witness answers, or there is none to ask): cut off.

With no witness at all the rule is the old one: no peer and no apiserver means cut off, which
in a 2-node cluster whose other node died (with the apiserver on it) gives up every VIP; so the
forwarder warns at start-up when it has no witness.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    PEERS_GONE = "peers-gone"  # keep our VIPs, take the dead peers'
    CUT_OFF = "cut-off"  # give every VIP up
    UNDECIDED = "undecided"  # hold what we hold, take nothing, look again


@dataclass(frozen=True)
class Evidence:
    api_reachable: bool
    link_up: bool | None  # the node network's link; None: not known (no peer address routed yet)
    witnesses: int  # how many LAN witnesses there are to ask
    witness_answered: bool  # one of them answered within the window
    witness_pending: bool  # probed for less than the window, no answer yet


def judge(evidence: Evidence) -> Verdict:
    if evidence.api_reachable:
        return Verdict.PEERS_GONE
    if evidence.link_up is False:
        return Verdict.CUT_OFF
    if evidence.witness_answered:
        return Verdict.PEERS_GONE
    if evidence.witnesses and evidence.witness_pending:
        return Verdict.UNDECIDED
    return Verdict.CUT_OFF


class Witnesses:
    """LAN addresses other than the peers whose ICMP echo replies say "we are on the LAN"; probed
    only while needed (a peer is silent or none answers), so a healthy cluster sends them nothing."""

    def __init__(self, addresses: tuple[str, ...] = (), window: float = 1.0) -> None:
        self.addresses = tuple(a for a in addresses if ":" not in a)  # the ICMP socket is IPv4
        self.window = window
        self._probing_since: float | None = None
        self._last_reply: float | None = None

    def set_addresses(self, addresses: tuple[str, ...]) -> None:
        self.addresses = tuple(a for a in addresses if ":" not in a)

    def to_probe(self, needed: bool, now: float) -> tuple[str, ...]:
        if not needed or not self.addresses:
            self._probing_since = None
            return ()
        if self._probing_since is None:
            self._probing_since = now
        return self.addresses

    def echo_reply(self, address: str, now: float) -> None:
        if address in self.addresses:
            self._last_reply = now

    def answered(self, now: float) -> bool:
        return self._last_reply is not None and now - self._last_reply < self.window

    def pending(self, now: float) -> bool:
        return not self.answered(now) and (self._probing_since is None or now - self._probing_since < self.window)
