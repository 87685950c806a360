"""The pod's link through the frozen binary: macvlan links on a veth standing in for hsn0, the
Go host-local and static IPAM plugins, real network namespaces. ADD/CHECK/DEL, traffic
between pods, rollback when a later step fails, and the error cases."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import sh

GO_PLUGINS = Path("/usr/lib/cni")
CNI_PATH = str(GO_PLUGINS)
SUBNET, GATEWAY = "10.231.0.0/24", "10.231.0.1"
MACVLAN_MODES = ("bridge", "private", "vepa", "passthru")


NEEDED = {GO_PLUGINS / "host-local": "containernetworking-plugins",
          Path("/usr/bin/ping"): "iputils-ping"}


@pytest.fixture(scope="session", autouse=True)
def go_reference_plugins_and_ping():
    """Debian's containernetworking-plugins (host-local, static, the reference macvlan) and
    ping, installed with apt-get when missing."""
    missing = sorted({pkg for path, pkg in NEEDED.items() if not path.exists()})
    if missing:
        proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing],
                              capture_output=True, text=True,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode != 0:
            pytest.fail(f"these tests need apt-get install {' '.join(missing)}: "
                        f"{proc.stderr[-300:]}")


def host_local(root: Path, subnet: str = SUBNET, gateway: str = GATEWAY, **range_extra) -> dict:
    """host-local IPAM keeping its leases under `root`, a default route and one via a gateway."""
    prefix = subnet.rsplit(".", 1)[0]
    return {"type": "host-local", "dataDir": str(root / "ipam"),
            "ranges": [[{"subnet": subnet, "gateway": gateway, **range_extra}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.232.0.0/16", "gw": f"{prefix}.254"}]}


def leases(root: Path, network: str = "cxinet") -> list[str]:
    """The addresses host-local has handed out (one file per address)."""
    folder = root / "ipam" / network
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name != "lock" and not p.name.startswith("last_reserved_ip"))


def ns_name(netns: str) -> str:
    return os.path.basename(netns)


def ip_json(netns: str | None, *args: str):
    prefix = ("ip", "-n", ns_name(netns)) if netns else ("ip",)
    proc = sh(*prefix, "-j", *args, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


def link_in(netns: str | None, ifname: str) -> dict | None:
    """`ip -d -j link show` of one link, None if it does not exist."""
    found = ip_json(netns, "-d", "link", "show", "dev", ifname)
    return found[0] if found else None


def link_names(netns: str) -> list[str]:
    return [entry["ifname"] for entry in ip_json(netns, "link", "show")]


def addresses(netns: str, ifname: str) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in ip_json(netns, "addr", "show", "dev", ifname)[0]
            ["addr_info"] if a.get("scope") == "global"]


def ifindex(netns: str | None, ifname: str) -> int:
    return link_in(netns, ifname)["ifindex"]


def macvlan_conf(sim, tmp_path, master: str, version: str = "1.0.0", **top) -> dict:
    top.setdefault("ipam", host_local(tmp_path))
    return sim.conf(version, master=master, linkType="macvlan", **top)


def with_prev(conf: dict, result: dict) -> dict:
    return {**conf, "prevResult": result}


def assert_nothing_left(sim, tmp_path, netns: str, container_id: str = "ctr1"):
    assert link_names(netns) == ["lo"], "a link was left in the pod's netns"
    assert leases(tmp_path) == [], "an IPAM lease was left"
    assert [r for r in sim.records() if r["containerID"] == container_id] == [], "a record was left"
    assert sim.services() == [], "a CXI service was left"


def ipvlan_in_kernel() -> bool:
    """Whether this kernel can make ipvlan links (probed in a scratch namespace)."""
    name = f"cxip-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "m0", "type", "veth", "peer", "name", "m1")
        return sh("ip", "-n", name, "link", "add", "iv0", "link", "m0", "type", "ipvlan",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", name, check=False)


def test_add_check_del_macvlan_bridge(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json

    link = link_in(netns, "eth0")
    assert link["linkinfo"]["info_kind"] == "macvlan"
    assert link["linkinfo"]["info_data"]["mode"] == "bridge"
    assert link["link_index"] == ifindex(None, master)
    assert "UP" in link["flags"] and link["mtu"] == 1500
    assert result["interfaces"] == [{"name": "eth0", "mac": link["address"], "sandbox": netns}]
    assert result["ips"] == [{"address": "10.231.0.2/24", "gateway": GATEWAY, "interface": 0}]
    assert result["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "10.232.0.0/16", "gw": "10.231.0.254"}]
    assert addresses(netns, "eth0") == ["10.231.0.2/24"]
    routes = {(r["dst"], r.get("gateway")) for r in ip_json(netns, "route", "show", "dev", "eth0")}
    assert {("default", GATEWAY), ("10.232.0.0/16", "10.231.0.254")} <= routes
    assert leases(tmp_path) == ["10.231.0.2"]
    (record,) = sim.records()
    assert record["link"]["type"] == "macvlan" and record["link"]["master"] == master
    assert len(result["cxi"]["services"]) == 2

    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)
    assert link_in(None, master) is not None, "the master must survive DEL"


@pytest.mark.parametrize("mode", MACVLAN_MODES)
def test_each_macvlan_mode_and_mtu(cni, sim, tmp_path, netns, make_veth, mode):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master, mode=mode, mtu=1400)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    link = link_in(netns, "eth0")
    assert link["linkinfo"]["info_data"]["mode"] == mode
    assert link["mtu"] == 1400
    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    other = "private" if mode != "private" else "bridge"
    err = cni("CHECK", with_prev({**conf, "mode": other}, result), netns=netns,
              cni_path=CNI_PATH).error(100)
    assert f"mode {mode}, the configuration says {other}" in err["msg"]
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_mtu_above_the_masters_is_refused(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    err = cni("ADD", macvlan_conf(sim, tmp_path, master, mtu=9000), netns=netns,
              cni_path=CNI_PATH).error(7)
    assert "invalid MTU 9000: must be 0..1500" in err["msg"]
    assert_nothing_left(sim, tmp_path, netns)


def test_two_pods_on_one_master_reach_each_other(cni, sim, tmp_path, make_netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    pods = [make_netns(), make_netns()]
    ips = []
    for i, netns in enumerate(pods):
        result = cni("ADD", conf, netns=netns, container_id=f"pod{i}", cni_path=CNI_PATH).ok().json
        ips.append(result["ips"][0]["address"].split("/")[0])
    assert ips == ["10.231.0.2", "10.231.0.3"]
    for here, there in ((pods[0], ips[1]), (pods[1], ips[0])):
        ping = sh("ip", "netns", "exec", ns_name(here), "ping", "-c1", "-W1", there, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    cni("DEL", conf, netns=pods[1], container_id="pod1", cni_path=CNI_PATH).ok()
    ping = sh("ip", "netns", "exec", ns_name(pods[0]), "ping", "-c1", "-W1", ips[1], check=False)
    assert ping.returncode != 0, "the deleted pod still answers"
    cni("DEL", conf, netns=pods[0], container_id="pod0", cni_path=CNI_PATH).ok()
    assert leases(tmp_path) == []


def test_del_twice_and_after_the_netns_is_gone(cni, sim, tmp_path, make_netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    first, second = make_netns(), make_netns()
    cni("ADD", conf, netns=first, container_id="a", cni_path=CNI_PATH).ok()
    cni("ADD", conf, netns=second, container_id="b", cni_path=CNI_PATH).ok()
    assert leases(tmp_path) == ["10.231.0.2", "10.231.0.3"]
    for _ in range(2):
        cni("DEL", conf, netns=first, container_id="a", cni_path=CNI_PATH).ok()
    assert link_names(first) == ["lo"] and leases(tmp_path) == ["10.231.0.3"]
    sh("ip", "netns", "del", ns_name(second))
    cni("DEL", conf, netns=second, container_id="b", cni_path=CNI_PATH).ok()
    cni("DEL", conf, netns=None, container_id="b", cni_path=CNI_PATH).ok()
    assert leases(tmp_path) == [] and sim.records() == [] and sim.services() == []


def test_del_whose_ipam_fails_still_removes_the_link_and_a_retry_finishes(cni, sim, tmp_path,
                                                                        netns, make_veth):
    """DEL deletes the link while the IPAM plugin releases the lease: an IPAM failure is
    reported after the link is gone, the record stays, and the runtime's retry finishes."""
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    broken = tmp_path / "broken-cni"
    broken.mkdir()
    (broken / "host-local").write_text('#!/bin/sh\necho \'{"code": 11, "msg": "store offline"}\'\nexit 1\n')
    (broken / "host-local").chmod(0o755)
    err = cni("DEL", with_prev(conf, result), netns=netns, cni_path=str(broken)).error(11)
    assert err["msg"] == "host-local: store offline"
    assert link_names(netns) == ["lo"] and leases(tmp_path) == ["10.231.0.2"]
    assert sim.records() and sim.services(), "DEL dropped the record before the lease was released"
    cni("DEL", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_check_fails_when_the_lease_the_address_or_the_link_goes(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    lease = tmp_path / "ipam" / "cxinet" / "10.231.0.2"
    saved = lease.read_bytes()
    lease.unlink()
    err = cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).error(100)
    assert "IPAM CHECK failed: host-local: " in err["msg"]
    lease.write_bytes(saved)
    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    sh("ip", "-n", ns_name(netns), "addr", "del", "10.231.0.2/24", "dev", "eth0")
    err = cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).error(100)
    assert "eth0 lacks address 10.231.0.2/24" in err["msg"]
    sh("ip", "-n", ns_name(netns), "link", "del", "eth0")
    err = cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).error(100)
    assert f"link eth0 is missing from {netns}" in err["msg"]
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_check_fails_when_the_link_hangs_off_another_master(cni, sim, tmp_path, netns, make_veth):
    master, other = make_veth(), make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    err = cni("CHECK", with_prev({**conf, "master": other}, result), netns=netns,
              cni_path=CNI_PATH).error(100)
    assert f"not master {other}" in err["msg"]
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()


def test_cxi_failure_rolls_back_link_and_lease(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    totals = {"ptes": 16, "txqs": 16, "tgqs": 16, "eqs": 16, "cts": 16, "les": 10, "tles": 16,
              "acs": 16}
    sim.seed({"cxi0": (master, False, totals)})
    conf = macvlan_conf(sim, tmp_path, master, cxi={"limits": {"tles": {"res": 8}}})
    err = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).error()
    assert err["code"] == 100 and "cxi0 has no room" in err["msg"], err
    assert_nothing_left(sim, tmp_path, netns)
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()


def test_ipvlan_without_kernel_support_fails_clearly_and_leaves_nothing(cni, sim, tmp_path, netns,
                                                                       make_veth):
    if ipvlan_in_kernel():
        pytest.skip("this kernel has ipvlan; the VM tier tests ipvlan itself")
    master = make_veth()
    conf = sim.conf("1.0.0", master=master, ipam=host_local(tmp_path))
    err = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).error(103)
    assert err["msg"] == ("this kernel has no ipvlan module; load it with modprobe ipvlan or "
                          "use linkType macvlan")
    assert_nothing_left(sim, tmp_path, netns)
    assert not [n for n in ip_json(None, "link", "show") if n["ifname"].startswith("cxi")]


def test_master_missing_or_down(cni, sim, tmp_path, netns, make_veth):
    err = cni("ADD", macvlan_conf(sim, tmp_path, "cxnomaster0"), netns=netns,
              cni_path=CNI_PATH).error(7)
    assert err["msg"].startswith("master cxnomaster0 does not exist on this node: set master to "
                                 "one of the links there (")
    assert_nothing_left(sim, tmp_path, netns)
    down = make_veth(up=False)
    err = cni("ADD", macvlan_conf(sim, tmp_path, down), netns=netns, cni_path=CNI_PATH).error(103)
    assert err["msg"] == f"master {down} on this node is down"
    assert f"ip link set {down} up" in err["details"]
    assert_nothing_left(sim, tmp_path, netns)


def test_interface_name_taken_in_the_netns(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    sh("ip", "-n", ns_name(netns), "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    conf = macvlan_conf(sim, tmp_path, master)
    err = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).error(103)
    assert err["msg"] == f"interface eth0 already exists in network namespace {netns}"
    assert leases(tmp_path) == [] and sim.records() == [] and sim.services() == []
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()  # the runtime's DEL after a failed ADD
    assert link_in(netns, "eth0")["linkinfo"]["info_kind"] == "veth", "DEL removed a foreign link"


def test_ipam_failure_keeps_its_code_and_leaves_no_link(cni, sim, tmp_path, make_netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master,
                        ipam=host_local(tmp_path, rangeStart="10.231.0.9", rangeEnd="10.231.0.9"))
    first, second = make_netns(), make_netns()
    cni("ADD", conf, netns=first, container_id="a", cni_path=CNI_PATH).ok()
    err = cni("ADD", conf, netns=second, container_id="b", cni_path=CNI_PATH).error(999)
    assert err["msg"].startswith("host-local: failed to allocate for range 0: no IP addresses")
    assert link_names(second) == ["lo"] and leases(tmp_path) == ["10.231.0.9"]
    assert link_in(first, "eth0") is not None
    # host-local of Debian knows specs up to 1.0.0: its own code 1 comes through
    err = cni("ADD", {**conf, "cniVersion": "1.1.0"}, netns=second, container_id="c",
              cni_path=CNI_PATH).error(1)
    assert err["msg"] == "host-local: incompatible CNI versions"
    assert link_names(second) == ["lo"]


def test_ipam_plugin_not_in_cni_path(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    err = cni("ADD", conf, netns=netns, cni_path=str(tmp_path / "empty")).error(7)
    assert err["msg"].startswith("IPAM plugin 'host-local' is not in CNI_PATH")
    assert_nothing_left(sim, tmp_path, netns)


def test_chained_prev_result_and_master_merge_with_right_indexes(cni, sim, tmp_path, netns,
                                                                 make_veth):
    master = make_veth()
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "0a:58:0a:f4:00:01"},
                           {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": netns}],
            "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1}],
            "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.0.1"}],
            "dns": {"nameservers": ["10.96.0.10"]}}
    conf = with_prev(macvlan_conf(sim, tmp_path, master), prev)
    result = cni("ADD", conf, netns=netns, ifname="hsn0", cni_path=CNI_PATH).ok().json
    mac = link_in(netns, "hsn0")["address"]
    assert result["interfaces"] == prev["interfaces"] + [{"name": "hsn0", "mac": mac, "sandbox": netns}]
    assert result["ips"] == prev["ips"] + [{"address": "10.231.0.2/24", "gateway": GATEWAY,
                                            "interface": 2}]
    assert result["routes"][0] == prev["routes"][0] and len(result["routes"]) == 3
    assert result["dns"] == prev["dns"]
    cni("CHECK", with_prev(conf, result), netns=netns, ifname="hsn0", cni_path=CNI_PATH).ok()
    cni("DEL", with_prev(conf, result), netns=netns, ifname="hsn0", cni_path=CNI_PATH).ok()
    assert link_names(netns) == ["lo"] and leases(tmp_path) == []


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_result_shape_per_spec_version(cni, sim, tmp_path, netns, make_veth, version):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master, version=version)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    assert result["cniVersion"] == version
    expected_ip = {"address": "10.231.0.2/24", "gateway": GATEWAY, "interface": 0}
    if version != "1.0.0":
        expected_ip["version"] = "4"
    assert result["ips"] == [expected_ip]
    assert result["interfaces"][0]["sandbox"] == netns
    if version != "0.3.1":
        cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_link_in_container_uses_the_master_inside_the_netns(cni, sim, tmp_path, netns, make_veth):
    outside = make_veth()
    sh("ip", "link", "set", outside + "p", "netns", ns_name(netns), "name", "hsn0")
    sh("ip", "-n", ns_name(netns), "link", "set", "hsn0", "up")
    conf = macvlan_conf(sim, tmp_path, "hsn0", linkInContainer=True)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    link = link_in(netns, "eth0")
    assert link["link"] == "hsn0" and "link_netnsid" not in link  # lower link in the same netns
    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()
    assert sorted(link_names(netns)) == ["hsn0", "lo"] and leases(tmp_path) == []
    err = cni("ADD", macvlan_conf(sim, tmp_path, "hsn9", linkInContainer=True), netns=netns,
              cni_path=CNI_PATH).error(7)
    assert f"master hsn9 does not exist in the pod's network namespace {netns}" in err["msg"]
    assert "hsn0" in err["msg"]


def test_dual_stack_static_ipam(cni, sim, tmp_path, netns, make_veth):
    master = make_veth()
    ipam = {"type": "static",
            "addresses": [{"address": "10.240.0.5/24", "gateway": "10.240.0.1"},
                          {"address": "fd00:240::5/64", "gateway": "fd00:240::1"}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}
    conf = macvlan_conf(sim, tmp_path, master, ipam=ipam)
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    assert [ip["address"] for ip in result["ips"]] == ["10.240.0.5/24", "fd00:240::5/64"]
    assert addresses(netns, "eth0") == ["10.240.0.5/24", "fd00:240::5/64"]
    info = ip_json(netns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert not [a for a in info if a.get("tentative") and a["local"] == "fd00:240::5"]
    v6 = ip_json(netns, "-6", "route", "show", "default")
    assert v6 and v6[0]["gateway"] == "fd00:240::1"
    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()
    assert link_names(netns) == ["lo"]


def test_status_and_gc_with_a_master(cni, sim, tmp_path, make_veth):
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master, version="1.1.0")
    cni("STATUS", conf, container_id=None, ifname=None, cni_path=CNI_PATH).ok()
    err = cni("STATUS", {**conf, "master": "cxnomaster0"}, container_id=None, ifname=None,
              cni_path=CNI_PATH).error(50)
    assert "master cxnomaster0 does not exist" in err["msg"]
    err = cni("STATUS", conf, container_id=None, ifname=None,
              cni_path=str(tmp_path / "empty")).error(50)
    assert "IPAM plugin 'host-local' is not in CNI_PATH" in err["msg"]
    gc = {**conf, "cni.dev/valid-attachments": []}
    cni("GC", gc, container_id=None, ifname=None, cni_path=CNI_PATH).ok()


def test_add_again_replaces_the_link_lease_and_services(cni, sim, tmp_path, netns, make_veth):
    """A runtime that repeats ADD (after a lost answer) gets a fresh attachment, not
    "eth0 already exists", and nothing of the first ADD lingers."""
    master = make_veth()
    conf = macvlan_conf(sim, tmp_path, master)
    cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok()
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    assert link_names(netns) == ["lo", "eth0"]
    assert len(leases(tmp_path)) == 1 and len(sim.services()) == 2 and len(sim.records()) == 1
    cni("CHECK", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", with_prev(conf, result), netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_del_after_the_nad_lost_its_master_still_removes_link_and_lease(cni, sim, tmp_path, netns,
                                                                       make_veth):
    """The NAD was edited between ADD and DEL (master dropped: now a chained entry): DEL
    removes what ADD recorded, with the IPAM configuration ADD used."""
    master = make_veth()
    cni("ADD", macvlan_conf(sim, tmp_path, master), netns=netns, cni_path=CNI_PATH).ok()
    assert link_in(netns, "eth0") is not None and len(leases(tmp_path)) == 1
    cni("DEL", sim.conf(), netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)


def test_del_after_the_nad_gained_a_master_leaves_links_it_never_made(cni, sim, tmp_path, netns,
                                                                      make_veth):
    """A chained attachment (no link of ours) whose configuration now names a master: DEL
    must not delete the pod's interface of that name, which another plugin made."""
    master = make_veth()
    other = make_veth()
    sh("ip", "link", "add", "eth0", "link", other, "netns", ns_name(netns), "type", "macvlan")
    cni("ADD", sim.conf(), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", macvlan_conf(sim, tmp_path, master), netns=netns, cni_path=CNI_PATH).ok()
    assert link_in(netns, "eth0") is not None, "DEL removed a link another plugin made"
    assert sim.services() == [] and sim.records() == []


def test_del_leaves_the_link_when_cni_netns_now_holds_another_namespace(cni, sim, tmp_path,
                                                                       make_netns, make_veth):
    """The recorded inode decides: a path that names another namespace by DEL time is not
    entered, and that namespace's link of the same name stays."""
    master = make_veth()
    first, second = make_netns(), make_netns()
    conf = macvlan_conf(sim, tmp_path, master)
    cni("ADD", conf, netns=first, cni_path=CNI_PATH).ok()
    cni("ADD", conf, netns=second, container_id="ctr2", cni_path=CNI_PATH).ok()
    cni("DEL", conf, netns=second, cni_path=CNI_PATH).ok()  # ctr1's DEL, with ctr2's path
    assert link_in(second, "eth0") is not None, "DEL entered a namespace it did not make a link in"
    assert [r["containerID"] for r in sim.records()] == ["ctr2"]
    cni("DEL", conf, netns=second, container_id="ctr2", cni_path=CNI_PATH).ok()


def test_add_repeated_into_another_namespace_removes_the_old_link_before_its_lease(
        cni, sim, tmp_path, make_netns, make_veth):
    """The same attachment ADDed again with another CNI_NETNS: the first namespace's link
    (found through the recorded path, checked by inode) goes with its lease, so no address
    stays up there that host-local hands out again."""
    master = make_veth()
    first, second = make_netns(), make_netns()
    conf = macvlan_conf(sim, tmp_path, master)
    cni("ADD", conf, netns=first, cni_path=CNI_PATH).ok()
    cni("ADD", conf, netns=second, cni_path=CNI_PATH).ok()
    assert link_in(first, "eth0") is None, "the old link kept its released address"
    assert link_in(second, "eth0") is not None and len(leases(tmp_path)) == 1
    cni("DEL", conf, netns=second, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, second)


def test_check_takes_a_prev_result_ip_without_an_address(cni, sim, tmp_path, netns, make_veth):
    """An ips entry with no address (the spec requires one, a runtime may still send it)
    is a CHECK failure to report or ignore, never an internal error."""
    conf = macvlan_conf(sim, tmp_path, make_veth())
    result = cni("ADD", conf, netns=netns, cni_path=CNI_PATH).ok().json
    odd = {**result, "ips": [*result["ips"], {"interface": 0}]}
    cni("CHECK", with_prev(conf, odd), netns=netns, cni_path=CNI_PATH).ok()
    cni("DEL", conf, netns=netns, cni_path=CNI_PATH).ok()
    assert_nothing_left(sim, tmp_path, netns)
