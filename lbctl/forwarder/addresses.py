"""VIPs on the node and their announcements: IPv4 VIP/32 with gratuitous ARP, IPv6 VIP/128 with
unsolicited neighbour advertisements (pyroute2, a packet socket and an ICMPv6 socket; blocking
calls, run them in a thread).

IPv4: the VIP goes on a dummy interface where the kernel has the driver, else on `lo`: a /32 on lo
is local to the node and, with the default arp_ignore=0, answered by ARP on the uplink. Addresses
we add carry the label "<interface>:lbctl", so a restarted forwarder finds (and removes) the ones an
earlier run left behind.

IPv6: a /128 on `lo` is local but NOT answered by neighbour discovery: the kernel answers a
neighbour solicitation only for an address on the interface it arrived on (or through proxy NDP,
which needs forwarding on, proxy_ndp on, an entry per address, and delays each answer to a
multicast solicitation by up to proxy_delay, 0.8 s by default). So the IPv6 VIP goes on the
announce interface itself (the uplink whose prefix holds it), which the kernel then answers for
at once, as for any of its addresses, with:
- `nodad`: no duplicate address detection, so the address is usable the moment it is added (DAD
  would hold it tentative for a second or more, and fail it while the old owner still answers);
- preferred lifetime 0 (deprecated): the node never picks the VIP as the source of its own
  connections (RFC 6724 rule 3), which would break them when the VIP moves; a deprecated address
  still receives traffic and is still answered for;
- address protocol `ADDRESS_PROTO` (IFA_PROTO; IPv6 addresses have no labels): how a restarted
  forwarder finds the ones an earlier run left.
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
ADDRESS_PROTO = 0x4C  # IFA_PROTO of our IPv6 VIPs ("L"); the kernel's own are 0-3
_IFA_F_NODAD = 0x02
_INFINITY = 0xFFFFFFFF
_ALL_NODES = "ff02::1"
_ND_NEIGHBOR_ADVERT = 136
_NA_ROUTER, _NA_SOLICITED, _NA_OVERRIDE = 0x80, 0x40, 0x20
_OPT_TARGET_LLADDR = 2


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


def unsolicited_na(mac: str, ip: str, router: bool = False) -> bytes:
    """The ICMPv6 body of an unsolicited neighbour advertisement for `ip` at `mac` (RFC 4861 4.4,
    7.2.6): override set (receivers replace the link-layer address they have), solicited clear,
    router as the sender's forwarding says, with the target link-layer address option. The
    checksum stays 0: the kernel fills it in on an ICMPv6 socket."""
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6:
        raise ValueError(f"{mac!r} is not an Ethernet address")
    flags = _NA_OVERRIDE | (_NA_ROUTER if router else 0)
    target = ipaddress.IPv6Address(ip).packed
    return (struct.pack("!BBHB3x", _ND_NEIGHBOR_ADVERT, 0, 0, flags) + target
            + struct.pack("!BB", _OPT_TARGET_LLADDR, 1) + hw)


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def canonical(ip: str) -> str:
    """The one spelling of an address (IPv6 has many): VIPs are compared as strings."""
    return str(ipaddress.ip_address(ip))


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
        """The VIPs an earlier run or we put on the node: IPv4 on our interface with our label,
        IPv6 anywhere with our address protocol."""
        label = label_for(self.interface)
        with IPRoute() as ip:
            found = {str(a.get("address")) for a in ip.get_addr(index=self._index, family=socket.AF_INET)
                     if a.get("label") == label and a.get("prefixlen") == 32}
            found |= {canonical(str(a.get("address"))) for a in ip.get_addr(family=socket.AF_INET6)
                      if a.get("IFA_PROTO") == ADDRESS_PROTO and a.get("prefixlen") == 128}
        return found

    def add(self, vip: str) -> None:
        """IPv4: VIP/32 on the VIP interface. IPv6: VIP/128 on each announce link (see the module
        docstring); raises when there is none."""
        if family_of(vip) == socket.AF_INET6:
            links = self.announce_links(vip)
            if not links:
                raise RuntimeError(f"no interface has an IPv6 prefix holding {vip} (nor an IPv6 default route): "
                                   "give the LAN interface with --interface")
            with IPRoute() as ip:
                for link in links:
                    try:
                        ip.addr("add", index=link.index, address=vip, prefixlen=128, flags=_IFA_F_NODAD,
                                proto=ADDRESS_PROTO, IFA_CACHEINFO={"ifa_preferred": 0, "ifa_valid": _INFINITY})
                    except NetlinkError as exc:
                        if exc.code != _EEXIST:
                            raise
            return
        with IPRoute() as ip:
            try:
                ip.addr("add", index=self._index, address=vip, prefixlen=32, label=label_for(self.interface))
            except NetlinkError as exc:
                if exc.code != _EEXIST:
                    raise

    def remove(self, vip: str) -> None:
        with IPRoute() as ip:
            if family_of(vip) == socket.AF_INET6:
                wanted = canonical(vip)
                for a in ip.get_addr(family=socket.AF_INET6):
                    if (a.get("IFA_PROTO") == ADDRESS_PROTO and a.get("prefixlen") == 128
                            and canonical(str(a.get("address"))) == wanted):
                        try:
                            ip.addr("del", index=int(a["index"]), address=wanted, prefixlen=128)
                        except NetlinkError as exc:
                            if exc.code != _EADDRNOTAVAIL:
                                raise
                return
            try:
                ip.addr("del", index=self._index, address=vip, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != _EADDRNOTAVAIL:
                    raise

    def announce_links(self, vip: str) -> list[Link]:
        """--interface if given; else every up interface with a connected prefix holding `vip` (of
        its family); else the interface of the family's default route."""
        address = ipaddress.ip_address(vip)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        with IPRoute() as ip:
            links = {int(link["index"]): link for link in ip.get_links()}
            chosen: list[int] = []
            if self._announce_interface:
                chosen = [int(i) for i in ip.link_lookup(ifname=self._announce_interface)]
            else:
                for a in ip.get_addr(family=family):
                    idx = int(a["index"])
                    if idx == self._index or links.get(idx) is None or links[idx].get("ifname") == "lo":
                        continue
                    if a.get("IFA_PROTO") == ADDRESS_PROTO:
                        continue  # one of our VIPs, not the node's prefix
                    net = ipaddress.ip_network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
                    if address in net and net.prefixlen < address.max_prefixlen and idx not in chosen:
                        chosen.append(idx)
                if not chosen:
                    for route in ip.get_default_routes(family=family):
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

    def announce(self, vip: str) -> list[str]:
        """One announcement on every announce link (gratuitous ARP for IPv4, an unsolicited
        neighbour advertisement for IPv6); returns the link names used."""
        if family_of(vip) == socket.AF_INET6:
            return self.send_unsolicited_na(vip)
        return self.send_gratuitous_arp(vip)

    def send_gratuitous_arp(self, vip: str) -> list[str]:
        """One announcement on every announce link; returns the link names used."""
        sent = []
        for link in self.announce_links(vip):
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
                sock.bind((link.name, _ETH_P_ARP))
                sock.send(gratuitous_arp_frame(link.mac, vip))
            sent.append(link.name)
        return sent

    def send_unsolicited_na(self, vip: str) -> list[str]:
        """An unsolicited NA to all nodes (ff02::1) on every announce link, from the VIP itself
        (an address of that link; its link-local may still be tentative after the link came up),
        hop limit 255 as receivers require; returns the link names used."""
        sent = []
        source = ipaddress.IPv6Address(vip).packed
        for link in self.announce_links(vip):
            body = unsolicited_na(link.mac, vip, router=_forwarding(link.name))
            with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, link.index)
                pktinfo = source + struct.pack("@I", link.index)
                sock.sendmsg([body], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)],
                              0, (_ALL_NODES, 0, 0, link.index))
            sent.append(link.name)
        return sent


def _forwarding(interface: str) -> bool:
    """Whether the node routes IPv6 on `interface` (the router flag its kernel's own NAs carry:
    a host that saw the node as a router and then an NA without the flag would drop it as one)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{interface}/forwarding") as sysctl:
            return sysctl.read().strip() == "1"
    except OSError:
        return False
