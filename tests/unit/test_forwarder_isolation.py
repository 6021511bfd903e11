"""Alone on the node network: cut off (give every VIP up) or the last one standing (keep them)?"""

from __future__ import annotations

import pytest

from lbctl.forwarder.isolation import Evidence, Verdict, Witnesses, judge


def evidence(api: bool = False, link: bool | None = True, witnesses: int = 1, answered: bool = False,
             pending: bool = False) -> Evidence:
    return Evidence(api_reachable=api, link_up=link, witnesses=witnesses, witness_answered=answered,
                    witness_pending=pending)


@pytest.mark.parametrize(("case", "given", "verdict"), [
    ("the apiserver answers: they are gone, not us", evidence(api=True, link=None, witnesses=0), Verdict.PEERS_GONE),
    ("the apiserver outranks a link read as down", evidence(api=True, link=False), Verdict.PEERS_GONE),
    ("our link is down (a cut veth, no carrier)", evidence(link=False, answered=True), Verdict.CUT_OFF),
    ("link up and the gateway answers: a sole survivor", evidence(answered=True), Verdict.PEERS_GONE),
    ("link state unknown, the gateway answers", evidence(link=None, answered=True), Verdict.PEERS_GONE),
    ("link up, the gateway not asked long enough yet", evidence(pending=True), Verdict.UNDECIDED),
    ("link up, the gateway silent for the whole window", evidence(), Verdict.CUT_OFF),
    ("no witness at all: the old rule, cut off", evidence(witnesses=0), Verdict.CUT_OFF),
    ("no witness: pending means nothing", evidence(witnesses=0, pending=True), Verdict.CUT_OFF),
    ("link down while the witnesses are still being asked", evidence(link=False, pending=True), Verdict.CUT_OFF),
])
def test_judge(case: str, given: Evidence, verdict: Verdict) -> None:
    assert judge(given) is verdict, case


def test_witnesses_are_probed_only_while_needed_and_answer_within_the_window() -> None:
    witnesses = Witnesses(("192.0.2.1", "2001:db8::1"), window=1.0)
    assert witnesses.addresses == ("192.0.2.1",)  # the ICMP socket is IPv4
    assert witnesses.to_probe(False, 0.0) == ()
    assert witnesses.to_probe(True, 10.0) == ("192.0.2.1",)
    assert witnesses.pending(10.5) and not witnesses.answered(10.5)
    assert not witnesses.pending(11.0)  # asked for the whole window, no answer
    witnesses.echo_reply("192.0.2.99", 11.1)  # not a witness
    assert not witnesses.answered(11.1)
    witnesses.echo_reply("192.0.2.1", 11.2)
    assert witnesses.answered(12.1) and not witnesses.pending(12.1)
    assert not witnesses.answered(12.2)  # replies stopped a window ago
    assert witnesses.to_probe(False, 13.0) == ()
    witnesses.to_probe(True, 20.0)  # a new episode: pending again from its own start
    assert witnesses.pending(20.5)


def test_no_witness_is_never_pending_for_long_and_never_answers() -> None:
    witnesses = Witnesses()
    assert witnesses.to_probe(True, 0.0) == ()
    assert not witnesses.answered(0.5)


def test_a_lan_probe_that_is_no_ipv4_address_is_refused_with_the_fix() -> None:
    from lbctl.forwarder.main import ForwarderConfig

    with pytest.raises(ValueError, match=r"--lan-probe 'gw\.example' is not an IPv4 address .*default gateway"):
        ForwarderConfig(node="n1", lan_probes=("gw.example",))
    assert ForwarderConfig(node="n1", lan_probes=("192.0.2.1",)).lan_probes == ("192.0.2.1",)
