"""The node policy: bounds the cluster admin writes beside the node's CNI files that no network
configuration can widen. A NAD is a network configuration, and tenants often write NADs in
their own namespaces; the policy file is root's alone, so its VNIs, VNI sources, backend,
library and kubeconfig, and its ceilings on a pod's share of the NIC (resource limits and
traffic classes), hold whatever a NAD says (see SECURITY.md)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable

from .schema import SchemaValidator, ValidationError, cs
from .trust import UntrustedPath, check_file, check_parents
from .vniset import VniSet, refusal

DEFAULT_PATH = "/etc/cxi-cni/policy.json"
PATH_ENV = "CXI_CNI_POLICY"  # moves the file, for tests and debugging
MAX_SIZE = 64 * 1024


class PolicyError(Exception):
    """The policy file exists but cannot be used, or a configuration goes beyond it: the
    message names the file and the key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def policy_schema(vni_list: dict, sources: list[str], backends: list[str], resources: list[str],
                  tcs: list[str]) -> SchemaValidator:
    def opt(schema):
        return cs.typed_dict_field(cs.with_default_schema(schema, default=None), required=False)

    count = cs.int_schema(ge=0, le=65535, strict=True)
    ceiling = cs.typed_dict_schema({"max": opt(count), "res": opt(count)}, extra_behavior="forbid")
    return SchemaValidator(cs.typed_dict_schema({
        "limits": opt(cs.dict_schema(cs.literal_schema(resources), ceiling)),
        # An empty list of traffic classes or sources would read as "no bound" where a
        # configuration's own empty list means "all": a policy names at least one.
        "tcs": opt(cs.list_schema(cs.literal_schema(tcs), min_length=1)),
        "allowedVnis": opt(vni_list),
        "podVnis": opt(vni_list),
        "vniSources": opt(cs.list_schema(cs.literal_schema(sources), min_length=1)),
        "allowDefaultVni": opt(cs.bool_schema()),
        "maxServicesPerPod": opt(cs.int_schema(ge=1, le=64, strict=True)),
        "backends": opt(cs.list_schema(cs.literal_schema(backends))),
        "libcxi": opt(cs.list_schema(cs.str_schema(min_length=1))),
        "kubeconfig": opt(cs.list_schema(cs.str_schema(min_length=1))),
    }, extra_behavior="forbid"))


class NodePolicy:
    """The admin's bounds, one attribute per key of the policy's schema; None for a key the
    file does not set. A plain class: making it a dataclass costs 0.4 ms at import, which is
    on every CNI call."""

    allowedVnis: VniSet | None = None
    podVnis: VniSet | None = None
    vniSources: list[str] | None = None
    allowDefaultVni: bool | None = None
    maxServicesPerPod: int | None = None
    limits: dict[str, dict] | None = None  # per resource {"max": N, "res": M}, ceilings
    tcs: list[str] | None = None
    backends: list[str] | None = None
    libcxi: list[str] | None = None
    kubeconfig: list[str] | None = None

    def __init__(self, path: str, **bounds):
        unknown = bounds.keys() - NodePolicy.__annotations__.keys()
        if unknown:
            raise TypeError(f"NodePolicy has no bound {sorted(unknown)[0]}")
        self.path = path
        self.__dict__.update(bounds)

    def given(self) -> dict:
        """The bounds the file sets, by key."""
        return {key: getattr(self, key) for key in NodePolicy.__annotations__
                if getattr(self, key) is not None}

    def bound(self, conf, teardown: bool = False) -> None:
        """Narrow `conf` to the policy: lists of VNIs are intersected, limits lowered, and
        a choice the policy does not list (a VNI source, backend, library, kubeconfig) is a
        PolicyError naming the configuration's field. For `teardown` (DEL, GC), which must
        clean up attachments made before the policy, only what the plugin would load or
        contact is held to it."""
        cxi = conf.cxi
        where = f"the node policy {self.path}"
        if not teardown:
            self._member("cxi.vniSources", cxi.vniSources, self.vniSources, where)
        self._member("cxi.backend", [cxi.backend], self.backends, where)
        if cxi.backend == "libcxi":
            self._member("cxi.libcxi", [cxi.libcxi], self.libcxi, where)
        if conf.kubeconfig:
            self._member("kubeconfig", [conf.kubeconfig], self.kubeconfig, where)
        if self.allowedVnis is not None:
            cxi.allowedVnis = cxi.allowedVnis & self.allowedVnis
        if self.podVnis is not None:
            cxi.podVnis = cxi.podVnis & self.podVnis
        if self.allowDefaultVni is not None:
            cxi.allowDefaultVni = cxi.allowDefaultVni and self.allowDefaultVni
        if self.maxServicesPerPod is not None:
            cxi.maxServicesPerPod = min(cxi.maxServicesPerPod, self.maxServicesPerPod)
        if self.tcs is not None and not teardown:
            outside = [tc for tc in cxi.tcs if tc not in self.tcs]
            if outside:
                raise PolicyError("cxi.tcs", f"traffic class {outside[0]} is not allowed by "
                                  f"{where} (it allows {', '.join(self.tcs) or 'none'})")
            cxi.tcs = list(cxi.tcs or self.tcs)
        if teardown:
            cxi.vniSources = [s for s in cxi.vniSources if s in (self.vniSources or cxi.vniSources)]
            return
        if cxi.vnis and self.vniSources is not None and "config" not in self.vniSources:
            raise PolicyError("cxi.vnis", f"{where} takes no VNIs from configurations (its "
                              f"vniSources are {', '.join(self.vniSources)}): leave cxi.vnis empty")
        reason = refusal(cxi.vnis, cxi.allowedVnis, cxi.allowDefaultVni)
        if reason:
            raise PolicyError("cxi.vnis", f"{reason}, as narrowed by {where}")

    @staticmethod
    def _member(field: str, chosen: list[str], allowed: list[str] | None, where: str) -> None:
        if allowed is None:
            return
        for value in chosen:
            if value not in allowed:
                raise PolicyError(field, f"{value!r} is not allowed by {where} (it allows "
                                  f"{', '.join(map(repr, allowed)) or 'nothing'})")


def policy_path() -> str:
    return os.environ.get(PATH_ENV) or DEFAULT_PATH


def load(validator: Callable[[], SchemaValidator]) -> NodePolicy | None:
    """The node policy, or None when the node has none; `validator` makes its schema's
    validator, when there is a file to check. PolicyError when the file is not root's
    alone or does not parse."""
    path = policy_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError("", f"cannot open the node policy {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError("", f"the node policy {path} is not a regular file")
        check_file(path, "the node policy", st)
        check_parents(path, "the node policy")
        raw = os.read(fd, MAX_SIZE + 1)
    except UntrustedPath as exc:
        raise PolicyError("", str(exc)) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SIZE:
        raise PolicyError("", f"the node policy {path} is larger than {MAX_SIZE} bytes")
    try:
        data = validator().validate_python(json.loads(raw))
    except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError
        detail = exc.errors(include_url=False)[0] if isinstance(exc, ValidationError) else None
        key = ".".join(str(p) for p in detail["loc"]) if detail else ""
        reason = detail["msg"] if detail else str(exc)
        raise PolicyError("", f"the node policy {path} is invalid: {key + ': ' if key else ''}"
                          f"{reason}") from None
    try:
        vni_sets = {key: VniSet.parse(data[key]) for key in ("allowedVnis", "podVnis")
                    if data[key] is not None}
    except ValueError as exc:
        raise PolicyError("", f"the node policy {path} is invalid: {exc}") from None
    return NodePolicy(path=path, **{**data, **vni_sets})
