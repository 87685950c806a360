"""Sets of VNIs as admins write them: numbers and ranges, like ["100-65534"] in the
configuration or "2000-2099,3000" in a Namespace annotation; and the one rule every VNI
from every source meets (`refusal`)."""

from __future__ import annotations

import re

RANGE_RE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")
MAX_VNI = 65535


class VniSet:
    """Inclusive ranges of VNIs; `vni in VniSet(...)`."""

    def __init__(self, ranges: tuple[tuple[int, int], ...] = ()):
        self.ranges = ranges

    @classmethod
    def parse(cls, items) -> VniSet:
        """From a list of ints and "A-B" strings, or one comma-separated string; ValueError
        naming the part that is not a VNI or range of VNIs."""
        if isinstance(items, str):
            items = [part for part in items.split(",") if part.strip()]
        ranges = []
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool):
                low = high = item
            else:
                match = RANGE_RE.match(str(item))
                if not match:
                    raise ValueError(f"{item!r} is not a VNI or a range like 100-199")
                low = int(match[1])
                high = int(match[2]) if match[2] else low
            if not 1 <= low <= high <= MAX_VNI:
                raise ValueError(f"{item!r} is not within 1..{MAX_VNI} with the low end first")
            ranges.append((low, high))
        return cls(tuple(sorted(ranges)))

    def __contains__(self, vni: int) -> bool:
        return any(low <= vni <= high for low, high in self.ranges)

    def __or__(self, other: VniSet) -> VniSet:
        return VniSet(tuple(sorted(self.ranges + other.ranges)))

    def __and__(self, other: VniSet) -> VniSet:
        """The VNIs in both, as ranges."""
        return VniSet(tuple(sorted((max(a, c), min(b, d)) for a, b in self.ranges
                                   for c, d in other.ranges if max(a, c) <= min(b, d))))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __repr__(self) -> str:
        return f"VniSet({str(self)!r})"

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges) or "none"


DEFAULT_VNI = 1  # the default service's VNI, which every process of the node shares


def refusal(vnis, allowed: VniSet, allow_default: bool) -> str | None:
    """Why the first refused of `vnis` may not be used, or None: every VNI must be in
    `allowed` (cxi.allowedVnis, already narrowed by the node policy), and VNI 1 must in
    addition be allowed by name (cxi.allowDefaultVni)."""
    for vni in vnis:
        if vni == DEFAULT_VNI and not (allow_default and vni in allowed):
            return (f"VNI 1 is the default service's VNI, which every process shares: it needs "
                    f"cxi.allowDefaultVni true and 1 in cxi.allowedVnis ({allowed})")
        if vni not in allowed:
            return f"VNI {vni} is outside cxi.allowedVnis ({allowed})"
    return None
