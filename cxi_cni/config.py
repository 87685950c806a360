"""The plugin's network configuration (NetConf), validated with pydantic into clear CNI errors."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class LimitConf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max: Annotated[int, Field(ge=0, le=65535)]
    res: Annotated[int, Field(ge=0, le=65535)] = 0

    @model_validator(mode="after")
    def res_within_max(self):
        if self.res > self.max:
            raise ValueError(f"res ({self.res}) must not exceed max ({self.max})")
        return self


Vni = Annotated[int, Field(ge=1, le=65535, strict=True)]
DeviceName = Annotated[str, Field(pattern=r"^cxi[0-9]{1,4}$")]


class CxiConf(BaseModel):
    """The `cxi` object: which devices, which backend, what each service grants."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["libcxi", "sim"] = "libcxi"
    simState: str = "/var/lib/cni/cxi/sim.json"
    libcxi: str = "libcxi.so.1"
    devices: Literal["all", "master"] | Annotated[list[DeviceName], Field(min_length=1)] = "all"
    vnis: Annotated[list[Vni], Field(max_length=4)] = []
    allowDefaultVni: bool = False
    vniSources: list[Literal["args", "kubernetes", "config"]] = list(VNI_SOURCES)
    vniPolicy: Literal["fallback", "required"] = "fallback"
    tcs: list[Literal[TRAFFIC_CLASSES]] = []  # type: ignore[valid-type]
    limits: dict[Literal[RESOURCES], LimitConf] = {}  # type: ignore[valid-type]

    @field_validator("vnis")
    @classmethod
    def unique_vnis(cls, vnis):
        if len(set(vnis)) != len(vnis):
            raise ValueError("VNIs must not repeat")
        return vnis


class NetConf(BaseModel):
    """The whole plugin configuration. Unknown top-level keys are ignored, as CNI
    plugins do (runtimes add their own); unknown keys inside `cxi` are refused."""

    model_config = ConfigDict(extra="ignore")
    cniVersion: str
    name: str = ""
    type: str = "cxi"
    master: str | None = None
    linkType: Literal["ipvlan", "macvlan"] = "ipvlan"
    mode: str | None = None
    mtu: Annotated[int, Field(ge=0, le=65535)] = 0
    linkInContainer: bool = False
    ipam: dict | None = None
    stateDir: str = "/var/lib/cni/cxi"
    logFile: str = "/var/log/cxi-cni.log"
    logLevel: Literal["debug", "info", "warning", "error"] = "info"
    kubeconfig: str | None = None
    cxi: CxiConf = CxiConf()
    args: dict | None = None
    runtimeConfig: dict | None = None

    @field_validator("master")
    @classmethod
    def master_is_ifname(cls, value):
        if value is not None and not IFNAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid interface name")
        return value

    @field_validator("stateDir", "logFile")
    @classmethod
    def absolute(cls, value):
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @field_validator("mtu")
    @classmethod
    def sane_mtu(cls, value):
        if value and value < 68:
            raise ValueError("an MTU below 68 cannot carry IPv4")
        return value

    @model_validator(mode="after")
    def consistent(self):
        if self.mode is not None and self.mode not in MODES[self.linkType]:
            raise ValueError(f"mode {self.mode!r} is not a {self.linkType} mode "
                             f"({', '.join(MODES[self.linkType])})")
        if self.cxi.devices == "master" and not self.master:
            raise ValueError('cxi.devices is "master" but no master is set')
        if 1 in self.cxi.vnis and not self.cxi.allowDefaultVni:
            raise ValueError("cxi.vnis holds VNI 1, the default service's VNI shared by "
                             "every process; set cxi.allowDefaultVni: true to use it anyway")
        if self.master and self.ipam is None:
            raise ValueError("master is set but ipam is missing: the link needs addresses")
        if self.ipam is not None and not isinstance(self.ipam.get("type"), str):
            raise ValueError('ipam has no "type"')
        return self

    @property
    def link_mode(self) -> str:
        return self.mode or MODES[self.linkType][0]


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
        return NetConf.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path = field_path(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        code = INVALID_CONFIG
        if first["type"] == "extra_forbidden":
            code, message = UNSUPPORTED_FIELD, "is not a field this plugin supports"
        shown = f"{path}: {message}" if path else message
        if "input" in first and first["type"] != "extra_forbidden" and path:
            shown += f" (got {first['input']!r:.80})"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise CniError(code, f"invalid network configuration: {shown}{more}",
                       "fix: " + fix_for(path, message)) from None
