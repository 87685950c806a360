"""The plugin's own CNI error codes (the spec leaves 100 and up to plugins) and the one
place where failures of the layers below (records, backend, driver, namespace, link) become
CNI errors with a message and a fix."""

from __future__ import annotations

import errno
import functools

from .cni.errors import (
    INVALID_CONFIG,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
)
from .cxi.backend import (
    DEFAULT_SVC_ID,
    NOT_PERMITTED,
    BackendUnavailable,
    CxiError,
    NoResources,
    VniInUse,
)
from .cxi.shape import LE_POOLS, TLE_POOLS
from .netns import NetnsInvalid, NetnsMissing
from .state import AttachmentBusy, StateError

CXI_FAILURE = 100  # a CXI driver call failed, or CHECK found a difference
BACKEND_UNAVAILABLE = 101  # library, symbol or devices missing
STATE_FAILURE = 102  # state directory or record unusable
LINK_FAILURE = 103  # netlink refused the pod's link (podlink.py makes these errors itself)
KUBE_FAILURE = 104  # the Kubernetes lookup failed for good
IPAM_FAILURE = 105  # the IPAM plugin failed without a CNI error of its own
LAUNCHER_FAILURE = 106  # dist/cxi's launcher cannot place its program (launcher.sh says it)
POLICY_REFUSED = 107  # the admin's policy refuses what was asked (a VNI, a service too many)

ERRNO_FIXES = {
    errno.ENOSPC: "the device has too few free resources: lower cxi.limits or free services",
    errno.EINVAL: "check cxi.vnis, cxi.tcs and cxi.limits against the device (cxi doctor)",
    errno.EBUSY: "a process in the pod still holds the NIC; the runtime will retry",
    errno.EPERM: NOT_PERMITTED,
    errno.EEXIST: "the service already has a UID/GID member",
    errno.ENODEV: "the CXI device is gone (cxi doctor lists the present ones)",
    errno.EBADR: "the NIC has no LE or TLE pool left (a driver before SHS 14.0.0 says so this "
                 "way): fewer services on it, or cxi.limits that reserve no LEs or TLEs",
}
FIT_HINT = "`cxi doctor` shows how many pods of this shape fit on each NIC"
NETNS_FIX = ("pass the path of the container's network namespace, such as /run/netns/NAME "
             "or /proc/PID/ns/net")


def cxi_error(exc: CxiError) -> CniError:
    """The CNI error of a failed driver call, with its errno's fix (-EBUSY: try again later)."""
    code = TRY_AGAIN_LATER if exc.errno == errno.EBUSY else CXI_FAILURE
    return CniError(code, str(exc), ERRNO_FIXES.get(exc.errno, "run `cxi doctor` on the node"))


def vni_in_use_error(exc: VniInUse, records) -> CniError:
    """The driver gives a VNI to one service per NIC: name the VNI, the device, the service
    holding it and (from the attachment records) the pod it belongs to, and the fix."""
    held = (exc.device, exc.holder.svc_id)
    owner = next((r for r in records if any((b.device, b.svc_id) == held for b in r.services)), None)
    if exc.holder.svc_id == DEFAULT_SVC_ID:
        who = "the default service"
    elif owner is None:
        who = "a service no cxi record claims"
    else:
        pod = owner.pod.get("pod") or owner.pod.get("podName")
        who = (f"pod {pod}{' (uid ' + owner.pod['podUID'] + ')' if owner.pod.get('podUID') else ''}, "
               if pod else "") + f"container {owner.container_id[:12]} interface {owner.ifname}"
    return CniError(CXI_FAILURE,
                    f"VNI {exc.vni} is already held on {exc.device} by service "
                    f"{exc.holder.svc_id} ({who}): this node's CXI driver (SHS 14.0.0) gives "
                    "a VNI to one service per NIC, so two pods of one job cannot share a NIC",
                    "upgrade the node to SHS 14.0.1 or later (shs-cxi-driver commit fd6adba); "
                    "until then place the job's pods on different nodes (pod anti-affinity) or "
                    "NICs (cxi.devices)")


def no_resources_error(exc: NoResources, pods: int, shape) -> CniError:
    """The NIC had no room for the pod's service: what ran out (from the driver's fail_info),
    how many pods' services the NIC holds, and what to change."""
    held = f"{pods} pod{'s' if pods != 1 else ''}"
    fixes = []
    if exc.no_tle_pools:
        fixes.append(f"each service that reserves TLEs takes one of the NIC's {TLE_POOLS} TLE "
                     "pools (the default service holds one): give pods that use no triggered "
                     "operations cxi.limits.tles {\"res\": 0, \"def\": 0}")
    if exc.no_le_pools:
        fixes.append(f"each service that reserves LEs takes one of the NIC's {LE_POOLS - 1} LE "
                     "pools (before SHS 14.0.1 each that limits LEs at all): reserve no LEs "
                     "(cxi.limits.les res and def 0), or upgrade the node")
    if exc.short:
        cpus = f" for {shape.cpus} CPU{'s' if shape.cpus != 1 else ''}" if shape else ""
        fixes.append(f"this pod reserves {exc.asked[exc.short].res} {exc.short}{cpus}: lower "
                     f"cxi.limits.{exc.short} (res, or def per CPU)")
    fixes.append("or place the pod on a node with room; " + FIT_HINT)
    return CniError(CXI_FAILURE, f"{exc.device} has no room for this pod's CXI service: "
                    f"{exc.what()} (cxil_alloc_svc -ENOSPC); the NIC holds the services of "
                    f"{held}", "; ".join(fixes))


def netns_error(exc: NetnsMissing | NetnsInvalid) -> CniError:
    """The CNI error of a CNI_NETNS that is gone (unknown container) or no namespace."""
    code = UNKNOWN_CONTAINER if isinstance(exc, NetnsMissing) else INVALID_CONFIG
    return CniError(code, f"CNI_NETNS: {exc}", NETNS_FIX)


# The failures of the layers below that a plugin command turns into CNI errors.
MAPPED = (StateError, AttachmentBusy, BackendUnavailable, CxiError, NetnsMissing, NetnsInvalid)


def cni_error(exc: Exception, command: str) -> CniError:
    """The CNI error for a failure of a layer below the plugin (one of MAPPED)."""
    if isinstance(exc, StateError):
        return CniError(STATE_FAILURE, str(exc), "fix or remove the file named")
    if isinstance(exc, AttachmentBusy):
        return CniError(TRY_AGAIN_LATER, "another command on the pod's network namespace or on "
                        "this attachment held its lock too long", "the runtime will retry")
    if isinstance(exc, BackendUnavailable):
        code = NOT_AVAILABLE if command == "STATUS" else BACKEND_UNAVAILABLE
        return CniError(code, str(exc), "run `cxi doctor` on the node")
    if isinstance(exc, CxiError):
        return cxi_error(exc)
    return netns_error(exc)


def mapped(command_method):
    """Decorate a plugin command: failures of the layers below leave it as CNI errors."""

    @functools.wraps(command_method)
    def wrapper(self, args):
        try:
            return command_method(self, args)
        except MAPPED as exc:
            raise cni_error(exc, args.command) from None

    return wrapper
