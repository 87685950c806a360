"""A pod's share of a NIC, through the frozen binary: resource limits shaped as Slurm shapes a
step's (per CPU, within the device less its system services), the NIC's LE and TLE pools,
what ADD says when the NIC is full, traffic classes in Slurm's syntax, LNIs per resource
group, destroy retries, and the node policy's ceilings.

These rules do not depend on the stack, so most tests run on both backends on one stack
(SHS 14.0.1); the LE pool rule, which does, runs on every stack (and test_cxi_services'
32 concurrent ADDs). test_backend_contract asserts the same rules below the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import DEFAULT_STACK, SimSetup, libcxi_setup
from kube_apiserver import new_object, pod_args

from cxi_cni.cxi.backend import Limit, ServiceDesc
from cxi_cni.cxi.shape import SLURM_MAX

CASSINI = {"ptes": 2048, "txqs": 1024, "tgqs": 512, "eqs": 2047, "cts": 2047, "les": 16384,
           "tles": 2048, "acs": 1022}
NS = "team-a"


@pytest.fixture(params=["sim", "libcxi"])
def sim(request, tmp_path, monkeypatch) -> SimSetup:
    """Both backends, on one stack: what is tested here is the same on every stack."""
    if request.param == "sim":
        return SimSetup(tmp_path)
    return libcxi_setup(request, tmp_path, monkeypatch, DEFAULT_STACK)


def limits_of(sim, device: str = "cxi0") -> dict[str, Limit]:
    [svc] = [s for s in sim.services() if s.device == device and s.netns_inode]
    return svc.desc.limits


def nothing_made(sim):
    assert sim.services() == [] and sim.records() == []


def test_slurm_defaults_reserve_per_cpu_and_give_slurms_traffic_classes(cni, sim, netns):
    """cxi.defaults "slurm": Slurm's per-CPU reservations for cxi.cpus CPUs, max up to the
    device, TLEs max = res, and LOW_LATENCY and BEST_EFFORT; a resource's own res and max
    win over them, and its def replaces Slurm's."""
    conf = sim.conf(cxi={"defaults": "slurm", "cpus": 4, "limits": {
        "les": {"def": 10}, "acs": {"res": 5}, "txqs": {"max": 6}}})
    cni("ADD", conf, netns=netns).ok()
    for device in ("cxi0", "cxi1"):
        assert limits_of(sim, device) == {
            "ptes": Limit(2048, 24), "txqs": Limit(6, 6), "tgqs": Limit(512, 4),
            "eqs": Limit(2047, 8), "cts": Limit(2047, 4), "les": Limit(16384, 40),
            "tles": Limit(8, 8), "acs": Limit(1022, 5)}
    [svc, _] = sim.services()
    assert svc.desc.tcs == frozenset({"low_latency", "best_effort"}) and svc.desc.restricted_tcs
    [record] = sim.records()
    assert record["cpus"] == 4
    cni("CHECK", conf, netns=netns).ok()


def test_without_defaults_a_pod_reserves_nothing_and_takes_no_pool(cni, sim, netns):
    """The plugin's default shape: every resource up to the device, nothing reserved, no TLEs,
    all traffic classes."""
    cni("ADD", sim.conf(), netns=netns).ok()
    expected = {name: Limit(total, 0) for name, total in CASSINI.items() if name != "tles"}
    assert limits_of(sim) == expected
    assert not sim.services()[0].desc.restricted_tcs


@pytest.mark.parametrize("sim", ["sim"], indirect=True)  # parsing: the same on both backends
def test_tcs_in_slurms_syntax(cni, sim, netns):
    cni("ADD", sim.conf(cxi={"tcs": "TC_LOW_LATENCY:bulk_data"}), netns=netns).ok()
    assert {s.desc.tcs for s in sim.services()} == {frozenset({"low_latency", "bulk_data"})}
    cni("DEL", sim.conf(), netns=netns).ok()
    err = cni("ADD", sim.conf(cxi={"tcs": "LOW_LATENCY:TC_FAST"}), netns=netns).error(7)
    assert err["msg"].startswith("invalid network configuration: cxi.tcs: 'TC_FAST' in "
                                 "'LOW_LATENCY:TC_FAST' is not a traffic class"), err
    assert "LOW_LATENCY:BEST_EFFORT" in err["details"]
    nothing_made(sim)


@pytest.mark.parametrize("sim", ["sim"], indirect=True)
@pytest.mark.parametrize(("cxi", "field"), [
    ({"limits": {"acs": {"max": 1023}}}, "cxi.limits.acs.max: 1023 is more than a Cassini NIC has"),
    ({"limits": {"les": {"def": 20000}}}, "cxi.limits.les.def: 20000 is more"),
    ({"lnisPerRgid": 9}, "cxi.lnisPerRgid"),
    ({"cpus": 0}, "cxi.cpus"),
    ({"destroyRetries": 31, "destroyRetryDelay": 1}, "cxi.destroyRetries: 31 retries 1 s apart "
                                                     "wait longer than 30 s"),
    ({"defaults": "pbs"}, "cxi.defaults"),
], ids=["max above the NIC", "def above the NIC", "lpr above 8", "no CPU", "retries too long",
        "unknown defaults"])
def test_limits_the_nic_cannot_have_are_refused(cni, sim, netns, cxi, field):
    err = cni("ADD", sim.conf(cxi=cxi), netns=netns).error(7)
    assert field in err["msg"], err
    nothing_made(sim)


def test_the_pods_cpus_come_from_its_spec(cni, sim, make_netns, api, kubeconfig):
    """With the kubernetes source, the reservations are for the pod's CPUs (its containers'
    limits, else requests, rounded up), not cxi.cpus; CHECK says when the pod's CPUs changed."""
    def pod(name, kind, *cpus):
        spec = {"containers": [{"name": f"c{i}", "resources": {kind: {"cpu": cpu}}}
                               for i, cpu in enumerate(cpus)]}
        obj = new_object("v1", "Pod", NS, name, spec=spec)
        api.add(obj)
        return obj

    conf = sim.conf(kubeconfig=kubeconfig, cxi={"cpus": 64, "limits": {"les": {"def": 16}}})
    limited, requested = pod("limited", "limits", "1500m", "2"), pod("requested", "requests", "3")
    first, second = make_netns(), make_netns()
    cni("ADD", conf, netns=first, container_id="p1", cni_args=pod_args(limited)).ok()
    assert limits_of(sim)["les"] == Limit(16384, 16 * 4)
    cni("ADD", conf, netns=second, container_id="p2", cni_args=pod_args(requested)).ok()
    assert {s.netns_inode: s.desc.limits["les"].res for s in sim.services() if s.device == "cxi0"} \
        == {os.stat(first).st_ino: 64, os.stat(second).st_ino: 48}
    cni("CHECK", conf, netns=first, container_id="p1", cni_args=pod_args(limited)).ok()
    limited["spec"]["containers"][1]["resources"]["limits"]["cpu"] = "6"  # resized in place
    err = cni("CHECK", conf, netns=first, container_id="p1", cni_args=pod_args(limited)).error(100)
    assert "the pod now has 8 CPUs, its services reserve for 4" in err["msg"], err
    unknown = new_object("v1", "Pod", NS, "no-cpus", spec={"containers": [{"name": "c"}]})
    api.add(unknown)
    cni("DEL", conf, netns=first, container_id="p1").ok()
    cni("ADD", conf, netns=first, container_id="p3", cni_args=pod_args(unknown)).ok()
    assert {s.desc.limits["les"].res for s in sim.services()} == {48, 16 * 64}  # cxi.cpus


def system_service(sim, device: str, limits: dict[str, Limit], in_use: dict[str, int]) -> int:
    """A service of the node's own (is_system_svc), made outside the plugin, whose processes
    use `in_use`."""
    svc_id = sim.backend().open(device).alloc_svc(ServiceDesc(
        is_system_svc=True, restricted_vnis=True, vnis=(9,), resource_limits=True, limits=limits))
    sim.set_in_use(device, svc_id, in_use)
    return svc_id


@pytest.mark.parametrize("adjust", [True, False])
def test_adjust_limits_takes_what_system_services_hold_off_the_max(cni, sim, netns, adjust):
    """Slurm's adjust_limits: the most a pod may use of a resource is the device's total less,
    for each system service, what it reserves or uses, whichever is more. LEs a system
    service has no pool of its own for have no use count (the driver says 0xFFFF)."""
    system_service(sim, "cxi0", {"txqs": Limit(400, 100), "eqs": Limit(300, 47),
                                 "les": Limit(1000, 0)},
                   {"txqs": 300, "eqs": 10, "les": 500})
    conf = sim.conf(cxi={"adjustLimits": adjust, "limits": {"txqs": {"res": 900}}})
    cni("ADD", conf, netns=netns).ok()
    on_cxi0, on_cxi1 = limits_of(sim, "cxi0"), limits_of(sim, "cxi1")
    if adjust:
        assert (on_cxi0["txqs"], on_cxi0["eqs"], on_cxi0["les"]) == \
            (Limit(724, 724), Limit(2000, 0), Limit(16384, 0))
    else:
        assert (on_cxi0["txqs"], on_cxi0["eqs"]) == (Limit(1024, 900), Limit(2047, 0))
    assert (on_cxi1["txqs"], on_cxi1["eqs"]) == (Limit(1024, 900), Limit(2047, 0))


def test_tle_pools_cap_the_pods_on_a_nic(cni, sim, make_netns, tmp_path, cxi_bin):
    """A NIC has 4 TLE pools and the default service holds one: 3 pods that reserve TLEs fit,
    the 4th fails naming the pools and the pods the NIC holds, and leaves nothing; a pod
    reserving no TLEs still fits. Doctor counted it beforehand."""
    conf = sim.conf(cxi={"devices": ["cxi0"], "limits": {"tles": {"def": 1}}, "cpus": 2})
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    doctor = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                            text=True, env={**os.environ, **sim.env}).stdout
    assert ("ok    cxi0: 3 more pods of the configured shape fit (2 CPUs: reserves tles 8); "
            "TLE pools run out first") in doctor, doctor
    for n in range(3):
        cni("ADD", conf, netns=make_netns(), container_id=f"p{n}").ok()
    err = cni("ADD", conf, netns=make_netns(), container_id="p3").error(100)
    assert err["msg"] == ("cxi0 has no room for this pod's CXI service: no TLE pool left "
                          "(cxil_alloc_svc -ENOSPC); the NIC holds the services of 3 pods"), err
    assert err["details"].startswith("each service that reserves TLEs takes one of the NIC's 4 TLE "
                                     "pools (the default service holds one)"), err
    assert "cxi doctor" in err["details"]
    assert len(sim.services()) == 3 and len(sim.records()) == 3
    cni("ADD", sim.conf(cxi={"devices": ["cxi0"]}), netns=make_netns(), container_id="p4").ok()
    doctor = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                            text=True, env={**os.environ, **sim.env}).stdout
    assert "warn  cxi0: 0 more pods of the configured shape fit" in doctor, doctor


def test_le_pools_cap_the_pods_that_reserve_les(cni, sim, make_netns):
    """A NIC gives 15 LE pools to services: a 16th pod reserving LEs fails saying so. (Before
    SHS 14.0.1 limiting LEs at all takes a pool: test_cxi_services' 32 concurrent ADDs.)"""
    conf = sim.conf(cxi={"devices": ["cxi0"], "limits": {"les": {"res": 16}}})
    for n in range(15):
        cni("ADD", conf, netns=make_netns(), container_id=f"p{n}").ok()
    err = cni("ADD", conf, netns=make_netns(), container_id="p15").error(100)
    assert "no LE pool left" in err["msg"] and "holds the services of 15 pods" in err["msg"], err
    assert "one of the NIC's 15 LE pools" in err["details"]
    assert len(sim.records()) == 15


def lpr_of(sim) -> dict[str, int]:
    backend = sim.backend()
    out = {}
    for svc in sim.services():
        dev = backend.open(svc.device)
        try:
            out[svc.device] = dev.svc_get_lpr(svc.svc_id)
        finally:
            dev.close()
    return out


def test_lnis_per_rgid_configured_or_computed_as_slurm_does(cni, sim, make_netns, tmp_path, cxi_bin):
    """An explicit cxi.lnisPerRgid is set on every service; "auto" shares resource groups only
    when the pod's CPUs spread over its NICs exceed the groups a NIC has left."""
    netns = make_netns()
    conf = sim.conf(cxi={"lnisPerRgid": 4})
    cni("ADD", conf, netns=netns).ok()
    assert lpr_of(sim) == {"cxi0": 4, "cxi1": 4}
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    rows = json.loads(subprocess.run([cxi_bin, "services", "--json", "--config", str(path)],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, **sim.env}).stdout)
    assert [row["lnis_per_rgid"] for row in rows] == [4, 4]
    cni("DEL", conf, netns=netns).ok()
    sim.seed({"cxi0": ("hsn0", False, None), "cxi1": ("hsn1", False, None)}, rgids_avail=3)
    cni("ADD", sim.conf(cxi={"cpus": 12}), netns=netns).ok()  # 12 / (2 NICs x 3 groups)
    assert lpr_of(sim) == {"cxi0": 2, "cxi1": 2}
    cni("DEL", sim.conf(), netns=netns).ok()
    cni("ADD", sim.conf(cxi={"cpus": 6}), netns=netns).ok()
    assert lpr_of(sim) == {"cxi0": 1, "cxi1": 1}


def test_destroy_retries_are_configurable_and_share_one_deadline(cni, sim, netns):
    """While an LNI holds the services, DEL tries cxi.destroyRetries more times,
    cxi.destroyRetryDelay apart, for all its services together, then says try again (11)."""
    conf = sim.conf(cxi={"destroyRetries": 3, "destroyRetryDelay": 0.25})
    cni("ADD", conf, netns=netns).ok()
    for svc in sim.services():
        sim.set_busy(svc.device, svc.svc_id, 1)
    started = time.monotonic()
    err = cni("DEL", conf, netns=netns).error(11)
    took = time.monotonic() - started
    assert "EBUSY" in err["msg"]
    assert 0.75 <= took < 0.75 + 1.5, took  # 3 x 0.25 s, once for both devices
    started = time.monotonic()
    cni("DEL", sim.conf(cxi={"destroyRetries": 0}), netns=netns).error(11)
    assert time.monotonic() - started < took - 0.5
    for svc in sim.services():
        sim.set_busy(svc.device, svc.svc_id, 0)
    cni("DEL", conf, netns=netns).ok()
    nothing_made(sim)


@pytest.mark.parametrize("sim", ["sim"], indirect=True)
def test_the_node_policy_caps_limits_and_traffic_classes(cni, sim, make_netns, node_policy):
    """A tenant's NAD cannot reserve more of the NIC, or use traffic classes, than the node
    policy allows: limits are lowered to its ceilings, a class outside is refused, and a
    configuration naming none gets the policy's."""
    env = node_policy(limits={"les": {"max": 2048, "res": 64}, "acs": {"res": 4}},
                      tcs=["low_latency", "best_effort"])
    greedy = sim.conf(cxi={"defaults": "slurm", "cpus": 64})
    cni("ADD", greedy, netns=make_netns(), env=env).ok()
    assert (limits_of(sim)["les"], limits_of(sim)["acs"]) == (Limit(2048, 64), Limit(1022, 4))
    err = cni("ADD", sim.conf(cxi={"tcs": ["dedicated_access"]}), netns=make_netns(),
              env=env).error(7)
    assert "cxi.tcs: traffic class dedicated_access is not allowed by the node policy" in err["msg"]
    cni("ADD", sim.conf(), netns=make_netns(), container_id="all-tcs", env=env).ok()
    assert {s.desc.tcs for s in sim.services()} == {frozenset({"low_latency", "best_effort"})}


@pytest.mark.parametrize("quantity", ["-3", "1e400", "nan", "inf", "1e30", "0", ["1e308", "1e308"]])
def test_a_cpu_quantity_that_is_no_count_of_cpus_falls_back_to_cxi_cpus(cni, sim, netns, api,
                                                                       kubeconfig, quantity):
    """The pod's author writes its CPU quantities: one that is not a finite, positive number
    of CPUs (the API server refuses most, this plugin does not rely on that) counts as none;
    a huge one is held to the NIC, like any other reservation."""
    spec = {"containers": [{"name": f"c{i}", "resources": {"limits": {"cpu": cpu}}}
                           for i, cpu in enumerate(quantity if isinstance(quantity, list) else [quantity])]}
    pod = new_object("v1", "Pod", NS, "odd-cpus", spec=spec)
    api.add(pod)
    conf = sim.conf(kubeconfig=kubeconfig, cxi={"cpus": 2, "limits": {"les": {"def": 16}}})
    cni("ADD", conf, netns=netns, cni_args=pod_args(pod)).ok()
    expected = SLURM_MAX["les"] if quantity == "1e30" else 32
    assert {s.desc.limits["les"].res for s in sim.services()} == {expected}
    cni("DEL", conf, netns=netns, cni_args=pod_args(pod)).ok()
    nothing_made(sim)
