"""Per-namespace CXI services: bind one on each device the way the node's stack does it
(stacks.py), with the limits its shape gives on that device (shape.py), undo it whole on
failure, verify it, and destroy it again (retrying while an LNI holds it)."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .backend import (
    DEFAULT_SVC_ID,
    MEMBER_IGNORE,
    MEMBER_NET_NS,
    Backend,
    BackendUnavailable,
    CxiError,
    Limit,
    Service,
    ServiceDesc,
)
from .shape import Shape, headroom

log = logging.getLogger("cxi_cni.services")


@dataclass(frozen=True)
class Retry:
    """How a destroy answered -EBUSY (a process still holds an LNI) is tried again: `times`
    more, `delay` seconds apart, all of one call's retries within `times * delay` seconds.
    Slurm's switch plugin tries 5 times, 1 s apart (destroy_retries)."""

    times: int = 5
    delay: float = 1.0

    def deadline(self) -> float:
        return time.monotonic() + self.times * self.delay


NO_RETRY = Retry(0, 0.0)


@dataclass(frozen=True)
class Binding:
    """One service this plugin made: where it lives."""

    device: str
    svc_id: int


@dataclass(frozen=True)
class ServiceSpec:
    """What every service of one attachment must grant: VNIs, TCs, and the shape its
    limits take on each device (None: no resource limits, the driver's defaults)."""

    vnis: tuple[int, ...]
    tcs: frozenset[str] = frozenset()
    shape: Shape | None = None

    def limits_on(self, dev) -> dict[str, Limit] | None:
        """The limits of this attachment's service on `dev`: its shape within what the
        device leaves (its totals, less what system services hold when the shape adjusts)."""
        if self.shape is None:
            return None
        return self.shape.limits(device_headroom(dev, self.shape.adjust))

    def desc(self, limits: dict[str, Limit] | None = None) -> ServiceDesc:
        return ServiceDesc.for_netns(self.vnis, self.tcs, limits)


def device_headroom(dev, adjust: bool) -> dict[str, int]:
    """The most a service may be given on `dev` (shape.headroom over its system services)."""
    system = []
    if adjust:
        system = [(svc, dev.svc_rsrc_use(svc.svc_id)) for svc in dev.system_services()]
    return headroom(dev.totals(), system, adjust)


def bind_netns(backend: Backend, devices: Iterable[str], inode: int, spec: ServiceSpec,
               on_made: Callable[[Binding | None, str], None],
               step: Callable[[str], None] = lambda name: None) -> list[Binding]:
    """On each device: alloc and bind the way the backend's stack does it (the call stacks:
    alloc, disable, set netns, enable; the member stack: alloc with the namespace as its
    member), with the limits the spec's shape gives there and, when the pod's CPUs need
    it, resource groups shared by several LNIs. On any failure destroy everything made here;
    what cannot be destroyed is on the exception as `undestroyed` (a list of Binding), for
    the caller to keep on record.

    `on_made(None, device)` is called before each alloc and `on_made(binding, device)`
    after it, so the caller can record the intent and then the id (a crash in between
    leaves a service that `destroy_orphans` recognises)."""
    made: list[Binding] = []
    devices = list(devices)
    try:
        for index, name in enumerate(devices):
            dev = backend.open(name)
            try:
                desc = spec.desc(spec.limits_on(dev))
                on_made(None, name)
                svc_id = dev.stack.alloc(dev, desc, inode)
                made.append(Binding(name, svc_id))
                step(f"after-alloc-{index}")
                on_made(made[-1], name)
                share_rgids(dev, svc_id, spec.shape, len(devices))
                dev.stack.bind(dev, svc_id, inode)
                step(f"after-bind-{index}")
                dev.stack.enable(dev, svc_id)
            finally:
                dev.close()
    except BaseException as exc:
        exc.undestroyed = roll_back(backend, made, inode)
        raise
    return made


def roll_back(backend: Backend, bindings: Iterable[Binding], inode: int) -> list[Binding]:
    """Destroy the services a failed ADD made (at once: nothing can use them yet); log and
    return those that could not be destroyed, which must stay on record for DEL or GC."""
    failures = destroy(backend, bindings, inode, NO_RETRY)
    for binding, exc in failures:
        log.error("rollback could not destroy service %s on %s, kept on record: %s",
                  binding.svc_id, binding.device, exc)
    return [binding for binding, _ in failures]


def share_rgids(dev, svc_id: int, shape: Shape | None, devices: int) -> None:
    """cxil_set_svc_lpr when the pod's LNIs need more than one per resource group (as Slurm
    does for steps with more tasks than a NIC has groups left), before anyone uses it. A
    library without the call is said when the number was configured, logged when computed."""
    if shape is None:
        return
    lpr = shape.lnis_per_rgid_for(dev.rgids_avail(), devices)
    if lpr <= 1:
        return
    try:
        dev.svc_set_lpr(svc_id, lpr)
    except BackendUnavailable as exc:
        if shape.lnis_per_rgid is not None:
            raise
        log.warning("%s LNIs per resource group needed on %s, not set: %s", lpr, dev.name, exc)


def reap_stale(dev, inode: int, judge: Callable[[Service, Callable[[], None]], None]) -> list[Service]:
    """Destroy services bound to `inode` that this attachment does not own: the inode
    belonged to a namespace that died without DEL, and its VNIs must not be inherited.
    Returns the services bound to `inode` that were kept.

    `judge(svc, reap)` calls `reap()` unless the service is this attachment's; it chooses
    the moment (holding the owner's lock), and `reap` destroys the id only if it is still
    bound to `inode`, since the listing may be old and the id handed out again."""
    reaped, kept = [], []
    for svc in dev.services_bound_to(inode):
        if svc.svc_id == DEFAULT_SVC_ID:
            continue

        def reap(svc=svc) -> None:
            if destroy_if_bound(dev, svc.svc_id, inode):
                log.warning("destroyed stale service %s on %s bound to reused netns inode %s "
                            "(VNIs %s)", svc.svc_id, dev.name, inode, list(svc.desc.vnis))
                reaped.append(svc.svc_id)

        judge(svc, reap)
        if svc.svc_id not in reaped:
            kept.append(svc)
    return kept


def destroy_if_bound(dev, svc_id: int, inode: int) -> bool:
    """Destroy `svc_id` if it is (still) bound to `inode`; False if it is gone or not."""
    try:
        if dev.stack.netns_of(dev, svc_id) != inode:
            return False
        dev.destroy_svc(svc_id)
    except CxiError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def destroy(backend: Backend, bindings: Iterable[Binding], inode: int,
            retry: Retry = Retry()) -> list[tuple[Binding, Exception]]:
    """Destroy recorded services; returns the ones that could not be destroyed. A service
    still used by an LNI is tried again as `retry` says, all of them within one deadline.

    A service that is gone (-EINVAL), or that is now bound to another namespace (its id
    was reused), is not ours any more and counts as destroyed."""
    failures = []
    deadline = retry.deadline()
    for binding in bindings:
        try:
            destroy_one(backend, binding, inode, retry, deadline)
        except (CxiError, OSError) as exc:
            failures.append((binding, exc))
    return failures


def destroy_one(backend: Backend, binding: Binding, inode: int, retry: Retry,
                deadline: float) -> None:
    try:
        dev = backend.open(binding.device)
    except CxiError as exc:
        if exc.errno == errno.ENODEV:
            log.warning("device %s is gone; service %s went with it", binding.device, binding.svc_id)
            return
        raise
    try:
        try:
            bound = dev.stack.netns_of(dev, binding.svc_id)
        except CxiError as exc:
            if exc.errno == errno.EINVAL:
                return
            raise
        if bound not in (0, inode):
            log.warning("service %s on %s is bound to netns inode %s, not %s: its id was "
                        "reused, leaving it", binding.svc_id, binding.device, bound, inode)
            return
        for attempt in range(retry.times + 1):
            try:
                dev.destroy_svc(binding.svc_id)
                return
            except CxiError as exc:
                if exc.errno == errno.EINVAL:
                    return
                wait = min(retry.delay, deadline - time.monotonic())
                if exc.errno != errno.EBUSY or attempt == retry.times or wait <= 0:
                    raise
                log.info("service %s on %s is in use by an LNI; destroy again in %.1f s",
                         binding.svc_id, binding.device, wait)
                time.sleep(wait)
    finally:
        dev.close()


def differences(backend: Backend, binding: Binding, inode: int, spec: ServiceSpec) -> list[str]:
    """What differs between a recorded service and what it must be (empty: all good)."""
    where = f"service {binding.svc_id} on {binding.device}"
    dev = backend.open(binding.device)
    try:
        try:
            desc = dev.get_svc(binding.svc_id)
            bound = dev.stack.netns_of(dev, binding.svc_id)
        except CxiError as exc:
            if exc.errno == errno.EINVAL:
                return [f"{where} no longer exists"]
            raise
    finally:
        dev.close()
    problems = []
    if not desc.enable:
        problems.append(f"{where} is disabled")
    if bound != inode:
        problems.append(f"{where} is bound to netns inode {bound}, not {inode}")
    if not desc.restricted_members or any(
        m.type not in (0, MEMBER_NET_NS) for m in desc.members
    ):
        problems.append(f"{where} admits members other than the namespace")
    if not desc.restricted_vnis or tuple(desc.vnis) != spec.vnis:
        problems.append(f"{where} has VNIs {list(desc.vnis)}, expected {list(spec.vnis)}")
    if spec.tcs and (not desc.restricted_tcs or desc.tcs != spec.tcs):
        problems.append(f"{where} has TCs {sorted(desc.tcs)}, expected {sorted(spec.tcs)}")
    return problems


def is_orphan_shape(svc: Service, inode: int = 0) -> bool:
    """A service as a crashed ADD for namespace `inode` leaves it between alloc and recording
    its id: on the call stacks restricted to no member at all and bound to nothing (nobody
    can use it); on the member stack already bound to `inode` through its member."""
    desc = svc.desc
    if svc.svc_id == DEFAULT_SVC_ID or not desc.restricted_members:
        return False
    if svc.netns_inode == 0:
        return all(m.type == MEMBER_IGNORE for m in desc.members)
    return bool(inode) and svc.netns_inode == inode


def destroy_orphans(backend: Backend, device: str, vnis: tuple[int, ...] | None,
                    spared: Callable[[], set[tuple[str, int]] | None], inode: int = 0) -> list[int] | None:
    """Destroy orphan-shaped services on `device` (with these VNIs, if given; bound to
    `inode`, if given, counts as orphan-shaped) that no record claims.

    `spared()` is asked after the listing, so it sees every ADD that allocated a listed
    service (an ADD records its intent before each alloc): the (device, svc_id) pairs
    records claim, or None when an ADD is allocating on `device` right now, whose newest
    service may not be recorded yet; then nothing is destroyed and None returned."""
    dev = backend.open(device)
    destroyed = []
    try:
        candidates = [svc for svc in dev.list_services() if is_orphan_shape(svc, inode)
                      and (vnis is None or tuple(svc.desc.vnis) == tuple(vnis))]
        claimed = spared() if candidates else set()
        if claimed is None:
            return None
        for svc in candidates:
            if (device, svc.svc_id) in claimed:
                continue
            try:
                dev.destroy_svc(svc.svc_id)
                destroyed.append(svc.svc_id)
                log.warning("destroyed orphan service %s on %s (VNIs %s) left by a crashed ADD",
                            svc.svc_id, device, list(svc.desc.vnis))
            except CxiError as exc:
                if exc.errno != errno.EINVAL:
                    raise
    finally:
        dev.close()
    return destroyed


def bound_services(backend: Backend, devices: Iterable[str]) -> list[Service]:
    """Every service bound to a network namespace, on the given devices."""
    out = []
    for name in devices:
        dev = backend.open(name)
        try:
            out.extend(s for s in dev.list_services() if s.netns_inode)
        finally:
            dev.close()
    return out
