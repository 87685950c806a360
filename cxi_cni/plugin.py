"""The cxi plugin's commands: ADD, DEL, CHECK, STATUS and GC over the CXI layer, the
attachment records and (with `master`) the pod's link and its delegated IPAM."""

from __future__ import annotations

import logging
import time

from . import faults, logs
from .cni.args import CmdArgs
from .cni.errors import (
    INVALID_CONFIG,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
)
from .cni.version import merge_results

log = logging.getLogger("cxi_cni.plugin")

# The plugin's own error codes (the spec leaves 100 and up to plugins).
CXI_FAILURE = 100
BACKEND_UNAVAILABLE = 101
STATE_FAILURE = 102

ERRNO_FIXES = {
    "ENOSPC": "the device has too few free resources: lower cxi.limits or free services",
    "EINVAL": "check cxi.vnis, cxi.tcs and cxi.limits against the device (cxi doctor)",
    "EBUSY": "a process in the pod still holds the NIC; the runtime will retry",
    "EPERM": "the device is a VF: bind services on the physical function",
    "EEXIST": "the service already has a UID/GID member",
    "ENODEV": "the CXI device is gone (cxi doctor lists the present ones)",
}


def cxi_error(exc) -> CniError:
    import errno as errno_mod

    name = errno_mod.errorcode.get(exc.errno, "")
    code = TRY_AGAIN_LATER if name == "EBUSY" else CXI_FAILURE
    return CniError(code, str(exc), ERRNO_FIXES.get(name, "run `cxi doctor` on the node"))


class Attachment:
    """Everything one invocation works with: config, backend, records, netns identity."""

    def __init__(self, args: CmdArgs):
        from .config import parse_conf

        self.args = args
        self.conf = parse_conf(args.conf)
        logs.configure(self.conf.logFile, self.conf.logLevel,
                       {"command": args.command, "containerID": args.container_id,
                        "ifname": args.ifname, **logs.pod_fields(args.args)})
        from .state import AttachmentStore

        self.store = AttachmentStore(self.conf.stateDir)
        self._backend = None

    @property
    def backend(self):
        if self._backend is None:
            self._backend = open_backend(self.conf)
        return self._backend

    def netns_inode(self, required: bool = True) -> int:
        """The inode of CNI_NETNS; 0 when it is gone and not required (DEL)."""
        from .netns import NetnsError, netns_inode, own_netns_inode

        try:
            inode = netns_inode(self.args.netns)
        except NetnsError as exc:
            if not required:
                return 0
            code = UNKNOWN_CONTAINER if exc.kind == "missing" else INVALID_CONFIG
            raise CniError(code, f"CNI_NETNS: {exc}",
                           "pass the path of the container's network namespace, such as "
                           "/run/netns/NAME or /proc/PID/ns/net") from None
        if inode == own_netns_inode():
            if not required:
                return 0
            raise CniError(INVALID_CONFIG, f"CNI_NETNS {self.args.netns} is the host's own "
                           "network namespace; refusing to give it a CXI service",
                           "pass the container's network namespace")
        return inode

    def devices(self) -> list[str]:
        from .cxi.backend import BackendUnavailable

        choice = self.conf.cxi.devices
        try:
            self.backend.check()
            if choice == "all":
                names = self.backend.device_names()
            elif choice == "master":
                names = [self.backend.device_for_netdev(self.conf.master)]
            else:
                present = set(self.backend.device_names())
                missing = [d for d in choice if d not in present]
                if missing:
                    raise CniError(INVALID_CONFIG, f"cxi.devices names {', '.join(missing)}, "
                                   "which this node does not have",
                                   f"present devices: {', '.join(sorted(present)) or 'none'}")
                names = list(choice)
        except BackendUnavailable as exc:
            raise CniError(BACKEND_UNAVAILABLE, str(exc), "run `cxi doctor` on the node") from None
        if not names:
            raise CniError(BACKEND_UNAVAILABLE, f"no CXI devices found by the {self.conf.cxi.backend} "
                           "backend", "run `cxi doctor` on the node")
        return names

    def spec(self, vnis) -> ServiceSpec:  # noqa: F821
        from .cxi.backend import Limit
        from .cxi.services import ServiceSpec

        limits = tuple((name, Limit(lim.max, lim.res))
                       for name, lim in sorted(self.conf.cxi.limits.items()))
        return ServiceSpec(tuple(vnis), frozenset(self.conf.cxi.tcs), limits)


def open_backend(conf):
    if conf.cxi.backend == "sim":
        from .cxi.sim import SimBackend

        return SimBackend(conf.cxi.simState)
    from .cxi.libcxi import LibcxiBackend

    return LibcxiBackend(conf.cxi.libcxi)


def bindings_of(record: dict | None) -> list:
    from .cxi.services import Binding

    return [Binding(s["device"], s["svcId"]) for s in (record or {}).get("services", [])]


def release_orphan(att: Attachment, record: dict) -> None:
    """An ADD killed between alloc and recording the id left an unbound service behind."""
    device = record.get("allocating")
    if device:
        from .cxi.services import destroy_orphans

        destroy_orphans(att.backend, device, tuple(record.get("vnis") or ()), att.store.claimed())


def release_unclaimed(att: Attachment, inode: int) -> None:
    """DEL whose record is unreadable: destroy the services bound to the pod's namespace
    that no readable record claims (they can only be this attachment's). With the
    namespace gone (inode 0), GC reaps them."""
    if not inode:
        return
    from .cxi.services import reap_stale

    claimed = att.store.claimed()
    for name in att.backend.device_names():
        dev = att.backend.open(name)
        try:
            reap_stale(dev, inode, lambda svc, reap: None if (svc.device, svc.svc_id) in claimed
                       else reap())
        finally:
            dev.close()


def state_guard(fn):
    """Map state, backend and CXI failures to CNI errors for every command."""

    def wrapper(self, args: CmdArgs):
        from .cxi.backend import BackendUnavailable, CxiError
        from .state import StateError

        try:
            return fn(self, args)
        except StateError as exc:
            raise CniError(STATE_FAILURE, str(exc), "fix or remove the file named") from None
        except BackendUnavailable as exc:
            code = NOT_AVAILABLE if args.command == "STATUS" else BACKEND_UNAVAILABLE
            raise CniError(code, str(exc), "run `cxi doctor` on the node") from None
        except CxiError as exc:
            raise cxi_error(exc) from None

    return wrapper


class CxiPlugin:
    """The plugin object handed to the CNI dispatcher."""

    @state_guard
    def add(self, args: CmdArgs) -> dict:
        from . import vnis as vni_sources
        from .cxi.services import bind_netns

        att = Attachment(args)
        inode = att.netns_inode()
        spec = att.spec(vni_sources.resolve(att.conf, args.args))
        devices = att.devices() if spec.vnis else []
        with att.store.lock(args.container_id, args.ifname):
            previous = att.store.load(args.container_id, args.ifname)
            if previous:
                log.warning("ADD for an attachment that exists; removing what it had first")
                if att.conf.master:
                    from . import interface as iface

                    iface.del_interface(att.conf, args)
                self._release(att, previous)
            record = {
                "containerID": args.container_id, "ifname": args.ifname,
                "netns": args.netns, "netnsInode": inode, "vnis": list(spec.vnis),
                "tcs": sorted(spec.tcs), "devices": devices, "services": [],
                "link": None, "created": time.time(), "complete": False,
            }
            att.store.save(record)
            faults.point("after-record")
            interface = None
            try:
                if att.conf.master:
                    from . import interface as iface

                    interface = iface.add_interface(att.conf, args)
                    record["link"] = interface.record
                    att.store.save(record)

                def made(binding, device):
                    record["allocating"] = None if binding else device
                    if binding:
                        record["services"].append({"device": binding.device,
                                                   "svcId": binding.svc_id})
                    att.store.save(record)

                bindings = bind_netns(att.backend, devices, inode, spec, made,
                                      StaleJudge(att, inode).judge, faults.point)
                faults.point("before-complete")
                record["complete"] = True
                att.store.save(record)
            except BaseException:
                record["services"] = []
                if interface is not None:
                    interface.undo()
                att.store.remove(args.container_id, args.ifname)
                raise
        logs.event(log, logging.INFO, "services bound", netnsInode=inode, vnis=list(spec.vnis),
                   services=[f"{b.device}/{b.svc_id}" for b in bindings])
        ours = interface.result if interface is not None else {}
        result = merge_results(args.prev_result, ours)
        result["cxi"] = {
            "netnsInode": inode, "vnis": list(spec.vnis),
            "services": [{"device": b.device, "svcId": b.svc_id} for b in bindings],
        }
        return result

    @state_guard
    def delete(self, args: CmdArgs) -> None:
        att = Attachment(args)
        with att.store.lock(args.container_id, args.ifname):
            try:
                record = att.store.load(args.container_id, args.ifname)
                damaged = False
            except Exception as exc:  # a damaged record must not block the pod's removal
                log.error("unreadable record, removing it: %s", exc)
                record, damaged = None, True
            if att.conf.master:
                from . import interface as iface

                iface.del_interface(att.conf, args)
            if record is not None:
                self._release(att, record)
            elif damaged:
                release_unclaimed(att, att.netns_inode(required=False))
            att.store.remove(args.container_id, args.ifname)

    def _release(self, att: Attachment, record: dict) -> None:
        """Destroy a record's services; keep the record with what is left if any fail."""
        from .cxi.services import destroy

        release_orphan(att, record)
        bindings = bindings_of(record)
        if not bindings:
            return
        failures = destroy(att.backend, bindings, record.get("netnsInode", 0))
        if failures:
            record["services"] = [{"device": b.device, "svcId": b.svc_id} for b, _ in failures]
            att.store.save(record)
            binding, exc = failures[0]
            from .cxi.backend import CxiError

            if isinstance(exc, CxiError):
                raise cxi_error(exc)
            raise CniError(CXI_FAILURE, f"cannot destroy service {binding.svc_id} on "
                           f"{binding.device}: {exc}", "the runtime will retry DEL")
        logs.event(log, logging.INFO, "services destroyed",
                   services=[f"{b.device}/{b.svc_id}" for b in bindings])

    @state_guard
    def check(self, args: CmdArgs) -> None:
        from .cxi.services import differences

        att = Attachment(args)
        inode = att.netns_inode()
        record = att.store.load(args.container_id, args.ifname)
        if record is None or not record.get("complete"):
            raise CniError(UNKNOWN_CONTAINER, f"no complete attachment record for container "
                           f"{args.container_id} interface {args.ifname}",
                           "ADD did not succeed for this attachment; the runtime should ADD it again")
        problems = []
        if record["netnsInode"] != inode:
            problems.append(f"the attachment was made for netns inode {record['netnsInode']}, "
                            f"CNI_NETNS has inode {inode}")
        spec = att.spec(record["vnis"])
        from . import vnis as vni_sources

        expected = vni_sources.resolve(att.conf, args.args)
        if expected != spec.vnis:
            problems.append(f"the pod's VNIs are now {list(expected)}, its services grant "
                            f"{list(spec.vnis)}")
        recorded = {b.device for b in bindings_of(record)}
        for device in (att.devices() if spec.vnis else []):
            if device not in recorded:
                problems.append(f"device {device} has no service for this attachment")
        for binding in bindings_of(record):
            problems.extend(differences(att.backend, binding, inode, spec))
        if att.conf.master:
            from . import interface as iface

            problems.extend(iface.check_interface(att.conf, args, record.get("link")))
        if problems:
            raise CniError(CXI_FAILURE, "CHECK failed: " + "; ".join(problems),
                           "the runtime should DEL and ADD this attachment again")

    @state_guard
    def status(self, args: CmdArgs) -> None:
        att = Attachment(args)
        try:
            att.backend.check()
            att.devices()
            att.store.ensure()
        except CniError as exc:
            raise CniError(NOT_AVAILABLE, exc.msg, exc.details) from None
        if att.conf.master:
            from . import interface as iface

            iface.status_interface(att.conf, args)

    @state_guard
    def gc(self, args: CmdArgs) -> None:
        from .gc import collect

        att = Attachment(args)
        valid = args.conf.get("cni.dev/valid-attachments")
        if not isinstance(valid, list):
            raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments, a list of "
                           "{containerID, ifname}", "the runtime must send the valid attachments")
        keep = {(v.get("containerID"), v.get("ifname")) for v in valid if isinstance(v, dict)}
        report = collect(att, keep)
        logs.event(log, logging.INFO, "gc done", **report)
        if report["failures"]:
            raise CniError(TRY_AGAIN_LATER, "GC could not remove everything: "
                           + "; ".join(report["failures"][:5]), "the runtime will retry GC")
        if att.conf.master:
            from . import interface as iface

            iface.gc_interface(att.conf, args)


class StaleJudge:
    """Decides whether a service bound to our netns inode belongs to this pod.

    A service is this pod's when a record of the same container (any ifname: a pod may
    have several cxi attachments) claims it. Anything else bound to the inode was left by
    a namespace that died without DEL: it is reaped, and the dead attachment's record
    forgets it so a later DEL of that attachment cannot destroy a reused id."""

    # How long to wait for another attachment's lock before answering "try again later":
    # waiting forever could deadlock two ADDs of different containers on one namespace.
    FORGET_WAIT = 5.0

    def __init__(self, att: Attachment, inode: int):
        self.att, self.inode = att, inode

    def judge(self, svc, reap) -> None:
        """Call `reap()` unless a record of this container claims `svc`. The records are
        read afresh each time: an ADD of another container in progress records each service
        before binding it, so a bound service is claimed by now. A claim of another
        container is forgotten under that attachment's lock, so its owner cannot destroy
        the id meanwhile and its record never points at an id the driver hands out again."""
        claim = {"device": svc.device, "svcId": svc.svc_id}
        claimants = self.claimants(claim)
        if any(r["containerID"] == self.att.args.container_id for r in claimants):
            return
        other = next(iter(claimants), None)
        if other is None:
            reap()
            return
        from .state import AttachmentBusy

        try:
            with self.att.store.lock(other["containerID"], other["ifname"], self.FORGET_WAIT):
                if any(r["containerID"] == self.att.args.container_id
                       for r in self.claimants(claim)):
                    return  # while we waited, the id went to this container
                reap()
                self._forget_locked(other, claim)
        except AttachmentBusy:
            raise CniError(TRY_AGAIN_LATER, f"network namespace {self.att.args.netns} has a "
                           f"service of container {other['containerID']}, whose ADD or DEL "
                           "is still running", "one namespace serves one pod sandbox; the "
                           "runtime will retry") from None

    def claimants(self, claim: dict) -> list[dict]:
        return [r for r in self.att.store.all()
                if claim in r.get("services", []) and r.get("netnsInode") == self.inode]

    def _forget_locked(self, record: dict, claim: dict) -> None:
        fresh = self.att.store.load(record["containerID"], record["ifname"])
        if fresh and claim in fresh["services"]:
            fresh["services"].remove(claim)
            self.att.store.save(fresh)
            log.warning("record of container %s ifname %s forgets stale service %s/%s",
                        record["containerID"], record["ifname"], claim["device"],
                        claim["svcId"])
