"""The cxi plugin's commands: ADD, DEL, CHECK, STATUS and GC, each a short story over the
invocation, the attachment record, the pod link and the CXI services."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from . import faults, logs, vnis
from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, NOT_AVAILABLE, TRY_AGAIN_LATER, UNKNOWN_CONTAINER, CniError
from .cni.version import merge_results
from .cxi.backend import NoResources, Service, VniInUse
from .cxi.services import Binding, bind_netns, bound_services, differences, roll_back
from .errors import CXI_FAILURE, POLICY_REFUSED, mapped, no_resources_error, vni_in_use_error
from .invocation import Invocation
from .lazy import lazy
from .record import AttachmentRecord
from .release import reap_stale_services, release_unclaimed, remove_attachment

log = logging.getLogger("cxi_cni.plugin")
podlink = lazy("cxi_cni.podlink")  # only attachments with a link use it


class CxiPlugin:
    """The plugin object handed to the CNI dispatcher."""

    @mapped
    def add(self, args: CmdArgs) -> dict:
        with Invocation(args) as inv:
            netns = inv.netns()
            resolver = vnis.VniResolver(inv.conf, args.args)
            pod_vnis = resolver.resolve()
            cpus = inv.pod_cpus(resolver.api_cpus)
            spec = inv.spec(pod_vnis, cpus)
            devices = inv.devices() if spec.vnis else []
            with inv.store.lock(args.container_id, args.ifname):
                previous = inv.store.load(args.container_id, args.ifname)
                if previous:
                    log.warning("ADD for an attachment that exists; removing what it had first")
                    remove_attachment(inv, previous)
                # The intent, before anything exists: the link to make, the first device to
                # allocate on. Each alloc is recorded right after it (one write per device).
                link = podlink.PodLink.plan(inv.conf, args, netns) if inv.conf.master else None
                record = AttachmentRecord(args.container_id, args.ifname, netns.path, netns.inode,
                                          spec.vnis, tuple(sorted(spec.tcs)), devices,
                                          link=link.record if link else None,
                                          allocating=devices[0] if devices else None,
                                          pod=logs.pod_fields(args.args), cpus=cpus)
                inv.store.save(record)
                faults.point("after-record")
                with ExitStack() as undo:
                    undo.callback(self._drop_record, inv, record)
                    ours = link.make(inv.conf, args, netns, undo) if link else {}
                    bindings = self._bind(inv, record, spec, undo)
                    result = merge_results(args.prev_result, ours)
                    result["cxi"] = {"netnsInode": netns.inode, "vnis": list(spec.vnis),
                                     "services": [{"device": b.device, "svcId": b.svc_id}
                                                  for b in bindings]}
                    faults.point("before-complete")
                    record.complete = True
                    inv.store.save(record)
                    undo.pop_all()
        logs.event(log, logging.INFO, "services bound", netnsInode=netns.inode,
                   vnis=list(spec.vnis), services=[f"{b.device}/{b.svc_id}" for b in bindings])
        return result

    @staticmethod
    def _bind(inv: Invocation, record: AttachmentRecord, spec, undo: ExitStack) -> list[Binding]:
        """With the pod's namespace locked: reap what a dead namespace left on its inode,
        check the pod's share of each NIC, then make the services. The record names the
        device of each alloc before it happens and the id right after, together with the
        next device; if a later step of ADD fails, `undo` destroys them."""

        def made(binding: Binding | None, device: str) -> None:
            if binding is None:  # the intent is recorded already (first device) or below
                return
            record.services.append(binding)
            following = record.devices[record.devices.index(device) + 1:]
            record.allocating = following[0] if following else None
            inv.store.save(record)

        with inv.store.namespace_lock(inv.netns().fd):
            held = reap_stale_services(inv, record.netns_inode, required=bool(record.devices))
            check_share(inv, record, held)
            try:
                bindings = bind_netns(inv.backend, record.devices, record.netns_inode, spec, made,
                                      faults.point)
            except BaseException as exc:
                # What the rollback could not destroy; all of it if the rollback itself failed.
                record.services = list(getattr(exc, "undestroyed", record.services))
                if isinstance(exc, VniInUse):
                    raise vni_in_use_error(exc, inv.store.all()) from None
                if isinstance(exc, NoResources):
                    pods = {s.netns_inode for s in bound_services(inv.backend, [exc.device])}
                    raise no_resources_error(exc, len(pods), spec.shape) from None
                raise

        def undo_services() -> None:
            record.services = roll_back(inv.backend, record.services, record.netns_inode)

        undo.callback(logs.undo_step, "destroy the pod's services", undo_services)
        return bindings

    @staticmethod
    def _drop_record(inv: Invocation, record: AttachmentRecord) -> None:
        """Undo's last step: the record goes, unless it still names services the rollback
        could not destroy; then it stays, incomplete, so DEL (which the runtime sends after
        a failed ADD) or GC destroys them. Nothing made is ever left without a record."""
        if not record.services:
            inv.store.remove(record.container_id, record.ifname, record.netns_inode)
            return
        record.allocating, record.complete = None, False
        logs.undo_step("keep the record of the services left", inv.store.save, record)

    @mapped
    def delete(self, args: CmdArgs) -> None:
        with Invocation(args) as inv, inv.store.lock(args.container_id, args.ifname):
            try:
                record = inv.store.load(args.container_id, args.ifname)
            except Exception as exc:  # a damaged record must not block the pod's removal
                log.error("unreadable record, removing it: %s", exc)
                netns = inv.netns_if_present()
                release_unclaimed(inv, netns.inode if netns else 0)
                inv.store.remove(args.container_id, args.ifname)
                return
            if record is not None:
                remove_attachment(inv, record)

    @mapped
    def check(self, args: CmdArgs) -> None:
        with Invocation(args) as inv:
            netns = inv.netns()
            record = inv.store.load(args.container_id, args.ifname)
            if record is None or not record.complete:
                raise CniError(UNKNOWN_CONTAINER, f"no complete attachment record for container "
                               f"{args.container_id} interface {args.ifname}",
                               "ADD did not succeed for this attachment; the runtime should ADD "
                               "it again")
            problems = self._service_problems(inv, record, netns.inode)
            if inv.conf.master:
                problems += podlink.check(inv.conf, args, netns, record.link)
            elif record.link is not None:
                problems.append(f"the attachment has a {record.link.type} link, the configuration "
                                "has no master")
            if problems:
                raise CniError(CXI_FAILURE, "CHECK failed: " + "; ".join(problems),
                               "the runtime should DEL and ADD this attachment again")

    @staticmethod
    def _service_problems(inv: Invocation, record: AttachmentRecord, inode: int) -> list[str]:
        problems = []
        if record.netns_inode != inode:
            problems.append(f"the attachment was made for netns inode {record.netns_inode}, "
                            f"CNI_NETNS has inode {inode}")
        spec = inv.spec(record.vnis)
        resolver = vnis.VniResolver(inv.conf, inv.args.args)
        expected = resolver.resolve()
        if expected != spec.vnis:
            problems.append(f"the pod's VNIs are now {list(expected)}, its services grant "
                            f"{list(spec.vnis)}")
        cpus = inv.pod_cpus(resolver.api_cpus)
        if record.cpus and record.services and cpus != record.cpus:
            problems.append(f"the pod now has {cpus} CPUs, its services reserve for "
                            f"{record.cpus}")
        recorded = {b.device for b in record.services}
        for device in (inv.devices() if spec.vnis else []):
            if device not in recorded:
                problems.append(f"device {device} has no service for this attachment")
        for binding in record.services:
            problems.extend(differences(inv.backend, binding, inode, spec))
        return problems

    @mapped
    def status(self, args: CmdArgs) -> None:
        with Invocation(args) as inv:
            try:
                inv.devices()
                inv.store.ensure()
            except CniError as exc:
                raise CniError(NOT_AVAILABLE, exc.msg, exc.details) from None
            if inv.conf.master:
                podlink.status(inv.conf, args)

    @mapped
    def gc(self, args: CmdArgs) -> None:
        from .gc import collect  # only GC loads it

        with Invocation(args) as inv:
            valid = args.conf.get("cni.dev/valid-attachments")
            # An entry GC cannot read could name an attachment in use: no guessing, refuse.
            if not isinstance(valid, list) or not all(
                    isinstance(v, dict) and isinstance(v.get("containerID"), str)
                    and isinstance(v.get("ifname"), str) for v in valid):
                raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments, a list of "
                               "{containerID, ifname} strings", "the runtime must send the valid "
                               "attachments; nothing was collected")
            keep = {(v["containerID"], v["ifname"]) for v in valid}
            report = collect(inv, keep)
            logs.event(log, logging.INFO, "gc done", **report)
            if report["failures"]:
                raise CniError(TRY_AGAIN_LATER, "GC could not remove everything: "
                               + "; ".join(report["failures"][:5]), "the runtime will retry GC")
            if inv.conf.master:
                podlink.gc(inv.conf, args)


def check_share(inv: Invocation, record: AttachmentRecord, held: dict[str, list[Service]]) -> None:
    """A pod (one network namespace) holds at most cxi.maxServicesPerPod services on a NIC,
    however many attachments it lists: each service reserves the NIC's queues."""
    cap = inv.conf.cxi.maxServicesPerPod
    for device in record.devices:
        if len(held.get(device, ())) + 1 > cap:
            owners = sorted(f"{r.container_id[:12]}/{r.ifname}"
                            for r in inv.store.records_in(record.netns_inode)
                            if r.key != record.key and any(b.device == device for b in r.services))
            raise CniError(POLICY_REFUSED, f"the pod's network namespace already holds "
                           f"{len(held[device])} CXI services on {device} "
                           f"({', '.join(owners) or 'other attachments'}); cxi.maxServicesPerPod "
                           f"is {cap}", "give the pod fewer cxi attachments on this NIC, or ask "
                           "the cluster admin to raise cxi.maxServicesPerPod")
