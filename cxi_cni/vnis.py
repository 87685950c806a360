"""Which VNIs a pod's CXI services get, and who may choose them. By default only what tenants
cannot write: the Vni object the VNI service made for the pod's owner, and the admin's
`cxi.vnis`. The pod's own Multus cni-args (`args`) and the runtime's CNI_ARGS `VNI=`
(`cniArgs`) count only where the admin lists them in `cxi.vniSources`, pod-chosen VNIs only
within the admin's allow-list, and every VNI only within `cxi.allowedVnis` (see SECURITY.md)."""

from __future__ import annotations

import logging
import os

from .cni.errors import INVALID_CONFIG, INVALID_ENV, TRY_AGAIN_LATER, UNKNOWN_CONTAINER, CniError
from .errors import KUBE_FAILURE, POLICY_REFUSED
from .kubenames import NAMESPACE_RE, NAMESPACE_RULE, OBJECT_NAME_RE, OBJECT_NAME_RULE
from .lazy import lazy
from .vniset import VniSet, refusal

log = logging.getLogger("cxi_cni.vnis")
k8s = lazy("cxi_cni.k8s")  # only pods looked up in the API use it

KUBE_TIMEOUT = 5.0


class Refused(Exception):
    """A source gave VNIs the admin's policy does not allow; the message says why."""


class Found:
    """VNIs one source gave, where they came from (for messages: "args.cni.vni", "Vni
    team-b/vni-...") and whether the pod's author wrote them. A plain class: a dataclass
    costs 0.3 ms at import, on every ADD."""

    def __init__(self, vnis: list, origin: str, pod_written: bool = False):
        self.vnis, self.origin, self.pod_written = vnis, origin, pod_written


def check_pod_names(namespace: str, pod: str) -> None:
    """The names go into API paths: refuse anything that is not a Kubernetes name."""
    for key, value, pattern, rule in (
        ("K8S_POD_NAMESPACE", namespace, NAMESPACE_RE, NAMESPACE_RULE),
        ("K8S_POD_NAME", pod, OBJECT_NAME_RE, OBJECT_NAME_RULE),
    ):
        if not pattern.match(value):
            raise CniError(INVALID_ENV, f"CNI_ARGS {key}={value[:64]!r} is not a Kubernetes name",
                           f"{key} must be {rule}; the container runtime sets it from the pod")


def check_shape(vnis: list, origin: str) -> tuple[int, ...]:
    """What a CXI service can hold at all: 1 to 4 distinct integers in 1..65535."""
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
    return tuple(vnis)


class VniResolver:
    """The pod's VNIs from the configured sources, first match wins. After `resolve()`,
    `facts` holds what the Kubernetes API said of the pod (None if it was not asked)."""

    def __init__(self, conf, cni_args: dict[str, str]):
        self.conf, self.cxi, self.cni_args = conf, conf.cxi, cni_args
        self.namespace = cni_args.get("K8S_POD_NAMESPACE", "")
        self.pod = cni_args.get("K8S_POD_NAME", "")
        self.facts: k8s.PodFacts | None = None
        self._lookup: k8s.PodLookup | None = None
        self._namespace_vnis: VniSet | None = None

    @property
    def api_cpus(self) -> float | None:
        """The pod's CPUs as the API said them (None: the API was not asked, or knows none)."""
        return self.facts.cpus if self.facts is not None and self.facts.found else None

    def resolve(self) -> tuple[int, ...]:
        """The VNIs; () when none is found and the policy lets the pod start without a CXI
        service (it then cannot use the NIC at all)."""
        try:
            self._note_ignored()
            for source in self.cxi.vniSources:
                found = getattr(self, f"from_{source}")()
                if found is None:
                    continue
                vnis = check_shape(found.vnis, found.origin)
                try:
                    return self.admit(vnis, found)
                except Refused as exc:
                    self.refuse(found, vnis, str(exc))
        finally:
            if self._lookup is not None:
                self._lookup.__exit__(None, None, None)
                self._lookup = None
        return self.nothing_found()

    def admit(self, vnis: tuple[int, ...], found: Found) -> tuple[int, ...]:
        """The admin's policy: every VNI within cxi.allowedVnis, VNI 1 only when allowed,
        and a pod-chosen VNI only within cxi.podVnis or its Namespace's allow-list."""
        reason = refusal(vnis, self.cxi.allowedVnis, self.cxi.allowDefaultVni)
        if reason:
            raise Refused(reason)
        if found.pod_written:
            allowed = self.cxi.podVnis | self.namespace_pod_vnis()
            outside = [v for v in vnis if v not in allowed]
            if outside:
                raise Refused(f"VNI {outside[0]} is not one the pod may choose: cxi.podVnis is "
                              f"{self.cxi.podVnis}, namespace {self.namespace or '?'} allows "
                              f"{self.namespace_pod_vnis()}")
        log.debug("VNIs %s from %s", list(vnis), found.origin)
        return vnis

    def refuse(self, found: Found, vnis: tuple[int, ...], reason: str) -> None:
        """Under `required` a refusal fails ADD; under `fallback` the next source is asked."""
        gives = f" gives VNIs {list(vnis)}" if vnis else ""
        message = f"{found.origin}{gives}, refused: {reason}"
        if self.cxi.vniPolicy == "required":
            raise CniError(POLICY_REFUSED, message, "use the VNI the VNI service gave the job, or "
                           "ask the cluster admin to allow it (cxi.allowedVnis, cxi.podVnis, or "
                           f"the {k8s.POD_VNIS_ANNOTATION} annotation of the namespace)")
        log.warning("%s; trying the next VNI source", message)

    def nothing_found(self) -> tuple[int, ...]:
        sources = ", ".join(self.cxi.vniSources)
        if self.cxi.vniPolicy == "fallback":
            if self.cxi.vnis:
                return tuple(self.cxi.vnis)
            log.info("no VNI for this pod from %s: it gets no CXI service (vniPolicy fallback "
                     "with no cxi.vnis)", sources)
            return ()
        raise CniError(INVALID_CONFIG, f"no VNI for this pod: none of cxi.vniSources ({sources}) "
                       "gave one", "create the pod's Vni object (annotate its Job or Deployment "
                       "with vni: \"true\"), or set cxi.vnis")

    def _note_ignored(self) -> None:
        """Say in the log when a pod or runtime asked for VNIs through a source that is off."""
        sources = self.cxi.vniSources
        if self.multus_vni() is not None and "args" not in sources:
            log.warning("args.cni.vni (Multus cni-args, written by the pod's author) ignored: "
                        "\"args\" is not in cxi.vniSources")
        if "VNI" in self.cni_args and not {"args", "cniArgs"} & set(sources):
            log.warning("CNI_ARGS VNI= ignored: \"cniArgs\" is not in cxi.vniSources")

    def multus_vni(self):
        return ((self.conf.args or {}).get("cni") or {}).get("vni")

    def from_args(self) -> Found | None:
        """Multus `args.cni.vni` (pod-written, allow-listed), else CNI_ARGS `VNI=`."""
        value = self.multus_vni()
        if value is not None:
            return Found(value if isinstance(value, list) else [value], "args.cni.vni",
                         pod_written=True)
        return self.from_cniArgs()

    def from_cniArgs(self) -> Found | None:  # noqa: N802 (named as the source in the config)
        raw = self.cni_args.get("VNI")
        if raw is None:
            return None
        try:
            return Found([int(v) for v in raw.split(",")], "CNI_ARGS VNI")
        except ValueError:
            raise CniError(INVALID_ENV, f"CNI_ARGS VNI={raw[:32]!r} is not a list of integers",
                           "pass VNI=N or VNI=N,M in CNI_ARGS") from None

    def from_config(self) -> Found | None:
        return Found(list(self.cxi.vnis), "cxi.vnis") if self.cxi.vnis else None

    def from_kubernetes(self) -> Found | None:
        lookup = self.lookup()
        if lookup is None:
            return None
        where = f"pod {self.namespace}/{self.pod}"
        try:
            self.facts = lookup.facts(self.cni_args.get("K8S_POD_UID", ""))
        except k8s.PodReplaced as exc:
            raise CniError(UNKNOWN_CONTAINER, str(exc), "the runtime tears this sandbox down; "
                           "the new pod gets its own") from None
        except k8s.OwnerMismatch as exc:
            self.refuse(Found([], f"the owners of {where}"), (), str(exc))
            return None
        except k8s.KubeUnavailable as exc:
            raise CniError(TRY_AGAIN_LATER, f"cannot reach the Kubernetes API to find the VNI of "
                           f"{where}: {exc}", "the runtime will retry") from None
        except k8s.KubeError as exc:
            raise CniError(KUBE_FAILURE, f"cannot read the VNI of {where}: {exc}",
                           "check the kubeconfig and the RBAC in deploy/") from None
        if not self.facts.found:
            log.info("%s is unknown to the API server (a static pod before its mirror pod?): no "
                     "Vni object to read", where)
            return None
        return Found(self.facts.vnis, self.facts.vni_origin) if self.facts.vnis else None

    def lookup(self) -> k8s.PodLookup | None:
        """The pod's API reads, when the runtime named a pod, credentials exist and its
        namespace is not one the admin exempted from lookups."""
        if self._lookup is not None:
            return self._lookup
        if not self.namespace or not self.pod:
            return None
        if not self.conf.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            log.debug("no kubeconfig and not in a pod: the kubernetes VNI source is skipped")
            return None
        if self.namespace in self.cxi.noLookupNamespaces:
            log.info("namespace %s is in cxi.noLookupNamespaces: no API lookup", self.namespace)
            return None
        check_pod_names(self.namespace, self.pod)
        try:
            self._lookup = k8s.PodLookup(self.conf.kubeconfig, self.namespace, self.pod, KUBE_TIMEOUT)
        except k8s.KubeError as exc:
            raise CniError(KUBE_FAILURE, f"cannot read the VNI of pod {self.namespace}/{self.pod}: "
                           f"{exc}", "check the kubeconfig and the RBAC in deploy/") from None
        return self._lookup

    def namespace_pod_vnis(self) -> VniSet:
        """The VNIs the admin lets pods of this namespace choose (its annotation), if any."""
        if self._namespace_vnis is None:
            self._namespace_vnis = VniSet()
            lookup = self.lookup()
            if lookup is not None:
                try:
                    raw = lookup.namespace_pod_vnis()
                    self._namespace_vnis = VniSet.parse(raw) if raw else VniSet()
                except (k8s.KubeError, k8s.KubeUnavailable, ValueError) as exc:
                    log.warning("cannot use the %s annotation of namespace %s: %s",
                                k8s.POD_VNIS_ANNOTATION, self.namespace, exc)
        return self._namespace_vnis


def resolve(conf, cni_args: dict[str, str]) -> tuple[int, ...]:
    """The pod's VNIs (see VniResolver)."""
    return VniResolver(conf, cni_args).resolve()
