"""Per-pod CXI services through the frozen binary with real netns, on both backends and
every stack they emulate (conftest's cxi_setup)."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from cxi_cni.cxi.backend import MEMBER_IGNORE, MEMBER_NET_NS, Limit, Member, ServiceDesc

SMALL = {"ptes": 2048, "txqs": 1024, "tgqs": 512, "eqs": 2047, "cts": 2047, "les": 10,
         "tles": 2048, "acs": 1022}


@pytest.fixture
def sim(cxi_setup):
    """Every test here runs against the sim backend and the libcxi stand-in."""
    return cxi_setup


def bound(sim, inode):
    return sorted((s.device, s.svc_id, list(s.desc.vnis)) for s in sim.services()
                  if s.netns_inode == inode)


def test_add_makes_one_service_per_device_bound_to_the_netns(cni, sim, netns):
    inode = os.stat(netns).st_ino
    result = cni("ADD", sim.conf(cxi={"vnis": [100, 2001]}), netns=netns).ok().json
    services = bound(sim, inode)
    assert [(d, v) for d, _, v in services] == [("cxi0", [100, 2001]), ("cxi1", [100, 2001])]
    assert len(sim.services()) == 2
    for svc in sim.services():
        desc = svc.desc
        assert desc.restricted_members and desc.restricted_vnis and desc.enable
        if sim.stack == "netns-member":  # the namespace is the member, the only one
            assert desc.members == (Member(inode, MEMBER_NET_NS), Member())
        else:  # no member at all: the namespace is set apart from the members
            assert all(m.type == MEMBER_IGNORE for m in desc.members)
    assert {(s["device"], s["svcId"]) for s in result["cxi"]["services"]} == \
        {(d, s) for d, s, _ in services}
    [record] = sim.records()
    assert record["netnsInode"] == inode and record["vnis"] == [100, 2001]
    assert sorted((s["device"], s["svcId"]) for s in record["services"]) == \
        [(d, s) for d, s, _ in services]


def test_device_selection_by_list_and_by_master(cni, sim, netns, make_veth):
    master = make_veth()
    sim.seed({"cxi0": ("hsn9", False, None), "cxi1": (master, False, None)})
    cni("ADD", sim.conf(cxi={"devices": ["cxi0"]}), netns=netns).ok()
    assert [s.device for s in sim.services()] == ["cxi0"]
    cni("DEL", sim.conf(), netns=netns).ok()
    # devices "master": the device whose netdev is the master (cxi1 here, not by digits)
    conf = sim.conf(cxi={"devices": "master"}, master=master, linkType="macvlan",
                    ipam={"type": "host-local", "subnet": "10.77.0.0/24",
                          "dataDir": str(sim.root / "ipam")})
    cni("ADD", conf, netns=netns).ok()
    assert [s.device for s in sim.services()] == ["cxi1"]
    cni("DEL", conf, netns=netns).ok()
    assert sim.services() == [] and sim.records() == []


def test_tcs_and_limits_reach_the_service(cni, sim, netns):
    """Every resource gets a limit, as one without could not be used at all: those named as
    given, the others up to the device's total with nothing reserved, and no TLEs (which
    would take one of the NIC's TLE pools)."""
    conf = sim.conf(cxi={"tcs": ["low_latency", "best_effort"],
                         "limits": {"les": {"max": 100, "res": 10}, "acs": {"max": 4, "res": 2}}})
    cni("ADD", conf, netns=netns).ok()
    for svc in sim.services():
        desc = svc.desc
        assert desc.restricted_tcs and sorted(desc.tcs) == ["best_effort", "low_latency"]
        assert desc.resource_limits
        assert desc.limits == {"ptes": Limit(2048, 0), "txqs": Limit(1024, 0), "tgqs": Limit(512, 0),
                               "eqs": Limit(2047, 0), "cts": Limit(2047, 0), "les": Limit(100, 10),
                               "acs": Limit(4, 2)}
    cni("CHECK", conf, netns=netns).ok()


def test_check_fails_when_the_service_is_destroyed_behind_its_back(cni, sim, netns):
    conf = sim.conf()
    cni("ADD", conf, netns=netns).ok()
    cni("CHECK", conf, netns=netns).ok()
    svc = sim.services()[1]
    dev, sid = svc.device, svc.svc_id
    sim.backend().open(dev).destroy_svc(sid)
    err = cni("CHECK", conf, netns=netns).error(100)
    assert f"service {sid} on {dev} no longer exists" in err["msg"]


def test_check_names_a_disabled_service_and_changed_vnis(cni, sim, netns):
    conf = sim.conf()
    cni("ADD", conf, netns=netns).ok()
    svc = sim.services()[0]
    dev, sid = svc.device, svc.svc_id
    sim.backend().open(dev).svc_enable(sid, False)
    err = cni("CHECK", conf, netns=netns).error(100)
    assert f"service {sid} on {dev} is disabled" in err["msg"]
    err = cni("CHECK", sim.conf(cxi={"vnis": [300]}), netns=netns).error(100)
    assert "VNIs are now [300]" in err["msg"]


def test_check_without_add_is_unknown_container(cni, sim, netns):
    cni("CHECK", sim.conf(), netns=netns).error(3)


def test_del_removes_services_even_after_the_netns_is_gone(cni, sim, make_netns):
    netns = make_netns()
    conf = sim.conf()
    cni("ADD", conf, netns=netns).ok()
    subprocess.run(["ip", "netns", "del", os.path.basename(netns)], check=True)
    cni("DEL", conf, netns=netns).ok()
    cni("DEL", conf, netns=netns).ok()
    assert sim.services() == [] and sim.records() == []


def test_rollback_when_device_two_of_two_fails(cni, sim, netns):
    sim.seed({"cxi0": ("hsn0", False, None), "cxi1": ("hsn1", False, SMALL)})
    blocker = sim.backend().open("cxi1").alloc_svc(ServiceDesc(
        restricted_vnis=True, vnis=(900,), resource_limits=True, limits={"les": Limit(10, 6)}))
    err = cni("ADD", sim.conf(cxi={"limits": {"les": {"res": 8}}}), netns=netns).error(100)
    assert err["msg"].startswith("cxi1 has no room for this pod's CXI service: les: reserves 8, "
                                 "4 free"), err
    assert [(s.device, s.svc_id) for s in sim.services()] == [("cxi1", blocker)]
    assert sim.records() == []


def test_rollback_on_a_vf_keeps_nothing(cni, sim, netns):
    """A VF refuses cxil_alloc_svc (the driver's admin gate, on every stack); the error
    names both causes of -EPERM and the fix of each."""
    sim.seed({"cxi0": ("hsn0", False, None), "cxi1": ("hsn1", True, None)})
    err = cni("ADD", sim.conf(), netns=netns).error(100)
    assert "cxil_alloc_svc on cxi1" in err["msg"] and "EPERM" in err["msg"]
    assert "CAP_SYS_ADMIN" in err["details"] and "SR-IOV VF" in err["details"], err
    assert sim.services() == [] and sim.records() == []


def test_busy_service_is_retried_then_reported_and_kept(cni, sim, netns):
    conf = sim.conf()
    cni("ADD", conf, netns=netns).ok()
    busy_id = next(s.svc_id for s in sim.services() if s.device == "cxi1")
    sim.set_busy("cxi1", busy_id, 1)
    err = cni("DEL", conf, netns=netns).error(11)
    assert "EBUSY" in err["msg"]
    [record] = sim.records()
    assert record["services"] == [{"device": "cxi1", "svcId": int(busy_id)}]
    sim.set_busy("cxi1", busy_id, 0)
    cni("DEL", conf, netns=netns).ok()
    assert sim.services() == [] and sim.records() == []


def test_stale_service_on_a_reused_inode_is_never_inherited(cni, sim, netns):
    """Pod A's namespace died without DEL and the kernel gave its inode to pod B's new
    namespace (pretended here by binding A's service to B's inode). B must not get A's
    VNI, and A's late DEL must not destroy B's service even though ids are reused."""
    inode = os.stat(netns).st_ino
    conf_a = sim.conf(cxi={"vnis": [666]})
    cni("ADD", conf_a, netns=netns, container_id="podA").ok()  # A's record and services
    assert {tuple(v) for _, _, v in bound(sim, inode)} == {(666,)}
    conf_b = sim.conf(cxi={"vnis": [777]})
    cni("ADD", conf_b, netns=netns, container_id="podB").ok()
    assert [v for _, _, v in bound(sim, inode)] == [[777], [777]]
    a_record = next(r for r in sim.records() if r["containerID"] == "podA")
    assert a_record["services"] == []  # forgot the reaped services
    cni("DEL", conf_a, netns=netns, container_id="podA").ok()
    assert [v for _, _, v in bound(sim, inode)] == [[777], [777]]
    cni("CHECK", conf_b, netns=netns, container_id="podB").ok()
    log = sim.log_file.read_text()
    assert "stale service" in log


def test_stale_service_made_outside_the_plugin_is_reaped(cni, sim, netns):
    inode = os.stat(netns).st_ino
    sim.bind("cxi0", [4242], inode)
    cni("ADD", sim.conf(), netns=netns).ok()
    assert all(v == [100] for _, _, v in bound(sim, inode))


def test_two_attachments_of_one_pod_keep_each_other(cni, sim, netns):
    """A pod with a flannel-chained cxi (eth0) and a NAD cxi (net1) on the same device."""
    cni("ADD", sim.conf(), netns=netns, ifname="eth0").ok()
    cni("ADD", sim.conf(cxi={"vnis": [200]}), netns=netns, ifname="net1").ok()
    assert len(sim.services()) == 4
    cni("CHECK", sim.conf(), netns=netns, ifname="eth0").ok()
    cni("DEL", sim.conf(), netns=netns, ifname="eth0").ok()
    assert sorted(v[0] for _, _, v in bound(sim, os.stat(netns).st_ino)) == [200, 200]


def test_readd_replaces_the_old_services(cni, sim, netns):
    cni("ADD", sim.conf(), netns=netns).ok()
    cni("ADD", sim.conf(cxi={"vnis": [300]}), netns=netns).ok()
    assert [list(s.desc.vnis) for s in sim.services()] == [[300], [300]]
    assert len(sim.records()) == 1


def test_32_concurrent_adds_give_32_distinct_services(cni, sim, make_netns):
    """32 pods at once on one NIC. Before SHS 14.0.1 every service limiting LEs takes one of
    the NIC's 15 LE pools: 15 pods get one, the others fail saying so and leave nothing."""
    fit = 32 if sim.stack == "shs-14.0.1" else 15
    spaces = [make_netns() for _ in range(32)]
    confs = [sim.conf(cxi={"devices": ["cxi0"], "vnis": [100 + i]}) for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        runs = list(pool.map(lambda i: cni("ADD", confs[i], netns=spaces[i], container_id=f"c{i}"),
                             range(32)))
    made = [i for i, run in enumerate(runs) if run.rc == 0]
    assert len(made) == fit, [run.stdout for run in runs if run.rc]
    for run in runs:
        if run.rc:
            assert "no LE pool left" in run.error(100)["msg"]
    services = sim.services()
    assert len(services) == fit
    assert len({s.svc_id for s in services}) == fit
    assert {s.netns_inode for s in services} == {os.stat(spaces[i]).st_ino for i in made}
    assert len(sim.records()) == fit
    with ThreadPoolExecutor(max_workers=32) as pool:
        for run in pool.map(lambda i: cni("DEL", confs[i], netns=spaces[i], container_id=f"c{i}"),
                            range(32)):
            run.ok()
    assert sim.services() == [] and sim.records() == []


def test_gc_reaps_services_of_dead_namespaces(cni, sim, make_netns, cxi_bin, tmp_path):
    live, dead = make_netns(), make_netns()
    cni("ADD", sim.conf(), netns=live, container_id="live").ok()
    cni("ADD", sim.conf(cxi={"vnis": [101]}), netns=dead, container_id="dead").ok()
    subprocess.run(["ip", "netns", "del", os.path.basename(dead)], check=True)
    conf_file = tmp_path / "conf.json"
    conf_file.write_text(json.dumps(sim.conf()))
    out = subprocess.run([cxi_bin, "gc", "--config", str(conf_file)], capture_output=True,
                         text=True, check=True, env={**os.environ, **sim.env}).stdout
    assert "1 attachments removed" in out, out
    assert [r["containerID"] for r in sim.records()] == ["live"]
    assert {s.netns_inode for s in sim.services()} == {os.stat(live).st_ino}


def test_services_json_and_doctor(cni, sim, netns, cxi_bin, tmp_path):
    cni("ADD", sim.conf(), netns=netns).ok()
    conflist = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [
        {"type": "bridge"}, {k: v for k, v in sim.conf().items() if k not in ("cniVersion", "name")}]}
    path = tmp_path / "net.conflist"
    path.write_text(json.dumps(conflist))
    env = {**os.environ, **sim.env}
    rows = json.loads(subprocess.run([cxi_bin, "services", "--json", "--config", str(path)],
                                     capture_output=True, text=True, check=True, env=env).stdout)
    assert len(rows) == 2
    for row in rows:
        assert {"device", "svc_id", "netns_inode", "vnis", "enabled", "container_id",
                "ifname"} <= set(row)
        assert row["netns_inode"] == os.stat(netns).st_ino and row["vnis"] == [100]
        assert row["enabled"] is True and row["container_id"] == "ctr1" and row["ifname"] == "eth0"
        assert (row["tcs"], row["lnis_per_rgid"]) == (None, 1)
        assert row["limits"]["les"] == {"max": 16384, "res": 0} and "tles" not in row["limits"]
    text = subprocess.run([cxi_bin, "services", "--config", str(path)], capture_output=True,
                          text=True, check=True, env=env).stdout.splitlines()
    assert text[2].split() == ["limits", "(reserved/max):", "ptes", "0/2048", "txqs", "0/1024",
                               "tgqs", "0/512", "eqs", "0/2047", "cts", "0/2047", "les",
                               "0/16384", "acs", "0/1022;", "LNIs", "per", "resource", "group:", "1"]
    doctor = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                            text=True, env=env)
    assert doctor.returncode == 0, doctor.stdout
    assert f"backend {sim.kind}: reachable, devices cxi0, cxi1" in doctor.stdout
    assert ("ok    cxi1: totals ptes 2048, txqs 1024, tgqs 512, eqs 2047, cts 2047, les 16384, "
            "tles 2048, acs 1022") in doctor.stdout
    if sim.stack == "shs-14.0.1":  # the default shape reserves nothing and takes no pool
        assert ("ok    cxi0: pods of the configured shape (1 CPU: reserves nothing) reserve "
                "nothing and need no LE or TLE pool") in doctor.stdout, doctor.stdout
    else:  # before 14.0.1 each takes an LE pool, of which this pod holds one
        assert ("ok    cxi0: 14 more pods of the configured shape fit (1 CPU: reserves nothing); "
                "LE pools run out first") in doctor.stdout, doctor.stdout
    if sim.kind == "sim":
        sim.sim_state.write_text("{")
        doctor = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                                text=True, env=env)
        assert doctor.returncode == 1 and "damaged" in doctor.stdout


def test_a_state_dir_of_an_earlier_version_is_indexed_before_use(cni, sim, netns):
    """Records written before the index by netns inode existed: the first command indexes
    them, so a dead pod's claim on a reused inode is still found and forgotten."""
    import shutil

    inode = os.stat(netns).st_ino
    cni("ADD", sim.conf(cxi={"vnis": [666]}), netns=netns, container_id="podA").ok()
    shutil.rmtree(sim.state_dir / "netns")
    cni("ADD", sim.conf(cxi={"vnis": [777]}), netns=netns, container_id="podB").ok()
    assert sorted(os.listdir(sim.state_dir / "netns")) == sorted(
        f"{inode}-{p.stem}" for p in sim.state_dir.glob("*.json"))
    assert next(r for r in sim.records() if r["containerID"] == "podA")["services"] == []
    cni("DEL", sim.conf(cxi={"vnis": [666]}), netns=netns, container_id="podA").ok()
    assert [v for _, _, v in bound(sim, inode)] == [[777], [777]]


@pytest.mark.parametrize("stack_key", ["auto", "forced"])
def test_two_pods_of_one_job_share_a_nic_unless_the_driver_is_14_0_0(cni, sim, make_netns, stack_key):
    """Pods of one job get the same VNI. SHS 14.0.0's driver refuses a second service with
    it on a NIC: ADD names the VNI, the device, the service, the pod holding it and the fix,
    and leaves nothing. With cxi.stack forced to the node's stack the plugin refuses before
    calling the driver; with auto it reads the driver's -EEXIST."""
    first, second = make_netns(), make_netns()
    conf = sim.conf(cxi={"vnis": [100], **({"stack": sim.stack} if stack_key == "forced" else {})})
    pod_a = "K8S_POD_NAMESPACE=team;K8S_POD_NAME=job-a-0;K8S_POD_UID=uid-a"
    cni("ADD", conf, netns=first, container_id="ctr-a", cni_args=pod_a).ok()
    before = sorted((s.device, s.svc_id) for s in sim.services())
    run = cni("ADD", conf, netns=second, container_id="ctr-b",
              cni_args="K8S_POD_NAMESPACE=team;K8S_POD_NAME=job-a-1")
    if sim.stack != "shs-14.0.0":
        run.ok()
        assert len(sim.services()) == 4
        return
    err = run.error(100)
    held = next(sid for device, sid in before if device == "cxi0")
    assert err["msg"].startswith(f"VNI 100 is already held on cxi0 by service {held} (pod team/job-a-0 "
                                 "(uid uid-a), container ctr-a interface eth0): "), err
    assert "one service per NIC" in err["msg"] and "SHS 14.0.1" in err["details"]
    assert sorted((s.device, s.svc_id) for s in sim.services()) == before
    assert [r["containerID"] for r in sim.records()] == ["ctr-a"]


def test_doctor_names_the_stack_its_evidence_and_what_it_means(sim, cxi_bin, tmp_path):
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(sim.conf()))
    run = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                         text=True, env={**os.environ, **sim.env})
    assert run.returncode == 0, run.stdout
    lines = run.stdout.splitlines()
    calls = "present" if sim.stack != "netns-member" else "absent"
    if sim.kind == "sim":
        assert f"ok    library: the simulated library ({sim.stack}), cxil_svc_set_netns {calls}" in lines
    else:
        newest = "LIBCXI_1.10" if calls == "present" else "LIBCXI_1.9"
        assert (f"ok    library: {sim.lib.resolve()}, symbol versions LIBCXI_1.0 to {newest}, "
                f"cxil_svc_set_netns {calls}") in lines
        rev = sim.root / "sys" / "class" / "cxi" / "cxi0" / "device" / "properties" / "driver_rev"
        assert f"ok    driver: revision standin-{sim.stack} ({rev})" in lines
    [stack_line] = [line for line in lines if line[6:].startswith("stack ")]
    status, meaning = {"shs-14.0.1": ("ok", "Pods of one job share a NIC"),
                       "shs-14.0.0": ("warn", "Two pods of one job cannot share a NIC"),
                       "netns-member": ("ok", "Services are bound at alloc")}[sim.stack]
    assert stack_line.startswith(f"{status:6}stack {sim.stack} ("), stack_line
    assert meaning in stack_line
    assert any(line.startswith("note  tested: ") and "not on Slingshot hardware" in line
               for line in lines)
    assert sim.services() == []  # the probes destroyed what they made


@pytest.mark.parametrize("odd", ["fifo", "plugins not a list", "nested deep"])
def test_admin_commands_refuse_a_config_file_they_cannot_use(cxi_bin, tmp_path, odd):
    """--config that is a FIFO (or /dev/zero) must not hang the admin's shell, and a file of
    the wrong shape is a one-line error, not a traceback."""
    path = tmp_path / "conf"
    if odd == "fifo":
        os.mkfifo(path)
    else:
        path.write_text('{"cniVersion":"1.0.0","name":"n","plugins":5}' if odd == "plugins not a list"
                        else "[" * 100000 + "]" * 100000)
    for command in ("services", "doctor", "gc", "env"):
        run = subprocess.run([cxi_bin, command, "--config", str(path)], capture_output=True,
                             text=True, timeout=20)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert str(path) in run.stderr and len(run.stderr.splitlines()) <= 2, run.stderr
