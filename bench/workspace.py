"""What a benchmark run makes and must remove: a temp folder, a veth master, network
namespaces, and the counts that tell whether anything leaked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxi_cni.cxi.services import Binding  # noqa: E402
from cxi_cni.cxi.simstate import SimState  # noqa: E402
from cxi_cni.record import AttachmentRecord  # noqa: E402
from cxi_cni.state import AttachmentStore  # noqa: E402

MAX_NAMESPACES = 256  # a bound on what one run may create


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Workspace:
    """Everything a benchmark run creates, removed by close() whatever happened."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix="cxi-bench-"))
        self.master = f"cxbm{self.tag}"
        self.namespaces: list[str] = []
        ip("link", "add", self.master, "type", "veth", "peer", "name", self.master + "p")
        ip("link", "set", self.master, "up")
        ip("link", "set", self.master + "p", "up")

    def netns(self, with_eth0: bool = False) -> str:
        """A new named netns (its /run/netns path); with a veth pair eth0/eth0p inside."""
        if len(self.namespaces) >= MAX_NAMESPACES:
            raise RuntimeError("the benchmark asked for too many namespaces")
        name = f"cxb{self.tag}-{len(self.namespaces)}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        if with_eth0:
            ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            ip("-n", name, "link", "set", "eth0", "up")
        return f"/run/netns/{name}"

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pod_links(self, ns_path: str) -> int:
        """Links in a namespace other than lo and the veth pair the benchmark made itself."""
        out = ip("-n", Path(ns_path).name, "-j", "link", "show").stdout
        return sum(1 for link in json.loads(out) if link["ifname"] not in ("lo", "eth0", "eth0p"))

    def close(self) -> None:
        for name in self.namespaces:
            ip("netns", "del", name, check=False)
        ip("link", "del", self.master, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def sim_services(sim_state: Path) -> int:
    """Services other than each device's default one (id 1) in a sim state."""
    if not sim_state.exists():
        return 0
    with SimState(str(sim_state)).transaction(write=False) as state:
        return sum(1 for dev in state["devices"].values() for sid in dev["services"] if sid != "1")


def records(state_dir: Path) -> int:
    return len(list(state_dir.glob("*.json"))) if state_dir.exists() else 0


def leases(ipam_dir: Path) -> int:
    """host-local lease files (one per address) under a dataDir."""
    if not ipam_dir.exists():
        return 0
    return sum(1 for p in ipam_dir.rglob("*") if p.is_file()
               and p.name not in ("lock",) and not p.name.startswith("last_reserved_ip"))


def seed_services(sim_state: Path, device: str, count: int) -> int:
    """Clone the device's newest bound service until it holds `count` bound services, each
    bound to an inode no namespace has. Returns how many the device holds."""
    with SimState(str(sim_state)).transaction() as state:
        services = state["devices"][device]["services"]
        template = services[max(services, key=int)]
        next_id = max(int(s) for s in services) + 1
        for k in range(min(count, 4096) - (len(services) - 1)):
            clone = json.loads(json.dumps(template))
            clone["desc"]["svc_id"] = next_id
            clone["netns"] = 0x7F000000 + k
            services[str(next_id)] = clone
            next_id += 1
        return len(services) - 1


def seed_attachments(sim_state: Path, state_dir: Path) -> int:
    """A record for every namespace the seeded services are bound to, as the plugin keeps
    them for the pods of a crowded node (whose namespaces are gone: GC may take them)."""
    bound: dict[int, list[Binding]] = {}
    with SimState(str(sim_state)).transaction(write=False) as state:
        for device, info in state["devices"].items():
            for sid, svc in info["services"].items():
                if svc["netns"]:
                    bound.setdefault(svc["netns"], []).append(Binding(device, int(sid)))
    store = AttachmentStore(str(state_dir))
    store.ensure()
    for inode, services in bound.items():
        store.save(AttachmentRecord(f"crowd{inode:x}", "eth0", f"/run/netns/gone-{inode:x}", inode,
                                    (100,), (), sorted({b.device for b in services}), services,
                                    complete=True))
    return len(bound)
