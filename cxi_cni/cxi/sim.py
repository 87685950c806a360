"""Simulated CXI devices: each driver call with the driver's rules and errnos.

The devices live in an SQLite database (simstate.py); every call is one transaction, so
concurrent plugin processes see the same devices a real driver would show them.

The state's "stack" says which software stack the simulation is (EMULATED): its library's
calls and its driver's rules. shs-14.0.1 (the default) and shs-14.0.0 have the netns calls,
and 14.0.0 refuses a VNI another service holds; netns-member has no netns calls and takes a
NET_NS member at alloc; shs-13 has neither (a node that cannot bind services at all).

Resources follow the driver (cass_svc.c reserve_rsrcs, cass_rgroup.c): a service without
resource limits gets the device's totals as its limits; a service other than the default
one that limits TLEs at all reserves at least 8 with max = res, and takes one of the NIC's 4
TLE pools (the default service holds one, reserving 512 TLEs); a service reserving LEs takes
one of the 15 LE pools left beside the shared pool 0 (before SHS 14.0.1, any service that
limits LEs does). Reservations are checked in the driver's order, stopping at the first one
short, and cxil_alloc_svc's fail_info says what the driver says. A service also keeps its
LNIs per resource group (cxil_set_svc_lpr, refused while an LNI uses it) and what its
processes use (cxil_get_svc_rsrc_use; tests set it, as they set `busy`).
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import astuple

from .backend import (
    ADMIN_CALLS,
    DEFAULT_SVC_ID,
    MAX_VNIS,
    MEMBER_GID,
    MEMBER_UID,
    RESOURCES,
    TRAFFIC_CLASSES,
    BackendUnavailable,
    CxiError,
    LibraryInfo,
    Limit,
    NoResources,
    Service,
    ServiceDesc,
)
from .shape import LE_POOLS, MAX_LNIS_PER_RGID, NOT_APPLICABLE, TLE_MIN, TLE_POOLS
from .simstate import (
    DEFAULT_STACK,
    EMULATED,
    RGIDS,
    Emulated,
    SimState,
    desc_from_json,
    desc_to_json,
    emulated,
)
from .stacks import AUTO, NETNS_CALLS, SET_NETNS_NEEDED, ResolvesStack


def effective_limits(desc: ServiceDesc, totals: dict, default: bool) -> dict[str, list[int]]:
    """The limits the driver keeps for a service (cass_svc.c reserve_rsrcs): its own, or the
    device's totals without resource limits; TLEs, when limited at all, reserved as their
    max and at least TLE_MIN (but for the default service)."""
    if desc.resource_limits:
        limits = {name: list(astuple(desc.limits.get(name, Limit(0, 0)))) for name in RESOURCES}
    else:
        limits = {name: [totals[name], 0] for name in RESOURCES}
    tles = limits["tles"]
    if not default and (tles[0] or tles[1]):
        limits["tles"] = [max(tles[1], TLE_MIN)] * 2
    return limits


class SimDevice:
    """One simulated NIC; each method is a driver call with the driver's errnos."""

    def __init__(self, state: SimState, name: str, stack):
        self.state, self.name, self.stack = state, name, stack

    @contextlib.contextmanager
    def _device(self, op: str, write: bool = True):
        """The device's state and the rules of the emulated stack, for one call.

        A call the library lacks fails first, then the driver's gate of admin-only calls
        (the sim's caller always has CAP_SYS_ADMIN, so only a VF is refused)."""
        with self.state.transaction(write) as state:
            device, rules = state["devices"].get(self.name), emulated(state)
            if device is None:
                raise CxiError(op, self.name, errno.ENODEV, "the device is gone")
            if op in NETNS_CALLS and not rules.netns_calls:
                raise BackendUnavailable(f"the simulated library ({state['stack']}) has no {op} "
                                         f"({SET_NETNS_NEEDED})")
            if op in ADMIN_CALLS and device["vf"]:
                raise CxiError(op, self.name, errno.EPERM, "not the physical function")
            yield device, rules

    def _service(self, device: dict, op: str, svc_id: int) -> dict:
        svc = device["services"].get(str(svc_id))
        if svc is None:
            raise CxiError(op, self.name, errno.EINVAL, f"no service {svc_id}")
        return svc

    def _unused_service(self, device: dict, op: str, svc_id: int) -> dict:
        """The service, which the driver changes only while no LNI uses it (-EBUSY)."""
        svc = self._service(device, op, svc_id)
        if svc["busy"]:
            raise CxiError(op, self.name, errno.EBUSY, f"service {svc_id} is used by an LNI")
        return svc

    def alloc_svc(self, desc: ServiceDesc) -> int:
        op = "cxil_alloc_svc"
        with self._device(op) as (device, rules):
            self._validate(op, device, desc, rules)
            if rules.unique_vnis and desc.restricted_vnis:
                self._refuse_held_vnis(op, device, desc.vnis)
            limits = self._reserve(op, device, desc, rules)
            used = set(device["services"].ids())
            svc_id = next(i for i in range(DEFAULT_SVC_ID + 1, len(used) + 3) if i not in used)
            stored = desc_to_json(desc)
            stored["svc_id"] = svc_id
            stored["enable"] = bool(desc.restricted_vnis)  # the driver's choice, not desc.enable
            stored["limits"] = limits
            device["services"][str(svc_id)] = {"desc": stored, "netns": 0, "busy": 0}
            return svc_id

    def _validate(self, op: str, device: dict, desc: ServiceDesc, rules: Emulated) -> None:
        def invalid(why: str):
            return CxiError(op, self.name, errno.EINVAL, why)

        if any(m.type not in range(rules.member_types) for m in desc.members):
            raise invalid("unknown member type")
        if desc.restricted_vnis:
            if not 1 <= len(desc.vnis) <= MAX_VNIS:
                raise invalid(f"restricted_vnis needs 1 to {MAX_VNIS} VNIs, got {len(desc.vnis)}")
            bad = [v for v in desc.vnis if not 1 <= v <= 65535]
            if bad:
                raise invalid(f"VNI {bad[0]} is outside 1..65535")
        if desc.restricted_tcs and not desc.tcs <= set(TRAFFIC_CLASSES):
            raise invalid(f"unknown traffic class {sorted(desc.tcs - set(TRAFFIC_CLASSES))[0]}")
        if desc.resource_limits:
            for name, lim in desc.limits.items():
                if name not in device["totals"]:
                    raise invalid(f"unknown resource {name}")
                if not 0 <= lim.res <= lim.max <= device["totals"][name]:
                    raise invalid(f"{name}: needs res <= max <= {device['totals'][name]} "
                                  f"(device total), got max={lim.max} res={lim.res}")

    def _reserve(self, op: str, device: dict, desc: ServiceDesc, rules: Emulated) -> dict:
        """The driver's reserve_rsrcs: the reservations, in order, out of what no service
        reserves (TLEs not checked here), then the LE and TLE pools and the TLEs. The
        limits to keep, or NoResources with the fail_info the driver fills."""
        totals = device["totals"]
        limits = effective_limits(desc, totals, default=False)
        reserved, le_pools_held, tle_pools_held = device["services"].usage(rules.le_pool_per_service)
        free = {name: total - reserved[name] for name, total in totals.items()}
        asked = {name: Limit(*lim) for name, lim in limits.items()} if desc.resource_limits else {}
        avail = {}

        def short(**flags):
            return NoResources(self.name, asked, avail, **flags)

        for name in RESOURCES:
            if name == "tles" or limits[name] == [0, 0]:
                continue
            avail[name] = max(0, free[name])
            if limits[name][1] > avail[name]:
                raise short()
        les, tles = limits["les"], limits["tles"]
        if les[1] or (rules.le_pool_per_service and les[0]):
            if not le_pools_held < LE_POOLS - 1:
                raise short(no_le_pools=True)
        if tles != [0, 0]:
            if tles[1] > free["tles"]:
                raise short()
            if not tle_pools_held < TLE_POOLS:
                raise short(no_tle_pools=True)
        return limits

    def _refuse_held_vnis(self, op: str, device: dict, vnis) -> None:
        for svc in device["services"].values():
            held = set(svc["desc"]["vnis"]) & set(vnis) if svc["desc"]["restricted_vnis"] else ()
            if held:
                raise CxiError(op, self.name, errno.EEXIST, f"VNI {min(held)} overlaps a profile")

    def destroy_svc(self, svc_id: int) -> None:
        op = "cxil_destroy_svc"
        with self._device(op) as (device, _):
            if svc_id == DEFAULT_SVC_ID:
                raise CxiError(op, self.name, errno.EINVAL, "the default service cannot be destroyed")
            self._unused_service(device, op, svc_id)
            del device["services"][str(svc_id)]

    def svc_enable(self, svc_id: int, enable: bool) -> None:
        op = "cxil_svc_enable"
        with self._device(op) as (device, _):
            self._service(device, op, svc_id)["desc"]["enable"] = bool(enable)

    def svc_set_netns(self, svc_id: int, netns_inode: int) -> None:
        op = "cxil_svc_set_netns"
        with self._device(op) as (device, _):  # the driver's order: id, members, enabled
            svc = self._service(device, op, svc_id)
            desc = svc["desc"]
            if not desc["restricted_members"] or any(
                t in (MEMBER_UID, MEMBER_GID) for _, t in desc["members"]
            ):
                raise CxiError(op, self.name, errno.EEXIST,
                               "needs restricted_members and no UID/GID member")
            if desc["enable"]:
                raise CxiError(op, self.name, errno.EBUSY, "the service is enabled")
            svc["netns"] = netns_inode

    def svc_get_netns(self, svc_id: int) -> int:
        op = "cxil_svc_get_netns"
        with self._device(op, write=False) as (device, _):
            return self._service(device, op, svc_id)["netns"]

    def get_svc(self, svc_id: int) -> ServiceDesc:
        op = "cxil_get_svc"
        with self._device(op, write=False) as (device, _):
            return desc_from_json(self._service(device, op, svc_id)["desc"])

    def list_services(self, netns: bool = True) -> list[Service]:
        with self._device("cxil_get_svc_list", write=False) as (device, _):
            return self._listed(device["services"], netns)

    def services_bound_to(self, inode: int) -> list[Service]:
        with self._device("cxil_get_svc_list", write=False) as (device, _):
            return self._listed(device["services"].where("netns = ?", inode), True)

    def system_services(self) -> list[Service]:
        with self._device("cxil_get_svc_list", write=False) as (device, _):
            return self._listed(device["services"].where("system = 1"), False)

    def _listed(self, services, netns: bool) -> list[Service]:
        bound = {int(sid): svc["netns"] for sid, svc in services.items()}
        descs = [desc_from_json(svc["desc"]) for svc in services.values()]
        return [Service(self.name, desc, self.stack.listed_netns(desc, bound.__getitem__) if netns else 0)
                for desc in descs]

    def totals(self) -> dict[str, int]:
        with self._device("totals", write=False) as (device, _):
            return dict(device["totals"])

    def rgids_avail(self) -> int | None:
        with self._device("rgids_avail", write=False) as (device, _):
            return device.get("rgids_avail", RGIDS)

    def svc_rsrc_use(self, svc_id: int) -> dict[str, int] | None:
        """What the service's processes use; for LEs and TLEs only where it has a pool of its
        own (or is the default service), NOT_APPLICABLE otherwise, as the driver says."""
        op = "cxil_get_svc_rsrc_use"
        with self._device(op, write=False) as (device, rules):
            svc = self._service(device, op, svc_id)
            use = {name: svc.get("in_use", {}).get(name, 0) for name in RESOURCES}
            if svc_id != DEFAULT_SVC_ID:
                if not svc["desc"]["limits"].get("les", [0, 0])[1]:
                    use["les"] = NOT_APPLICABLE
                if not svc["desc"]["limits"].get("tles", [0, 0])[1]:
                    use["tles"] = NOT_APPLICABLE
            return use

    def svc_set_lpr(self, svc_id: int, lnis_per_rgid: int) -> None:
        op = "cxil_set_svc_lpr"
        with self._device(op) as (device, _):
            if not 0 <= lnis_per_rgid <= MAX_LNIS_PER_RGID:
                raise CxiError(op, self.name, errno.EINVAL,
                               f"{lnis_per_rgid} LNIs per resource group, the most is {MAX_LNIS_PER_RGID}")
            self._unused_service(device, op, svc_id)["lpr"] = lnis_per_rgid

    def svc_get_lpr(self, svc_id: int) -> int | None:
        op = "cxil_get_svc_lpr"
        with self._device(op, write=False) as (device, _):
            return self._service(device, op, svc_id).get("lpr", 1)

    def close(self) -> None:
        pass


class SimBackend(ResolvesStack):
    """Simulated CXI devices in the state file `path` (created with defaults if absent)."""

    name = "sim"

    def __init__(self, path: str, stack: str = AUTO):
        self.state, self.stack_choice = SimState(path), stack

    def _devices(self) -> dict:
        with self.state.transaction(write=False) as state:
            return state["devices"]

    def emulated_stack(self) -> str:
        with self.state.transaction(write=False) as state:
            return state.get("stack", DEFAULT_STACK)

    def library(self, with_versions: bool = False) -> LibraryInfo:
        stack = self.emulated_stack()
        return LibraryInfo(f"the simulated library ({stack})", (), EMULATED[stack].netns_calls)

    def driver_revision(self) -> str | None:
        return f"simulated {self.emulated_stack()} ({self.state.path})"

    def check(self) -> None:
        self.stack  # noqa: B018  (resolves the stack, or says why it cannot)
        if not self._devices():
            raise BackendUnavailable(f"the sim state {self.state.path} has no CXI devices")

    def device_names(self) -> list[str]:
        return sorted(self._devices(), key=lambda name: (len(name), name))

    def device_for_netdev(self, netdev: str) -> str:
        for name, device in sorted(self._devices().items()):
            if device["netdev"] == netdev:
                return name
        raise BackendUnavailable(f"no simulated CXI device is behind netdev {netdev}")

    def open(self, name: str) -> SimDevice:
        if name not in self._devices():
            raise CxiError("cxil_open_device", name, errno.ENODEV, "no such CXI device")
        return SimDevice(self.state, name, self.stack)
