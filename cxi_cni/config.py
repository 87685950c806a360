"""The plugin's network configuration (NetConf): every field declared once (its schema,
default and how to fix it), validated with pydantic-core into clear CNI errors.

The schema is built with pydantic-core, pydantic's validation engine, directly: declaring
the same thing as BaseModel classes costs about 60 ms more per process (importing
pydantic's model machinery and building the models), and every ADD, DEL and CHECK is a
new process. Errors keep pydantic's shape (location, message, input)."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace

from . import nodepolicy
from .cni.errors import INVALID_CONFIG, UNSUPPORTED_FIELD, CniError
from .cni.skel import valid_ifname
from .cni.version import SUPPORTED_VERSIONS
from .cxi.backend import RESOURCES, TRAFFIC_CLASSES
from .cxi.shape import MAX_LNIS_PER_RGID, SLURM_MAX
from .cxi.stacks import CHOICES as STACKS
from .schema import SchemaValidator, ValidationError, cs
from .vniset import VniSet, refusal

MODES = {"ipvlan": ("l2", "l3", "l3s"), "macvlan": ("bridge", "private", "vepa", "passthru")}
# Where a pod's VNIs may come from (vnis.py): the owner's Vni object, the admin's cxi.vnis,
# the pod author's Multus cni-args, the runtime's CNI_ARGS VNI=.
VNI_SOURCES = ("kubernetes", "config", "args", "cniArgs")
VNI_SERVICE_RANGE = "100-65534"  # what the VNI service hands out
REQUIRED = object()
DEFAULT_FIX = "see the configuration reference in README.md"


@dataclass(frozen=True)
class Field:
    """One configuration key: the pydantic-core schema of its value, its default (REQUIRED
    for none) and the fix shown when it is wrong."""

    name: str
    schema: dict
    default: object = None
    fix: str = DEFAULT_FIX

    def typed_dict_field(self) -> dict:
        if self.default is REQUIRED:
            return cs.typed_dict_field(self.schema)
        default = self.default
        if isinstance(default, list | dict):  # a fresh copy for every configuration, validated
            inner = cs.with_default_schema(self.schema, default_factory=lambda: copy.deepcopy(default),
                                           validate_default=True)  # so a default `cxi` gets its own defaults
        else:
            inner = cs.with_default_schema(self.schema, default=default)
        return cs.typed_dict_field(inner, required=False)


def nullable(schema: dict) -> dict:
    return cs.nullable_schema(schema)


def strict_dict(fields: tuple[Field, ...], extra: str = "forbid") -> dict:
    return cs.typed_dict_schema({f.name: f.typed_dict_field() for f in fields}, extra_behavior=extra)


U16 = cs.int_schema(ge=0, le=65535)
VNI_LIST = cs.list_schema(cs.union_schema(
    [cs.int_schema(ge=1, le=65535, strict=True), cs.str_schema(pattern=r"^\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?$")],
    custom_error_type="vni_or_range", custom_error_message='should be a VNI (1..65535) or a range like "100-199"'))
LIMIT_FIELDS = (
    Field("max", U16, None),
    Field("res", U16, None),
    Field("def", U16, None),
)
# Slurm's traffic classes (tcs=LOW_LATENCY:BEST_EFFORT, any case, TC_ prefix optional) and
# the pair it gives a job by default.
SLURM_TCS = ("low_latency", "best_effort")
# The most a DEL waits for LNIs to let go of its services (destroyRetries x destroyRetryDelay):
# a quarter of the kubelet's default runtime request timeout (2 min), which bounds the
# StopPodSandbox that runs DEL, leaving room for a second cxi attachment and the chain.
MAX_DESTROY_WAIT = 30.0
CXI_FIELDS = (
    Field("backend", cs.literal_schema(["libcxi", "sim"]), "libcxi",
          'set cxi.backend to "libcxi" (real NICs) or "sim" (simulated)'),
    Field("simState", cs.str_schema(), "/var/lib/cni/cxi/sim.db"),
    Field("libcxi", cs.str_schema(), "libcxi.so.1"),
    Field("stack", cs.literal_schema(list(STACKS)), "auto",
          "set cxi.stack to " + ", ".join(f'"{s}"' for s in STACKS)
          + ' (how services are bound to a namespace; "auto" asks the library, cxi doctor names it)'),
    Field("devices", cs.union_schema([
        cs.literal_schema(["all", "master"]),
        cs.list_schema(cs.str_schema(pattern=r"^cxi[0-9]{1,4}$"), min_length=1)]), "all",
        'set cxi.devices to "all", "master" or a list like ["cxi0", "cxi1"]'),
    Field("vnis", cs.list_schema(cs.int_schema(ge=1, le=65535, strict=True), max_length=4), [],
          "cxi.vnis is a list of 1 to 4 integers within cxi.allowedVnis (VNI 1 only with "
          "cxi.allowDefaultVni: true and 1 in cxi.allowedVnis)"),
    Field("allowDefaultVni", cs.bool_schema(), False),
    Field("vniSources", cs.list_schema(cs.literal_schema(list(VNI_SOURCES))), ["kubernetes", "config"],
          "cxi.vniSources is an ordered list among " + ", ".join(VNI_SOURCES)
          + " (args and cniArgs are written by tenants or the runtime: see SECURITY.md)"),
    Field("allowedVnis", VNI_LIST, [VNI_SERVICE_RANGE],
          "cxi.allowedVnis lists the VNIs any source may give a pod, as numbers and ranges like "
          f'"{VNI_SERVICE_RANGE}" (the default: what the VNI service hands out)'),
    Field("podVnis", VNI_LIST, [],
          "cxi.podVnis lists the VNIs a pod may choose itself through Multus cni-args (with "
          '"args" in cxi.vniSources), as numbers and ranges like "2000-2099"'),
    Field("noLookupNamespaces", cs.list_schema(cs.str_schema(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")),
          ["kube-system"], "cxi.noLookupNamespaces lists namespaces whose pods get no API lookup"),
    Field("maxServicesPerPod", cs.int_schema(ge=1, le=64, strict=True), 2,
          "cxi.maxServicesPerPod is how many services one pod may hold on one NIC (1..64)"),
    Field("vniPolicy", cs.literal_schema(["fallback", "required"]), "fallback",
          'set cxi.vniPolicy to "fallback" (use cxi.vnis) or "required"'),
    Field("tcs", cs.union_schema([cs.list_schema(cs.literal_schema(list(TRAFFIC_CLASSES))),
                                  cs.str_schema()]), [],
          "cxi.tcs lists traffic classes among " + ", ".join(TRAFFIC_CLASSES)
          + ', or is a string as Slurm writes it, like "LOW_LATENCY:BEST_EFFORT" (TC_ prefix '
          "optional)"),
    Field("limits", cs.dict_schema(cs.literal_schema(list(RESOURCES)), strict_dict(LIMIT_FIELDS)), {},
          "cxi.limits maps " + ", ".join(RESOURCES) + ' to {"max": N, "res": M, "def": D} (def: '
          "reserved per CPU of the pod) with res <= max <= the resource's Cassini total ("
          + ", ".join(f"{name} {total}" for name, total in SLURM_MAX.items()) + ")"),
    Field("defaults", cs.literal_schema(["none", "slurm"]), "none",
          'set cxi.defaults to "none" or "slurm" (Slurm\'s per-CPU reservations and traffic '
          "classes)"),
    Field("adjustLimits", cs.bool_schema(), True),
    Field("cpus", cs.int_schema(ge=1, le=4096, strict=True), 1,
          "cxi.cpus is the pod's CPU count (1..4096) when the Kubernetes API does not give one"),
    Field("lnisPerRgid", cs.union_schema([cs.literal_schema(["auto"]),
                                          cs.int_schema(ge=1, le=MAX_LNIS_PER_RGID, strict=True)]),
          "auto", f'set cxi.lnisPerRgid to "auto" or a number of LNIs 1..{MAX_LNIS_PER_RGID}'),
    Field("destroyRetries", cs.int_schema(ge=0, le=600, strict=True), 5,
          f"cxi.destroyRetries (0..600) times cxi.destroyRetryDelay (seconds) must stay within "
          f"{MAX_DESTROY_WAIT:g} s, so DEL ends before the runtime gives up on it"),
    Field("destroyRetryDelay", cs.float_schema(ge=0, le=MAX_DESTROY_WAIT, strict=True), 1.0,
          f"cxi.destroyRetryDelay is seconds (0..{MAX_DESTROY_WAIT:g}) between two tries of a "
          "destroy the driver answered -EBUSY"),
)
NETCONF_FIELDS = (
    Field("cniVersion", cs.str_schema(), REQUIRED,
          "set cniVersion to one of " + ", ".join(SUPPORTED_VERSIONS)),
    Field("name", cs.str_schema(), ""),
    Field("type", cs.str_schema(), "cxi"),
    Field("master", nullable(cs.str_schema()), None,
          "set master to the name of the hsnN netdev the pod's link hangs off"),
    Field("linkType", cs.literal_schema(list(MODES)), "ipvlan",
          'set linkType to "ipvlan" (default) or "macvlan"'),
    Field("mode", nullable(cs.str_schema()), None,
          "ipvlan modes: l2 (default), l3, l3s; macvlan modes: bridge (default), private, vepa, passthru"),
    Field("mtu", U16, 0, "set mtu to an integer 68..65535, or leave it out to inherit the master's"),
    Field("linkInContainer", cs.bool_schema(), False),
    Field("ipam", nullable(cs.dict_schema()), None,
          'set ipam to an object with a "type", e.g. {"type": "host-local", ...}'),
    Field("stateDir", cs.str_schema(), "/var/lib/cni/cxi",
          "set stateDir to an absolute path (default /var/lib/cni/cxi)"),
    Field("logFile", cs.str_schema(), "/var/log/cxi-cni.log",
          "set logFile to an absolute path (default /var/log/cxi-cni.log)"),
    Field("logLevel", cs.literal_schema(["debug", "info", "warning", "error"]), "info",
          'set logLevel to "debug", "info", "warning" or "error"'),
    Field("kubeconfig", nullable(cs.str_schema()), None),
    Field("cxi", strict_dict(CXI_FIELDS), {}),
    Field("args", nullable(cs.dict_schema()), None,
          'args.cni is an object, such as Multus makes of a pod\'s cni-args: {"cni": {...}}'),
    Field("runtimeConfig", nullable(cs.dict_schema()), None),
)
VALIDATOR = SchemaValidator(strict_dict(NETCONF_FIELDS, extra="ignore"))


@functools.cache
def policy_validator():
    """The node policy's schema, built only on a node that has a policy file."""
    return nodepolicy.policy_schema(VNI_LIST, list(VNI_SOURCES), ["libcxi", "sim"],
                                    list(RESOURCES), list(TRAFFIC_CLASSES))



# Dotted field path -> its fix, for the error's details.
FIXES = {**{f.name: f.fix for f in NETCONF_FIELDS}, **{f"cxi.{f.name}": f.fix for f in CXI_FIELDS}}


@dataclass(frozen=True)
class LimitConf:
    """One resource's limit as configured; None: not given (see cxi/shape.py LimitRule)."""

    max: int | None = None
    res: int | None = None
    per_cpu: int | None = None


class CxiConf(SimpleNamespace):
    """The `cxi` object: one attribute per field of CXI_FIELDS, all set by the validator."""


class NetConf(SimpleNamespace):
    """The whole plugin configuration: one attribute per field of NETCONF_FIELDS, all set by
    the validator. Unknown top-level keys are ignored, as CNI plugins do (runtimes add their
    own); unknown keys inside `cxi` are refused. (Plain namespaces rather than dataclasses:
    each dataclass costs its generated code at import, in every CNI process.)"""

    node_policy: nodepolicy.NodePolicy | None = None  # set by parse_conf, None without a file

    @property
    def link_mode(self) -> str:
        return self.mode or MODES[self.linkType][0]




def semantic_problem(conf: NetConf, teardown: bool = False) -> tuple[str, str, bool] | None:
    """(field path, message, whether the message starts with the path) of the first rule
    the schema cannot say, or None. For `teardown` the VNI policy is not checked: DEL must
    remove what an older configuration made."""
    if conf.master is not None and not valid_ifname(conf.master):  # an existing link's name
        return "master", f"{conf.master!r} is not a valid interface name", True
    for key in ("stateDir", "logFile"):
        if not getattr(conf, key).startswith("/"):
            return key, f"{getattr(conf, key)!r} is not an absolute path", True
    if conf.mtu and conf.mtu < 68:
        return "mtu", "an MTU below 68 cannot carry IPv4", True
    for name, lim in conf.cxi.limits.items():
        for key, value in (("max", lim.max), ("res", lim.res), ("def", lim.per_cpu)):
            if value is not None and value > SLURM_MAX[name]:
                return (f"cxi.limits.{name}.{key}", f"{value} is more than a Cassini NIC has "
                        f"({SLURM_MAX[name]})", True)
        if lim.res is not None and lim.max is not None and lim.res > lim.max:
            return f"cxi.limits.{name}", f"res ({lim.res}) must not exceed max ({lim.max})", True
    if isinstance(conf.cxi.tcs, str):
        return "cxi.tcs", conf.cxi.tcs, True
    if conf.cxi.destroyRetries * conf.cxi.destroyRetryDelay > MAX_DESTROY_WAIT:
        return "cxi.destroyRetries", (f"{conf.cxi.destroyRetries} retries "
                                      f"{conf.cxi.destroyRetryDelay:g} s apart wait longer than "
                                      f"{MAX_DESTROY_WAIT:g} s"), True
    if len(set(conf.cxi.vnis)) != len(conf.cxi.vnis):
        return "cxi.vnis", "VNIs must not repeat", True
    for key in ("allowedVnis", "podVnis"):
        if isinstance(getattr(conf.cxi, key), str):
            return f"cxi.{key}", getattr(conf.cxi, key), True
    reason = None if teardown else refusal(conf.cxi.vnis, conf.cxi.allowedVnis, conf.cxi.allowDefaultVni)
    if reason:
        return "cxi.vnis", reason, True
    if conf.mode is not None and conf.mode not in MODES[conf.linkType]:
        return "mode", (f"mode {conf.mode!r} is not a {conf.linkType} mode "
                        f"({', '.join(MODES[conf.linkType])})"), False
    if isinstance(conf.cxi.devices, list) and len(set(conf.cxi.devices)) != len(conf.cxi.devices):
        return "cxi.devices", "names a device more than once (one service per device)", True
    if conf.cxi.devices == "master" and not conf.master:
        return "cxi.devices", 'cxi.devices is "master" but no master is set', False
    if conf.master and conf.ipam is None:
        return "ipam", "master is set but ipam is missing: the link needs addresses", False
    if conf.ipam is not None and not isinstance(conf.ipam.get("type"), str):
        return "ipam", 'ipam has no "type"', False
    if conf.args is not None and not isinstance(conf.args.get("cni", {}), dict):
        return "args.cni", "is not an object (Multus passes a pod's cni-args there)", True
    return None


def slurm_tcs(text: str) -> list[str]:
    """Traffic classes as Slurm's tcs= writes them ("TC_LOW_LATENCY:best_effort"); ValueError
    naming the first one that is none."""
    found = []
    for word in text.split(":"):
        name = word.strip().lower().removeprefix("tc_")
        if name not in TRAFFIC_CLASSES:
            raise ValueError(f"{word!r} in {text!r} is not a traffic class ("
                             + ", ".join(tc.upper() for tc in TRAFFIC_CLASSES) + ", TC_ prefix optional)")
        if name not in found:
            found.append(name)
    return found


def build_conf(data: dict) -> NetConf:
    cxi = data.pop("cxi")
    cxi["limits"] = {name: LimitConf(lim["max"], lim["res"], lim["def"])
                     for name, lim in cxi["limits"].items()}
    if isinstance(cxi["tcs"], str):
        try:  # semantic_problem reports it with the field's fix
            cxi["tcs"] = slurm_tcs(cxi["tcs"])
        except ValueError as exc:
            cxi["tcs"] = str(exc)
    if not cxi["tcs"] and cxi["defaults"] == "slurm":
        cxi["tcs"] = list(SLURM_TCS)
    for key in ("allowedVnis", "podVnis"):
        try:
            cxi[key] = VniSet.parse(cxi[key])
        except ValueError as exc:  # semantic_problem reports it with the field's fix
            cxi[key] = str(exc)
    return NetConf(**data, cxi=CxiConf(**cxi))


def field_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def fix_for(path: str) -> str:
    """The fix of the longest declared field that `path` lies in."""
    for name in sorted(FIXES, key=len, reverse=True):
        if path == name or path.startswith((name + ".", name + "[")):
            return FIXES[name]
    return DEFAULT_FIX


# What DEL and GC need of a configuration to find and remove what ADD made: where the
# records, the log and the devices are. Any other field that is wrong (since ADD, or by
# rules a later version added) is left at its default for them instead of failing.
TEARDOWN_NEEDS = ("type", "cniVersion", "name", "stateDir", "logFile", "cxi", "cxi.backend",
                  "cxi.libcxi", "cxi.simState", "cxi.stack")


class ConfProblem(Exception):
    """A field of the configuration is wrong: its path, and the CNI error to give."""

    def __init__(self, path: str, error: CniError):
        super().__init__(error.msg)
        self.path, self.error = path, error


def parse_conf(raw: dict, teardown: bool = False) -> NetConf:
    """Validate the config and bound it by the node policy; a bad field becomes code 7, an
    unknown `cxi` key code 2. `teardown` (DEL, GC) holds only what the plugin loads or
    contacts to the policy, so attachments made before it can still be removed, and takes
    any other wrong field at its default (named in `conf.ignored`, for the log)."""
    ignored: list[str] = []
    dropped: set[tuple[str, ...]] = set()
    while True:
        try:
            conf = checked_conf(raw, teardown)
        except ConfProblem as problem:
            field = teardown_field(problem.path) if teardown else None
            if field is None or field in dropped:
                raise problem.error from None
            dropped.add(field)
            raw = without(raw, field)
            ignored.append(problem.error.msg.removeprefix("invalid network configuration: "))
            continue
        conf.ignored = ignored
        return conf


FIELD_OF_PATH = re.compile(r"(?:cxi\.)?[^.\[]+")  # "cxi.limits.les.def" -> "cxi.limits"


def teardown_field(path: str) -> tuple[str, ...] | None:
    """The field DEL may leave at its default for a problem at `path`, None if it needs it."""
    match = FIELD_OF_PATH.match(path)
    if match is None or match[0] in TEARDOWN_NEEDS:
        return None
    return tuple(match[0].split("."))


def without(raw: dict, field: tuple[str, ...]) -> dict:
    out = dict(raw)
    if len(field) == 1:
        out.pop(field[0], None)
    elif isinstance(out.get(field[0]), dict):
        out[field[0]] = {k: v for k, v in out[field[0]].items() if k != field[1]}
    return out


def checked_conf(raw: dict, teardown: bool) -> NetConf:
    """build_conf over the validator and semantic_problem; ConfProblem for the first wrong
    field."""
    try:
        conf = build_conf(VALIDATOR.validate_python(raw))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path = field_path(first["loc"])
        message = str(first["msg"])
        code = INVALID_CONFIG
        if first["type"] == "extra_forbidden":
            code, message = UNSUPPORTED_FIELD, "is not a field this plugin supports"
        shown = f"{path}: {message}" if path else message
        if "input" in first and first["type"] != "extra_forbidden" and path:
            shown += f" (got {first['input']!r:.80})"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ConfProblem(path, CniError(code, f"invalid network configuration: {shown}{more}",
                                         "fix: " + fix_for(path))) from None
    problem = semantic_problem(conf, teardown)
    if problem:
        path, message, with_path = problem
        shown = f"{path}: {message}" if with_path else message
        raise ConfProblem(path, CniError(INVALID_CONFIG, f"invalid network configuration: {shown}",
                                         "fix: " + fix_for(path)))
    try:
        conf.node_policy = nodepolicy.load(policy_validator)
        if conf.node_policy is not None:
            conf.node_policy.bound(conf, teardown)
    except nodepolicy.PolicyError as exc:
        if not exc.field:
            raise CniError(INVALID_CONFIG, str(exc), f"fix or remove {nodepolicy.policy_path()} "
                           "(root's, writable by root alone; keys in SECURITY.md)") from None
        raise CniError(INVALID_CONFIG, f"invalid network configuration: {exc.field}: {exc}",
                       "stay within the node policy, or ask the cluster admin to widen it") from None
    return conf
