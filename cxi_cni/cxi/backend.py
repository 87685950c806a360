"""The CXI backend interface: the few driver calls the plugin needs, in Python terms.

Two implementations exist: `libcxi` (ctypes over the real library) and `sim` (simulated
devices in a state file). Both raise `CxiError` carrying the negative errno the driver
would return, so the code above them handles one set of failures. How a service is bound to
a namespace differs between software stacks; each backend resolves its `stack`
(stacks.py) once and hands it to the devices it opens.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, field
from typing import Protocol

# Resource names in the order of the driver's limits array (cxi-abi: PTE, TXQ, TGQ, EQ,
# CT, LE, TLE, AC). The same order is used by cxi_svc_fail_info.rsrc_avail.
RESOURCES = ("ptes", "txqs", "tgqs", "eqs", "cts", "les", "tles", "acs")

# Traffic classes in the order of the driver's tcs[] array.
TRAFFIC_CLASSES = ("dedicated_access", "low_latency", "bulk_data", "best_effort", "eth")

# Member types of a service (enum cxi_svc_member_type).
MEMBER_IGNORE, MEMBER_UID, MEMBER_GID, MEMBER_NET_NS = 0, 1, 2, 3

DEFAULT_SVC_ID = 1
MAX_VNIS = 4

# The calls the driver lets through only for a caller with CAP_SYS_ADMIN on a physical
# function: -EPERM otherwise, for either cause (its ioctl gate of admin-only ops, checked
# before the op itself). Listing and reading services is open to everyone.
ADMIN_CALLS = ("cxil_alloc_svc", "cxil_destroy_svc", "cxil_svc_enable", "cxil_svc_set_netns",
               "cxil_set_svc_lpr")
NOT_PERMITTED = ("the CXI driver lets a process create, destroy, enable or bind a service only "
                 "with CAP_SYS_ADMIN and only on a physical function: run it as root (container "
                 "runtimes run CNI plugins as root; run `cxi doctor` with sudo), and where the "
                 "NIC is an SR-IOV VF (a virtual machine's) manage services on the host's "
                 "physical function instead")


@dataclass(frozen=True)
class Limit:
    """A resource limit of a service: at most `max`, of which `res` are reserved."""

    max: int
    res: int = 0


@dataclass(frozen=True)
class Member:
    """Who may use a service: a uid, a gid or (the research patches) a netns inode, by type."""

    id: int = 0
    type: int = MEMBER_IGNORE


@dataclass
class ServiceDesc:
    """A CXI service description (struct cxi_svc_desc), independent of its byte layout."""

    svc_id: int = 0
    restricted_members: bool = False
    restricted_vnis: bool = False
    restricted_tcs: bool = False
    resource_limits: bool = False
    enable: bool = False
    is_system_svc: bool = False
    cntr_pool_id: int = 0
    vnis: tuple[int, ...] = ()
    tcs: frozenset[str] = frozenset()
    members: tuple[Member, Member] = (Member(), Member())
    limits: dict[str, Limit] = field(default_factory=dict)

    @classmethod
    def for_netns(cls, vnis, tcs=(), limits=None) -> ServiceDesc:
        """Step 1 of the binding sequence: restricted members (both IGNORE), the VNIs,
        TCs and limits if any, enabled."""
        return cls(
            restricted_members=True,
            restricted_vnis=True,
            vnis=tuple(vnis),
            restricted_tcs=bool(tcs),
            tcs=frozenset(tcs),
            resource_limits=bool(limits),
            limits=dict(limits or {}),
            enable=True,
        )


@dataclass
class Service:
    """A service as listed on a device, with the namespace it is bound to (0: none)."""

    device: str
    desc: ServiceDesc
    netns_inode: int = 0

    @property
    def svc_id(self) -> int:
        return self.desc.svc_id


class CxiError(Exception):
    """A driver call failed. `errno` is positive (EINVAL, EBUSY, ...)."""

    def __init__(self, op: str, device: str, err: int, detail: str = ""):
        self.op, self.device, self.errno, self.detail = op, device, abs(err), detail
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        text = f"{op} on {device} failed: {os.strerror(self.errno)} (-{name})"
        super().__init__(text + (f": {detail}" if detail else ""))


class VniInUse(CxiError):
    """cxil_alloc_svc refused a VNI that another service of the device holds: the driver of
    SHS 14.0.0 (like those of 13.x) gives a VNI to one service per NIC."""

    def __init__(self, device: str, vni: int, holder: Service):
        self.vni, self.holder = vni, holder
        super().__init__("cxil_alloc_svc", device, errno_mod.EEXIST,
                         f"VNI {vni} is held by service {holder.svc_id} on {device}, and this "
                         "driver gives a VNI to one service per NIC")


class NoResources(CxiError):
    """cxil_alloc_svc -ENOSPC, with what the driver's cxi_svc_fail_info says: the first
    resource (in the driver's order) whose reservation exceeded what was free, and whether
    no LE, TLE or counter pool was left. The driver checks the reservations in order and
    stops at the first short one, so only that one's count means anything; it never checks
    TLEs there (a TLE shortage shows as nothing named)."""

    def __init__(self, device: str, asked: dict[str, Limit], avail: dict[str, int],
                 no_le_pools: bool = False, no_tle_pools: bool = False,
                 no_cntr_pools: bool = False):
        self.asked = dict(asked)
        self.avail = {name: avail.get(name, 0) for name in RESOURCES}  # 0: not counted
        self.no_le_pools, self.no_tle_pools = no_le_pools, no_tle_pools
        self.no_cntr_pools = no_cntr_pools
        self.short = next((name for name in RESOURCES if name != "tles" and name in asked
                           and asked[name].res > avail.get(name, 0)), None)
        super().__init__("cxil_alloc_svc", device, errno_mod.ENOSPC, self.what())

    def what(self) -> str:
        """What ran out, in words: "les: reserves 160, 100 free; no TLE pool left"."""
        said = []
        if self.short:
            said.append(f"{self.short}: reserves {self.asked[self.short].res}, "
                        f"{self.avail.get(self.short, 0)} free")
        said += [f"no {what} pool left" for what, flag in (
            ("LE", self.no_le_pools), ("TLE", self.no_tle_pools), ("counter", self.no_cntr_pools))
            if flag]
        if not said:
            tles = self.asked.get("tles", Limit(0, 0)).res
            said.append("the driver names nothing short" + (
                f" (it does not report TLEs; this service reserves {tles})" if tles else ""))
        return "; ".join(said)


class BackendUnavailable(Exception):
    """The backend cannot serve at all (library missing, symbol missing, no devices)."""


@dataclass(frozen=True)
class LibraryInfo:
    """What serves the driver calls: the library file (or the sim's state file), the symbol
    versions it defines, and whether it has the netns calls of LIBCXI_1.10."""

    file: str
    versions: tuple[str, ...] = ()
    netns_calls: bool = False


class Device(Protocol):
    """An open CXI device. Every call is one driver call and is atomic on its own.
    `list_services` fills each Service's netns_inode the way `stack` shows it (with
    netns=False it leaves it 0, sparing the call stacks a call per service)."""

    name: str
    stack: object  # stacks.Stack

    def alloc_svc(self, desc: ServiceDesc) -> int: ...
    def destroy_svc(self, svc_id: int) -> None: ...
    def svc_enable(self, svc_id: int, enable: bool) -> None: ...
    def svc_set_netns(self, svc_id: int, netns_inode: int) -> None: ...
    def svc_get_netns(self, svc_id: int) -> int: ...
    def get_svc(self, svc_id: int) -> ServiceDesc: ...
    def list_services(self, netns: bool = True) -> list[Service]: ...
    def close(self) -> None: ...

    def totals(self) -> dict[str, int]:
        """How many of each resource the device has (what a limit's max may reach)."""

    def svc_rsrc_use(self, svc_id: int) -> dict[str, int] | None:
        """cxil_get_svc_rsrc_use: how many of each resource the service's processes use
        (0xFFFF for LEs or TLEs it has no pool of its own for); None when the library
        has no such call (LIBCXI_1.5)."""

    def svc_set_lpr(self, svc_id: int, lnis_per_rgid: int) -> None:
        """cxil_set_svc_lpr (LIBCXI_1.8); BackendUnavailable when the library lacks it."""

    def svc_get_lpr(self, svc_id: int) -> int | None:
        """cxil_get_svc_lpr; None when the library has no such call."""

    def rgids_avail(self) -> int | None:
        """How many resource groups the device has left (sysfs rgids_avail), None if unknown."""

    def services_bound_to(self, inode: int) -> list[Service]:
        """The listed services bound to the namespace `inode` (ListingFilters)."""

    def system_services(self) -> list[Service]:
        """The listed system services, their netns_inode left 0 (ListingFilters)."""


class ListingFilters:
    """The listings a device answers from its whole list, for a device with no cheaper way
    (the simulator filters in its database instead)."""

    def services_bound_to(self, inode: int) -> list[Service]:
        return [svc for svc in self.list_services() if svc.netns_inode == inode]

    def system_services(self) -> list[Service]:
        return [svc for svc in self.list_services(netns=False) if svc.desc.is_system_svc]


class Backend(Protocol):
    """A set of CXI devices reached one way (real library or simulation)."""

    name: str
    stack: object  # stacks.Stack, resolved on first use (BackendUnavailable if it cannot be)

    def check(self) -> None:
        """Raise BackendUnavailable with a plain reason when ADD could not be served."""

    def library(self, with_versions: bool = False) -> LibraryInfo:
        """The library (or state) behind the calls; BackendUnavailable if it cannot load.
        The symbol versions are read from the file only when asked for."""

    def driver_revision(self) -> str | None:
        """What the driver says of its own version, where it says it (None: nowhere)."""

    def device_names(self) -> list[str]:
        """Names of the CXI devices present, like ["cxi0", "cxi1"], sorted."""

    def device_for_netdev(self, netdev: str) -> str:
        """The CXI device of the NIC behind an `hsnN` netdev; BackendUnavailable if none."""

    def open(self, name: str) -> Device: ...
