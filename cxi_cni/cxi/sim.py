"""Simulated CXI devices kept in an SQLite database, enforcing the driver's service rules.

Every call is one transaction, so concurrent plugin processes see the same devices a real
driver would show them (SimState).

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
import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from .backend import (
    DEFAULT_SVC_ID,
    MAX_VNIS,
    MEMBER_GID,
    MEMBER_NET_NS,
    MEMBER_UID,
    RESOURCES,
    TRAFFIC_CLASSES,
    BackendUnavailable,
    CxiError,
    LibraryInfo,
    Limit,
    Member,
    NoResources,
    Service,
    ServiceDesc,
)
from .shape import LE_POOLS, MAX_LNIS_PER_RGID, NOT_APPLICABLE, TLE_MIN, TLE_POOLS
from .stacks import AUTO, SET_NETNS_NEEDED, ResolvesStack

STATE_VERSION = 2  # 1 was one JSON file, before the database
DEFAULT_STACK = "shs-14.0.1"
MIN_DATABASE = 512  # bytes: an SQLite database is at least one page
BUSY_WAIT = 60.0  # seconds a call waits for another process's transaction on the same devices
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (device TEXT NOT NULL, svc_id INTEGER NOT NULL,
                                     netns INTEGER NOT NULL, system INTEGER NOT NULL,
                                     data TEXT NOT NULL, PRIMARY KEY (device, svc_id));
CREATE INDEX IF NOT EXISTS services_by_netns ON services (device, netns);
"""
NETNS_CALLS = ("cxil_svc_set_netns", "cxil_svc_get_netns")


@dataclass(frozen=True)
class Emulated:
    """The library calls and driver rules of one simulated stack."""

    netns_calls: bool  # the library has cxil_svc_set_netns / cxil_svc_get_netns
    unique_vnis: bool  # alloc is -EEXIST when another service holds one of the VNIs
    member_types: int  # member types the driver accepts: 3 without NET_NS, 4 with
    le_pool_per_service: bool = True  # any LE limit takes an LE pool (before 14.0.1)


EMULATED = {
    "shs-14.0.1": Emulated(netns_calls=True, unique_vnis=False, member_types=4,
                           le_pool_per_service=False),
    "shs-14.0.0": Emulated(netns_calls=True, unique_vnis=True, member_types=4),
    "netns-member": Emulated(netns_calls=False, unique_vnis=False, member_types=4),
    "shs-13": Emulated(netns_calls=False, unique_vnis=False, member_types=3),
}

# Resource totals of one simulated NIC, in the order of backend.RESOURCES.
DEFAULT_TOTALS = dict(zip(RESOURCES, (2048, 1024, 512, 2047, 2047, 16384, 2048, 1022), strict=True))
DEFAULT_SVC_TLES = 512  # the driver's default_svc_num_tles
RGIDS = 255  # resource groups a device has left with no LNI (sysfs rgids_avail)


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
    totals = dict(totals or DEFAULT_TOTALS)
    return {
        "netdev": netdev,
        "pci": pci,
        "vf": vf,
        "totals": totals,
        "rgids_avail": RGIDS,
        "services": {str(DEFAULT_SVC_ID): {"desc": desc_to_json(default_service(totals)),
                                           "netns": 0, "busy": 0}},
    }


def default_service(totals: dict) -> ServiceDesc:
    """As the driver makes it: VNIs 1 and 10, TCs but Ethernet, limited to the device's
    totals but TLEs, of which it reserves 512 (and TLE pool 0), disabled."""
    limits = {name: Limit(total, 0) for name, total in totals.items()}
    limits["tles"] = Limit(DEFAULT_SVC_TLES, DEFAULT_SVC_TLES)
    return ServiceDesc(svc_id=DEFAULT_SVC_ID, restricted_vnis=True, vnis=(1, 10),
                       restricted_tcs=True, tcs=frozenset(TRAFFIC_CLASSES[:4]),
                       resource_limits=True, limits=limits)


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
        limits={name: Limit(mx, res) for name, (mx, res) in data["limits"].items()
                if (mx or res) and data["resource_limits"]},
    )


def effective_limits(desc: ServiceDesc, totals: dict, default: bool) -> dict[str, list[int]]:
    """The limits the driver keeps for a service (cass_svc.c reserve_rsrcs): its own, or the
    device's totals without resource limits; TLEs, when limited at all, reserved as their
    max and at least TLE_MIN (but for the default service)."""
    if desc.resource_limits:
        limits = {name: [desc.limits.get(name, Limit(0, 0)).max, desc.limits.get(name, Limit(0, 0)).res]
                  for name in RESOURCES}
    else:
        limits = {name: [totals[name], 0] for name in RESOURCES}
    tles = limits["tles"]
    if not default and (tles[0] or tles[1]):
        limits["tles"] = [max(tles[1], TLE_MIN)] * 2
    return limits


class Services(MutableMapping):
    """One device's services by id (as text), read from the database when first asked for
    (one row, or all of them for a walk) and written back, if changed, when the call ends."""

    def __init__(self, db: sqlite3.Connection, device: str):
        self.db, self.device = db, device
        self.rows: dict[str, dict] = {}
        self.read_as: dict[str, str | None] = {}  # the row's text when read (None: new)
        self.gone: set[str] = set()
        self.complete = False

    def __getitem__(self, svc_id: str) -> dict:
        if svc_id in self.gone:
            raise KeyError(svc_id)
        if svc_id not in self.rows and not self.complete:
            row = self.db.execute("SELECT data FROM services WHERE device = ? AND svc_id = ?",
                                  (self.device, int(svc_id))).fetchone()
            if row is not None:
                self.rows[svc_id], self.read_as[svc_id] = json.loads(row[0]), row[0]
        return self.rows[svc_id]

    def __setitem__(self, svc_id: str, value: dict) -> None:
        self.rows[svc_id] = value
        self.read_as.setdefault(svc_id, None)
        self.gone.discard(svc_id)

    def __delitem__(self, svc_id: str) -> None:
        self[svc_id]  # noqa: B018  (KeyError when there is none)
        del self.rows[svc_id]
        self.gone.add(svc_id)

    def __iter__(self):
        self.read_all()
        return iter(sorted(self.rows, key=int))

    def __len__(self) -> int:
        self.read_all()
        return len(self.rows)

    def read_all(self) -> None:
        if self.complete:
            return
        for svc_id, text in self.db.execute("SELECT svc_id, data FROM services WHERE device = ?",
                                            (self.device,)):
            key = str(svc_id)
            if key not in self.rows and key not in self.gone:
                self.rows[key], self.read_as[key] = json.loads(text), text
        self.complete = True

    def write(self) -> None:
        for svc_id in self.gone:
            self.db.execute("DELETE FROM services WHERE device = ? AND svc_id = ?",
                            (self.device, int(svc_id)))
        for svc_id, value in self.rows.items():
            text = json.dumps(value, separators=(",", ":"))
            if text != self.read_as.get(svc_id):
                self.db.execute("INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?)",
                                row(self.device, int(svc_id), value, text))

    def ids(self) -> list[int]:
        """The ids of the device's services, without reading the services."""
        return [svc_id for (svc_id,) in self.db.execute(
            "SELECT svc_id FROM services WHERE device = ? ORDER BY svc_id", (self.device,))]

    def where(self, condition: str, *args) -> dict[str, dict]:
        """The stored services that meet an SQL condition on the netns and system columns."""
        return {str(svc_id): json.loads(text) for svc_id, text in self.db.execute(
            f"SELECT svc_id, data FROM services WHERE device = ? AND {condition} ORDER BY svc_id",
            (self.device, *args))}

    def usage(self, le_pool_per_service: bool) -> tuple[dict[str, int], int, int]:
        """What the stored services hold, summed by the database: the reservation of each
        resource, the LE pools (services but the default one reserving LEs, or before
        14.0.1 limiting them) and the TLE pools (services limiting TLEs)."""
        limit = "IFNULL(json_extract(data, '$.desc.limits.{}[{}]'), 0)".format
        sums = ", ".join(f"SUM({limit(name, 1)})" for name in RESOURCES)
        les = f"svc_id != {DEFAULT_SVC_ID} AND ({limit('les', 1)} > 0 OR (? AND {limit('les', 0)} > 0))"
        tles = f"{limit('tles', 0)} > 0 OR {limit('tles', 1)} > 0"
        found = self.db.execute(f"SELECT {sums}, SUM({les}), SUM({tles}) FROM services "
                                "WHERE device = ?", (int(le_pool_per_service), self.device)).fetchone()
        counts = [int(value or 0) for value in found]
        return dict(zip(RESOURCES, counts, strict=False)), counts[-2], counts[-1]


def row(device: str, svc_id: int, value: dict, text: str) -> tuple:
    """A service's row: the inode it is bound to (by the netns call or its NET_NS member)
    and whether it is a system service, in columns the listings filter on."""
    members = value["desc"]["members"]
    bound = value["netns"] or next((mid for mid, kind in members if kind == MEMBER_NET_NS), 0)
    return device, svc_id, bound, int(bool(value["desc"]["is_system_svc"])), text


class SimState:
    """The simulated devices in an SQLite database (sqlite3, standard library): each driver
    call is one transaction, so concurrent plugin processes see the devices a real driver
    would show them and a process killed mid-call changes nothing. A call reads only the
    services it needs: one, or all of a device for a walk (a listing, a reservation check),
    so a call on a device with a thousand services costs a few milliseconds, not the
    rewrite of every service. `transaction()` yields the state as the dicts the rules use:
    {"version", "stack", "devices": {name: {..., "services": {id: service}}}}."""

    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            # Only stat it: opening and closing the file ourselves would drop the POSIX locks
            # another connection of this process holds on it (SQLite's documented pitfall).
            st = os.stat(self.path) if os.path.exists(self.path) else None
            if st is not None and not stat.S_ISREG(st.st_mode):  # sqlite would block on a FIFO
                raise BackendUnavailable(f"the sim state {self.path} is not a regular file")
            if st is not None and 0 < st.st_size < MIN_DATABASE:  # sqlite would take it for new
                raise sqlite3.DatabaseError("not an SQLite database (shorter than one page)")
            db = sqlite3.connect(self.path, timeout=BUSY_WAIT, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
            if db.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                db.execute("BEGIN IMMEDIATE")  # a new state: the default devices, once
                if db.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                    self._store(db, default_state(), {})
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self.failed(exc) from None
        except OSError as exc:
            raise BackendUnavailable(f"cannot open the sim state {self.path}: {exc.strerror}") from None
        self._db = db
        return db

    def failed(self, exc: sqlite3.DatabaseError) -> BackendUnavailable:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return BackendUnavailable(f"the sim state {self.path} stayed locked by another "
                                      f"process for {BUSY_WAIT:.0f} s")
        return BackendUnavailable(f"the sim state {self.path} is damaged ({exc}); "
                                  "move it away to start again with the default simulated devices")

    @contextlib.contextmanager
    def transaction(self, write: bool = True):
        """One call's transaction. Writers take turns on an flock first: a blocked flock
        wakes the moment it is free, where SQLite's own busy wait polls with sleeps of up
        to 100 ms, which stretched 64 ADDs at once by a third."""
        db = self.connect()
        with self.turn(write):
            yield from self._transaction(db, write)

    @contextlib.contextmanager
    def turn(self, write: bool):
        if not write:  # readers never wait in WAL mode
            yield
            return
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendUnavailable(f"cannot open the sim state {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _transaction(self, db: sqlite3.Connection, write: bool):
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                read_as: dict[str, str] = {}
                state = self._load(db, read_as)
                yield state
                if write:
                    self._store(db, state, read_as)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise self.failed(exc) from None

    def _load(self, db: sqlite3.Connection, read_as: dict[str, str]) -> dict:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("version") != str(STATE_VERSION) or meta.get("stack") not in EMULATED:
            raise sqlite3.DatabaseError(f"expected a version {STATE_VERSION} state of a known stack")
        devices = {}
        for name, text in db.execute("SELECT name, data FROM devices"):
            device = json.loads(text)
            device["services"] = Services(db, name)
            devices[name], read_as[name] = device, text
        read_as[""] = meta["stack"]
        return {"version": STATE_VERSION, "stack": meta["stack"], "devices": devices}

    def _store(self, db: sqlite3.Connection, state: dict, read_as: dict[str, str]) -> None:
        """Write back what changed: `read_as` holds each device row's text as read."""
        stack = state.get("stack", DEFAULT_STACK)
        if read_as.get("") != stack:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?), ('stack', ?)",
                       (str(state.get("version", STATE_VERSION)), stack))
        for name in set(read_as) - {""} - set(state["devices"]):
            db.execute("DELETE FROM devices WHERE name = ?", (name,))
            db.execute("DELETE FROM services WHERE device = ?", (name,))
        for name, device in state["devices"].items():
            services = device["services"]
            text = json.dumps({key: value for key, value in device.items() if key != "services"},
                              separators=(",", ":"))
            if text != read_as.get(name):
                db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?)", (name, text))
            if isinstance(services, Services):
                services.write()
            else:  # a whole device given as plain dicts (a new state, or tests seeding one)
                db.execute("DELETE FROM services WHERE device = ?", (name,))
                db.executemany("INSERT INTO services VALUES (?, ?, ?, ?, ?)", [
                    row(name, int(svc_id), svc, json.dumps(svc, separators=(",", ":")))
                    for svc_id, svc in services.items()])

    def reset(self, state: dict) -> None:
        """Replace the whole state (the devices, their services and the stack)."""
        with self.transaction() as current:
            current["devices"] = state["devices"]
            current["stack"] = state.get("stack", DEFAULT_STACK)
            current["version"] = state.get("version", STATE_VERSION)


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
            limits = self._reserve(op, device, desc, rules)
            used = set(device["services"].ids())
            svc_id = next(i for i in range(DEFAULT_SVC_ID + 1, len(used) + 3) if i not in used)
            stored = desc_to_json(desc)
            stored["svc_id"] = svc_id
            stored["enable"] = bool(desc.enable and desc.restricted_vnis)
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
            if device["vf"]:
                raise CxiError(op, self.name, errno.EPERM, "not the physical function")
            if not 0 <= lnis_per_rgid <= MAX_LNIS_PER_RGID:
                raise CxiError(op, self.name, errno.EINVAL,
                               f"{lnis_per_rgid} LNIs per resource group, the most is {MAX_LNIS_PER_RGID}")
            svc = self._service(device, op, svc_id)
            if svc["busy"]:
                raise CxiError(op, self.name, errno.EBUSY, f"service {svc_id} is used by an LNI")
            svc["lpr"] = lnis_per_rgid

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
