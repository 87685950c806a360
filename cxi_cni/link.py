"""Netlink work for the pod's link (pyroute2, imported only here and only when needed): find
the master, create an ipvlan or macvlan link straight into the pod's network namespace,
rename, address and route it, read it back for CHECK, and delete it."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from .netns import Netns

IFF_UP = 0x1
IFA_F_TENTATIVE = 0x40
DAD_SETTLE_SECONDS = 5.0
MACVLAN_MODES = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8}
IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}


class LinkError(Exception):
    """A netlink operation failed; errno is the kernel's answer when there is one."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


def rtnl_api():
    """pyroute2's IPRoute and NetlinkError without running pyroute2/__init__.py, which
    imports every subsystem (conntrack, nftables, wireguard, ...) and costs about 60 ms of
    each invocation that touches links. The package object is made from its spec so submodules import normally; the
    first access to a top-level name (`from pyroute2 import X` elsewhere) runs the real
    __init__, so other users of pyroute2 see the usual package."""
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        package = importlib.util.module_from_spec(spec)
        completing = []

        def complete(name):
            # `from pyroute2 import config` asks for the attribute before importing the
            # submodule: submodules must not run the real __init__.
            if completing or name.startswith("__") or importlib.util.find_spec(f"pyroute2.{name}"):
                raise AttributeError(name)
            completing.append(name)
            del package.__getattr__
            spec.loader.exec_module(package)
            return getattr(package, name)

        package.__getattr__ = complete
        sys.modules["pyroute2"] = package
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    return IPRoute, NetlinkError


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
    addresses: list[str] = field(default_factory=list)


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
    """One rtnetlink socket bound to a network namespace (the host's when netns is None)."""

    def __init__(self, netns: Netns | None = None):
        IPRoute, self.NetlinkError = rtnl_api()
        self.netns = netns
        if netns is None:
            self.ipr = IPRoute()
        else:
            with netns.entered():
                self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, what: str, fn, *argv, **kw):
        try:
            return fn(*argv, **kw)
        except self.NetlinkError as exc:
            raise LinkError(f"{what}: {os.strerror(exc.code)}", exc.code) from None

    def find(self, name: str) -> LinkInfo | None:
        try:
            msgs = self.ipr.link("get", ifname=name)
        except self.NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EINVAL):  # EINVAL: a name the kernel refuses
                return None
            raise LinkError(f"cannot look up {name}: {os.strerror(exc.code)}", exc.code) from None
        return link_info(msgs[0]) if msgs else None

    def names(self) -> list[str]:
        return [m.get("IFLA_IFNAME") for m in self.call("cannot list links", self.ipr.link, "dump")]

    def create(self, kind: str, mode: str, parent_index: int, mtu: int,
               into: Netns | None, name: str) -> None:
        """A new link on the parent named `name`, made directly in the namespace `into`
        (or in this socket's namespace when None)."""
        spec = {"ifname": name, "kind": kind, "link": parent_index}
        if kind == "macvlan":
            spec["macvlan_mode"] = mode
        else:
            spec["ipvlan_mode"] = IPVLAN_MODES[mode]
        if mtu:
            spec["mtu"] = mtu
        if into is not None:
            spec["net_ns_fd"] = into.fd
        self.call(f"cannot create the {kind} link", self.ipr.link, "add", **spec)

    def rename(self, index: int, name: str) -> None:
        self.call(f"cannot rename the link to {name}", self.ipr.link, "set", index=index,
                  ifname=name)

    def delete(self, index: int) -> None:
        self.call("cannot delete the link", self.ipr.link, "del", index=index)

    def set_up(self, index: int, name: str) -> None:
        self.call(f"cannot bring {name} up", self.ipr.link, "set", index=index, state="up")

    def addresses(self, index: int) -> list[tuple[str, int, int]]:
        """(address, prefix length, flags) of every address on the link."""
        out = []
        for msg in self.call("cannot list addresses", self.ipr.addr, "dump", index=index):
            flags = msg.get("IFA_FLAGS") or msg["flags"]
            out.append((msg.get("IFA_ADDRESS"), msg["prefixlen"], flags))
        return out

    def add_address(self, index: int, cidr: str, name: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        spec = {"index": index, "address": str(iface.ip), "prefixlen": iface.network.prefixlen}
        if iface.version == 4 and iface.network.prefixlen < 31:
            spec["broadcast"] = str(iface.network.broadcast_address)
        self.call(f"cannot add address {cidr} to {name}", self.ipr.addr, "add", **spec)

    def add_route(self, index: int, route: dict, gateway: str | None, name: str) -> None:
        """Append a route (ECMP-style, as the reference plugins do) through the link."""
        dst = ipaddress.ip_network(route["dst"], strict=False)
        spec = {"dst": str(dst.network_address), "dst_len": dst.prefixlen, "oif": index,
                "family": socket.AF_INET6 if dst.version == 6 else socket.AF_INET}
        if gateway:
            spec["gateway"] = gateway
        if isinstance(route.get("priority"), int):
            spec["priority"] = route["priority"]
        if isinstance(route.get("table"), int):
            spec["table"] = route["table"]
        if isinstance(route.get("scope"), int):
            spec["scope"] = route["scope"]
        via = f" via {gateway}" if gateway else ""
        self.call(f"cannot add route {route['dst']}{via} dev {name}", self.ipr.route,
                  "append", **spec)

    def routes(self, index: int) -> set:
        """Destinations (ip_network) of the routes through the link, any table."""
        out = set()
        for family, zero in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for msg in self.call("cannot list routes", self.ipr.route, "dump", family=family):
                if msg.get("RTA_OIF") == index:
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


def write_sysctl(netns: Netns, key: str, value: str, required: bool = False) -> None:
    """Write /proc/sys/<key> as seen from inside the namespace."""
    with netns.entered():
        try:
            with open(f"/proc/sys/{key}", "w") as fh:
                fh.write(value)
        except OSError as exc:
            if required:
                raise LinkError(f"cannot set {key.replace('/', '.')}={value}: {exc.strerror}",
                                exc.errno) from None


def read_sysctl(netns: Netns, key: str) -> str | None:
    with netns.entered():
        try:
            with open(f"/proc/sys/{key}") as fh:
                return fh.read().strip()
        except OSError:
            return None


def configure(rtnl: Rtnl, index: int, name: str, ips: list[dict], routes: list[dict]) -> None:
    """Addresses, up, then routes, as the reference plugins' ConfigureIface: a route
    without a gateway goes through the first gateway of its address family."""
    netns = rtnl.netns
    write_sysctl(netns, f"net/ipv4/conf/{name}/arp_notify", "1")
    gateways: dict[int, str] = {}
    has_v6 = False
    for ip in ips:
        version = ipaddress.ip_interface(ip["address"]).version
        if version == 6 and not has_v6:
            has_v6 = True
            for dev in ("lo", name):
                if read_sysctl(netns, f"net/ipv6/conf/{dev}/disable_ipv6") not in (None, "0"):
                    write_sysctl(netns, f"net/ipv6/conf/{dev}/disable_ipv6", "0", required=True)
            write_sysctl(netns, f"net/ipv6/conf/{name}/keep_addr_on_down", "1")
            write_sysctl(netns, f"net/ipv6/conf/{name}/ndisc_notify", "1")
        rtnl.add_address(index, ip["address"], name)
        if ip.get("gateway"):
            gateways.setdefault(ipaddress.ip_address(ip["gateway"]).version, ip["gateway"])
    rtnl.set_up(index, name)
    if 6 in gateways:
        rtnl.settle(index, name)
    for route in routes:
        version = ipaddress.ip_network(route["dst"], strict=False).version
        rtnl.add_route(index, route, route.get("gw") or gateways.get(version), name)
