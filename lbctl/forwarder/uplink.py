"""The node's own link to the node network, read from the kernel (pyroute2; blocking calls, run them
in a thread). Used only when no peer answers, to tell "cut off" from "the peers are gone"
(isolation.py decides)."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

_UP_STATES = ("UP", "UNKNOWN")  # UNKNOWN: drivers that report no operstate (they do report carrier)


def link_up(peer_addresses: list[str]) -> bool | None:
    """Whether the link(s) the kernel routes our peers through are up with a carrier. False when none
    is (a cut veth, an unplugged cable, an interface set down, whose routes are then gone); None
    when there is no IPv4 peer address to route."""
    addresses = [a for a in peer_addresses if ":" not in a]
    if not addresses:
        return None
    with IPRoute() as ipr:
        interfaces: set[int] = set()
        for address in addresses:
            try:
                routes = ipr.route("get", dst=address)
            except NetlinkError:  # no route at all (ENETUNREACH): the link that had it is down
                continue
            for route in routes:
                oif = route.get_attr("RTA_OIF")
                if oif is not None:
                    interfaces.add(int(oif))
        for index in interfaces:
            try:
                (link,) = ipr.link("get", index=index)
            except (NetlinkError, ValueError):
                continue
            carrier = link.get_attr("IFLA_CARRIER")
            if link.get_attr("IFLA_OPERSTATE") in _UP_STATES and carrier != 0:
                return True
    return False


def default_gateways() -> tuple[str, ...]:
    """The IPv4 default gateways of the main routing table: the LAN witnesses when none are configured."""
    with IPRoute() as ipr:
        found = {str(route.get_attr("RTA_GATEWAY")) for route in ipr.get_default_routes(family=socket.AF_INET)
                 if route.get_attr("RTA_GATEWAY")}
    return tuple(sorted(found))
