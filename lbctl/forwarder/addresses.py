"""VIP/32 on a local interface and gratuitous ARP (pyroute2 and a packet socket; blocking calls,
run them in a thread).

The VIP goes on a dummy interface where the kernel has the driver, else on `lo`: a /32 on lo is
local to the node and, with the default arp_ignore=0, answered by ARP on the uplink. Addresses we
add carry the label "<interface>:lbctl", so a restarted forwarder finds (and removes) the ones an
earlier run left behind.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

DUMMY_NAME = "lbctl0"
_IFNAMSIZ = 15
_ETH_P_ARP = 0x0806
_EEXIST = 17
_EADDRNOTAVAIL = 99


def label_for(interface: str) -> str:
    return f"{interface}:lbctl"[:_IFNAMSIZ]


def gratuitous_arp_frame(mac: str, ip: str) -> bytes:
    """An Ethernet broadcast ARP request for `ip` from `ip` (RFC 5227's announcement)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6:
        raise ValueError(f"{mac!r} is not an Ethernet address")
    proto = ipaddress.IPv4Address(ip).packed
    ethernet = b"\xff" * 6 + hw + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + proto + b"\x00" * 6 + proto
    return ethernet + arp


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mac: str


class VipAddresses:
    """The interface that holds VIPs, and the uplinks announced on."""

    def __init__(self, vip_interface: str | None = None, announce_interface: str | None = None) -> None:
        self._wanted_vip_interface = vip_interface
        self._announce_interface = announce_interface
        self.interface = ""
        self._index = 0

    def prepare(self) -> str:
        """Pick (and create or bring up) the VIP interface; returns its name."""
        with IPRoute() as ip:
            name = self._wanted_vip_interface
            if name is None:
                name = DUMMY_NAME
                if not ip.link_lookup(ifname=name):
                    try:
                        ip.link("add", ifname=name, kind="dummy")
                    except NetlinkError as exc:  # no dummy driver in this kernel
                        log.info("no dummy interface (%s); VIPs go on lo", exc)
                        name = "lo"
            found = ip.link_lookup(ifname=name)
            if not found:
                raise RuntimeError(f"interface {name} does not exist; pick another with --vip-interface")
            self._index = int(found[0])
            ip.link("set", index=self._index, state="up")
        self.interface = name
        return name

    def current(self) -> set[str]:
        """The VIPs on our interface that carry our label."""
        label = label_for(self.interface)
        with IPRoute() as ip:
            return {str(a.get("address")) for a in ip.get_addr(index=self._index, family=socket.AF_INET)
                    if a.get("label") == label and a.get("prefixlen") == 32}

    def add(self, vip: str) -> None:
        with IPRoute() as ip:
            try:
                ip.addr("add", index=self._index, address=vip, prefixlen=32, label=label_for(self.interface))
            except NetlinkError as exc:
                if exc.code != _EEXIST:
                    raise

    def remove(self, vip: str) -> None:
        with IPRoute() as ip:
            try:
                ip.addr("del", index=self._index, address=vip, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != _EADDRNOTAVAIL:
                    raise

    def announce_links(self, vip: str) -> list[Link]:
        """--interface if given; else every up interface with a connected prefix holding `vip`; else
        the interface of the default route."""
        address = ipaddress.IPv4Address(vip)
        with IPRoute() as ip:
            links = {int(link["index"]): link for link in ip.get_links()}
            chosen: list[int] = []
            if self._announce_interface:
                chosen = [int(i) for i in ip.link_lookup(ifname=self._announce_interface)]
            else:
                for a in ip.get_addr(family=socket.AF_INET):
                    idx = int(a["index"])
                    if idx == self._index or links.get(idx) is None or links[idx].get("ifname") == "lo":
                        continue
                    net = ipaddress.IPv4Network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
                    if address in net and net.prefixlen < 32 and idx not in chosen:
                        chosen.append(idx)
                if not chosen:
                    for route in ip.get_default_routes(family=socket.AF_INET):
                        oif = route.get("oif")
                        if oif is not None and int(oif) not in chosen:
                            chosen.append(int(oif))
            result = []
            for idx in chosen:
                link = links.get(idx)
                mac = link.get("address") if link is not None else None
                if link is None or not mac or mac == "00:00:00:00:00:00":
                    continue
                result.append(Link(str(link.get("ifname")), idx, str(mac)))
            return result

    def send_gratuitous_arp(self, vip: str) -> list[str]:
        """One announcement on every announce link; returns the link names used."""
        sent = []
        for link in self.announce_links(vip):
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
                sock.bind((link.name, _ETH_P_ARP))
                sock.send(gratuitous_arp_frame(link.mac, vip))
            sent.append(link.name)
        return sent
