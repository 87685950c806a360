"""How a CXI service is bound to a network namespace and how it shows that binding: one small
strategy per software stack in the field, which stack a node runs, and probes that ask the
driver what it allows.

| stack (cxi.stack) | binds a service | shows the binding | extra rule of the driver |
|---|---|---|---|
| shs-14.0.1 | alloc, disable, cxil_svc_set_netns, enable | cxil_svc_get_netns only | none |
| shs-14.0.0 | the same | the same | a VNI belongs to one service per NIC (alloc -EEXIST) |
| netns-member | member NET_NS (3) holding the inode, given to cxil_alloc_svc | the members | none |

On drivers before 14.0.1 (so on 14.0.0 and, as far as known, the research patches) every
service that limits LEs at all takes one of the NIC's LE pools (`le_pool_per_service`).

`auto` takes the call stacks when the library has cxil_svc_set_netns and cxil_svc_get_netns
(LIBCXI_1.10) and the member stack (the research patches) otherwise. Whether a call-stack
driver has the 14.0.0 rule shows when it refuses a shared VNI, or in `probe_shared_vni`.
Everything above this module asks the stack; nothing else knows which one a node runs.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, replace

from .backend import (
    MEMBER_IGNORE,
    MEMBER_NET_NS,
    NOT_PERMITTED,
    BackendUnavailable,
    CxiError,
    LibraryInfo,
    Limit,
    Member,
    ServiceDesc,
    VniInUse,
)

AUTO = "auto"
CHOICES = (AUTO, "shs-14.0.1", "shs-14.0.0", "netns-member")
# No namespace has inode 1: nsfs inodes come from proc_alloc_inum, which starts at 0xF0000000.
NEVER_A_NETNS = 1
# VNIs the probes try, from the top of the range down, skipping those in use.
PROBE_VNIS = range(65534, 65500, -1)
# The probes' services reserve nothing and take no LE or TLE pool (a service without
# limits would take a TLE pool, of which a NIC has 4), so a full NIC can still be probed.
PROBE_LIMITS = {"txqs": Limit(1, 0)}
# The calls of LIBCXI_1.10 (SHS >= 14.0.0) with which the call stacks bind and show a namespace.
NETNS_CALLS = ("cxil_svc_set_netns", "cxil_svc_get_netns")
SET_NETNS_NEEDED = "libcxi >= 1.10 / LIBCXI_1.10 needed to bind a service to a network namespace"


def member_inode(desc: ServiceDesc) -> int:
    """The namespace inode of a NET_NS member, 0 when the service has none."""
    return next((m.id for m in desc.members if m.type == MEMBER_NET_NS), 0)


@dataclass(frozen=True)
class Stack:
    """One way to bind a service to a namespace. `chosen_by` says why this node uses it."""

    name: str
    title: str
    meaning: str
    chosen_by: str = ""
    netns_calls: bool = True  # binds with cxil_svc_set_netns and shows with cxil_svc_get_netns
    unique_vnis: bool | None = False  # None: not known (auto on a call stack)
    # Every service that limits LEs takes an LE pool, not only one reserving them (drivers
    # before 14.0.1, shs-cxi-driver d54e468); None: not known.
    le_pool_per_service: bool | None = False

    def alloc(self, dev, desc: ServiceDesc, inode: int) -> int:
        """cxil_alloc_svc for a service that will belong to namespace `inode`. VniInUse when
        the driver gives each VNI to one service and another service holds one of ours."""
        desc = self.desc_for(desc, inode)
        if self.unique_vnis:
            raise_if_held(dev, desc.vnis)
        try:
            return dev.alloc_svc(desc)
        except CxiError as exc:
            if exc.errno == errno.EEXIST:
                raise_if_held(dev, desc.vnis)
            raise

    def desc_for(self, desc: ServiceDesc, inode: int) -> ServiceDesc:
        return desc

    def bind(self, dev, svc_id: int, inode: int) -> None:
        """After alloc: give the service its namespace (the call stacks disable it first:
        the driver refuses set_netns on an enabled service with -EBUSY)."""
        dev.svc_enable(svc_id, False)
        try:
            dev.svc_set_netns(svc_id, inode)
        except CxiError as exc:
            if exc.errno == errno.EINVAL and exists(dev, svc_id):
                raise BackendUnavailable(
                    f"cxil_svc_set_netns on {dev.name} answers -EINVAL for service {svc_id}, "
                    f"which exists: the CXI driver has no SVC_SET_NETNS (it predates SHS "
                    f"14.0.0) while {self.chosen_by}; install the driver of SHS 14.0.1 or "
                    "later") from None
            raise

    def enable(self, dev, svc_id: int) -> None:
        dev.svc_enable(svc_id, True)

    def netns_of(self, dev, svc_id: int) -> int:
        """The inode `svc_id` is bound to (0: none); CxiError EINVAL when it does not exist."""
        return dev.svc_get_netns(svc_id)

    def listed_netns(self, desc: ServiceDesc, get_netns: Callable[[int], int]) -> int:
        """The inode a listed service is bound to; `get_netns` is the device's own cheapest
        answer of cxil_svc_get_netns for it (0 when none)."""
        return get_netns(desc.svc_id)


@dataclass(frozen=True)
class MemberStack(Stack):
    """The research patches: the namespace is member NET_NS of the service, set at alloc,
    which the driver compares with the caller's net_ns inode; no set/get_netns calls."""

    netns_calls: bool = False

    def alloc(self, dev, desc: ServiceDesc, inode: int) -> int:
        try:
            return super().alloc(dev, desc, inode)
        except CxiError as exc:
            if exc.errno == errno.EINVAL and refuses_member(dev, desc):
                raise BackendUnavailable(
                    f"the CXI driver of {dev.name} refuses a service member of type NET_NS "
                    f"(cxil_alloc_svc -EINVAL), and {self.chosen_by}: this node can bind a "
                    "service to a namespace neither way (a driver of SHS 13 or older without "
                    "the research patches); install SHS 14.0.1 or later") from None
            raise

    def desc_for(self, desc: ServiceDesc, inode: int) -> ServiceDesc:
        return replace(desc, restricted_members=True,
                       members=(Member(inode, MEMBER_NET_NS), Member()))

    def bind(self, dev, svc_id: int, inode: int) -> None:
        pass  # bound by its member since alloc

    def enable(self, dev, svc_id: int) -> None:
        pass  # restricted VNIs: the driver enabled it at alloc

    def netns_of(self, dev, svc_id: int) -> int:
        return member_inode(dev.get_svc(svc_id))

    def listed_netns(self, desc: ServiceDesc, get_netns: Callable[[int], int]) -> int:
        return member_inode(desc)


UPGRADE = "upgrade the node to SHS 14.0.1 or later (shs-cxi-driver commit fd6adba)"


def make(name: str, chosen_by: str) -> Stack:
    """The stack of a cxi.stack name (not auto)."""
    if name == "shs-14.0.1":
        return Stack(name, "HPE SHS 14.0.1 or later", "Pods of one job share a NIC, each with "
                     "its own service", chosen_by)
    if name == "shs-14.0.0":
        return Stack(name, "HPE SHS 14.0.0", "Two pods of one job cannot "
                     f"share a NIC: the driver gives a VNI to one service per NIC; {UPGRADE}",
                     chosen_by, unique_vnis=True, le_pool_per_service=True)
    if name == "netns-member":
        return MemberStack(name, "the research patches: a NET_NS service member",
                           "Services are bound at alloc through their member; libfabric "
                           "finds them only with the research patch to libfabric, else "
                           "through `cxi env`", chosen_by, le_pool_per_service=True)
    raise ValueError(f"unknown CXI stack {name!r}")


def resolve(choice: str, library: LibraryInfo) -> Stack:
    """The stack `choice` (cxi.stack) names for this library; BackendUnavailable when a
    forced call stack meets a library without the netns calls."""
    if choice == AUTO:
        if library.netns_calls:
            return Stack("netns-call", "HPE SHS 14.0.0 or later (cxil_svc_set_netns)",
                         "Whether two pods of one job can share a NIC depends on the driver: "
                         "14.0.0 refuses, 14.0.1 allows (cxi doctor probes it)",
                         f"{library.file} has cxil_svc_set_netns", unique_vnis=None,
                         le_pool_per_service=None)
        return make("netns-member", f"{library.file} has no cxil_svc_set_netns")
    stack = make(choice, f"cxi.stack is {choice!r}")
    if stack.netns_calls and not library.netns_calls:
        raise BackendUnavailable(
            f"{library.file} has no cxil_svc_set_netns ({SET_NETNS_NEEDED}), which cxi.stack "
            f"{choice!r} needs; set cxi.stack to \"auto\" or install SHS 14.0.1 or later")
    return stack


class ResolvesStack:
    """For backends: `stack`, resolved from `stack_choice` and `library()` on first use."""

    stack_choice: str = AUTO
    _stack: Stack | None = None

    @property
    def stack(self) -> Stack:
        if self._stack is None:
            self._stack = resolve(self.stack_choice, self.library())
        return self._stack


def raise_if_held(dev, vnis) -> None:
    """VniInUse naming the first service of `dev` that holds one of `vnis`."""
    wanted = set(vnis)
    for svc in dev.list_services():
        shared = [v for v in svc.desc.vnis if v in wanted] if svc.desc.restricted_vnis else []
        if shared:
            raise VniInUse(dev.name, shared[0], svc)


def exists(dev, svc_id: int) -> bool:
    """Whether `dev` has service `svc_id` (cxil_get_svc finds it)."""
    try:
        dev.get_svc(svc_id)
    except CxiError:
        return False
    return True


def refuses_member(dev, desc: ServiceDesc) -> bool:
    """Whether the driver refused `desc` for its NET_NS member alone: the same service with
    no member at all is accepted (and destroyed again at once)."""
    try:
        svc_id = dev.alloc_svc(replace(desc, restricted_members=True, members=(Member(), Member())))
    except CxiError:
        return False
    dev.destroy_svc(svc_id)
    return True


@dataclass(frozen=True)
class Probe:
    """What a probe found: True or False, or None with the reason it could not tell."""

    answer: bool | None
    detail: str


def _free_vnis(dev) -> list[int]:
    used = {v for svc in dev.list_services() for v in svc.desc.vnis}
    return [v for v in PROBE_VNIS if v not in used][:3]


def _probe_services(dev, make_descs: Callable[[int], list[ServiceDesc]],
                    refusal: tuple[int, int], then: Callable[[int], None] = lambda svc_id: None
                    ) -> Probe:
    """Allocate the descs one after another on a VNI no service uses (trying up to three),
    call `then` with the last one, and destroy them again. True when all was accepted;
    False when step `refusal[0]` (`len(descs)` is `then`) was refused with errno
    `refusal[1]`; None when the probe cannot tell."""
    for vni in _free_vnis(dev):
        made = []
        try:
            descs = make_descs(vni)
            for index in range(len(descs) + 1):
                try:
                    if index < len(descs):
                        made.append(dev.alloc_svc(descs[index]))
                    else:
                        then(made[-1])
                except CxiError as exc:
                    if exc.errno == errno.EPERM:
                        return Probe(None, f"not probed: {exc}: {NOT_PERMITTED}")
                    if index == 0 and exc.errno == errno.EEXIST:
                        break  # the VNI is in use after all (a VNI range): try the next
                    if (index, exc.errno) == refusal:
                        return Probe(False, f"VNI {vni}: {exc}")
                    return Probe(None, f"not probed: {exc}")
            else:
                return Probe(True, f"VNI {vni}: accepted")
        finally:
            for svc_id in made:
                try:
                    dev.destroy_svc(svc_id)
                except CxiError:
                    pass  # a member-less service is an orphan that GC sweeps
    return Probe(None, "not probed: no free VNI to probe with")


def probe_desc(vni: int) -> ServiceDesc:
    """A service nobody can use (restricted to no member), on `vni`, holding nothing."""
    return ServiceDesc(restricted_members=True, restricted_vnis=True, vnis=(vni,), enable=True,
                       resource_limits=True, limits=dict(PROBE_LIMITS))


def probe_shared_vni(dev) -> Probe:
    """Whether the driver lets two services hold the same VNI (SHS 14.0.1) or not (14.0.0):
    two member-less services (nobody can use them) on an unused VNI, destroyed again."""
    def descs(vni):
        return [probe_desc(vni), probe_desc(vni)]
    return _probe_services(dev, descs, (1, errno.EEXIST))


def probe_set_netns(dev) -> Probe:
    """Whether the driver has SVC_SET_NETNS (SHS 14.0.0 and later; older drivers answer an
    unknown op with -EINVAL): one member-less service, disabled, bound to a namespace
    nobody has, destroyed again."""
    def bind(svc_id):
        dev.svc_enable(svc_id, False)
        dev.svc_set_netns(svc_id, NEVER_A_NETNS)

    return _probe_services(dev, lambda vni: [probe_desc(vni)], (1, errno.EINVAL), bind)


def probe_member_netns(dev) -> Probe:
    """Whether the driver accepts a NET_NS member at alloc (the research patches): one
    service whose member is a namespace nobody has, destroyed again."""
    def descs(vni):
        return [replace(probe_desc(vni), members=(Member(NEVER_A_NETNS, MEMBER_NET_NS),
                                                  Member(0, MEMBER_IGNORE)))]
    return _probe_services(dev, descs, (0, errno.EINVAL))
