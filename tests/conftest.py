"""Shared fixtures: the frozen binary, throwaway network namespaces and links, sim configs."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from cnitool import run_cni

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("the tests make network namespaces and links: run them as root")


@pytest.fixture(scope="session")
def cxi_bin() -> str:
    path = Path(os.environ.get("CXI_BINARY", REPO / "dist" / "cxi"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run ./build.sh first")
    return str(path)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@pytest.fixture
def make_netns():
    """Factory for named network namespaces (/run/netns/NAME), deleted at teardown."""
    made = []

    def make() -> str:
        name = f"cxit-{uuid.uuid4().hex[:10]}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return f"/run/netns/{name}"

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns(make_netns) -> str:
    return make_netns()


@pytest.fixture
def make_veth():
    """Factory for veth pairs in the host namespace (stand-ins for hsnN), deleted at teardown."""
    made = []

    def make(up: bool = True) -> str:
        name = f"cxm{uuid.uuid4().hex[:8]}"
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
        made.append(name)
        if up:
            sh("ip", "link", "set", name, "up")
            sh("ip", "link", "set", name + "p", "up")
        return name

    yield make
    for name in made:
        sh("ip", "link", "del", name, check=False)


class SimSetup:
    """A private state dir, log file and sim state file, and configs that use them."""

    def __init__(self, root: Path):
        self.root = root
        self.state_dir = root / "state"
        self.sim_state = root / "sim.json"
        self.log_file = root / "cxi.log"

    def conf(self, cni_version: str = "1.0.0", cxi: dict | None = None, **top) -> dict:
        return {
            "cniVersion": cni_version, "name": "cxinet", "type": "cxi",
            "stateDir": str(self.state_dir), "logFile": str(self.log_file),
            "cxi": {"backend": "sim", "simState": str(self.sim_state), "vnis": [100], **(cxi or {})},
            **top,
        }

    def sim(self) -> dict:
        return json.loads(self.sim_state.read_text()) if self.sim_state.exists() else {}

    def services(self, bound_only: bool = True) -> list[tuple[str, int, dict]]:
        out = []
        for dev, data in self.sim().get("devices", {}).items():
            for sid, svc in data["services"].items():
                if not bound_only or int(sid) != 1:
                    out.append((dev, int(sid), svc))
        return out

    def records(self) -> list[dict]:
        if not self.state_dir.exists():
            return []
        return [json.loads(p.read_text()) for p in self.state_dir.glob("*.json")]

    def seed(self, devices: dict) -> None:
        """Write a sim state with the given devices: {name: (netdev, vf, totals or None)}."""
        from cxi_cni.cxi.sim import STATE_VERSION, new_device

        state = {"version": STATE_VERSION, "devices": {
            name: new_device(netdev, f"0000:{0x41 + i:02x}:00.0", vf=vf, totals=totals)
            for i, (name, (netdev, vf, totals)) in enumerate(sorted(devices.items()))}}
        self.sim_state.write_text(json.dumps(state))


@pytest.fixture
def sim(tmp_path) -> SimSetup:
    return SimSetup(tmp_path)


@pytest.fixture
def cni(cxi_bin):
    """run_cni bound to the frozen binary."""
    def call(command, conf=None, **kw):
        return run_cni(cxi_bin, command, conf, **kw)
    return call


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino
