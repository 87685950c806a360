"""Side by side with the Go reference macvlan plugin of containernetworking/plugins: the same
configuration through dist/cxi (type cxi, linkType macvlan, sim CXI backend) and through
/usr/lib/cni/macvlan, each on its own veth master and netns with its own host-local dataDir,
gives the same result and the same state in the pod's netns, apart from the `cxi` key, the
MAC addresses and the sandbox paths."""

from __future__ import annotations

import copy
import re

import pytest
from cnitool import run_cni
from conftest import sh
from test_link_macvlan import CNI_PATH, GO_PLUGINS, host_local, ip_json, link_in, ns_name, with_prev

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
CASES = [
    ("1.0.0", {}),
    ("1.0.0", {"mode": "passthru"}),
    ("0.4.0", {"mode": "private", "mtu": 1400}),
    ("0.3.1", {"mode": "vepa"}),
]


def comparable(result: dict, netns: str) -> dict:
    """A result with what must differ between the two runs replaced by placeholders."""
    out = copy.deepcopy(result)
    out.pop("cxi", None)
    for iface in out["interfaces"]:
        assert MAC_RE.match(iface["mac"]), iface
        assert iface["sandbox"] == netns, iface
        iface["mac"], iface["sandbox"] = "MAC", "SANDBOX"
    if out.get("dns") == {}:  # the Go plugins print an empty dns object; we leave it out
        del out["dns"]
    return out


def netns_state(netns: str) -> dict:
    """The pod's link, global addresses, routes (with their protocol: both add theirs as
    "boot") and arp_notify, without ids and MACs."""
    link = link_in(netns, "eth0")
    addrs = ip_json(netns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    routes = ip_json(netns, "route", "show", "table", "all")
    arp_notify = sh("ip", "netns", "exec", ns_name(netns), "cat",
                    "/proc/sys/net/ipv4/conf/eth0/arp_notify").stdout.strip()
    return {
        **link_state(link, addrs),
        "routes": sorted((r for r in routes if r.get("dev") == "eth0"
                          and not r["dst"].startswith("fe80")), key=str),
        "arp_notify": arp_notify,
    }


def link_state(link: dict, addrs: list[dict]) -> dict:
    """What `ip -j -d link` and `ip -j addr` say of a pod link, without ids and MACs."""
    return {
        "kind": link["linkinfo"]["info_kind"],
        "mode": link["linkinfo"]["info_data"]["mode"],
        "mtu": link["mtu"], "flags": link["flags"], "operstate": link["operstate"],
        "addresses": [{k: a.get(k) for k in ("family", "local", "prefixlen", "broadcast", "scope")}
                      for a in addrs if a.get("scope") != "link"],
    }


@pytest.mark.parametrize(("version", "extra"), CASES)
def test_cxi_and_reference_macvlan_agree(cni, sim, tmp_path, make_netns, make_veth, version, extra):
    reference = str(GO_PLUGINS / "macvlan")
    masters = {"cxi": make_veth(), "ref": make_veth()}
    netns = {"cxi": make_netns(), "ref": make_netns()}
    confs = {
        "cxi": sim.conf(version, master=masters["cxi"], linkType="macvlan",
                        ipam=host_local(tmp_path / "cxi"), **extra),
        "ref": {"cniVersion": version, "name": "cxinet", "type": "macvlan",
                "master": masters["ref"], "ipam": host_local(tmp_path / "ref"), **extra},
    }

    def run(who, command, conf):
        if who == "cxi":
            return cni(command, conf, netns=netns[who], cni_path=CNI_PATH)
        return run_cni(reference, command, conf, netns=netns[who], cni_path=CNI_PATH)

    results = {who: run(who, "ADD", confs[who]).ok().json for who in confs}
    assert "cxi" in results["cxi"] and "cxi" not in results["ref"]
    assert comparable(results["cxi"], netns["cxi"]) == comparable(results["ref"], netns["ref"])
    assert netns_state(netns["cxi"]) == netns_state(netns["ref"])
    for who in confs:
        if version != "0.3.1":  # CHECK exists from spec 0.4.0 on
            run(who, "CHECK", with_prev(confs[who], results[who])).ok()
        run(who, "DEL", with_prev(confs[who], results[who])).ok()
        assert link_in(netns[who], "eth0") is None
