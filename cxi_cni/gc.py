"""Garbage collection: remove attachments the runtime no longer knows, every service bound to
a network namespace that no longer exists (its inode may be handed out again), and the
orphans of killed ADDs."""

from __future__ import annotations

import logging

from .cni.errors import CniError
from .cxi.backend import CxiError
from .cxi.services import bound_services, destroy_if_bound, destroy_orphans
from .invocation import Invocation
from .netns import live_netns_inodes
from .release import orphan_guard, remove_attachment
from .state import StateError

log = logging.getLogger("cxi_cni.gc")


def collect(inv: Invocation, keep: set[tuple[str, str]] | None) -> dict:
    """`keep`: the valid (containerID, ifname) pairs; None (cxi gc without a list) keeps
    the records whose namespace is alive."""
    removed, failed = [], []
    # The records first, the live namespaces second: a pod ADDed in between is not in the
    # list, rather than in it with a namespace that was not there yet when looked for.
    records = inv.store.all()
    alive = live_netns_inodes() if keep is None else set()
    for record in records:
        if (record.key in keep) if keep is not None else (record.netns_inode in alive):
            continue
        try:
            if collect_one(inv, record, keep is None):
                removed.append(f"{record.container_id}/{record.ifname}")
        except CniError as exc:
            failed.append(f"{record.container_id}/{record.ifname}: {exc.msg}")
        except StateError as exc:  # its lock or index entry is broken: the others still go
            failed.append(f"{record.container_id}/{record.ifname}: {exc}")
    reaped = reap_dead_namespaces(inv, failed)
    reaped.extend(sweep_orphans(inv))
    return {"removedAttachments": removed, "reapedServices": reaped, "failures": failed}


def collect_one(inv: Invocation, record, by_liveness: bool) -> bool:
    """Remove one attachment under its lock; False when it is gone, or (judged by liveness)
    was ADDed again into another namespace since it was read: not judged here."""
    with inv.store.lock(*record.key):
        fresh = inv.store.load(*record.key)
        if fresh is None or (by_liveness and fresh.netns_inode != record.netns_inode):
            return False
        remove_attachment(inv, fresh)
        return True


def reap_dead_namespaces(inv: Invocation, failed: list[str]) -> list[str]:
    """Destroy every service bound to a namespace inode that nothing holds, unless a record
    the runtime still counts as valid claims it. Services are listed first and live
    namespaces second: a namespace made after the listing cannot have a service in it, so
    nothing alive is mistaken for dead."""
    snapshot = bound_services(inv.backend, inv.device_names())
    live = live_netns_inodes()
    claimed = inv.store.claimed()
    reaped = []
    for svc in snapshot:
        if svc.netns_inode in live or (svc.device, svc.svc_id) in claimed:
            continue
        dev = inv.backend.open(svc.device)
        try:  # only if still bound there: the listing is old, and ids are handed out again
            if destroy_if_bound(dev, svc.svc_id, svc.netns_inode):
                log.warning("destroyed service %s on %s: its netns inode %s is dead",
                            svc.svc_id, svc.device, svc.netns_inode)
                reaped.append(f"{svc.device}/{svc.svc_id}")
        except CxiError as exc:
            failed.append(f"{svc.device}/{svc.svc_id}: {exc}")
        finally:
            dev.close()
    return reaped


def sweep_orphans(inv: Invocation) -> list[str]:
    """Unbound member-less services left by crashed ADDs, on devices where no running ADD
    is allocating (the records are read after each device's listing)."""
    swept = []
    for device in inv.device_names():
        ids = destroy_orphans(inv.backend, device, None, orphan_guard(inv, device))
        if ids is None:
            log.info("orphans on %s are left for the next GC: an ADD is allocating there", device)
        swept.extend(f"{device}/{sid}" for sid in ids or [])
    return swept
