"""The simulated devices' state: the SQLite database the sim backend keeps them in, the
stacks it can emulate and the devices a new state starts with.

Every driver call is one transaction (SimState.transaction), so concurrent plugin processes
see the same devices a real driver would show them, and a process killed mid-call changes
nothing. A call reads only the services it needs (Services), so its cost does not grow with
the services on the device.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from ..trust import UntrustedPath, check_root_file
from .backend import (
    DEFAULT_SVC_ID,
    MEMBER_NET_NS,
    RESOURCES,
    TRAFFIC_CLASSES,
    BackendUnavailable,
    Limit,
    Member,
    ServiceDesc,
)
from .shape import CASSINI_TOTALS

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
    """The library calls and driver rules of the stack the state emulates."""
    return EMULATED[state.get("stack", DEFAULT_STACK)]


def new_device(netdev: str, pci: str, vf: bool = False, totals: dict | None = None) -> dict:
    """A simulated NIC behind `netdev`, with its default service (a Cassini's totals unless
    `totals` says otherwise)."""
    totals = dict(totals or CASSINI_TOTALS)
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
    """A ServiceDesc as the state stores it."""
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
    """A stored desc as the driver lists it: limits only with resource_limits, and not 0/0."""
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
            # Only stat it: opening and closing the file ourselves would drop the POSIX locks
            # another connection of this process holds on it (SQLite's documented pitfall).
            st = check_root_file(self.path, "cxi.simState")
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
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
        except UntrustedPath as exc:  # root would make and write files where others steer it
            raise BackendUnavailable(f"cannot use the sim state {self.path}: {exc}") from None
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
