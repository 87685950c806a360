"""`cxi doctor`: the node checks an operator runs when pods fail to get their CXI services."""

from __future__ import annotations

import os
from collections.abc import Iterator

from .cni.errors import CniError
from .config import parse_conf
from .cxi.backend import BackendUnavailable, CxiError
from .files import FileProblem
from .invocation import open_backend
from .logs import open_log
from .state import AttachmentStore, StateError
from .trust import UntrustedPath


def run_checks(raw_conf: dict) -> Iterator[tuple[bool, str]]:
    try:
        conf = parse_conf(raw_conf)
    except CniError as exc:
        yield False, f"configuration: {exc.msg} ({exc.details})"
        return
    yield True, (f"configuration: backend {conf.cxi.backend}, devices {conf.cxi.devices!r}, "
                 f"stateDir {conf.stateDir}")
    yield from backend_checks(conf)
    yield from state_checks(conf)
    yield log_check(conf.logFile)
    if conf.master:
        yield master_check(conf.master)


def backend_checks(conf) -> Iterator[tuple[bool, str]]:
    backend = open_backend(conf)
    try:
        backend.check()
        names = backend.device_names()
    except BackendUnavailable as exc:
        yield False, f"backend {backend.name}: {exc}"
        return
    yield True, f"backend {backend.name}: reachable, devices {', '.join(names)}"
    if conf.cxi.devices == "master":
        try:
            yield True, f"master {conf.master} is on {backend.device_for_netdev(conf.master)}"
        except BackendUnavailable as exc:
            yield False, f"cxi.devices \"master\": {exc}"
    elif isinstance(conf.cxi.devices, list):
        missing = sorted(set(conf.cxi.devices) - set(names))
        yield (not missing), ("cxi.devices: all present" if not missing
                              else f"cxi.devices names absent devices: {', '.join(missing)}")
    for name in names:
        try:
            dev = backend.open(name)
            try:
                services = dev.list_services()
            finally:
                dev.close()
        except (CxiError, BackendUnavailable) as exc:
            yield False, f"{name}: cannot list services: {exc}"
            continue
        bound = sum(1 for s in services if s.netns_inode)
        yield True, f"{name}: {len(services)} services, {bound} bound to a network namespace"


def state_checks(conf) -> Iterator[tuple[bool, str]]:
    store = AttachmentStore(conf.stateDir)
    try:
        store.ensure()
    except StateError as exc:
        yield False, f"stateDir: {exc}"
        return
    yield True, f"stateDir {conf.stateDir}: usable, {len(store.all())} attachment records"


def log_check(path: str) -> tuple[bool, str]:
    try:
        fd = open_log(path)
    except (FileProblem, UntrustedPath) as exc:
        return False, f"logFile: {exc}"
    if fd is None:
        return True, "logFile /dev/null: no log"
    os.close(fd)
    return True, f"logFile {path}: writable"


def master_check(master: str) -> tuple[bool, str]:
    base = f"/sys/class/net/{master}"
    if not os.path.exists(base):
        return False, f"master {master}: no such network interface"
    try:
        with open(f"{base}/operstate") as fh:
            state = fh.read().strip()
    except OSError:
        state = "unknown"
    return state in ("up", "unknown"), f"master {master}: operstate {state}"
