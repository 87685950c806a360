"""Releasing what an attachment holds, the one way DEL, a repeated ADD and GC all do it: its
link and lease, its services (and the orphan of an alloc it was killed in), its record; and
the services a dead namespace left on an inode that a new pod now has."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from . import logs
from .cni.errors import TRY_AGAIN_LATER, CniError
from .cxi.backend import BackendUnavailable, CxiError, Service
from .cxi.services import destroy, destroy_orphans, reap_stale
from .errors import CXI_FAILURE, cxi_error
from .invocation import Invocation
from .lazy import lazy
from .netns import Netns, NetnsInvalid, NetnsMissing
from .record import AttachmentRecord
from .state import AttachmentBusy

log = logging.getLogger("cxi_cni.release")
podlink = lazy("cxi_cni.podlink")  # only records with a link use it


def remove_attachment(inv: Invocation, record: AttachmentRecord) -> None:
    """Everything the record says was made, then the record. Call with its lock held. A
    service that cannot be destroyed keeps the record (with what is left) and raises."""
    if record.link is not None:
        with recorded_netns(inv, record) as netns:
            podlink.PodLink(record.link, record.container_id).remove(inv.args, netns)
    release_services(inv, record)
    inv.store.remove(record.container_id, record.ifname, record.netns_inode)


@contextmanager
def recorded_netns(inv: Invocation, record: AttachmentRecord) -> Iterator[Netns | None]:
    """The namespace the record's link was made in, if it still exists: CNI_NETNS through
    the command's one handle, else (GC, or an ADD repeated into another namespace, whose
    old link must go before its lease is released) the recorded path; None when it is
    gone, not a namespace, the host's, or another namespace than the recorded inode."""
    netns, owned = (inv.netns_if_present(), False) if inv.args.netns else (None, False)
    if netns is None or netns.inode != record.netns_inode:
        try:
            netns, owned = Netns.open(record.netns), True
        except (NetnsMissing, NetnsInvalid) as exc:
            log.info("no link to delete: %s", exc)
            netns, owned = None, False
    try:
        if netns is not None and (netns.is_host or netns.inode != record.netns_inode):
            log.info("no link to delete: %s is not the namespace the link was made in", netns.path)
            yield None
        else:
            yield netns
    finally:
        if owned:
            netns.close()


def release_services(inv: Invocation, record: AttachmentRecord) -> None:
    """Destroy the record's services (and the orphan of an alloc in flight); keep the record
    with what is left, and raise, if any cannot be destroyed or that orphan cannot be told
    yet from the service of another pod's ADD allocating on the same device (code 11)."""
    if record.allocating and destroy_orphans(
            inv.backend, record.allocating, record.vnis,
            orphan_guard(inv, record.allocating, record.key), record.netns_inode) is None:
        raise CniError(TRY_AGAIN_LATER, f"another pod's ADD is allocating on {record.allocating} "
                       "right now, so the service this attachment's interrupted ADD may have "
                       "left there cannot be told from that pod's yet; the record is kept",
                       "the runtime retries DEL, which finishes once that ADD is done")
    if not record.services:
        return
    failures = destroy(inv.backend, record.services, record.netns_inode, inv.retry)
    if failures:
        record.services = [binding for binding, _ in failures]
        inv.store.save(record)
        binding, exc = failures[0]
        if isinstance(exc, CxiError):
            raise cxi_error(exc)
        raise CniError(CXI_FAILURE, f"cannot destroy service {binding.svc_id} on "
                       f"{binding.device}: {exc}", "the runtime will retry DEL")
    logs.event(log, logging.INFO, "services destroyed",
               services=[f"{b.device}/{b.svc_id}" for b in record.services])
    record.services = []


def orphan_guard(inv: Invocation, device: str, own: tuple[str, str] | None = None):
    """destroy_orphans' `spared`: the services the records claim, or None while the ADD of
    an attachment other than `own` is allocating on `device` (its record says so and its
    lock is held; a record whose ADD was killed does not count). The claims are read after
    the locks are probed, so an ADD that finished in between has its service claimed."""
    def spared() -> set[tuple[str, int]] | None:
        if any(inv.store.lock_held(*r.key) for r in inv.store.all()
               if r.allocating == device and r.key != own):
            return None
        return inv.store.claimed()
    return spared


def reap_stale_services(inv: Invocation, inode: int, required: bool) -> dict[str, list[Service]]:
    """Before ADD binds anything: on every device (not only the ones this attachment uses),
    destroy the services bound to the pod's inode that this pod does not own, so the
    namespace holds exactly the services of its own records. Returns, per device, the
    services of this pod that stay. Without a usable backend there is nothing to reap
    unless this ADD needs the backend itself (`required`)."""
    try:
        return reap_on_every_device(inv, inode, StaleJudge(inv, inode).judge)
    except BackendUnavailable as exc:
        if required:
            raise
        log.info("no stale services looked for: %s", exc)
        return {}


def release_unclaimed(inv: Invocation, inode: int) -> None:
    """DEL whose record is unreadable: destroy the services bound to the pod's namespace
    that no readable record claims (they can only be this attachment's). With the
    namespace gone (inode 0), GC reaps them."""
    if not inode:
        return
    claimed = inv.store.claimed()
    reap_on_every_device(inv, inode, lambda svc, reap: None if (svc.device, svc.svc_id) in claimed
                         else reap())


def reap_on_every_device(inv: Invocation, inode: int, judge) -> dict[str, list[Service]]:
    """reap_stale with `judge` on each device of the node; per device, the services bound
    to `inode` that stay."""
    kept = {}
    for name in inv.device_names():
        dev = inv.backend.open(name)
        try:
            kept[name] = reap_stale(dev, inode, judge)
        finally:
            dev.close()
    return kept


class StaleJudge:
    """Decides whether a service bound to our netns inode belongs to this pod.

    A service is this pod's when a record of the same container (any ifname: a pod may
    have several cxi attachments) claims it. Anything else bound to the inode was left by
    a namespace that died without DEL: it is reaped, and the dead attachment's record
    forgets it so a later DEL of that attachment cannot destroy a reused id."""

    # How long to wait for another attachment's lock before answering "try again later":
    # waiting forever could deadlock two ADDs of different containers on one namespace.
    FORGET_WAIT = 5.0

    def __init__(self, inv: Invocation, inode: int):
        self.inv, self.inode = inv, inode
        self.container_id = inv.args.container_id

    def judge(self, svc: Service, reap) -> None:
        """Call `reap()` unless a record of this container claims `svc`. The records are
        read afresh each time: an ADD of another container in progress records each service
        before binding it, so a bound service is claimed by now. A claim of another
        container is forgotten under that attachment's lock, so its owner cannot destroy
        the id meanwhile and its record never points at an id the driver hands out again."""
        claimants = self.claimants(svc)
        if any(r.container_id == self.container_id for r in claimants):
            return
        other = next(iter(claimants), None)
        if other is None:
            reap()
            return
        try:
            with self.inv.store.lock(*other.key, timeout=self.FORGET_WAIT):
                if any(r.container_id == self.container_id for r in self.claimants(svc)):
                    return  # while we waited, the id went to this container
                reap()
                self._forget_locked(other, svc)
        except AttachmentBusy:
            raise CniError(TRY_AGAIN_LATER, f"network namespace {self.inv.args.netns} has a "
                           f"service of container {other.container_id}, whose ADD or DEL "
                           "is still running", "one namespace serves one pod sandbox; the "
                           "runtime will retry") from None

    def claimants(self, svc: Service) -> list[AttachmentRecord]:
        return [r for r in self.inv.store.records_in(self.inode)
                if any((b.device, b.svc_id) == (svc.device, svc.svc_id) for b in r.services)]

    def _forget_locked(self, record: AttachmentRecord, svc: Service) -> None:
        fresh = self.inv.store.load(*record.key)
        if fresh is None:
            return
        kept = [b for b in fresh.services if (b.device, b.svc_id) != (svc.device, svc.svc_id)]
        if len(kept) != len(fresh.services):
            fresh.services = kept
            self.inv.store.save(fresh)
            log.warning("record of container %s ifname %s forgets stale service %s/%s",
                        record.container_id, record.ifname, svc.device, svc.svc_id)
