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

# Totals of cases run, kills survived and leaks found, printed at the end of the run.
pytest_plugins = ["reliability"]


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


# The stacks every CXI behaviour test runs on (cxi_cni/cxi/stacks.py); shs-13, a node that
# can bind no service at all, has tests of its own.
STACKS = ("shs-14.0.1", "shs-14.0.0", "netns-member")
DEFAULT_STACK = STACKS[0]
TWO_NICS = {"cxi0": ("hsn0", False, None), "cxi1": ("hsn1", False, None)}


class SimSetup:
    """A private state dir, log file and CXI backend, and configs that use them. The
    default backend is the simulated one; LibcxiSetup drives the libcxi stand-in. `stack`
    is the software stack the devices emulate (the plugin finds it with cxi.stack auto)."""

    kind = "sim"

    def __init__(self, root: Path, stack: str = DEFAULT_STACK):
        self.root = root
        self.stack = stack
        self.state_dir = root / "state"
        self.sim_state = root / "sim.db"
        self.log_file = root / "cxi.log"
        self.env: dict[str, str] = {}
        self.prepare()

    def prepare(self) -> None:
        """Make the devices: two NICs, cxi0 behind hsn0 and cxi1 behind hsn1 (the sim's
        defaults, which need no state file on the default stack)."""
        if self.stack != DEFAULT_STACK:
            self.seed(TWO_NICS)

    def backend_conf(self) -> dict:
        return {"backend": "sim", "simState": str(self.sim_state)}

    def conf(self, cni_version: str = "1.0.0", cxi: dict | None = None, **top) -> dict:
        return {
            "cniVersion": cni_version, "name": "cxinet", "type": "cxi",
            "stateDir": str(self.state_dir), "logFile": str(self.log_file),
            "cxi": {**self.backend_conf(), "vnis": [100], **(cxi or {})},
            **top,
        }

    def backend(self):
        from cxi_cni.cxi.sim import SimBackend

        return SimBackend(str(self.sim_state))

    def bind(self, device: str, vnis, inode: int) -> int:
        """A service bound to `inode` the way the stack binds, made outside the plugin."""
        from cxi_cni.cxi.services import ServiceSpec, bind_netns

        [binding] = bind_netns(self.backend(), [device], inode, ServiceSpec(tuple(vnis)),
                               lambda *made: None)
        return binding.svc_id

    def services(self):
        """Every service but the default one, as the backend lists them."""
        backend = self.backend()
        out = []
        for name in backend.device_names():
            dev = backend.open(name)
            try:
                out.extend(s for s in dev.list_services() if s.svc_id != 1)
            finally:
                dev.close()
        return out

    def set_busy(self, device: str, svc_id: int, busy: int) -> None:
        with self.backend().state.transaction() as state:
            state["devices"][device]["services"][str(svc_id)]["busy"] = busy

    def set_in_use(self, device: str, svc_id: int, in_use: dict[str, int]) -> None:
        """What the service's processes use (cxil_get_svc_rsrc_use), by resource name."""
        with self.backend().state.transaction() as state:
            state["devices"][device]["services"][str(svc_id)]["in_use"] = dict(in_use)

    def records(self) -> list[dict]:
        if not self.state_dir.exists():
            return []
        return [json.loads(p.read_text()) for p in self.state_dir.glob("*.json")]

    def seed(self, devices: dict, rgids_avail: int | None = None) -> None:
        """Devices as {name: (netdev, is_vf, totals dict or None)}, each with `rgids_avail`
        resource groups left (default: all of them)."""
        from cxi_cni.cxi.simstate import STATE_VERSION, SimState, new_device

        state = {"version": STATE_VERSION, "stack": self.stack, "devices": {
            name: new_device(netdev, f"0000:{0x41 + i:02x}:00.0", vf=vf, totals=totals)
            for i, (name, (netdev, vf, totals)) in enumerate(sorted(devices.items()))}}
        for device in state["devices"].values():
            device["rgids_avail"] = rgids_avail or device["rgids_avail"]
        SimState(str(self.sim_state)).reset(state)


class LibcxiSetup(SimSetup):
    """The libcxi backend over the C stand-in library, with a fake sysfs tree."""

    kind = "libcxi"

    def __init__(self, root: Path, lib: Path, monkeypatch, stack: str = DEFAULT_STACK):
        self.lib, self.monkeypatch = lib, monkeypatch
        self.lib_state = root / "libcxi.state"
        super().__init__(root, stack)

    def prepare(self) -> None:
        self.env = {"FAKE_LIBCXI_STATE": str(self.lib_state),
                    "CXI_CNI_SYSFS_ROOT": str(self.root / "sys")}
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        self.seed(TWO_NICS)

    def backend_conf(self) -> dict:
        return {"backend": "libcxi", "libcxi": str(self.lib)}

    def backend(self):
        from cxi_cni.cxi.libcxi import LibcxiBackend

        return LibcxiBackend(str(self.lib), str(self.root / "sys"))

    def seed(self, devices: dict, rgids_avail: int | None = None) -> None:
        from libcxi_standin import standin

        from cxi_cni.cxi.backend import RESOURCES

        sysfs = self.root / "sys"
        if sysfs.exists():
            import shutil

            shutil.rmtree(sysfs)
        self.lib_state.write_text("")
        standin.write_driver(self.lib_state, self.stack)
        totals = {name: tuple(t[r] for r in RESOURCES) if t else standin.TOTALS
                  for name, (_, _, t) in devices.items()}
        nics = [standin.Nic(name, netdev, f"0000:{0x41 + i:02x}:00.0", totals[name],
                            rgids_avail or 255)
                for i, (name, (netdev, _, _)) in enumerate(sorted(devices.items()))]
        standin.make_sysfs(sysfs, nics, driver_rev=f"standin-{self.stack}")
        for name, (_, vf, _) in devices.items():
            standin.write_device(self.lib_state, int(name[3:]), is_vf=vf, totals=totals[name])

    def set_busy(self, device: str, svc_id: int, busy: int) -> None:
        from libcxi_standin import standin

        standin.set_busy(self.lib_state, int(device[3:]), svc_id, busy)

    def set_in_use(self, device: str, svc_id: int, in_use: dict[str, int]) -> None:
        from libcxi_standin import standin

        standin.set_in_use(self.lib_state, int(device[3:]), svc_id, in_use)


@pytest.fixture
def sim(tmp_path) -> SimSetup:
    return SimSetup(tmp_path)


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory) -> Path:
    from libcxi_standin import standin

    return standin.build(tmp_path_factory.mktemp("libcxi"))


@pytest.fixture(scope="session")
def standin_lib_old(tmp_path_factory) -> Path:
    """The stand-in without cxil_svc_set_netns / cxil_svc_get_netns (libcxi before 1.10)."""
    from libcxi_standin import standin

    return standin.build(tmp_path_factory.mktemp("libcxi-1.9"), with_netns=False)


def libcxi_setup(request, root: Path, monkeypatch, stack: str) -> LibcxiSetup:
    """The stand-in as a node of `stack` has it: the library with or without the netns
    calls, and the driver of that stack."""
    from libcxi_standin import standin

    lib = request.getfixturevalue("standin_lib" if standin.DRIVERS[stack] else "standin_lib_old")
    return LibcxiSetup(root, lib, monkeypatch, stack)


@pytest.fixture(params=[(kind, stack) for kind in ("sim", "libcxi") for stack in STACKS],
                ids=lambda param: "-".join(param))
def cxi_setup(request, tmp_path, monkeypatch) -> SimSetup:
    """The same CXI behaviour tests against both backends, each emulating every stack."""
    kind, stack = request.param
    if kind == "sim":
        return SimSetup(tmp_path, stack)
    return libcxi_setup(request, tmp_path, monkeypatch, stack)


@pytest.fixture
def node_policy(tmp_path):
    """A node policy file (root's, 0644) and the environment that points the plugin at it."""
    folder = tmp_path / "etc-cxi-cni"
    folder.mkdir(mode=0o755)
    path = folder / "policy.json"

    def write(**keys) -> dict:
        path.write_text(json.dumps(keys))
        path.chmod(0o644)
        return {"CXI_CNI_POLICY": str(path)}
    write.path = path
    return write


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    from kube_apiserver import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def api(pki):
    """A Kubernetes API server on 127.0.0.1 over TLS, accepting kube_apiserver.TOKEN."""
    from kube_apiserver import TOKEN, KubeApiServer

    with KubeApiServer(pki, TOKEN) as server:
        yield server


@pytest.fixture
def kubeconfig(api, pki, tmp_path) -> str:
    """A JSON kubeconfig for the test API server, as the installer DaemonSet writes it."""
    from kube_apiserver import TOKEN, write_kubeconfig

    return str(write_kubeconfig(tmp_path / "cxi.kubeconfig", api.url, pki.ca_pem, token=TOKEN,
                                as_json=True))


@pytest.fixture
def cni(cxi_bin, request):
    """run_cni bound to the frozen binary, with the test's backend environment."""
    setup = next((request.getfixturevalue(name) for name in ("cxi_setup", "sim")
                  if name in request.fixturenames), None)

    def call(command, conf=None, env=None, **kw):
        return run_cni(cxi_bin, command, conf, env={**(setup.env if setup else {}), **(env or {})}, **kw)
    call.binary = cxi_bin
    return call


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino
