"""Simulated CXI devices kept in a JSON state file, enforcing the driver's service rules.

Every call is one transaction: an exclusive flock on `<state>.lock`, read, change, write
to a temporary file and rename over the state, so concurrent plugin processes see the
same devices a real driver would show them.

The state's "stack" says which software stack the simulation is (EMULATED): its library's
calls and its driver's rules. shs-14.0.1 (the default) and shs-14.0.0 have the netns calls,
and 14.0.0 refuses a VNI another service holds; netns-member has no netns calls and takes a
NET_NS member at alloc; shs-13 has neither (a node that cannot bind services at all).
Rules that later features add (pools, fail_info, lpr) belong in SimDevice's checks too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass

from .backend import (
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
    Member,
    Service,
    ServiceDesc,
)
from .stacks import AUTO, SET_NETNS_NEEDED, ResolvesStack

STATE_VERSION = 1
DEFAULT_STACK = "shs-14.0.1"
NETNS_CALLS = ("cxil_svc_set_netns", "cxil_svc_get_netns")


@dataclass(frozen=True)
class Emulated:
    """The library calls and driver rules of one simulated stack."""

    netns_calls: bool  # the library has cxil_svc_set_netns / cxil_svc_get_netns
    unique_vnis: bool  # alloc is -EEXIST when another service holds one of the VNIs
    member_types: int  # member types the driver accepts: 3 without NET_NS, 4 with


EMULATED = {
    "shs-14.0.1": Emulated(netns_calls=True, unique_vnis=False, member_types=4),
    "shs-14.0.0": Emulated(netns_calls=True, unique_vnis=True, member_types=4),
    "netns-member": Emulated(netns_calls=False, unique_vnis=False, member_types=4),
    "shs-13": Emulated(netns_calls=False, unique_vnis=False, member_types=3),
}

# Resource totals of one simulated NIC, in the order of backend.RESOURCES.
DEFAULT_TOTALS = dict(zip(RESOURCES, (2048, 1024, 512, 2047, 2047, 16384, 2048, 1022), strict=True))


def default_state(stack: str = DEFAULT_STACK) -> dict:
    """Two NICs, cxi0 behind hsn0 and cxi1 behind hsn1, each with its default service."""
    return {
        "version": STATE_VERSION,
        "stack": stack,
        "devices": {
            f"cxi{n}": new_device(f"hsn{n}", f"0000:{0x41 + n:02x}:00.0") for n in range(2)
        },
    }


def emulated(state: dict) -> Emulated:
    return EMULATED[state.get("stack", DEFAULT_STACK)]


def new_device(netdev: str, pci: str, vf: bool = False, totals: dict | None = None) -> dict:
    default_svc = desc_to_json(ServiceDesc(svc_id=DEFAULT_SVC_ID, enable=True, is_system_svc=True))
    return {
        "netdev": netdev,
        "pci": pci,
        "vf": vf,
        "totals": dict(totals or DEFAULT_TOTALS),
        "services": {str(DEFAULT_SVC_ID): {"desc": default_svc, "netns": 0, "busy": 0}},
    }


def desc_to_json(desc: ServiceDesc) -> dict:
    return {
        "svc_id": desc.svc_id,
        "restricted_members": desc.restricted_members,
        "restricted_vnis": desc.restricted_vnis,
        "restricted_tcs": desc.restricted_tcs,
        "resource_limits": desc.resource_limits,
        "enable": desc.enable,
        "is_system_svc": desc.is_system_svc,
        "cntr_pool_id": desc.cntr_pool_id,
        "vnis": list(desc.vnis),
        "tcs": sorted(desc.tcs),
        "members": [[m.id, m.type] for m in desc.members],
        "limits": {name: [lim.max, lim.res] for name, lim in desc.limits.items()},
    }


def desc_from_json(data: dict) -> ServiceDesc:
    members = tuple(Member(int(i), int(t)) for i, t in data["members"])
    return ServiceDesc(
        svc_id=data["svc_id"],
        restricted_members=data["restricted_members"],
        restricted_vnis=data["restricted_vnis"],
        restricted_tcs=data["restricted_tcs"],
        resource_limits=data["resource_limits"],
        enable=data["enable"],
        is_system_svc=data["is_system_svc"],
        cntr_pool_id=data["cntr_pool_id"],
        vnis=tuple(data["vnis"]),
        tcs=frozenset(data["tcs"]),
        members=(members[0], members[1]),
        limits={name: Limit(mx, res) for name, (mx, res) in data["limits"].items()},
    )


class SimState:
    """The state file and its lock; `transaction()` yields the decoded state."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def transaction(self, write: bool = True):
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendUnavailable(f"cannot open the sim state {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            state = self.read()
            yield state
            if write:
                self.replace(state)
        finally:
            os.close(lock_fd)

    def read(self) -> dict:
        try:  # never blocking (a FIFO at the path), and only a regular file
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise BackendUnavailable(f"the sim state {self.path} is not a regular file")
                raw = fh.read()
        except FileNotFoundError:
            return default_state()
        except OSError as exc:
            raise BackendUnavailable(f"cannot read the sim state {self.path}: {exc.strerror}") from None
        try:
            state = json.loads(raw)
            if state.get("version") != STATE_VERSION or not isinstance(state.get("devices"), dict):
                raise ValueError(f"expected a version {STATE_VERSION} state with devices")
            if state.get("stack", DEFAULT_STACK) not in EMULATED:
                raise ValueError(f"unknown stack {state['stack']!r}, not one of {', '.join(EMULATED)}")
        except (ValueError, AttributeError) as exc:
            raise BackendUnavailable(
                f"the sim state {self.path} is damaged ({exc}); "
                "move it away to start again with the default simulated devices"
            ) from None
        return state

    def replace(self, state: dict) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh, separators=(",", ":"))
        os.replace(tmp, self.path)


class SimDevice:
    """One simulated NIC; each method is a driver call with the driver's errnos."""

    def __init__(self, state: SimState, name: str, stack):
        self.state, self.name, self.stack = state, name, stack

    @contextlib.contextmanager
    def _device(self, op: str, write: bool = True):
        """The device's state and the rules of the emulated stack, for one call."""
        with self.state.transaction(write) as state:
            device, rules = state["devices"].get(self.name), emulated(state)
            if device is None:
                raise CxiError(op, self.name, errno.ENODEV, "the device is gone")
            if op in NETNS_CALLS and not rules.netns_calls:
                raise BackendUnavailable(f"the simulated library ({state['stack']}) has no {op} "
                                         f"({SET_NETNS_NEEDED})")
            yield device, rules

    def _service(self, device: dict, op: str, svc_id: int) -> dict:
        svc = device["services"].get(str(svc_id))
        if svc is None:
            raise CxiError(op, self.name, errno.EINVAL, f"no service {svc_id}")
        return svc

    def alloc_svc(self, desc: ServiceDesc) -> int:
        op = "cxil_alloc_svc"
        with self._device(op) as (device, rules):
            self._validate(op, device, desc, rules)
            if rules.unique_vnis and desc.restricted_vnis:
                self._refuse_held_vnis(op, device, desc.vnis)
            used = {int(i) for i in device["services"]}
            svc_id = next(i for i in range(DEFAULT_SVC_ID + 1, len(used) + 3) if i not in used)
            stored = desc_to_json(desc)
            stored["svc_id"] = svc_id
            stored["enable"] = bool(desc.enable and desc.restricted_vnis)
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
            self._check_limits(op, device, desc.limits)

    def _check_limits(self, op: str, device: dict, limits: dict[str, Limit]) -> None:
        totals = device["totals"]
        for name, lim in limits.items():
            if name not in totals:
                raise CxiError(op, self.name, errno.EINVAL, f"unknown resource {name}")
            if not 0 <= lim.res <= lim.max <= totals[name]:
                raise CxiError(op, self.name, errno.EINVAL,
                               f"{name}: needs res <= max <= {totals[name]} (device total), "
                               f"got max={lim.max} res={lim.res}")
        reserved = dict.fromkeys(totals, 0)
        for svc in device["services"].values():
            for name, (_, res) in svc["desc"]["limits"].items():
                reserved[name] += res if svc["desc"]["resource_limits"] else 0
        short = {n: totals[n] - reserved[n] for n, lim in limits.items()
                 if reserved[n] + lim.res > totals[n]}
        if short:
            avail = ", ".join(f"{n}={v}" for n, v in short.items())
            raise CxiError(op, self.name, errno.ENOSPC, f"available: {avail}")

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
            svc = self._service(device, op, svc_id)
            if svc["busy"]:
                raise CxiError(op, self.name, errno.EBUSY, f"service {svc_id} is used by an LNI")
            del device["services"][str(svc_id)]

    def svc_enable(self, svc_id: int, enable: bool) -> None:
        op = "cxil_svc_enable"
        with self._device(op) as (device, _):
            self._service(device, op, svc_id)["desc"]["enable"] = bool(enable)

    def svc_set_netns(self, svc_id: int, netns_inode: int) -> None:
        op = "cxil_svc_set_netns"
        with self._device(op) as (device, _):  # the driver's order: VF, id, members, enabled
            if device["vf"]:
                raise CxiError(op, self.name, errno.EPERM, "not the physical function")
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

    def list_services(self) -> list[Service]:
        with self._device("cxil_get_svc_list", write=False) as (device, _):
            netns = {int(sid): svc["netns"] for sid, svc in device["services"].items()}
            services = [desc_from_json(svc["desc"]) for svc in device["services"].values()]
        return [Service(self.name, desc, self.stack.listed_netns(desc, netns.__getitem__))
                for desc in services]

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
