"""The conflist of the kubelet's-path tests: bridge + host-local, then the cxi entry, the way
a flannel chain looks to the plugin (flannel itself delegates to bridge + host-local)."""

from __future__ import annotations

from pathlib import Path


def chain_entry(conf: dict) -> dict:
    """A plugin config as an entry of a conflist (which gives cniVersion and name)."""
    return {key: value for key, value in conf.items() if key not in ("cniVersion", "name")}


def bridge_chain(name: str, bridge: str, ipam_dir: Path, subnet: str, cxi_entry: dict | None) -> dict:
    """On a bridge device and IPAM folder of the caller's; no gateway and no masquerading,
    so nothing is routed on the host or written to iptables."""
    plugins = [{"type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": str(ipam_dir), "ranges": [[{"subnet": subnet}]]}}]
    if cxi_entry is not None:
        plugins.append(cxi_entry)
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}


def leases(ipam_dir: Path) -> list[str]:
    """host-local's leases (one file per address, named by it) in every network's folder."""
    return sorted(str(p.relative_to(ipam_dir)) for p in ipam_dir.glob("*/*") if p.name[0].isdigit())
