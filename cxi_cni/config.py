"""The plugin's network configuration (NetConf), validated with pydantic into clear CNI errors.

The schema is built with pydantic-core, pydantic's validation engine, directly: declaring
the same thing as BaseModel classes costs about 60 ms more per process (importing
pydantic's model machinery and building the models), and every ADD, DEL and CHECK is a
new process. Errors keep pydantic's shape (location, message, input)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic_core import SchemaValidator, ValidationError
from pydantic_core import core_schema as cs

from .cni.errors import INVALID_CONFIG, UNSUPPORTED_FIELD, CniError
from .cxi.backend import RESOURCES, TRAFFIC_CLASSES

MODES = {"ipvlan": ("l2", "l3", "l3s"), "macvlan": ("bridge", "private", "vepa", "passthru")}
IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
VNI_SOURCES = ("args", "kubernetes", "config")

# Field path prefix -> how to fix it, shown in the error's details.
FIXES = {
    "cniVersion": "set cniVersion to one of 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0",
    "master": "set master to the name of the hsnN netdev the pod's link hangs off",
    "linkType": 'set linkType to "ipvlan" (default) or "macvlan"',
    "mode": "ipvlan modes: l2 (default), l3, l3s; macvlan modes: bridge (default), "
            "private, vepa, passthru",
    "mtu": "set mtu to an integer 68..65535, or leave it out to inherit the master's",
    "stateDir": "set stateDir to an absolute path (default /var/lib/cni/cxi)",
    "logFile": "set logFile to an absolute path (default /var/log/cxi-cni.log)",
    "logLevel": 'set logLevel to "debug", "info", "warning" or "error"',
    "ipam": 'set ipam to an object with a "type", e.g. {"type": "host-local", ...}',
    "cxi.backend": 'set cxi.backend to "libcxi" (real NICs) or "sim" (simulated)',
    "cxi.devices": 'set cxi.devices to "all", "master" or a list like ["cxi0", "cxi1"]',
    "cxi.vnis": "cxi.vnis is a list of 1 to 4 integers in 1..65535 (VNI 1 only with "
                "cxi.allowDefaultVni: true)",
    "cxi.tcs": "cxi.tcs lists traffic classes among " + ", ".join(TRAFFIC_CLASSES),
    "cxi.limits": "cxi.limits maps " + ", ".join(RESOURCES) + ' to {"max": N, "res": M} '
                  "with 0 <= res <= max",
    "cxi.vniSources": "cxi.vniSources is an ordered list among " + ", ".join(VNI_SOURCES),
    "cxi.vniPolicy": 'set cxi.vniPolicy to "fallback" (use cxi.vnis) or "required"',
    "cxi": "see the configuration reference in README.md",
}


def optional(schema, default=None):
    return cs.typed_dict_field(cs.with_default_schema(schema, default=default), required=False)


def nullable(schema):
    return optional(cs.nullable_schema(schema))


U16 = cs.int_schema(ge=0, le=65535)
LIMIT = cs.typed_dict_schema({"max": cs.typed_dict_field(U16), "res": optional(U16, 0)},
                             extra_behavior="forbid")
CXI_SCHEMA = cs.typed_dict_schema({
    "backend": optional(cs.literal_schema(["libcxi", "sim"]), "libcxi"),
    "simState": optional(cs.str_schema(), "/var/lib/cni/cxi/sim.json"),
    "libcxi": optional(cs.str_schema(), "libcxi.so.1"),
    "devices": optional(cs.union_schema([
        cs.literal_schema(["all", "master"]),
        cs.list_schema(cs.str_schema(pattern=r"^cxi[0-9]{1,4}$"), min_length=1)]), "all"),
    "vnis": optional(cs.list_schema(cs.int_schema(ge=1, le=65535, strict=True), max_length=4), []),
    "allowDefaultVni": optional(cs.bool_schema(), False),
    "vniSources": optional(cs.list_schema(cs.literal_schema(list(VNI_SOURCES))), list(VNI_SOURCES)),
    "vniPolicy": optional(cs.literal_schema(["fallback", "required"]), "fallback"),
    "tcs": optional(cs.list_schema(cs.literal_schema(list(TRAFFIC_CLASSES))), []),
    "limits": optional(cs.dict_schema(cs.literal_schema(list(RESOURCES)), LIMIT), {}),
}, extra_behavior="forbid")
NETCONF_SCHEMA = cs.typed_dict_schema({
    "cniVersion": cs.typed_dict_field(cs.str_schema()),
    "name": optional(cs.str_schema(), ""),
    "type": optional(cs.str_schema(), "cxi"),
    "master": nullable(cs.str_schema()),
    "linkType": optional(cs.literal_schema(["ipvlan", "macvlan"]), "ipvlan"),
    "mode": nullable(cs.str_schema()),
    "mtu": optional(U16, 0),
    "linkInContainer": optional(cs.bool_schema(), False),
    "ipam": nullable(cs.dict_schema()),
    "stateDir": optional(cs.str_schema(), "/var/lib/cni/cxi"),
    "logFile": optional(cs.str_schema(), "/var/log/cxi-cni.log"),
    "logLevel": optional(cs.literal_schema(["debug", "info", "warning", "error"]), "info"),
    "kubeconfig": nullable(cs.str_schema()),
    "cxi": optional(CXI_SCHEMA, None),
    "args": nullable(cs.dict_schema()),
    "runtimeConfig": nullable(cs.dict_schema()),
}, extra_behavior="ignore")
VALIDATOR = SchemaValidator(NETCONF_SCHEMA)


@dataclass(frozen=True)
class LimitConf:
    max: int
    res: int = 0


@dataclass
class CxiConf:
    """The `cxi` object: which devices, which backend, what each service grants."""

    backend: str = "libcxi"
    simState: str = "/var/lib/cni/cxi/sim.json"
    libcxi: str = "libcxi.so.1"
    devices: str | list[str] = "all"
    vnis: list[int] = field(default_factory=list)
    allowDefaultVni: bool = False
    vniSources: list[str] = field(default_factory=lambda: list(VNI_SOURCES))
    vniPolicy: str = "fallback"
    tcs: list[str] = field(default_factory=list)
    limits: dict[str, LimitConf] = field(default_factory=dict)


@dataclass
class NetConf:
    """The whole plugin configuration. Unknown top-level keys are ignored, as CNI
    plugins do (runtimes add their own); unknown keys inside `cxi` are refused."""

    cniVersion: str
    name: str = ""
    type: str = "cxi"
    master: str | None = None
    linkType: str = "ipvlan"
    mode: str | None = None
    mtu: int = 0
    linkInContainer: bool = False
    ipam: dict | None = None
    stateDir: str = "/var/lib/cni/cxi"
    logFile: str = "/var/log/cxi-cni.log"
    logLevel: str = "info"
    kubeconfig: str | None = None
    cxi: CxiConf = field(default_factory=CxiConf)
    args: dict | None = None
    runtimeConfig: dict | None = None

    @property
    def link_mode(self) -> str:
        return self.mode or MODES[self.linkType][0]


def semantic_problem(conf: NetConf) -> tuple[str, str] | None:
    """(field path, message) of the first rule the schema cannot say, or None."""
    if conf.master is not None and not IFNAME_RE.match(conf.master):
        return "master", f"{conf.master!r} is not a valid interface name"
    for key in ("stateDir", "logFile"):
        if not getattr(conf, key).startswith("/"):
            return key, f"{getattr(conf, key)!r} is not an absolute path"
    if conf.mtu and conf.mtu < 68:
        return "mtu", "an MTU below 68 cannot carry IPv4"
    for name, lim in conf.cxi.limits.items():
        if lim.res > lim.max:
            return f"cxi.limits.{name}", f"res ({lim.res}) must not exceed max ({lim.max})"
    if len(set(conf.cxi.vnis)) != len(conf.cxi.vnis):
        return "cxi.vnis", "VNIs must not repeat"
    if conf.mode is not None and conf.mode not in MODES[conf.linkType]:
        return "", (f"mode {conf.mode!r} is not a {conf.linkType} mode "
                    f"({', '.join(MODES[conf.linkType])})")
    if conf.cxi.devices == "master" and not conf.master:
        return "", 'cxi.devices is "master" but no master is set'
    if 1 in conf.cxi.vnis and not conf.cxi.allowDefaultVni:
        return "", ("cxi.vnis holds VNI 1, the default service's VNI shared by every "
                    "process; set cxi.allowDefaultVni: true to use it anyway")
    if conf.master and conf.ipam is None:
        return "", "master is set but ipam is missing: the link needs addresses"
    if conf.ipam is not None and not isinstance(conf.ipam.get("type"), str):
        return "", 'ipam has no "type"'
    return None


def build_conf(data: dict) -> NetConf:
    cxi = dict(data.pop("cxi") or {})
    cxi["limits"] = {name: LimitConf(**lim) for name, lim in (cxi.get("limits") or {}).items()}
    return NetConf(**data, cxi=CxiConf(**cxi))


def field_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def fix_for(path: str, message: str) -> str:
    for prefix in sorted(FIXES, key=len, reverse=True):
        if path.startswith(prefix) or (not path and message.startswith(prefix)):
            return FIXES[prefix]
    return "see the configuration reference in README.md"


def parse_conf(raw: dict) -> NetConf:
    """Validate the config; a bad field becomes code 7, an unknown `cxi` key code 2."""
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
        raise CniError(code, f"invalid network configuration: {shown}{more}",
                       "fix: " + fix_for(path, message)) from None
    problem = semantic_problem(conf)
    if problem:
        path, message = problem
        shown = f"{path}: {message}" if path else message
        raise CniError(INVALID_CONFIG, f"invalid network configuration: {shown}",
                       "fix: " + fix_for(path, message))
    return conf
