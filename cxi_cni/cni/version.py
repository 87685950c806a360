"""CNI spec versions this plugin speaks, and result conversion between their shapes."""

from __future__ import annotations

from .errors import INCOMPATIBLE_VERSION, INVALID_CONFIG, CniError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]


def parse(version: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in version.split("."))
    except (AttributeError, ValueError):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not a version number",
            f"use one of {', '.join(SUPPORTED_VERSIONS)}",
        ) from None
    return major, minor, patch


def require_supported(version: str) -> str:
    parse(version)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported by this plugin",
            f"use one of {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


# Keys of a result whose shape the spec fixes: each a list of objects with these string keys.
RESULT_LISTS = {"interfaces": ("name", "mac", "sandbox"), "ips": ("address", "gateway"),
                "routes": ("dst", "gw")}


# Fields of a result's entries that hold an IP address (or, dst, a network).
IP_FIELDS = ("address", "dst", "gateway", "gw")


def is_ip(field: str, value) -> bool:
    """Whether `value` is what the result field holds: an address with its prefix length
    (address), a network whose host bits may be set (dst), an address (gateway, gw)."""
    import ipaddress  # only results that carry addresses need it (1 ms to load)

    try:
        if field == "address":
            ipaddress.ip_interface(value)
        elif field == "dst":
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_result(result: dict) -> None:
    """A prevResult shaped as the spec says (what the plugin reads of it and passes on); a
    CniError naming the first field that is not, before anything is made."""
    def bad(path: str, problem: str) -> CniError:
        return CniError(INVALID_CONFIG, f"prevResult.{path} {problem}",
                        "the runtime must pass the previous plugin's result as the CNI spec "
                        "shapes it")

    for key, strings in RESULT_LISTS.items():
        entries = result.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise bad(key, "is not a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise bad(f"{key}[{i}]", "is not an object")
            for name in strings:
                if name in entry and not isinstance(entry[name], str):
                    raise bad(f"{key}[{i}].{name}", "is not a string")
            if "interface" in entry and (isinstance(entry["interface"], bool)
                                         or not isinstance(entry["interface"], int)):
                raise bad(f"{key}[{i}].interface", "is not an integer")
            for name in IP_FIELDS:  # the list's own fields, strings by now
                if name in strings and name in entry and not is_ip(name, entry[name]):
                    raise bad(f"{key}[{i}].{name}", f"{entry[name][:64]!r} is not an IP "
                              f"{'network' if name == 'dst' else 'address'}")
    if result.get("dns") is not None and not isinstance(result["dns"], dict):
        raise bad("dns", "is not an object")


def normalize_result(result: dict | None) -> dict:
    """A result of any supported version in the 1.x shape (ips without "version")."""
    import copy

    out = copy.deepcopy(result or {})
    out.pop("cniVersion", None)
    for key in ("interfaces", "ips", "routes", "dns"):  # null: as if the field were absent
        if key in out and out[key] is None:
            del out[key]
    for ip in out.get("ips") or []:
        ip.pop("version", None)
    return out


def result_for(result: dict, version: str) -> dict:
    """A 1.x-shaped result converted for the given spec version, with cniVersion set."""
    import copy

    out = {"cniVersion": version, **copy.deepcopy(result)}
    for key in ("interfaces", "ips", "routes"):
        out.setdefault(key, [])
    if not at_least(version, "1.0.0"):
        for ip in out["ips"]:
            ip["version"] = "6" if ":" in ip.get("address", "") else "4"
    return out


def merge_results(prev: dict | None, ours: dict | None) -> dict:
    """prevResult (1.x shape) with this plugin's interfaces, ips, routes and dns appended;
    our ips' interface indexes are shifted past the previous interfaces."""
    import copy

    out = copy.deepcopy(prev or {})
    ours = ours or {}
    offset = len(out.get("interfaces") or [])
    out.setdefault("interfaces", []).extend(copy.deepcopy(ours.get("interfaces") or []))
    for ip in copy.deepcopy(ours.get("ips") or []):
        if isinstance(ip.get("interface"), int):
            ip["interface"] += offset
        out.setdefault("ips", []).append(ip)
    out.setdefault("routes", []).extend(copy.deepcopy(ours.get("routes") or []))
    if ours.get("dns"):
        out["dns"] = {**(out.get("dns") or {}), **ours["dns"]}
    return out
