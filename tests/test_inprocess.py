"""The dispatcher and the plugin's commands run in-process (skel.dispatch with env, stdin and
stdout as parameters), beside the binary tests: real namespaces and links, the sim backend."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from cxi_cni.cni import skel
from cxi_cni.cni.args import CmdArgs
from cxi_cni.gc import collect
from cxi_cni.invocation import Invocation
from cxi_cni.plugin import CxiPlugin
from cxi_cni.vnis import resolve


def dispatch(command: str, conf, netns: str | None = None, container_id: str = "ctr1",
             ifname: str = "eth0", cni_args: str = "", plugin_factory=CxiPlugin):
    """One command through skel.dispatch; (exit code, parsed stdout, what on_finish saw)."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname,
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": cni_args}
    if netns:
        env["CNI_NETNS"] = netns
    stdin = io.BytesIO(conf if isinstance(conf, bytes) else json.dumps(conf).encode())
    stdout, finished = io.StringIO(), []
    rc = skel.dispatch("cxi", plugin_factory, env, stdin, stdout,
                       on_finish=lambda *seen: finished.append(seen))
    text = stdout.getvalue().strip()
    return rc, (json.loads(text) if text else None), finished[0]


def cmd_args(conf: dict, command: str = "CLI", **kw) -> CmdArgs:
    return CmdArgs(command=command, container_id=kw.get("container_id", ""), netns="", ifname="",
                   cni_path=[], args=kw.get("args", {}), conf=conf, cni_version=conf["cniVersion"])


def test_version_does_not_load_the_plugin():
    def refuse():
        raise AssertionError("VERSION loaded the plugin")

    rc, out, seen = dispatch("VERSION", {"cniVersion": "0.4.0"}, plugin_factory=refuse)
    assert rc == 0 and out["cniVersion"] == "0.4.0" and "1.1.0" in out["supportedVersions"]
    assert seen[0] == "VERSION" and seen[2] is None


def test_add_check_del_in_process(sim, netns):
    conf = sim.conf(cxi={"vnis": [321]})
    rc, result, seen = dispatch("ADD", conf, netns)
    assert rc == 0, result
    assert result["cxi"]["vnis"] == [321] and len(result["cxi"]["services"]) == 2
    assert {s.netns_inode for s in sim.services()} == {os.stat(netns).st_ino}
    assert seen[1].container_id == "ctr1" and seen[2] is None
    assert dispatch("CHECK", {**conf, "prevResult": result}, netns)[0] == 0
    assert dispatch("DEL", conf, netns)[0] == 0
    assert sim.services() == [] and sim.records() == []


@pytest.mark.parametrize(("case", "code", "needle"), [
    ("netns missing", 3, "CNI_NETNS"),
    ("netns a regular file", 7, "CNI_NETNS"),
    ("host netns", 7, "host's own"),
    ("bad field", 7, "cxi.tcs"),
    ("unknown cxi key", 2, "cxi.zz"),
    ("state dir symlink", 102, "symlink"),
    ("sim state damaged", 101, "damaged"),
])
def test_domain_failures_become_cni_errors(sim, netns, tmp_path, case, code, needle):
    conf, path = sim.conf(), netns
    if case == "netns missing":
        path = str(tmp_path / "gone")
    elif case == "netns a regular file":
        path = str(tmp_path / "file")
        (tmp_path / "file").write_text("x")
    elif case == "host netns":
        path = "/proc/self/ns/net"
    elif case == "bad field":
        conf["cxi"]["tcs"] = ["fast"]
    elif case == "unknown cxi key":
        conf["cxi"]["zz"] = 1
    elif case == "state dir symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        os.symlink(tmp_path / "real", sim.state_dir)
    elif case == "sim state damaged":
        sim.sim_state.write_text("{")
    rc, err, seen = dispatch("ADD", conf, path)
    assert rc == 1 and err["code"] == code and needle in err["msg"], err
    assert seen[2] is not None and getattr(seen[2], "code", None) == code
    if case != "sim state damaged":
        assert sim.services() == []
    assert not sim.state_dir.is_dir() or sim.records() == []


def test_status_reports_an_unusable_backend_as_not_available(sim):
    sim.sim_state.write_text("{")
    rc, err, _ = dispatch("STATUS", sim.conf("1.1.0"))
    assert rc == 1 and err["code"] == 50 and "damaged" in err["msg"]


def test_an_unexpected_exception_is_internal_error_json(sim, netns):
    class Broken(CxiPlugin):
        def add(self, args):
            raise RuntimeError("boom")

    rc, err, seen = dispatch("ADD", sim.conf(), netns, plugin_factory=Broken)
    assert rc == 1 and err["code"] == 999 and "RuntimeError: boom" in err["msg"]
    assert "bug in the cxi plugin" in err["details"]  # the name its caller gave
    assert isinstance(seen[2], RuntimeError)


def test_gc_collects_dead_attachments_in_process(sim, make_netns):
    live, dead = make_netns(), make_netns()
    assert dispatch("ADD", sim.conf(), live, container_id="live")[0] == 0
    assert dispatch("ADD", sim.conf(), dead, container_id="dead")[0] == 0
    subprocess.run(["ip", "netns", "del", os.path.basename(dead)], check=True)
    with Invocation(cmd_args(sim.conf("1.1.0"), "GC")) as inv:
        report = collect(inv, None)
    assert report["removedAttachments"] == ["dead/eth0"] and report["failures"] == []
    assert [r["containerID"] for r in sim.records()] == ["live"]
    assert {s.netns_inode for s in sim.services()} == {os.stat(live).st_ino}


def test_vni_sources_in_process(sim):
    conf = Invocation(cmd_args(sim.conf(cxi={"vnis": [700]}))).conf
    assert resolve(conf, {}) == (700,)
    assert resolve(conf, {"VNI": "801,802"}) == (700,)  # the runtime's VNI= is off by default
    conf.cxi.vniSources = ["cniArgs", "config"]
    assert resolve(conf, {"VNI": "801,802"}) == (801, 802)
    assert resolve(conf, {"VNI": "99"}) == (700,)  # outside cxi.allowedVnis: the next source


def test_a_namespace_lock_held_too_long_is_try_again_later(sim, netns, monkeypatch):
    """Another ADD of the pod holds its namespace past the wait: code 11 (the runtime
    retries), not an internal error, and nothing of this ADD is left."""
    import fcntl

    from cxi_cni import state

    monkeypatch.setattr(state, "NAMESPACE_WAIT", 0.2)
    holder = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        rc, out, _ = dispatch("ADD", sim.conf(cxi={"vnis": [321]}), netns)
    finally:
        os.close(holder)
    assert rc != 0 and out["code"] == 11, out
    assert "held its lock too long" in out["msg"] and "retry" in out["details"]
    assert sim.services() == [] and sim.records() == []


def busy_after_alloc(sim, monkeypatch, fail_on: str | None):
    """Each service is in use by an LNI right after its alloc (so it cannot be destroyed),
    and the alloc on device `fail_on` fails as if the NIC had no room."""
    import errno

    from cxi_cni.cxi.backend import CxiError
    from cxi_cni.cxi.sim import SimDevice

    alloc = SimDevice.alloc_svc

    def alloc_then_busy(self, desc):
        if self.name == fail_on:
            raise CxiError("cxil_alloc_svc", self.name, errno.ENOSPC, "no room")
        svc_id = alloc(self, desc)
        sim.set_busy(self.name, svc_id, 1)
        return svc_id

    monkeypatch.setattr(SimDevice, "alloc_svc", alloc_then_busy)


def test_a_service_the_rollback_cannot_destroy_stays_on_record(sim, netns, monkeypatch):
    """ADD fails on cxi1 after cxi0's service was made, and that service is in use: the
    record keeps it (incomplete), and the DEL the runtime sends destroys it once free."""
    busy_after_alloc(sim, monkeypatch, fail_on="cxi1")
    conf = sim.conf(cxi={"vnis": [321], "destroyRetries": 0})
    rc, out, _ = dispatch("ADD", conf, netns)
    assert rc != 0 and "cxi1" in out["msg"], out
    [left] = sim.services()
    [record] = sim.records()
    assert left.device == "cxi0" and record["complete"] is False
    assert [(s["device"], s["svcId"]) for s in record["services"]] == [("cxi0", left.svc_id)]
    assert dispatch("DEL", conf, netns)[0] != 0  # still in use: DEL fails and keeps it
    assert sim.records() and sim.services()
    sim.set_busy("cxi0", left.svc_id, 0)
    assert dispatch("DEL", conf, netns)[0] == 0
    assert sim.services() == [] and sim.records() == []


def test_services_a_failed_last_step_cannot_destroy_stay_on_record(sim, netns, monkeypatch):
    """Every service is made, then writing the complete record fails (a full disk): the
    services that cannot be destroyed stay named by the record written before, and a GC
    that no longer counts the attachment as valid destroys them."""
    from cxi_cni.state import AttachmentStore, StateError

    busy_after_alloc(sim, monkeypatch, fail_on=None)
    save = AttachmentStore.save

    def save_until_complete(self, record):
        if record.complete:  # as save() says a full disk
            raise StateError("cannot write state record: No space left on device")
        save(self, record)

    monkeypatch.setattr(AttachmentStore, "save", save_until_complete)
    conf = sim.conf(cxi={"vnis": [321]})
    rc, out, _ = dispatch("ADD", conf, netns)
    assert rc != 0 and out["code"] == 102, out
    [record] = sim.records()
    assert record["complete"] is False
    assert sorted((s["device"], s["svcId"]) for s in record["services"]) == sorted(
        (s.device, s.svc_id) for s in sim.services())
    monkeypatch.undo()
    for svc in sim.services():
        sim.set_busy(svc.device, svc.svc_id, 0)
    with Invocation(cmd_args(sim.conf("1.1.0"), "GC")) as inv:  # no DEL came: GC does it
        report = collect(inv, set())
    assert report["removedAttachments"] == ["ctr1/eth0"] and report["failures"] == [], report
    assert sim.services() == [] and sim.records() == []


class AddInFlight:
    """Another attachment's ADD ("adding"/eth0, VNI 321) that holds its lock, records its
    intent and allocates on cxi0 right before an orphan sweep lists cxi0; `finish()` records
    the service and lets the lock go, as the ADD would."""

    def __init__(self, conf, netns: str, monkeypatch):
        from cxi_cni.cxi.backend import ServiceDesc
        from cxi_cni.cxi.sim import SimDevice
        from cxi_cni.record import AttachmentRecord
        from cxi_cni.state import AttachmentStore

        self.store = AttachmentStore(conf["stateDir"])
        self.store.ensure()
        self.record = AttachmentRecord("adding", "eth0", netns, os.stat(netns).st_ino, (321,), (),
                                       ["cxi0"], allocating="cxi0")
        self.lock = self.store.lock("adding", "eth0")
        self.lock.__enter__()
        self.made: list[int] = []
        listing = SimDevice.list_services

        def allocate_first(dev, netns_too=True):
            if dev.name == "cxi0" and not self.made and \
                    sys._getframe(1).f_code.co_name == "destroy_orphans":
                self.store.save(self.record)
                self.made.append(dev.alloc_svc(ServiceDesc.for_netns((321,))))
            return listing(dev, netns_too)

        monkeypatch.setattr(SimDevice, "list_services", allocate_first)

    def finish(self) -> None:
        from cxi_cni.record import Binding

        self.record.services, self.record.allocating = [Binding("cxi0", self.made[0])], None
        self.store.save(self.record)
        self.lock.__exit__(None, None, None)


def killed_add_record(conf, netns: str, container_id: str = "ctr1"):
    """The record an ADD killed while allocating on cxi0 leaves (its lock is free)."""
    from cxi_cni.record import AttachmentRecord
    from cxi_cni.state import AttachmentStore

    store = AttachmentStore(conf["stateDir"])
    store.ensure()
    store.save(AttachmentRecord(container_id, "eth0", netns, os.stat(netns).st_ino, (321,), (),
                                ["cxi0", "cxi1"], allocating="cxi0"))


def test_gc_spares_the_service_an_add_allocates_while_it_sweeps(sim, netns, monkeypatch):
    """GC sees the ADD's unbound, member-less service but reads the records after the
    listing, so it leaves it alone (else the driver hands its id to the next alloc)."""
    conf = sim.conf("1.1.0", cxi={"vnis": [321]})
    adding = AddInFlight(conf, netns, monkeypatch)
    with Invocation(cmd_args(conf, "GC")) as inv:
        report = collect(inv, {("adding", "eth0")})
    assert adding.made and report["reapedServices"] == [], report
    assert [(s.device, s.svc_id) for s in sim.services()] == [("cxi0", adding.made[0])]
    adding.finish()


def test_del_of_a_killed_add_waits_for_another_adds_service_of_the_same_vnis(sim, make_netns,
                                                                             monkeypatch):
    """DEL of an attachment whose ADD was killed while allocating on cxi0 looks for its
    orphan there; another pod's ADD of the same job is allocating on cxi0 at that moment:
    DEL says "try again" and keeps its record, and the retry, once that ADD is done,
    finishes without touching its service."""
    conf = sim.conf(cxi={"vnis": [321]})
    killed = make_netns()
    killed_add_record(conf, killed)
    adding = AddInFlight(conf, make_netns(), monkeypatch)
    rc, out, _ = dispatch("DEL", conf, killed)
    assert rc != 0 and out["code"] == 11 and "cxi0" in out["msg"], out
    assert adding.made and sorted(r["containerID"] for r in sim.records()) == ["adding", "ctr1"]
    adding.finish()
    assert dispatch("DEL", conf, killed)[0] == 0
    assert [(s.device, s.svc_id) for s in sim.services()] == [("cxi0", adding.made[0])]
    assert [r["containerID"] for r in sim.records()] == ["adding"]


def test_a_killed_adds_stale_marker_does_not_stop_another_dels_sweep(sim, make_netns):
    """Two ADDs were killed while allocating on cxi0, each leaving an orphan: the DEL of
    one is not held up by the other's record (no one holds its lock) and sweeps them."""
    from cxi_cni.cxi.backend import ServiceDesc

    conf = sim.conf(cxi={"vnis": [321]})
    first, second = make_netns(), make_netns()
    killed_add_record(conf, first, "ctr1")
    killed_add_record(conf, second, "ctr2")
    dev = sim.backend().open("cxi0")
    orphans = [dev.alloc_svc(ServiceDesc.for_netns((321,))) for _ in range(2)]
    dev.close()
    assert dispatch("DEL", conf, first)[0] == 0
    assert sim.services() == [] and [r["containerID"] for r in sim.records()] == ["ctr2"]
    assert dispatch("DEL", conf, second, container_id="ctr2")[0] == 0
    assert sim.records() == [] and len(orphans) == 2


def test_a_rollback_that_fails_itself_keeps_every_service_on_record(sim, netns, monkeypatch):
    """The alloc on cxi1 fails, and the rollback's destroy on cxi0 fails in a way destroy()
    does not expect (the backend stops answering): cxi0's service stays on record."""
    from cxi_cni.cxi.backend import BackendUnavailable
    from cxi_cni.cxi.sim import SimDevice

    busy_after_alloc(sim, monkeypatch, fail_on="cxi1")

    def unavailable(self, svc_id):
        raise BackendUnavailable("the sim state stayed locked")

    monkeypatch.setattr(SimDevice, "destroy_svc", unavailable)
    conf = sim.conf(cxi={"vnis": [321], "destroyRetries": 0})
    assert dispatch("ADD", conf, netns)[0] != 0
    [left] = sim.services()
    [record] = sim.records()
    assert [(s["device"], s["svcId"]) for s in record["services"]] == [("cxi0", left.svc_id)]
    monkeypatch.undo()
    sim.set_busy("cxi0", left.svc_id, 0)
    assert dispatch("DEL", conf, netns)[0] == 0
    assert sim.services() == [] and sim.records() == []


def scan_then(monkeypatch, call: int, meanwhile):
    """GC's `call`-th look at the live namespaces (1: which records to keep, 2: which
    services are dead) returns what it saw, and `meanwhile` runs right after it."""
    from cxi_cni import gc

    scan, calls = gc.live_netns_inodes, []

    def scan_and_race():
        calls.append(1)
        seen = scan()
        if len(calls) == call:
            meanwhile()
        return seen

    monkeypatch.setattr(gc, "live_netns_inodes", scan_and_race)


def test_cxi_gc_keeps_a_pod_added_while_it_looks_for_live_namespaces(sim, make_netns, monkeypatch):
    """`cxi gc` without a list keeps the records whose namespace lives: a pod ADDed right
    after the look is not judged by it (its record is read before), and keeps everything."""
    conf = sim.conf("1.1.0", cxi={"vnis": [321]})
    fresh = []

    def a_pod_starts():  # its namespace made after the look, then its ADD
        fresh.append(make_netns())
        assert dispatch("ADD", conf, fresh[0], container_id="fresh")[0] == 0

    scan_then(monkeypatch, 1, a_pod_starts)
    with Invocation(cmd_args(conf, "GC")) as inv:
        report = collect(inv, None)
    assert report["removedAttachments"] == [], report
    assert [r["containerID"] for r in sim.records()] == ["fresh"]
    assert {s.netns_inode for s in sim.services()} == {os.stat(fresh[0]).st_ino}


def test_gc_destroys_a_dead_namespaces_service_only_if_its_id_is_still_bound_there(sim, make_netns,
                                                                                   monkeypatch):
    """GC lists a service bound to a dead namespace; before it destroys it, the id is
    freed and handed to a live pod's service: that one stays."""
    conf = sim.conf("1.1.0", cxi={"vnis": [321]})
    dead, live = make_netns(), make_netns()
    dead_id = sim.bind("cxi0", (321,), os.stat(dead).st_ino)  # no record: only GC can see it
    subprocess.run(["ip", "netns", "del", os.path.basename(dead)], check=True)
    made = []

    def id_handed_out_again():
        dev = sim.backend().open("cxi0")
        dev.destroy_svc(dead_id)
        dev.close()
        made.append(sim.bind("cxi0", (321,), os.stat(live).st_ino))

    scan_then(monkeypatch, 2, id_handed_out_again)
    with Invocation(cmd_args(conf, "GC")) as inv:
        collect(inv, None)
    assert made == [dead_id], "the sim did not hand the id out again"
    assert [(s.svc_id, s.netns_inode) for s in sim.services()] == [(dead_id, os.stat(live).st_ino)]
