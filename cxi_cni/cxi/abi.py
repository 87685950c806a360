"""ctypes layouts of the CXI service structs, and conversion to and from ServiceDesc.

Written from the documented byte layout of the driver's user ABI (x86-64, gcc):
cxi_svc_desc is 68 bytes with alignment 4, cxi_svc_fail_info 20 bytes, and
cxil_svc_list a uint32 count followed by the descriptors from offset 4. The sizes and
offsets are asserted at import so a wrong edit fails at once, not inside the driver.
"""

from __future__ import annotations

import ctypes

from cxi_cni.cxi.backend import (
    MAX_VNIS,
    RESOURCES,
    TRAFFIC_CLASSES,
    Limit,
    Member,
    NoResources,
    ServiceDesc,
)

MAX_MEMBERS = 2

# Bits of the first byte of cxi_svc_desc.
FLAG_RESTRICTED_MEMBERS = 1 << 0
FLAG_RESTRICTED_VNIS = 1 << 1
FLAG_RESTRICTED_TCS = 1 << 2
FLAG_RESOURCE_LIMITS = 1 << 3
FLAG_ENABLE = 1 << 4
FLAG_IS_SYSTEM_SVC = 1 << 5
CNTR_POOL_SHIFT = 6
CNTR_POOL_MASK = 0x3

_BOOL_FLAGS = (
    ("restricted_members", FLAG_RESTRICTED_MEMBERS),
    ("restricted_vnis", FLAG_RESTRICTED_VNIS),
    ("restricted_tcs", FLAG_RESTRICTED_TCS),
    ("resource_limits", FLAG_RESOURCE_LIMITS),
    ("enable", FLAG_ENABLE),
    ("is_system_svc", FLAG_IS_SYSTEM_SVC),
)

# Offsets of struct cxil_devinfo at the start of struct cxil_dev that stay stable.
DEVINFO_DEV_ID_OFFSET = 0
DEVINFO_NAME_OFFSET = 28
DEVINFO_NAME_LEN = 14

UINT16_MAX = 0xFFFF


class SvcMember(ctypes.Structure):
    """One service member: a uid or gid (or unused) and its member type."""

    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int32)]


class SvcLimit(ctypes.Structure):
    """One resource limit: the most a service may use and how many are reserved."""

    _fields_ = [("max", ctypes.c_uint16), ("res", ctypes.c_uint16)]


class CxiSvcDesc(ctypes.Structure):
    """struct cxi_svc_desc. The bitfield byte is kept whole and decoded by hand."""

    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("num_vld_vnis", ctypes.c_uint8),
        ("vnis", ctypes.c_uint16 * MAX_VNIS),
        ("tcs", ctypes.c_bool * len(TRAFFIC_CLASSES)),
        ("members", SvcMember * MAX_MEMBERS),
        ("limits", SvcLimit * len(RESOURCES)),
        ("svc_id", ctypes.c_uint32),
    ]


class CxiSvcFailInfo(ctypes.Structure):
    """struct cxi_svc_fail_info: what was available when an allocation fell short."""

    _fields_ = [
        ("rsrc_avail", ctypes.c_uint16 * len(RESOURCES)),
        ("no_le_pools", ctypes.c_bool),
        ("no_tle_pools", ctypes.c_bool),
        ("no_cntr_pools", ctypes.c_bool),
    ]


class CxiRsrcUse(ctypes.Structure):
    """struct cxi_rsrc_use: how many of each resource a service's processes use.

    The layout cxil_get_svc_rsrc_use fills since the driver's resource groups
    (shs-cxi-driver 67c3df0, in every release from SHS 12.0.0): the service id, its TLE
    pool, and the counts (0xFFFF: not applicable). The first drivers had no tle_pool_id,
    which moved in_use 4 bytes ahead. The driver leaves svc_id 0 in the answer for one
    service (cxi_svc_rsrc_get does not set it)."""

    _fields_ = [
        ("svc_id", ctypes.c_uint32),
        ("tle_pool_id", ctypes.c_uint32),
        ("in_use", ctypes.c_uint16 * len(RESOURCES)),
    ]


class CxilSvcListHead(ctypes.Structure):
    """The fixed head of struct cxil_svc_list; `count` descriptors follow it."""

    _fields_ = [("count", ctypes.c_uint32)]


SVC_LIST_DESCS_OFFSET = 4


def _assert_layout() -> None:
    expected = {
        "flags": 0,
        "num_vld_vnis": 1,
        "vnis": 2,
        "tcs": 10,
        "members": 16,
        "limits": 32,
        "svc_id": 64,
    }
    for name, offset in expected.items():
        actual = getattr(CxiSvcDesc, name).offset
        assert actual == offset, f"cxi_svc_desc.{name} at {actual}, expected {offset}"
    assert ctypes.sizeof(CxiSvcDesc) == 68 and ctypes.alignment(CxiSvcDesc) == 4
    assert ctypes.sizeof(SvcMember) == 8 and ctypes.sizeof(SvcLimit) == 4
    assert ctypes.sizeof(CxiSvcFailInfo) == 20
    assert CxiSvcFailInfo.no_le_pools.offset == 16
    assert ctypes.sizeof(CxiRsrcUse) == 24 and CxiRsrcUse.in_use.offset == 8
    assert SVC_LIST_DESCS_OFFSET % ctypes.alignment(CxiSvcDesc) == 0


_assert_layout()


def _checked_field(value: int, bits: int, what: str, signed: bool = False) -> int:
    """`value`, or ValueError when a field of `bits` bits does not hold it.

    The field is unsigned unless `signed`; ctypes would keep the low bits without a word."""
    low = -(1 << (bits - 1)) if signed else 0
    if not low <= value < low + (1 << bits):
        raise ValueError(f"{what} {value} does not fit in {bits} {'signed ' if signed else ''}bits")
    return value


def desc_to_struct(desc: ServiceDesc) -> CxiSvcDesc:
    """Encode a ServiceDesc. ValueError when a value cannot be represented at all
    (more than 4 VNIs, a VNI or limit above 65535, a member type beyond int32, an unknown
    TC or resource name)."""
    out = CxiSvcDesc()
    flags = 0
    for name, bit in _BOOL_FLAGS:
        if getattr(desc, name):
            flags |= bit
    flags |= _checked_field(desc.cntr_pool_id, 2, "cntr_pool_id") << CNTR_POOL_SHIFT
    out.flags = flags

    if len(desc.vnis) > MAX_VNIS:
        raise ValueError(f"{len(desc.vnis)} VNIs given, a service holds at most {MAX_VNIS}")
    out.num_vld_vnis = len(desc.vnis)
    for i, vni in enumerate(desc.vnis):
        out.vnis[i] = _checked_field(vni, 16, "VNI")

    unknown_tcs = set(desc.tcs) - set(TRAFFIC_CLASSES)
    if unknown_tcs:
        raise ValueError(f"unknown traffic class(es): {', '.join(sorted(unknown_tcs))}")
    for i, tc in enumerate(TRAFFIC_CLASSES):
        out.tcs[i] = tc in desc.tcs

    if len(desc.members) != MAX_MEMBERS:
        raise ValueError(f"a service has exactly {MAX_MEMBERS} member slots")
    for slot, member in zip(out.members, desc.members, strict=True):
        slot.id = _checked_field(member.id, 32, "member id")
        slot.type = _checked_field(member.type, 32, "member type", signed=True)

    unknown_resources = set(desc.limits) - set(RESOURCES)
    if unknown_resources:
        raise ValueError(f"unknown resource(s): {', '.join(sorted(unknown_resources))}")
    for i, resource in enumerate(RESOURCES):
        limit = desc.limits.get(resource)
        if limit is not None:
            out.limits[i].max = _checked_field(limit.max, 16, f"{resource} max")
            out.limits[i].res = _checked_field(limit.res, 16, f"{resource} res")

    out.svc_id = _checked_field(desc.svc_id, 32, "svc_id")
    return out


def struct_to_desc(raw: CxiSvcDesc) -> ServiceDesc:
    """Decode a cxi_svc_desc. Limits are reported only when resource_limits is set, and
    then only for resources with a non-zero max or reservation."""
    flags = raw.flags
    fields = {name: bool(flags & bit) for name, bit in _BOOL_FLAGS}
    num_vnis = min(raw.num_vld_vnis, MAX_VNIS)
    limits = {}
    if fields["resource_limits"]:
        for i, resource in enumerate(RESOURCES):
            entry = raw.limits[i]
            if entry.max or entry.res:
                limits[resource] = Limit(max=entry.max, res=entry.res)
    return ServiceDesc(
        svc_id=raw.svc_id,
        cntr_pool_id=(flags >> CNTR_POOL_SHIFT) & CNTR_POOL_MASK,
        vnis=tuple(raw.vnis[:num_vnis]),
        tcs=frozenset(tc for i, tc in enumerate(TRAFFIC_CLASSES) if raw.tcs[i]),
        members=tuple(Member(id=m.id, type=m.type) for m in raw.members),
        limits=limits,
        **fields,
    )


def no_resources(device: str, fail: CxiSvcFailInfo, desc: ServiceDesc) -> NoResources:
    """The -ENOSPC of cxil_alloc_svc as the driver's fail_info tells it."""
    asked = dict(desc.limits) if desc.resource_limits else {}
    avail = {name: fail.rsrc_avail[i] for i, name in enumerate(RESOURCES)}
    return NoResources(device, asked, avail, bool(fail.no_le_pools), bool(fail.no_tle_pools),
                       bool(fail.no_cntr_pools))


def rsrc_use_counts(raw: CxiRsrcUse, svc_id: int) -> dict[str, int] | None:
    """The in_use counts by resource name, or None when the answer names another service
    (the driver leaves 0 there; anything else means another layout)."""
    if raw.svc_id not in (0, svc_id):
        return None
    return {name: raw.in_use[i] for i, name in enumerate(RESOURCES)}


def svc_list_descs(list_ptr: ctypes.c_void_p) -> list[CxiSvcDesc]:
    """Copy the descriptors out of a struct cxil_svc_list owned by the library."""
    address = ctypes.cast(list_ptr, ctypes.c_void_p).value
    if not address:
        return []
    count = CxilSvcListHead.from_address(address).count
    array = (CxiSvcDesc * count).from_address(address + SVC_LIST_DESCS_OFFSET)
    return [CxiSvcDesc.from_buffer_copy(entry) for entry in array]
