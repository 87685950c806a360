"""How much of a NIC one service takes: its resource limits computed the way Slurm's
switch/hpe_slingshot plugin computes a job step's (a ceiling and a reservation per resource,
the reservation per CPU unless given), the headroom a device leaves after its system
services, its LNIs per resource group, and how many services of one shape a NIC holds.

The driver's rules this follows (shs-cxi-driver cass_svc.c, cass_rgroup.c):
- every limit needs res <= max <= the device's total of that resource;
- a service that reserves or limits TLEs gets max = res, at least 8 (CASS_MIN_POOL_TLES),
  and one of the NIC's 4 TLE pools; the default service holds pool 0. A service without
  resource limits gets the driver's defaults, which limit TLEs: it takes a TLE pool too;
- a service that reserves LEs gets one of the NIC's 16 LE pools (pool 0 is shared by the
  default service and every service that reserves none). Drivers before SHS 14.0.1
  (shs-cxi-driver d54e468) give a pool to every service that limits LEs at all;
- a resource a service has no limit for (max = res = 0 with resource limits on) cannot be
  used by its processes at all, so every resource gets a limit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .backend import DEFAULT_SVC_ID, RESOURCES, Limit, Service, ServiceDesc

# How many of each resource a Cassini NIC has (the driver's C_NUM_* counts).
CASSINI_TOTALS = dict(zip(RESOURCES, (2048, 1024, 512, 2047, 2047, 16384, 2048, 1022), strict=True))
# Slurm's defaults (switch_hpe_slingshot.h): the most a step may use of each resource, which
# are the Cassini totals, and what it reserves per CPU.
SLURM_MAX = dict(CASSINI_TOTALS)  # its own copy: neither name changes the other
SLURM_PER_CPU = dict(zip(RESOURCES, (6, 2, 1, 2, 1, 16, 1, 2), strict=True))
TLE_MIN = 8  # the driver raises a smaller TLE reservation to this (CASS_MIN_POOL_TLES)
LE_POOLS = 16  # per NIC; pool 0 is never given to a service of its own
TLE_POOLS = 4  # per NIC; the default service holds one
MAX_LNIS_PER_RGID = 8  # the driver refuses more (C_NUM_LACS)
NOT_APPLICABLE = 0xFFFF  # cxi_rsrc_use.in_use of LEs or TLEs of a service without a pool of its own


@dataclass(frozen=True)
class LimitRule:
    """The configured limit of one resource. `max` None: Slurm's maximum; `res` None or 0:
    `per_cpu` times the pod's CPUs (Slurm reads a reservation of 0 as not given)."""

    max: int | None = None
    res: int | None = None
    per_cpu: int = 0


@dataclass(frozen=True)
class Shape:
    """What every service of one attachment may take of its NIC: a rule per resource (those
    not named: Slurm's maximum, no reservation), the pod's CPUs, whether system services'
    share is taken off the device's totals first (Slurm's adjust_limits), ceilings no rule
    may pass (the node policy) and the LNIs per resource group (None: as Slurm computes it)."""

    rules: tuple[tuple[str, LimitRule], ...] = ()
    cpus: int = 1
    adjust: bool = True
    caps: tuple[tuple[str, Limit], ...] = ()
    lnis_per_rgid: int | None = None

    def limits(self, headroom: dict[str, int]) -> dict[str, Limit]:
        """The limits of a service on a device that leaves `headroom` of each resource."""
        rules, caps = dict(self.rules), dict(self.caps)
        out = {}
        for name in RESOURCES:
            rule, cap = rules.get(name, LimitRule()), caps.get(name)
            ceiling = min(SLURM_MAX[name] if rule.max is None else rule.max, headroom[name])
            res = rule.res or rule.per_cpu * self.cpus
            if cap is not None:
                ceiling, res = min(ceiling, cap.max), min(res, cap.res)
            res = min(res, ceiling)
            if name == "tles":  # Slurm: max = res; the driver: at least TLE_MIN
                if 0 < res < TLE_MIN:
                    res = TLE_MIN if cap is None or cap.res >= TLE_MIN else 0
                ceiling = res
            out[name] = Limit(ceiling, res)
        return out

    def lnis_per_rgid_for(self, rgids_avail: int | None, devices: int) -> int:
        """LNIs per resource group: the configured number, or as Slurm computes it: one,
        unless the pod's CPUs spread over its devices exceed the resource groups a device
        has left (sysfs rgids_avail), then as many as it takes, at most the driver's 8."""
        if self.lnis_per_rgid is not None:
            return self.lnis_per_rgid
        if not rgids_avail or devices < 1:
            return 1
        return min(MAX_LNIS_PER_RGID, max(1, math.ceil(self.cpus / (devices * rgids_avail))))


def headroom(totals: dict[str, int], system: list[tuple[Service, dict[str, int] | None]],
             adjust: bool) -> dict[str, int]:
    """What a service may be given at most: the device's totals, with adjust less what each
    system service reserves or uses, whichever is more (`system` pairs each with its
    cxil_get_svc_rsrc_use answer, None where the library has no such call)."""
    left = dict(totals)
    if not adjust:
        return left
    for svc, use in system:
        for name in RESOURCES:
            held = reservation(svc, name)
            used = (use or {}).get(name, 0)
            held = max(held, 0 if used == NOT_APPLICABLE else used)
            left[name] = max(0, left[name] - held)
    return left


def reservation(svc: Service, name: str) -> int:
    """What a listed service reserves of a resource. Without resource limits the driver
    gives it its defaults: nothing reserved but the smallest TLE pool."""
    if svc.desc.resource_limits:
        return svc.desc.limits.get(name, Limit(0, 0)).res
    return TLE_MIN if name == "tles" and svc.svc_id != DEFAULT_SVC_ID else 0


def holds_tle_pool(svc: Service) -> bool:
    """The default service holds TLE pool 0; another holds one unless it limits TLEs to
    nothing (without resource limits the driver's defaults limit them)."""
    if svc.svc_id == DEFAULT_SVC_ID:
        return True
    if not svc.desc.resource_limits:
        return True
    tles = svc.desc.limits.get("tles", Limit(0, 0))
    return bool(tles.max or tles.res)


def holds_le_pool(svc: Service, le_pool_per_service: bool) -> bool:
    """Whether a service (not the default one) holds an LE pool of its own: when it reserves
    LEs, or on drivers before 14.0.1 when it limits them at all."""
    if svc.svc_id == DEFAULT_SVC_ID:
        return False
    les = svc.desc.limits.get("les", Limit(0, 0)) if svc.desc.resource_limits else None
    if les is None:  # the driver's defaults: LEs limited to the device, none reserved
        return le_pool_per_service
    return bool(les.res) or (le_pool_per_service and bool(les.max))


@dataclass(frozen=True)
class Fit:
    """How many more services of one shape a device takes (None: no bound, it reserves
    nothing and needs no pool), and what runs out first."""

    count: int | None
    limited_by: str = ""


def fit(limits: dict[str, Limit], totals: dict[str, int], services: list[Service],
        le_pool_per_service: bool) -> Fit:
    """How many services with `limits` the device still takes: each reservation out of what
    no service reserves, each LE or TLE pool the shape needs out of those left."""
    reserved = dict.fromkeys(RESOURCES, 0)
    for svc in services:
        for name in RESOURCES:
            reserved[name] += reservation(svc, name)
    bounds = {}
    for name, lim in limits.items():
        if lim.res:
            bounds[name] = max(0, totals[name] - reserved[name]) // lim.res
    shape = Service("", ServiceDesc(resource_limits=True, limits=dict(limits)))
    if holds_tle_pool(shape):
        bounds["TLE pools"] = TLE_POOLS - sum(holds_tle_pool(s) for s in services)
    if holds_le_pool(shape, le_pool_per_service):
        bounds["LE pools"] = LE_POOLS - 1 - sum(holds_le_pool(s, le_pool_per_service)
                                                for s in services)
    if not bounds:
        return Fit(None)
    name = min(bounds, key=lambda key: (bounds[key], key))
    return Fit(max(0, bounds[name]), name)

