"""Which VNIs a pod's CXI services get: from Multus cni-args or CNI_ARGS, from the
Kubernetes Vni object of the pod's owner, or from the configuration, first match wins."""

from __future__ import annotations

import logging
import os
import re

from . import k8s
from .cni.errors import INVALID_CONFIG, INVALID_ENV, TRY_AGAIN_LATER, CniError
from .errors import KUBE_FAILURE

log = logging.getLogger("cxi_cni.vnis")


def check_vnis(vnis: list[int], origin: str, allow_default: bool) -> tuple[int, ...]:
    """The driver's rules (1..65535, 1 to 4) plus ours: VNI 1 only when allowed."""
    code = INVALID_ENV if origin.startswith("CNI_ARGS") else INVALID_CONFIG
    if not 1 <= len(vnis) <= 4:
        raise CniError(code, f"{origin} gives {len(vnis)} VNIs; a CXI service takes 1 to 4",
                       "give between one and four VNIs")
    for vni in vnis:
        if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= 65535:
            raise CniError(code, f"{origin} holds {vni!r}, which is not a VNI",
                           "a VNI is an integer in 1..65535")
    if len(set(vnis)) != len(vnis):
        raise CniError(code, f"{origin} repeats a VNI", "list each VNI once")
    if 1 in vnis and not allow_default:
        raise CniError(code, f"{origin} asks for VNI 1, the default service's VNI that every "
                       "process shares", "use the job's own VNI, or set "
                       "cxi.allowDefaultVni: true if this is really meant")
    return tuple(vnis)


def from_args(conf, cni_args: dict[str, str]) -> tuple[list[int], str] | None:
    cni = (conf.args or {}).get("cni") or {}
    if "vni" in cni:
        value = cni["vni"]
        return (value if isinstance(value, list) else [value]), "args.cni.vni"
    raw = cni_args.get("VNI")
    if raw is not None:
        try:
            return [int(v) for v in raw.split(",")], "CNI_ARGS VNI"
        except ValueError:
            raise CniError(INVALID_ENV, f"CNI_ARGS VNI={raw[:32]!r} is not a list of integers",
                           "pass VNI=N or VNI=N,M in CNI_ARGS") from None
    return None


# Kubernetes object names: a namespace is an RFC 1123 label, a pod name a DNS subdomain.
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def check_pod_names(namespace: str, pod: str) -> None:
    """The names go into API paths: refuse anything that is not a Kubernetes name."""
    for key, value, pattern, rule in (
        ("K8S_POD_NAMESPACE", namespace, NAMESPACE_RE, "an RFC 1123 label (a-z, 0-9, '-', at most 63)"),
        ("K8S_POD_NAME", pod, POD_NAME_RE, "a DNS subdomain (a-z, 0-9, '-', '.', at most 253)"),
    ):
        if not pattern.match(value):
            raise CniError(INVALID_ENV, f"CNI_ARGS {key}={value[:64]!r} is not a Kubernetes name",
                           f"{key} must be {rule}; the container runtime sets it from the pod")


def from_kubernetes(conf, cni_args: dict[str, str]) -> tuple[list[int], str] | None:
    namespace, pod = cni_args.get("K8S_POD_NAMESPACE"), cni_args.get("K8S_POD_NAME")
    if not namespace or not pod:
        return None
    if not conf.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.debug("no kubeconfig and not in a pod: the kubernetes VNI source is skipped")
        return None
    check_pod_names(namespace, pod)
    try:
        vnis = k8s.pod_vnis(conf.kubeconfig, namespace, pod)
    except k8s.KubeUnavailable as exc:
        raise CniError(TRY_AGAIN_LATER, f"cannot reach the Kubernetes API to find the VNI of "
                       f"pod {namespace}/{pod}: {exc}", "the runtime will retry") from None
    except k8s.KubeError as exc:
        raise CniError(KUBE_FAILURE, f"cannot read the VNI of pod {namespace}/{pod}: {exc}",
                       "check the kubeconfig and the RBAC in deploy/") from None
    return (vnis, f"the Vni object of pod {namespace}/{pod}") if vnis else None


def resolve(conf, cni_args: dict[str, str]) -> tuple[int, ...]:
    """The pod's VNIs; () when none is found and the policy lets the pod start without a
    CXI service (it then cannot use the NIC at all)."""
    allow = conf.cxi.allowDefaultVni
    for source in conf.cxi.vniSources:
        if source == "config":
            if conf.cxi.vnis:
                return check_vnis(conf.cxi.vnis, "cxi.vnis", allow)
            continue
        found = (from_args if source == "args" else from_kubernetes)(conf, cni_args)
        if found:
            vnis, origin = found
            log.debug("VNIs %s from %s", vnis, origin)
            return check_vnis(vnis, origin, allow)
    if conf.cxi.vniPolicy == "fallback":
        if conf.cxi.vnis:
            return check_vnis(conf.cxi.vnis, "cxi.vnis", allow)
        log.info("no VNI for this pod from %s: it gets no CXI service (vniPolicy fallback "
                 "with no cxi.vnis)", ", ".join(conf.cxi.vniSources))
        return ()
    raise CniError(INVALID_CONFIG, "no VNI for this pod: none of cxi.vniSources "
                   f"({', '.join(conf.cxi.vniSources)}) gave one",
                   "set cxi.vnis, pass args.cni.vni (Multus cni-args) or VNI= in CNI_ARGS, or "
                   "create the pod's Vni object")
