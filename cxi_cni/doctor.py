"""`cxi doctor`: the node checks an operator runs when pods fail to get their CXI services.

Each check yields (status, line): True (ok), False (a failure: ADD cannot work), WARN (ADD
works, with a limit the operator should know) or NOTE (information)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

from .cni.errors import CniError
from .config import parse_conf
from .cxi import stacks
from .cxi.backend import RESOURCES, BackendUnavailable, CxiError
from .cxi.services import device_headroom
from .cxi.shape import TLE_POOLS, fit, holds_tle_pool, reservation
from .files import FileProblem
from .invocation import open_backend, shape_of
from .k8s import READS
from .kubeapi import ApiClient, KubeError, KubeUnavailable
from .kubeconfig import load_access
from .link import LinkError
from .logs import open_log
from .nodepolicy import policy_path
from .podlink import host_master
from .state import AttachmentStore, StateError
from .trust import UntrustedPath

KUBE_CHECK_SECONDS = 10.0
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"

WARN, NOTE = "warn", "note"
TESTED = ("tested: the three stacks (shs-14.0.1, shs-14.0.0, netns-member) were tested against "
          "a C stand-in for libcxi and the simulated backend, not on Slingshot hardware; on a "
          "real node follow README.md, \"First steps on a real node\"")


def run_checks(raw_conf: dict) -> Iterator[tuple[bool | str, str]]:
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
    yield policy_check(conf)
    yield from kube_checks(conf)
    if conf.master:
        yield master_check(conf)


def backend_checks(conf) -> Iterator[tuple[bool | str, str]]:
    backend = open_backend(conf)
    try:
        backend.check()
        names = backend.device_names()
    except BackendUnavailable as exc:
        yield False, f"backend {backend.name}: {exc}"
        return
    yield True, f"backend {backend.name}: reachable, devices {', '.join(names)}"
    found = yield from stack_checks(backend, names[0])
    if conf.cxi.devices == "master":
        try:
            yield True, f"master {conf.master} is on {backend.device_for_netdev(conf.master)}"
        except BackendUnavailable as exc:
            yield False, f"cxi.devices \"master\": {exc}"
    elif isinstance(conf.cxi.devices, list):
        missing = sorted(set(conf.cxi.devices) - set(names))
        yield (not missing), ("cxi.devices: all present" if not missing
                              else f"cxi.devices names absent devices: {', '.join(missing)}")
    le_pool_per_service = backend.stack.le_pool_per_service
    if le_pool_per_service is None:  # a call stack: the probe told 14.0.1 from older
        le_pool_per_service = found != "shs-14.0.1"
    for name in names:
        try:
            dev = backend.open(name)
            try:
                services = dev.list_services()
                lines = list(capacity(conf, dev, services, le_pool_per_service))
            finally:
                dev.close()
        except (CxiError, BackendUnavailable) as exc:
            yield False, f"{name}: cannot list services: {exc}"
            continue
        bound = sum(1 for s in services if s.netns_inode)
        yield True, f"{name}: {len(services)} services, {bound} bound to a network namespace"
        yield from lines


def counts(values: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in values.items())


def capacity(conf, dev, services, le_pool_per_service: bool) -> Iterator[tuple[bool | str, str]]:
    """A device's totals, what its system services hold (what adjustLimits takes off), and
    how many more pods of the configured shape (at cxi.cpus CPUs) it takes, and what runs
    out first."""
    totals = dev.totals()
    yield True, f"{dev.name}: totals {counts(totals)}"
    system = [s for s in services if s.desc.is_system_svc]
    if system:
        held = {name: sum(reservation(s, name) for s in system) for name in RESOURCES}
        ids = ", ".join(str(s.svc_id) for s in system)
        yield True, (f"{dev.name}: system services ({ids}) reserve {counts(held)}"
                     + ("" if conf.cxi.adjustLimits else "; cxi.adjustLimits is off: pods may "
                        "be given limits up to the totals"))
    shape = shape_of(conf)
    limits = shape.limits(device_headroom(dev, shape.adjust))
    asked = {name: lim.res for name, lim in limits.items() if lim.res}
    what = (f"{shape.cpus} CPU{'s' if shape.cpus != 1 else ''}: reserves "
            + (counts(asked) if asked else "nothing"))
    pools = TLE_POOLS - sum(holds_tle_pool(s) for s in services)
    room = fit(limits, totals, services, le_pool_per_service)
    if room.count is None:
        yield True, (f"{dev.name}: pods of the configured shape ({what}) reserve nothing and "
                     f"need no LE or TLE pool: no bound but the driver's ({pools} TLE pools left)")
    else:
        status = True if room.count else WARN
        fits = "pod of the configured shape fits" if room.count == 1 else "pods of the configured shape fit"
        yield status, (f"{dev.name}: {room.count} more {fits} ({what}); {room.limited_by} "
                       "run out first")


def stack_checks(backend, device: str) -> Iterator[tuple[bool | str, str]]:
    """The library and driver found, and the stack they make, probed on `device`; returns
    the stack the probe found (None: none or not probed)."""
    info, stack = backend.library(with_versions=True), backend.stack
    versions = f", symbol versions {info.versions[0]} to {info.versions[-1]}" if info.versions else ""
    yield True, (f"library: {info.file}{versions}, cxil_svc_set_netns "
                 f"{'present' if info.netns_calls else 'absent'}")
    revision = backend.driver_revision()
    yield True, (f"driver: {revision}" if revision else
                 "driver: no revision shown (class/cxi/cxiN/device/properties/driver_rev)")
    found = None
    try:
        dev = backend.open(device)
        try:
            status, line, found = identify(stack, dev)
            yield status, line
        finally:
            dev.close()
    except (CxiError, BackendUnavailable) as exc:
        yield WARN, f"stack {stack.name}: {stack.chosen_by}; not probed on {device}: {exc}"
    yield NOTE, TESTED
    return found


def identify(stack: stacks.Stack, dev) -> tuple[bool | str, str, str | None]:
    """Ask the driver what the library alone cannot tell: on the call stacks whether it has
    SVC_SET_NETNS (older drivers do not) and whether two services may hold one VNI (14.0.1)
    or not (14.0.0); on the member stack whether the driver takes a NET_NS member at all
    (the research patches) or not (SHS 13 and older)."""
    if stack.netns_calls:
        probe = stacks.probe_set_netns(dev)
        if probe.answer is False:
            return False, (f"stack: none works on this node: {stack.chosen_by}, but the driver "
                           f"of {dev.name} has no SVC_SET_NETNS (it predates SHS 14.0.0: "
                           f"{probe.detail}); install the driver of SHS 14.0.1 or later"), None
        probe = stacks.probe_shared_vni(dev)
        found = {True: "shs-14.0.1", False: "shs-14.0.0"}.get(probe.answer)
        asked = f"two services with one VNI on {dev.name}: {probe.detail}"
    else:
        probe = stacks.probe_member_netns(dev)
        found = "netns-member" if probe.answer else None
        asked = f"a NET_NS member on {dev.name}: {probe.detail}"
        if probe.answer is False:
            return False, (f"stack: none works on this node: {stack.chosen_by}, and the driver "
                           f"refuses {asked}; install SHS 14.0.1 or later"), None
    head = f"stack {found or stack.name} ({stacks.make(found, '').title if found else stack.title})"
    if found is None:
        return WARN, f"{head}: {stack.chosen_by}; {asked}", None
    if stack.name not in (found, "netns-call", "netns-member"):
        return WARN, f"{head}: the driver contradicts cxi.stack {stack.name!r} ({asked})", found
    meaning = stacks.make(found, "").meaning
    return ((WARN if found == "shs-14.0.0" else True),
            f"{head}: {stack.chosen_by}; {asked}. {meaning}", found)


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


def master_check(conf) -> tuple[bool | str, str]:
    """The master as ADD and STATUS see it: on this node, present, up and with room for the
    configured MTU; in each pod's namespace under linkInContainer, out of the node's sight."""
    try:
        master = host_master(conf)
    except CniError as exc:
        return False, f"{exc.msg} ({exc.details})"
    except LinkError as exc:
        return False, f"master {conf.master}: {exc}"
    if master is None:
        return NOTE, (f"master {conf.master}: lives in each pod's network namespace "
                      "(linkInContainer is true), so ADD checks it there")
    return True, f"master {conf.master}: up, MTU {master.mtu}"


def policy_check(conf) -> tuple[bool | str, str]:
    policy = conf.node_policy
    if policy is None:
        return WARN, (f"node policy: none at {policy_path()}; every network configuration (a "
                      "tenant's NAD too) is trusted as the admin's (SECURITY.md)")
    shown = ", ".join(f"{k} {bound_text(v)}" for k, v in policy.given().items()) or "no bounds"
    return True, f"node policy {policy.path}: {shown}"


def bound_text(value) -> str:
    """A policy bound as the admin wrote it: JSON for lists and limits (unset ceilings
    left out), the ranges for a set of VNIs."""
    if isinstance(value, dict):
        value = {name: {k: v for k, v in limit.items() if v is not None} for name, limit in value.items()}
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def kube_checks(conf) -> Iterator[tuple[bool | str, str]]:
    """The kubeconfig loads, the API server answers, and RBAC lets the plugin read what a
    VNI lookup reads."""
    if "kubernetes" not in conf.cxi.vniSources:
        yield True, "kubernetes: not among cxi.vniSources, no lookups"
        return
    if not conf.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        yield WARN, "kubernetes: no kubeconfig set, so no pod gets its job's Vni (set kubeconfig)"
        return
    try:
        access = load_access(conf.kubeconfig)
        login = ("a client certificate" if access.client_cert_pem else
                 f"the token file {access.token_file}" if access.token_file else "a token")
        yield True, f"kubeconfig {access.source}: server {access.server}, logs in with {login}"
        api = ApiClient(access, deadline=time.monotonic() + KUBE_CHECK_SECONDS)
        try:
            version = (api.get("/version") or {}).get("gitVersion", "unknown version")
            yield True, f"API server {access.server}: reachable ({version})"
            denied = [named(group, resource) for group, resource in READS
                      if not allowed(api, group, resource)]
        finally:
            api.close()
    except (KubeError, KubeUnavailable) as exc:
        yield False, f"kubernetes: {exc}"
        return
    yield (not denied), ("RBAC: may get " + ", ".join(named(g, r) for g, r in READS) if not denied
                         else f"RBAC: may not get {', '.join(denied)}; grant it in deploy/rbac.yaml")


def named(group: str, resource: str) -> str:
    return f"{resource}.{group}" if group else resource


def allowed(api: ApiClient, group: str, resource: str) -> bool:
    review = api.post(ACCESS_REVIEWS, {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "get", "group": group, "resource": resource}}})
    return bool(((review or {}).get("status") or {}).get("allowed"))
