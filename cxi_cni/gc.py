"""Garbage collection: remove attachments the runtime no longer knows, and every service
bound to a network namespace that no longer exists (its inode may be handed out again)."""

from __future__ import annotations

import logging

log = logging.getLogger("cxi_cni.gc")


def collect(att, keep: set[tuple[str, str]] | None) -> dict:
    """`keep`: the valid (containerID, ifname) pairs; None (cxi gc without a list) keeps
    the records whose namespace is alive."""
    from .cxi.services import bound_services, destroy
    from .netns import live_netns_inodes

    removed, failed = [], []
    alive = live_netns_inodes() if keep is None else set()
    for record in att.store.all():
        key = (record["containerID"], record["ifname"])
        if (key in keep) if keep is not None else (record.get("netnsInode") in alive):
            continue
        with att.store.lock(*key):
            fresh = att.store.load(*key)
            if fresh is None:
                continue
            from .plugin import bindings_of, release_orphan

            if att.conf.master:  # the pod's link and addresses, as DEL would remove them
                from .cni.errors import CniError
                from .interface import gc_attachment

                try:
                    gc_attachment(att.conf, att.args, fresh)
                except CniError as exc:
                    failed.append(f"{key[0]}/{key[1]}: {exc.msg}")
                    continue
            release_orphan(att, fresh)
            failures = destroy(att.backend, bindings_of(fresh), fresh.get("netnsInode", 0))
            if failures:
                fresh["services"] = [{"device": b.device, "svcId": b.svc_id} for b, _ in failures]
                att.store.save(fresh)
                failed.extend(f"{b.device}/{b.svc_id}: {exc}" for b, exc in failures)
                continue
            att.store.remove(*key)
            removed.append(f"{key[0]}/{key[1]}")
    # Services first, live namespaces second: a namespace made after the scan cannot
    # have a service in the snapshot, so nothing alive is mistaken for dead.
    snapshot = bound_services(att.backend, att.backend.device_names())
    live = live_netns_inodes()
    reaped = []
    for svc in snapshot:
        if svc.netns_inode in live:
            continue
        dev = att.backend.open(svc.device)
        try:
            log.warning("destroying service %s on %s: its netns inode %s is dead",
                        svc.svc_id, svc.device, svc.netns_inode)
            dev.destroy_svc(svc.svc_id)
            reaped.append(f"{svc.device}/{svc.svc_id}")
        except Exception as exc:
            failed.append(f"{svc.device}/{svc.svc_id}: {exc}")
        finally:
            dev.close()
    reaped.extend(sweep_orphans(att))
    return {"removedAttachments": removed, "reapedServices": reaped, "failures": failed}


def sweep_orphans(att) -> list[str]:
    """Unbound member-less services left by crashed ADDs, on devices where no ADD is
    recorded as allocating right now."""
    from .cxi.services import destroy_orphans

    records = att.store.all()
    busy = {r.get("allocating") for r in records}
    claimed = att.store.claimed(records)
    swept = []
    for device in att.backend.device_names():
        if device not in busy:
            swept.extend(f"{device}/{sid}" for sid in destroy_orphans(att.backend, device, None, claimed))
    return swept
