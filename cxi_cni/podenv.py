"""`cxi env`, run inside a pod: find the CXI services bound to the pod's own network
namespace and say them as the SLINGSHOT_* variables that Cray MPICH and libfabric before
2.5 need (and that override libfabric's own choice when all three are set).

The formats are those of Slurm's switch/hpe_slingshot plugin, as libfabric's cxi provider
reads them: SLINGSHOT_DEVICES and SLINGSHOT_SVC_IDS are comma-separated and matched by
position (the service id of each device), SLINGSHOT_VNIS is comma-separated and its first
VNI is the one libfabric uses. Only listing calls are made, which need no privilege: the
pod needs /dev/cxiN and libcxi, nothing else."""

from __future__ import annotations

import errno
import shlex
from dataclasses import dataclass

from .cxi.backend import Backend, CxiError, Service

DEVICES_FIX = ("give the pod the node's /dev/cxiN devices through a device plugin or CDI "
               "that shares them between pods")


class PodEnvError(Exception):
    """Why no exports can be given, in words for the pod's author."""


@dataclass(frozen=True)
class Found:
    """The services bound to one namespace, per device that could be read, and why the
    devices that could not be read were skipped."""

    inode: int
    services: dict[str, list[Service]]
    skipped: list[str]


def open_problem(exc: CxiError) -> str:
    if exc.errno == errno.ENOENT:
        return f"{exc}: this container has no /dev/{exc.device}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{exc}: this container may not open /dev/{exc.device}"
    return str(exc)


def find(backend: Backend, inode: int) -> Found:
    """The enabled, non-system services bound to `inode` on every device this process can
    open (as libfabric considers them). PodEnvError when no device can be read."""
    names = backend.device_names()
    if not names:
        raise PodEnvError(f"no CXI device on this node ({backend.name} backend lists none); "
                          "is the cxi driver loaded?")
    services, skipped = {}, []
    for name in names:
        try:
            dev = backend.open(name)
        except CxiError as exc:
            skipped.append(open_problem(exc))
            continue
        try:
            services[name] = [s for s in dev.services_bound_to(inode)
                              if s.desc.enable and not s.desc.is_system_svc]
        finally:
            dev.close()
    if not services:
        raise PodEnvError(f"cannot open any CXI device ({'; '.join(skipped)}); {DEVICES_FIX}")
    return Found(inode, services, skipped)


def exports(found: Found, vni: int | None = None) -> dict[str, str]:
    """SLINGSHOT_DEVICES, SLINGSHOT_SVC_IDS and SLINGSHOT_VNIS for one service per device:
    the primary VNI (`vni`, or the first VNI of the services) first, then the other VNIs
    every chosen service grants."""
    chosen: dict[str, Service] = {}
    for device, services in found.services.items():
        if vni is not None:
            services = [s for s in services if vni in s.desc.vnis]
        if len(services) > 1:
            held = "; ".join(f"service {s.svc_id} VNIs {list(s.desc.vnis)}" for s in services)
            raise PodEnvError(f"{device} has {len(services)} services bound to this namespace "
                              f"({held}): choose one with --vni")
        if services:
            chosen[device] = services[0]
    if not chosen:
        devices = ", ".join(found.services)
        wanted = f" granting VNI {vni}" if vni is not None else ""
        raise PodEnvError(f"no CXI service{wanted} is bound to this network namespace (inode "
                          f"{found.inode}) on {devices}: the pod's network setup (the cxi CNI "
                          "plugin) made none; check that the pod got a VNI, and `cxi services` "
                          "on the node")
    first_device, first = next(iter(chosen.items()))
    primary = vni if vni is not None else first.desc.vnis[0]
    lacking = [d for d, s in chosen.items() if primary not in s.desc.vnis]
    if lacking:
        raise PodEnvError(f"VNI {primary} (the first VNI of service {first.svc_id} on "
                          f"{first_device}) is not granted on {', '.join(lacking)}: choose the "
                          "VNI with --vni (devices without it are then left out)")
    vnis = [primary] + [v for v in first.desc.vnis if v != primary
                        and all(v in s.desc.vnis for s in chosen.values())]
    return {"SLINGSHOT_DEVICES": ",".join(chosen),
            "SLINGSHOT_SVC_IDS": ",".join(str(s.svc_id) for s in chosen.values()),
            "SLINGSHOT_VNIS": ",".join(map(str, vnis))}


def shell(variables: dict[str, str]) -> str:
    """`export NAME=value` lines for `eval "$(cxi env)"`."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
