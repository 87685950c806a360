"""cxi_cni/link.py's netlink requests against the real kernel, in process: what they make
(read back with `ip -j`), what they read (multi-datagram dumps, routes of every table,
multipath hops), the kernel's errno in every failure, and that they stay off pyroute2's
asyncio layers."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, sh

from cxi_cni.link import LinkError, Rtnl, configure
from cxi_cni.netns import Netns


def ip_json(netns: str, *args: str):
    return json.loads(sh("ip", "-n", Path(netns).name, "-j", *args).stdout)


@pytest.fixture
def pod(netns):
    with Netns.open(netns) as handle, Rtnl(handle) as rtnl:
        yield rtnl


@pytest.fixture
def pod_link(pod, make_veth):
    """A macvlan link made from the host socket straight into the pod's namespace, renamed
    to eth0; its index."""
    master = make_veth()
    with Rtnl() as host:
        parent = host.find(master)
        host.create("macvlan", "bridge", parent.index, 1400, pod.netns, name="cxitmp0")
    made = pod.find("cxitmp0")
    pod.rename(made.index, "eth0")
    return made.index, parent.index


def test_link_is_made_in_the_pod_namespace_with_its_kind_mode_mtu_and_parent(pod, pod_link, netns):
    index, parent = pod_link
    found = pod.find("eth0")
    assert (found.index, found.kind, found.mode, found.mtu, found.parent_index, found.up) == \
        (index, "macvlan", "bridge", 1400, parent, False)
    link = ip_json(netns, "-d", "link", "show", "eth0")[0]
    assert link["address"] == found.mac and link["linkinfo"]["info_data"]["mode"] == "bridge"
    pod.set_up(index, "eth0")
    assert pod.find("eth0").up and "UP" in ip_json(netns, "link", "show", "eth0")[0]["flags"]
    assert pod.find("cxitmp0") is None
    assert sorted(pod.names()) == ["eth0", "lo"]


def test_addresses_and_routes_as_the_reference_plugins_add_them(pod, pod_link, netns):
    """IPv4 and IPv6 addresses, routes through the first gateway of their family or their
    own, with metric, a table below and above 255 and a scope, all protocol boot."""
    index, _ = pod_link
    ips = [{"address": "10.250.0.5/24", "gateway": "10.250.0.1"},
           {"address": "fd00:250::5/64", "gateway": "fd00:250::1"}, {"address": "10.251.0.1/31"}]
    routes = [{"dst": "0.0.0.0/0"}, {"dst": "10.60.0.0/16", "gw": "10.250.0.9", "priority": 7},
              {"dst": "10.61.0.0/16", "table": 100}, {"dst": "10.62.0.0/16", "table": 1000},
              {"dst": "fd00:99::/48"}]
    configure(pod, index, "eth0", ips, routes)

    addrs = ip_json(netns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"], a.get("broadcast")) for a in addrs if a["scope"] == "global"] \
        == [("10.250.0.5", 24, "10.250.0.255"), ("10.251.0.1", 31, None), ("fd00:250::5", 64, None)]
    assert not [a for a in addrs if a.get("tentative")], "settle() returned before DAD was done"
    assert {(a, p) for a, p, _ in pod.addresses(index)} >= {
        ("10.250.0.5", 24), ("10.251.0.1", 31), ("fd00:250::5", 64)}

    listed = ip_json(netns, "route", "show", "table", "all") + ip_json(netns, "-6", "route", "show", "table", "all")
    made = {(r["dst"], r.get("gateway"), r.get("metric"), r.get("table", "main"), r.get("protocol"))
            for r in listed if r.get("dev") == "eth0" and r.get("protocol") != "kernel"
            and r.get("table") != "local"}  # fmt: skip
    assert made == {("default", "10.250.0.1", None, "main", None),
                    ("10.60.0.0/16", "10.250.0.9", 7, "main", None),
                    ("10.61.0.0/16", "10.250.0.1", None, "100", None),
                    ("10.62.0.0/16", "10.250.0.1", None, "1000", None),
                    ("fd00:99::/48", "fd00:250::1", 1024, "main", None)}
    have = pod.routes(index)
    for route in routes:
        assert ipaddress.ip_network(route["dst"]) in have  # any table
    assert ipaddress.ip_network("10.250.0.5/32") in have  # the local table's too


def sysctls(netns: str, keys: list[str]) -> dict[str, str]:
    return {key: sh("ip", "netns", "exec", Path(netns).name, "cat", f"/proc/sys/{key}").stdout.strip()
            for key in keys}


@pytest.mark.parametrize("ipv6", [False, True], ids=["IPv4 only", "with IPv6"])
def test_sysctls_are_set_in_the_pod_namespace_as_the_reference_plugins_set_them(pod, pod_link, netns, ipv6):
    """arp_notify always; for an IPv6 address IPv6 turned back on (lo and the link), addresses
    kept while down and neighbour notifications. The thread comes back to its namespace."""
    index, _ = pod_link
    for dev in ("lo", "eth0"):
        sh("ip", "netns", "exec", Path(netns).name, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
    v6_keys = ["net/ipv6/conf/lo/disable_ipv6", "net/ipv6/conf/eth0/disable_ipv6",
               "net/ipv6/conf/eth0/keep_addr_on_down", "net/ipv6/conf/eth0/ndisc_notify"]
    before = sysctls(netns, v6_keys)
    home = os.stat("/proc/thread-self/ns/net").st_ino
    ips = [{"address": "10.253.0.5/24"}] + ([{"address": "fd00:253::5/64"}] if ipv6 else [])
    configure(pod, index, "eth0", ips, [])
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    expected = dict(zip(v6_keys, ("0", "0", "1", "1"), strict=True)) if ipv6 else before
    assert sysctls(netns, ["net/ipv4/conf/eth0/arp_notify", *v6_keys]) == \
        {"net/ipv4/conf/eth0/arp_notify": "1", **expected}


def test_route_scope_and_no_gateway(pod, pod_link, netns):
    index, _ = pod_link
    configure(pod, index, "eth0", [{"address": "10.252.0.5/24"}],
              [{"dst": "10.70.0.0/16", "scope": 253}])
    route = [r for r in ip_json(netns, "route", "show") if r["dst"] == "10.70.0.0/16"][0]
    assert (route.get("gateway"), route.get("scope"), route.get("protocol")) == (None, "link", None)


def test_a_multipath_route_counts_for_the_links_of_its_hops(pod, pod_link, netns, make_veth):
    index, parent = pod_link
    with Rtnl() as host:
        host.create("macvlan", "bridge", parent, 0, pod.netns, name="eth1")
    other = pod.find("eth1").index
    for link, address in ((index, "10.253.0.5/24"), (other, "10.254.0.5/24")):
        pod.add_address(link, address, "eth")
        pod.set_up(link, "eth")
    sh("ip", "-n", Path(netns).name, "route", "add", "10.80.0.0/16", "nexthop", "via", "10.253.0.1",
       "dev", "eth0", "nexthop", "via", "10.254.0.1", "dev", "eth1")
    assert ipaddress.ip_network("10.80.0.0/16") in pod.routes(index)
    assert ipaddress.ip_network("10.80.0.0/16") in pod.routes(other)


def test_a_dump_longer_than_one_datagram_is_read_whole(pod, pod_link, netns):
    """1,500 addresses take several datagrams of the kernel's dump."""
    index, _ = pod_link
    batch = "".join(f"address add 10.{100 + i // 250}.{i % 250}.1/32 dev eth0\n" for i in range(1500))
    subprocess.run(["ip", "-n", Path(netns).name, "-batch", "-"], input=batch, text=True,
                   check=True, capture_output=True)
    assert len([a for a in pod.addresses(index) if a[0].startswith("10.")]) == 1500


def test_failures_carry_the_kernels_errno(pod, pod_link):
    index, parent = pod_link
    assert pod.find("nosuch0") is None  # ENODEV
    assert pod.find("a b") is None  # EINVAL: a name the kernel refuses
    with pytest.raises(LinkError) as too_long:
        pod.find("x" * 20)
    assert too_long.value.errno == errno.ERANGE
    pod.add_address(index, "10.255.0.5/24", "eth0")
    with pytest.raises(LinkError, match=r"^cannot add address 10.255.0.5/24 to eth0: File exists$") as dup:
        pod.add_address(index, "10.255.0.5/24", "eth0")
    assert dup.value.errno == errno.EEXIST
    with pytest.raises(LinkError, match="cannot create the macvlan link: No such device") as gone:
        pod.create("macvlan", "bridge", 999_999, 0, None, name="cxitmp1")
    assert gone.value.errno == errno.ENODEV
    with pytest.raises(LinkError) as bad_route:
        pod.add_route(index, {"dst": "10.90.0.0/16"}, "192.0.2.1", "eth0")  # unreachable gateway
    assert bad_route.value.errno == errno.ENETUNREACH
    pod.delete(index)
    with pytest.raises(LinkError, match="cannot delete the link: No such device") as twice:
        pod.delete(index)
    assert twice.value.errno == errno.ENODEV
    assert pod.find("eth0") is None


def test_link_calls_stay_off_pyroute2s_asyncio_layers():
    """The point of talking to the kernel through pyroute2's message classes: its IPRoute
    and netlink socket classes import asyncio and cost 80-150 ms per invocation."""
    code = ("import sys; from cxi_cni.link import Rtnl; r = Rtnl(); r.find('lo'); r.names(); "
            "r.routes(1); r.close(); "
            "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith("
            "('pyroute2.iproute', 'pyroute2.netlink.nlsocket', 'pyroute2.netlink.core'))))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
