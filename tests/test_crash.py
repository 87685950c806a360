"""Crash consistency through the frozen binary: ADD SIGKILLed at every step (the debug kill
points of CXI_CNI_DEBUG_KILL_AT), then DEL, or separately GC, must leave no CXI service, no
link, no IPAM lease and no state record behind; and a pod whose namespace died without DEL
never hands its service to the next pod that gets the same namespace inode."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import reliability
from conftest import sh

CNI_PATH = "/usr/lib/cni"
KILL_ENV = "CXI_CNI_DEBUG_KILL_AT"
# Steps of a chained ADD on two devices, in the order ADD reaches them.
CHAINED_STEPS = ["after-record", "after-alloc-0", "after-bind-0", "after-alloc-1",
                 "after-bind-1", "before-complete"]
# With `master`, the pod's link and its IPAM lease come between the record and the services.
MASTER_STEPS = ["after-record", "after-link", "after-ipam", *CHAINED_STEPS[1:]]


@pytest.fixture(scope="module", autouse=True)
def host_local_plugin():
    if not os.access(f"{CNI_PATH}/host-local", os.X_OK):
        pytest.fail("these tests need the host-local IPAM plugin: apt-get install "
                    "containernetworking-plugins")


def pod_links(netns: str) -> list[dict]:
    return [link for link in reliability.ip_links(netns) if link["ifname"] != "lo"]


def leases(ipam_dir: Path) -> list[str]:
    return [p.name for p in ipam_dir.rglob("*") if p.is_file() and p.name != "lock"
            and not p.name.startswith("last_reserved_ip")]


def assert_half_made(step: str, setup, netns: str, ipam_dir: Path | None) -> None:
    """What the killed ADD must have left at `step`, so the cleanup has real work to do. The
    member stack binds at alloc (and the driver enables at alloc), the call stacks after."""
    inode = os.stat(netns).st_ino
    bound_at_alloc = getattr(setup, "stack", "") == "netns-member"
    [record] = setup.records()
    assert record["complete"] is False
    services = setup.services()
    bound = [s for s in services if s.netns_inode == inode]
    if step in ("after-record", "after-link", "after-ipam"):
        assert services == []
    elif step.startswith("after-alloc-"):
        index = int(step.rsplit("-", 1)[1])
        assert len(bound) == index + bound_at_alloc and len(services) == index + 1
        assert record["allocating"] == f"cxi{index}"
    elif step.startswith("after-bind-"):
        index = int(step.rsplit("-", 1)[1])
        assert len(bound) == len(services) == index + 1
        enabled = next(s for s in bound if s.device == f"cxi{index}").desc.enable
        assert enabled is bound_at_alloc
    else:
        assert len(bound) == 2 and all(s.desc.enable for s in bound)
    if ipam_dir is not None:
        made_link = step not in ("after-record",)
        assert len(pod_links(netns)) == made_link
        assert len(leases(ipam_dir)) == (step not in ("after-record", "after-link"))


def kill_add_then_clean(cni, setup, netns: str, conf: dict, gc_conf: dict, step: str,
                        cleanup: str, tmp_path: Path, ipam_dir: Path | None = None,
                        master: str | None = None) -> None:
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    env = {KILL_ENV: step, "TMPDIR": str(unpack)}
    run = cni("ADD", conf, netns=netns, cni_path=CNI_PATH, env=env)
    assert run.rc == -signal.SIGKILL, f"ADD was not killed at {step}: rc={run.rc} {run.stdout}"
    assert run.stdout == "" and "Traceback" not in run.stderr
    assert_half_made(step, setup, netns, ipam_dir)
    env = {"TMPDIR": str(unpack)}
    if cleanup == "DEL":
        cni("DEL", conf, netns=netns, cni_path=CNI_PATH, env=env).ok()
        cni("DEL", conf, netns=netns, cni_path=CNI_PATH, env=env).ok()  # and again
    else:
        cni("GC", gc_conf, container_id=None, ifname=None, cni_path=CNI_PATH, env=env).ok()
    left = reliability.leaks(setup, [netns], ipam_dir, master, unpack, binary=cni.binary)
    reliability.record("crash", cases=1, kills=1, leaks=len(left), step=step, cleanup=cleanup,
                       backend=setup.kind, master=bool(master))
    assert left == [], f"after a kill at {step} and {cleanup}: {left}"


def gc_of(conf: dict) -> dict:
    return {**conf, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}


@pytest.mark.parametrize("cleanup", ["DEL", "GC"])
@pytest.mark.parametrize("step", CHAINED_STEPS)
def test_chained_add_killed_leaves_nothing(cni, cxi_setup, netns, tmp_path, step, cleanup):
    conf = cxi_setup.conf(cxi={"vnis": [300, 301]})
    kill_add_then_clean(cni, cxi_setup, netns, conf, gc_of(conf), step, cleanup, tmp_path)


@pytest.mark.parametrize("cleanup", ["DEL", "GC"])
@pytest.mark.parametrize("step", MASTER_STEPS)
def test_macvlan_add_killed_leaves_nothing(cni, sim, netns, make_veth, tmp_path, step, cleanup):
    master = make_veth()
    ipam_dir = tmp_path / "ipam"
    conf = sim.conf(master=master, linkType="macvlan",
                    ipam={"type": "host-local", "subnet": "10.233.0.0/24", "dataDir": str(ipam_dir)})
    kill_add_then_clean(cni, sim, netns, conf, gc_of(conf), step, cleanup, tmp_path, ipam_dir,
                        master)


@pytest.mark.parametrize("step", ["after-alloc-1", "after-bind-0"])
def test_killed_add_then_the_namespace_dies_before_del(cni, sim, make_netns, tmp_path, step):
    """The runtime's timeout killed ADD and the pod's namespace went away before DEL."""
    netns = make_netns()
    conf = sim.conf()
    run = cni("ADD", conf, netns=netns, env={KILL_ENV: step})
    assert run.rc == -signal.SIGKILL
    sh("ip", "netns", "del", os.path.basename(netns))
    cni("DEL", conf, netns=netns).ok()
    left = reliability.leaks(sim)
    reliability.record("crash", cases=1, kills=1, leaks=len(left), step=step, cleanup="DEL")
    assert left == []


def test_add_after_a_killed_add_starts_clean(cni, sim, netns):
    """A killed ADD retried by the runtime without DEL: the retry owns the only services."""
    conf = sim.conf()
    assert cni("ADD", conf, netns=netns, env={KILL_ENV: "after-alloc-1"}).rc == -signal.SIGKILL
    cni("ADD", conf, netns=netns).ok()
    inode = os.stat(netns).st_ino
    services = sim.services()
    assert sorted(s.device for s in services) == ["cxi0", "cxi1"]
    assert all(s.netns_inode == inode and s.desc.enable for s in services)
    cni("CHECK", conf, netns=netns).ok()
    cni("DEL", conf, netns=netns).ok()
    left = reliability.leaks(sim, [netns])
    reliability.record("crash", cases=1, kills=1, leaks=len(left), step="after-alloc-1",
                       cleanup="ADD again")
    assert left == []


def pretend_inode_reuse(sim, old_inode: int, new_inode: int) -> None:
    """What the kernel does when it hands a dead namespace's inode to a new one, for the
    services and records of the dead pod: they now name the new namespace's inode."""
    with sim.backend().state.transaction() as state:
        for device in state["devices"].values():
            for svc in device["services"].values():
                if svc["netns"] == old_inode:
                    svc["netns"] = new_inode
    for path in sim.state_dir.glob("*.json"):
        record = json.loads(path.read_text())
        if record["netnsInode"] == old_inode:
            path.write_text(json.dumps({**record, "netnsInode": new_inode}))
    for entry in (sim.state_dir / "netns").glob(f"{old_inode}-*"):  # the store's index by inode
        entry.rename(entry.with_name(entry.name.replace(f"{old_inode}-", f"{new_inode}-", 1)))


@pytest.mark.parametrize("first", ["ADD", "GC"])
def test_dead_namespace_inode_reused_by_a_new_pod(cni, sim, make_netns, first):
    """Pod A's namespace dies without DEL; pod B's new namespace gets the same inode (from
    the kernel, or the sim pretends). Whether B's ADD or GC comes first, B never gets A's
    service, and A's late DEL and GC leave B's services alone."""
    old = make_netns()
    conf_a, conf_b = sim.conf(cxi={"vnis": [501]}), sim.conf(cxi={"vnis": [502]})
    cni("ADD", conf_a, netns=old, container_id="podA").ok()
    old_inode = os.stat(old).st_ino
    sh("ip", "netns", "del", os.path.basename(old))
    new = make_netns()
    new_inode = os.stat(new).st_ino
    reused_by_kernel = new_inode == old_inode
    if not reused_by_kernel:
        pretend_inode_reuse(sim, old_inode, new_inode)
    gc_conf = sim.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "podB", "ifname": "eth0"}]})
    if first == "GC":
        cni("GC", gc_conf, container_id=None, ifname=None).ok()
        assert sim.services() == [] and sim.records() == []
    cni("ADD", conf_b, netns=new, container_id="podB").ok()

    def b_services():
        return sorted((s.device, list(s.desc.vnis)) for s in sim.services()
                      if s.netns_inode == new_inode)

    inherited = [s for s in sim.services() if list(s.desc.vnis) != [502]]
    assert b_services() == [("cxi0", [502]), ("cxi1", [502])] and inherited == []
    cni("DEL", conf_a, netns=old, container_id="podA").ok()  # A's late DEL
    cni("GC", gc_conf, container_id=None, ifname=None).ok()
    assert b_services() == [("cxi0", [502]), ("cxi1", [502])]
    assert [r["containerID"] for r in sim.records()] == ["podB"]
    cni("CHECK", conf_b, netns=new, container_id="podB").ok()
    cni("DEL", conf_b, netns=new, container_id="podB").ok()
    left = reliability.leaks(sim, [new])
    reliability.record("inode reuse", cases=1, leaks=len(left) + len(inherited), first=first,
                       reused_by_kernel=reused_by_kernel)
    assert left == []
