"""The operator's defaults, each defined once: the command line (lbctl.cli), OperatorConfig
(lbctl.operator.app) and ReconcilerSettings (lbctl.operator.reconciler) all read them here."""

from __future__ import annotations

from lbctl.model.meta import SYSTEM_NAMESPACE

WORKERS = 32  # concurrent syncs
NODE_PORT_RANGE = (30000, 32767)  # the apiserver's default --service-node-port-range
GC_INTERVAL_S = 300.0  # between orphan sweeps
RESYNC_INTERVAL_S = 600.0  # between full re-syncs of every Service
NODE_DEBOUNCE_S = 0.2  # one batch per burst of node changes
RESOURCE_DEBOUNCE_S = 0.05  # one batch per burst of pool or BGPPeer changes
FIRST_SWEEP_S = 10.0  # the first orphan sweep after a takeover that asked for one soon
STATUS_REFRESH_S = 1.0  # pool/peer status written at most this often while assignments change
CLAIM_RETRY_S = 0.05  # a NodePort claim that lost a race is tried again (with other ports) after this

LEASE_NAME = "lbctl-operator"
LEASE_NAMESPACE = SYSTEM_NAMESPACE
LEASE_DURATION_S = 3
RENEW_DEADLINE_S = 2.0
RETRY_PERIOD_S = 0.5


def port_range_text(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}-{bounds[1]}"
