"""What the Kubernetes API says about one pod: that it is the pod the runtime means (its UID),
the VNI its job was given (the VNI service's `Vni` object of its nearest controlling owner),
the VNIs its namespace lets its author choose, and its CPU count.

The VNI service gives each owner (Job, ReplicaSet, Deployment, DaemonSet, volcano Job) a
namespaced object `vni-<owner uid>` (horizon-opencube.eu/v1, plural vnis) whose `spec.vni`
is the owner's VNI. The walk follows only controller ownerReferences, within the pod's own
namespace, checks every owner's UID against the reference that led to it, and takes a Vni
object only when it belongs to that owner."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

from .kubeapi import ApiClient, KubeError, KubeUnavailable
from .kubeconfig import load_access
from .kubenames import OBJECT_NAME_RE, OBJECT_NAME_RULE

__all__ = ["KubeError", "KubeUnavailable", "PodReplaced", "OwnerMismatch", "PodFacts", "PodLookup",
           "pod_vnis"]

VNI_GROUP_PATH = "/apis/horizon-opencube.eu/v1"
MAX_OWNER_DEPTH = 8
# The Namespace annotation (written by the cluster admin) listing VNIs the namespace's pods may
# ask for themselves through Multus cni-args, e.g. "2000-2099,3000".
POD_VNIS_ANNOTATION = "cxi-cni/pod-vnis"

# Owners whose object we may read to continue the walk: (apiVersion, kind) -> plural.
WALKABLE_OWNERS = {
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "DaemonSet"): "daemonsets",
    ("batch/v1", "Job"): "jobs",
    ("batch.volcano.sh/v1alpha1", "Job"): "jobs",
}


# Every (API group, resource) the plugin reads: the RBAC of deploy/rbac.yaml must grant get.
READS = (("", "pods"), ("", "namespaces"), ("horizon-opencube.eu", "vnis"),
         *sorted({(api_version.rpartition("/")[0], plural)
                  for (api_version, _), plural in WALKABLE_OWNERS.items()}))


class PodReplaced(KubeError):
    """The API's pod of that name has another UID than the runtime's sandbox: the pod was
    deleted and made again while the old sandbox was being set up."""


class OwnerMismatch(KubeError):
    """An ownerReference or a Vni object does not point at the object it names: refused."""


@dataclass
class PodFacts:
    """What the API knows of the pod; `found` is False when it does not know the pod."""

    found: bool = True
    vnis: list[int] | None = None
    vni_origin: str = ""
    cpus: float | None = None


class PodLookup:
    """One pod's reads against the API server, over one connection within one deadline.
    Use as a context manager; `timeout` bounds everything it asks, in seconds."""

    def __init__(self, kubeconfig: str | None, namespace: str, pod: str, timeout: float = 5.0):
        self.namespace, self.pod = namespace, pod
        with misshapen(f"kubeconfig {kubeconfig or '(in-cluster)'}"):
            self.api = ApiClient(load_access(kubeconfig), deadline=time.monotonic() + timeout)

    def __enter__(self) -> PodLookup:
        return self

    def __exit__(self, *exc) -> None:
        self.api.close()

    def facts(self, expected_uid: str = "") -> PodFacts:
        """The pod, checked against `expected_uid` (K8S_POD_UID) when given, with its
        nearest owner's VNIs. PodReplaced, OwnerMismatch, KubeError, KubeUnavailable."""
        with misshapen(f"the API's answers about pod {self.namespace}/{self.pod}"):
            return self._facts(expected_uid)

    def _facts(self, expected_uid: str) -> PodFacts:
        obj = self.api.get(f"/api/v1/namespaces/{self.namespace}/pods/{self.pod}")
        if obj is None:
            return PodFacts(found=False)
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if expected_uid and uid != expected_uid:
            raise PodReplaced(f"pod {self.namespace}/{self.pod} in the API has UID {uid or 'none'}, "
                              f"the sandbox was made for UID {expected_uid}: the pod was replaced")
        facts = PodFacts(cpus=pod_cpus(obj.get("spec") or {}))
        found = self._nearest_owner_vnis(obj)
        if found:
            facts.vnis, facts.vni_origin = found
        return facts

    def _nearest_owner_vnis(self, obj: dict) -> tuple[list[int], str] | None:
        seen: set[str] = set()
        for _ in range(MAX_OWNER_DEPTH):
            ref = controller_ref(obj)
            if ref is None or ref.get("uid") in seen:
                return None
            uid = str(ref.get("uid") or "")
            seen.add(uid)
            plural = WALKABLE_OWNERS.get((ref.get("apiVersion"), ref.get("kind")))
            if plural is None or not uid:
                return None
            kind, name = ref.get("kind"), str(ref.get("name") or "")
            if not OBJECT_NAME_RE.match(name):  # tenant-written: it must not steer the path
                raise OwnerMismatch(f"the ownerReference to {kind} names {name[:64]!r}, which is not "
                                    f"{OBJECT_NAME_RULE}")
            owner = self.api.get(f"{api_prefix(ref['apiVersion'])}/namespaces/{self.namespace}/"
                                 f"{plural}/{name}")
            if owner is None:  # the owner is gone (being deleted): nothing further up to ask
                return None
            owner_uid = str((owner.get("metadata") or {}).get("uid") or "")
            if owner_uid != uid:
                raise OwnerMismatch(f"the ownerReference to {kind} {self.namespace}/{name} names UID "
                                    f"{uid}, but that {kind} has UID {owner_uid or 'none'}")
            vni_object = self.api.get(f"{VNI_GROUP_PATH}/namespaces/{self.namespace}/vnis/vni-{uid}")
            if vni_object is not None:
                where = f"Vni {self.namespace}/vni-{uid} of {kind} {self.namespace}/{name}"
                check_vni_owner(vni_object, uid, where)
                return vnis_of(vni_object, where), where
            obj = owner
        return None

    def namespace_pod_vnis(self) -> str | None:
        """The admin's annotation on the pod's Namespace listing the VNIs its pods may choose."""
        with misshapen(f"the API's answer about namespace {self.namespace}"):
            return self._namespace_pod_vnis()

    def _namespace_pod_vnis(self) -> str | None:
        obj = self.api.get(f"/api/v1/namespaces/{self.namespace}")
        annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
        value = annotations.get(POD_VNIS_ANNOTATION)
        return value if isinstance(value, str) else None


@contextlib.contextmanager
def misshapen(what: str):
    """A KubeError for data not shaped as Kubernetes writes it (a metadata that is a string,
    a token that is not text, a server URL that is no URL), never an internal error."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, ValueError, RecursionError) as exc:
        raise KubeError(f"{what} is not shaped as Kubernetes writes it "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None


def pod_vnis(kubeconfig: str | None, namespace: str, pod: str, timeout: float = 5.0) -> list[int] | None:
    """VNIs of the nearest owner of `namespace/pod` that has a Vni object, or None."""
    with PodLookup(kubeconfig, namespace, pod, timeout) as lookup:
        return lookup.facts().vnis


def controller_ref(obj: dict) -> dict | None:
    """The reference to the object's controller; other ownerReferences are not followed."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if isinstance(ref, dict) and ref.get("controller") is True), None)


def api_prefix(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def check_vni_owner(vni_object: dict, owner_uid: str, where: str) -> None:
    """A Vni object that names owners must name this one (the VNI service's do)."""
    refs = (vni_object.get("metadata") or {}).get("ownerReferences") or []
    uids = {str(ref.get("uid")) for ref in refs if isinstance(ref, dict)}
    if refs and owner_uid not in uids:
        raise OwnerMismatch(f"{where} belongs to another owner (ownerReferences {sorted(uids)})")


def vnis_of(vni_object: dict, where: str) -> list[int]:
    value = (vni_object.get("spec") or {}).get("vni")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise KubeError(f"{where} has spec.vni = {value!r}; expected an integer or a list of integers")
    return list(values)


def pod_cpus(spec: dict) -> float | None:
    """The CPUs of the pod: the sum of its containers' CPU limits, else of their requests;
    None when no container states either."""
    for kind in ("limits", "requests"):
        total, seen = 0.0, False
        for container in spec.get("containers") or []:
            quantity = ((container.get("resources") or {}).get(kind) or {}).get("cpu")
            if quantity is not None:
                cpus = cpu_quantity(quantity)
                if cpus is not None:
                    total, seen = total + cpus, True
        if seen:
            return total if math.isfinite(total) else None
    return None


def cpu_quantity(value) -> float | None:
    """A Kubernetes CPU quantity ("2", "500m", 1.5) in CPUs; None if it is not a finite,
    positive one (the pod's author writes it: "nan", "-3" or "1e400" must not reach the
    shape's arithmetic, whatever the API server let through)."""
    text = str(value).strip()
    try:
        cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return cpus if math.isfinite(cpus) and cpus > 0 else None
