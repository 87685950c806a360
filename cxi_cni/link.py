"""Netlink work for the pod's link, on a plain rtnetlink socket with pyroute2's message
classes (imported only here and only when needed): find the master, create an ipvlan or
macvlan link straight into the pod's network namespace, rename, address and route it, read
it back for CHECK, and delete it."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
import time
import types
from dataclasses import dataclass

from .lazy import without_package_init
from .netns import Netns

IFF_UP = 0x1
IFA_F_TENTATIVE = 0x40
DAD_SETTLE_SECONDS = 5.0
MACVLAN_MODES = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8}
IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}
RTEXT_FILTER_SKIP_STATS = 1 << 3  # link replies without their counters
RT_TABLE_MAIN = 254
DUMP_ATTEMPTS = 5  # a dump the kernel marks inconsistent (NLM_F_DUMP_INTR) is asked again
NLMSG_SEQ_OFFSET = 8  # struct nlmsghdr: length, type, flags, then the sequence number


class LinkError(Exception):
    """A netlink operation failed; errno is the kernel's answer when there is one."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


@functools.cache
def rtnl_api() -> types.SimpleNamespace:
    """The synchronous part of pyroute2 this module needs: the rtnetlink message classes
    (encode and decode), the netlink constants and the reply parser. Its socket classes
    (IPRoute, nlsocket) run on an asyncio core in 0.9 and cost 50-150 ms to import; the
    socket here is a plain one, and the few requests it sends are simple."""
    without_package_init("pyroute2")
    from pyroute2 import netlink
    from pyroute2.netlink import marshal, rtnl
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    class RtnlMarshal(marshal.Marshal):
        msg_map = {rtnl.RTM_NEWLINK: ifinfmsg, rtnl.RTM_NEWADDR: ifaddrmsg,
                   rtnl.RTM_NEWROUTE: rtmsg}

    return types.SimpleNamespace(nl=netlink, rtnl=rtnl, Marshal=RtnlMarshal, ifinfmsg=ifinfmsg,
                                 ifaddrmsg=ifaddrmsg, rtmsg=rtmsg)


@dataclass
class LinkInfo:
    """What CHECK and ADD need to know about one link."""

    index: int
    name: str
    kind: str
    mode: str | None
    parent_index: int | None
    mac: str
    mtu: int
    up: bool


def link_info(msg) -> LinkInfo:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
    mode = None
    if kind == "macvlan":
        raw = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_MACVLAN_MODE")
        mode = raw if isinstance(raw, str) else {v: k for k, v in MACVLAN_MODES.items()}.get(raw)
    elif kind == "ipvlan":
        raw = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_IPVLAN_MODE")
        mode = {v: k for k, v in IPVLAN_MODES.items()}.get(raw)
    return LinkInfo(index=msg["index"], name=msg.get("IFLA_IFNAME"), kind=kind, mode=mode,
                    parent_index=msg.get("IFLA_LINK"), mac=msg.get("IFLA_ADDRESS") or "",
                    mtu=msg.get("IFLA_MTU") or 0, up=bool(msg["flags"] & IFF_UP))


class Rtnl:
    """One rtnetlink socket bound to a network namespace (the host's when netns is None);
    each method is one request and its answer, or a LinkError carrying the kernel's errno."""

    def __init__(self, netns: Netns | None = None):
        self.api = rtnl_api()
        self.netns = netns
        self.seq = 0
        self.marshal = self.api.Marshal()
        if netns is None:
            self.sock = self.open_socket()
        else:
            with netns.entered():  # a netlink socket stays in the namespace it was made in
                self.sock = self.open_socket()

    @staticmethod
    def open_socket() -> socket.socket:
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
        except OSError as exc:
            raise LinkError(f"cannot open a netlink socket: {exc.strerror}", exc.errno) from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, what: str, msg, msg_type: int, flags: int = 0) -> list:
        """Send `msg` as `msg_type` and collect the answer: the messages of a dump (flags
        NLM_F_DUMP), else the reply, if any, up to the kernel's acknowledgement. A failure
        is a LinkError `what: <the kernel's reason>` with its errno."""
        nl = self.api.nl
        dump = flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP
        msg["header"].update(type=msg_type, flags=nl.NLM_F_REQUEST | flags | (0 if dump else nl.NLM_F_ACK))
        msg.encode()
        data = bytearray(msg.data)
        try:
            for _ in range(DUMP_ATTEMPTS):
                self.seq += 1
                struct.pack_into("=I", data, NLMSG_SEQ_OFFSET, self.seq)
                self.sock.send(data)
                replies, consistent = self.answer(what)
                if consistent or not dump:
                    return replies
        except OSError as exc:
            raise LinkError(f"{what}: {exc.strerror}", exc.errno) from None
        raise LinkError(f"{what}: the kernel's answer kept changing while it was read", errno.EINTR)

    def answer(self, what: str) -> tuple[list, bool]:
        """Read datagrams until the answer to the last request ends: (its messages, whether
        the kernel says a dump of them is consistent)."""
        nl = self.api.nl
        replies, consistent = [], True
        while True:
            size = self.sock.recv_into(bytearray(16), 16, socket.MSG_PEEK | socket.MSG_TRUNC)
            for reply in self.marshal.parse(self.sock.recv(size)):
                header = reply["header"]
                if header["sequence_number"] != self.seq:
                    continue  # the rest of an answer abandoned when it failed
                failure = header.get("error")
                if failure is not None:  # NetlinkError, OSError (ENOBUFS), or a decoding error
                    code = getattr(failure, "code", None) or getattr(failure, "errno", None) or 0
                    reason = os.strerror(code) if code else f"unreadable answer ({failure})"
                    raise LinkError(f"{what}: {reason}", code)
                consistent &= not header["flags"] & nl.NLM_F_DUMP_INTR
                if header["type"] in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                    return replies, consistent
                replies.append(reply)

    def link_msg(self, index: int = 0, **attrs):
        msg = self.api.ifinfmsg()
        msg["index"] = index
        msg["attrs"] = [(name, value) for name, value in attrs.items()]
        return msg

    def find(self, name: str) -> LinkInfo | None:
        msg = self.link_msg(IFLA_EXT_MASK=RTEXT_FILTER_SKIP_STATS, IFLA_IFNAME=name)
        try:
            replies = self.request(f"cannot look up {name}", msg, self.api.rtnl.RTM_GETLINK)
        except LinkError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL):  # EINVAL: a name the kernel refuses
                return None
            raise
        return link_info(replies[0]) if replies else None

    def names(self) -> list[str]:
        msg = self.link_msg(IFLA_EXT_MASK=RTEXT_FILTER_SKIP_STATS)
        return [m.get("IFLA_IFNAME") for m in self.request(
            "cannot list links", msg, self.api.rtnl.RTM_GETLINK, self.api.nl.NLM_F_DUMP)]

    def create(self, kind: str, mode: str, parent_index: int, mtu: int,
               into: Netns | None, name: str) -> None:
        """A new link on the parent named `name`, made directly in the namespace `into`
        (or in this socket's namespace when None)."""
        if kind == "macvlan":
            data = ("IFLA_MACVLAN_MODE", MACVLAN_MODES[mode])
        else:
            data = ("IFLA_IPVLAN_MODE", IPVLAN_MODES[mode])
        msg = self.link_msg(IFLA_IFNAME=name, IFLA_LINK=parent_index)
        if mtu:
            msg["attrs"].append(("IFLA_MTU", mtu))
        if into is not None:
            msg["attrs"].append(("IFLA_NET_NS_FD", into.fd))
        msg["attrs"].append(("IFLA_LINKINFO", {"attrs": [
            ("IFLA_INFO_KIND", kind), ("IFLA_INFO_DATA", {"attrs": [data]})]}))
        nl = self.api.nl
        self.request(f"cannot create the {kind} link", msg, self.api.rtnl.RTM_NEWLINK,
                     nl.NLM_F_CREATE | nl.NLM_F_EXCL)

    def rename(self, index: int, name: str) -> None:
        self.request(f"cannot rename the link to {name}", self.link_msg(index, IFLA_IFNAME=name),
                     self.api.rtnl.RTM_SETLINK)

    def delete(self, index: int) -> None:
        self.request("cannot delete the link", self.link_msg(index), self.api.rtnl.RTM_DELLINK)

    def set_up(self, index: int, name: str) -> None:
        msg = self.link_msg(index)
        msg["flags"] = msg["change"] = IFF_UP
        self.request(f"cannot bring {name} up", msg, self.api.rtnl.RTM_SETLINK)

    def addresses(self, index: int) -> list[tuple[str, int, int]]:
        """(address, prefix length, flags) of every address on the link."""
        out = []
        for msg in self.request("cannot list addresses", self.api.ifaddrmsg(),
                                self.api.rtnl.RTM_GETADDR, self.api.nl.NLM_F_DUMP):
            if msg["index"] == index:
                flags = msg.get("IFA_FLAGS") or msg["flags"]
                out.append((msg.get("IFA_ADDRESS"), msg["prefixlen"], flags))
        return out

    def add_address(self, index: int, cidr: str, name: str) -> None:
        """The address as the reference plugins add it: local and address alike, and the
        broadcast address of an IPv4 subnet that has one."""
        iface = ipaddress.ip_interface(cidr)
        msg = self.api.ifaddrmsg()
        msg["family"] = socket.AF_INET6 if iface.version == 6 else socket.AF_INET
        msg["prefixlen"], msg["index"] = iface.network.prefixlen, index
        msg["attrs"] = [("IFA_LOCAL", str(iface.ip)), ("IFA_ADDRESS", str(iface.ip))]
        if iface.version == 4 and iface.network.prefixlen < 31:
            msg["attrs"].append(("IFA_BROADCAST", str(iface.network.broadcast_address)))
        nl = self.api.nl
        self.request(f"cannot add address {cidr} to {name}", msg, self.api.rtnl.RTM_NEWADDR,
                     nl.NLM_F_CREATE | nl.NLM_F_EXCL)

    def add_route(self, index: int, route: dict, gateway: str | None, name: str) -> None:
        """Append a route (ECMP-style, as the reference plugins do) through the link, with
        their defaults: main table, universe scope, protocol boot."""
        dst = ipaddress.ip_network(route["dst"], strict=False)
        rtnl = self.api.rtnl
        msg = self.api.rtmsg()
        msg["family"] = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
        msg["dst_len"], msg["table"] = dst.prefixlen, RT_TABLE_MAIN
        msg["proto"], msg["type"] = rtnl.rtprotos["RTPROT_BOOT"], rtnl.rtypes["RTN_UNICAST"]
        msg["attrs"] = [("RTA_OIF", index)]
        if dst.prefixlen:
            msg["attrs"].append(("RTA_DST", str(dst.network_address)))
        if gateway:
            msg["attrs"].append(("RTA_GATEWAY", gateway))
        if isinstance(route.get("priority"), int):
            msg["attrs"].append(("RTA_PRIORITY", route["priority"]))
        if isinstance(route.get("table"), int):
            # tables past 255 exist only in the attribute
            msg["table"] = route["table"] if route["table"] < 256 else 0
            msg["attrs"].append(("RTA_TABLE", route["table"]))
        if isinstance(route.get("scope"), int):
            msg["scope"] = route["scope"]
        via = f" via {gateway}" if gateway else ""
        nl = self.api.nl
        self.request(f"cannot add route {route['dst']}{via} dev {name}", msg, rtnl.RTM_NEWROUTE,
                     nl.NLM_F_CREATE | nl.NLM_F_APPEND)

    def routes(self, index: int) -> set:
        """Destinations (ip_network) of the routes through the link, any table, including
        multipath routes with a hop through it."""
        out = set()
        for family, zero in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            query = self.api.rtmsg()
            query["family"] = family
            for msg in self.request("cannot list routes", query, self.api.rtnl.RTM_GETROUTE,
                                    self.api.nl.NLM_F_DUMP):
                hops = [msg.get("RTA_OIF")] + [hop["oif"] for hop in msg.get("RTA_MULTIPATH") or []]
                if index in hops:
                    dst = msg.get("RTA_DST") or zero
                    out.add(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
        return out

    def settle(self, index: int, name: str, timeout: float = DAD_SETTLE_SECONDS) -> None:
        """Wait until no IPv6 address of the link is tentative (duplicate detection done)."""
        deadline = time.monotonic() + timeout
        while any(flags & IFA_F_TENTATIVE for _, _, flags in self.addresses(index)):
            if time.monotonic() > deadline:
                raise LinkError(f"IPv6 addresses of {name} still tentative after {timeout:.0f} s")
            time.sleep(0.05)


def write_sysctl(key: str, value: str, required: bool = False) -> None:
    """Write /proc/sys/<key> as the network namespace this thread is in sees it."""
    try:
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(value)
    except OSError as exc:
        if required:
            raise LinkError(f"cannot set {key.replace('/', '.')}={value}: {exc.strerror}",
                            exc.errno) from None


def read_sysctl(key: str) -> str | None:
    try:
        with open(f"/proc/sys/{key}") as fh:
            return fh.read().strip()
    except OSError:
        return None


def set_sysctls(netns: Netns, name: str, ipv6: bool) -> None:
    """The link's sysctls as the reference plugins set them, in one visit to its namespace:
    ARP notifications, and for IPv6 addresses IPv6 on (lo and the link), addresses kept
    while down, and neighbour notifications."""
    with netns.entered():
        write_sysctl(f"net/ipv4/conf/{name}/arp_notify", "1")
        if not ipv6:
            return
        for dev in ("lo", name):
            if read_sysctl(f"net/ipv6/conf/{dev}/disable_ipv6") not in (None, "0"):
                write_sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "0", required=True)
        write_sysctl(f"net/ipv6/conf/{name}/keep_addr_on_down", "1")
        write_sysctl(f"net/ipv6/conf/{name}/ndisc_notify", "1")


def configure(rtnl: Rtnl, index: int, name: str, ips: list[dict], routes: list[dict]) -> None:
    """Sysctls, addresses, up, then routes, as the reference plugins' ConfigureIface: a
    route without a gateway goes through the first gateway of its address family."""
    set_sysctls(rtnl.netns, name, any(ipaddress.ip_interface(ip["address"]).version == 6
                                      for ip in ips))
    gateways: dict[int, str] = {}
    for ip in ips:
        rtnl.add_address(index, ip["address"], name)
        if ip.get("gateway"):
            gateways.setdefault(ipaddress.ip_address(ip["gateway"]).version, ip["gateway"])
    rtnl.set_up(index, name)
    if 6 in gateways:
        rtnl.settle(index, name)
    for route in routes:
        version = ipaddress.ip_network(route["dst"], strict=False).version
        rtnl.add_route(index, route, route.get("gw") or gateways.get(version), name)
