"""libcni, the library containerd, CRI-O and Multus run plugins with, drives a bridge +
host-local + cxi chain through a small Go driver built here from Debian's libcni sources:
AddNetworkList, CheckNetworkList (with the cached result), DelNetworkList twice, and DEL
after the namespace is gone, checking services, records, leases and libcni's cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import REPO, SimSetup, sh
from cri.network import bridge_chain, chain_entry, leases

pytestmark = pytest.mark.libcni

DRIVER = REPO / "tests" / "libcni" / "driver.go"
GOCODE = Path("/usr/share/gocode")
LIBCNI = GOCODE / "src/github.com/containernetworking/cni/libcni"
GO_PLUGINS = Path("/usr/lib/cni")


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    """The Go driver, built offline against Debian's libcni (GOPATH mode, no modules)."""
    if not shutil.which("go") or not LIBCNI.is_dir():
        pytest.fail("the libcni tier needs Go and libcni's sources: tests/run.sh installs golang-go "
                    "and golang-github-appc-cni-dev")
    out = tmp_path_factory.mktemp("libcni")
    env = {"PATH": os.environ["PATH"], "HOME": str(out), "GO111MODULE": "off", "GOFLAGS": "",
           "GOPATH": f"{out / 'gopath'}:{GOCODE}", "GOCACHE": str(out / "gocache")}
    proc = subprocess.run(["go", "build", "-o", str(out / "driver"), str(DRIVER)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"go build of {DRIVER} failed:\n{proc.stderr}"
    return out / "driver"


class Chain:
    """One bridge + host-local + cxi conflist with its own plugin folder, IPAM folder,
    libcni cache and bridge device; every call goes through the driver."""

    def __init__(self, driver: Path, cxi_bin: str, root: Path, sim: SimSetup):
        self.driver, self.root, self.sim = driver, root, sim
        run_id = uuid.uuid4().hex[:8]
        self.bin_dir, self.cache, self.ipam = root / "bin", root / "cache", root / "ipam"
        self.bin_dir.mkdir(parents=True)
        shutil.copy2(cxi_bin, self.bin_dir / "cxi")
        self.bridge = f"cxl{run_id}"
        self.conflist = bridge_chain(f"cxilibcni-{run_id}", self.bridge, self.ipam,
                                     f"198.18.{int(run_id[:4], 16) % 250}.0/24", chain_entry(sim.conf()))
        self.conflist_path = root / "net.conflist"
        self.conflist_path.write_text(json.dumps(self.conflist))

    def call(self, command: str, container_id: str, netns: str) -> subprocess.CompletedProcess:
        uid = uuid.uuid5(uuid.NAMESPACE_URL, container_id)
        pod_args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=pod-{container_id};"
                    f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}")
        return subprocess.run(
            [str(self.driver), "-conflist", str(self.conflist_path), "-path", f"{self.bin_dir}:{GO_PLUGINS}",
             "-cache", str(self.cache), "-id", container_id, "-netns", netns, "-args", pod_args, command],
            capture_output=True, text=True, timeout=120)

    def ok(self, command: str, container_id: str, netns: str) -> subprocess.CompletedProcess:
        proc = self.call(command, container_id, netns)
        assert proc.returncode == 0, f"{command} failed: {proc.stderr}"
        return proc

    def cache_file(self, container_id: str) -> Path:
        return self.cache / "results" / f"{self.conflist['name']}-{container_id}-eth0"

    def leases(self) -> list[str]:
        return leases(self.ipam)

    def assert_attached(self, container_id: str, netns: str, result: dict) -> None:
        inode = os.stat(netns).st_ino
        devices = sorted(self.sim.backend().device_names())
        services = self.sim.services()
        assert sorted(s.device for s in services) == devices and {s.netns_inode for s in services} == {inode}
        (record,) = self.sim.records()
        assert (record["containerID"], record["netnsInode"], record["complete"]) == (container_id, inode, True)
        (address,) = [ip["address"].split("/")[0] for ip in result["ips"]]
        assert self.leases() == [f"{self.conflist['name']}/{address}"]
        cached = json.loads(self.cache_file(container_id).read_text())
        assert cached["kind"] == "cniCacheV1" and cached["containerId"] == container_id, cached
        assert [ip["address"] for ip in cached["result"]["ips"]] == [ip["address"] for ip in result["ips"]]

    def assert_nothing_left(self, container_id: str) -> None:
        assert self.sim.services() == [], "a service outlived DEL"
        assert self.sim.records() == [], "an attachment record outlived DEL"
        assert self.leases() == [], "host-local still holds the address"
        assert not self.cache_file(container_id).exists(), "libcni kept the cached result"


@pytest.fixture
def chain(driver, cxi_bin, tmp_path):
    made = Chain(driver, cxi_bin, tmp_path / "libcni", SimSetup(tmp_path / "sim"))
    try:
        yield made
    finally:
        if Path(f"/sys/class/net/{made.bridge}").exists():
            sh("ip", "link", "del", made.bridge, check=False)


def test_add_check_del_and_del_again(chain, netns):
    result = json.loads(chain.ok("add", "pod1", netns).stdout)
    eth0 = [i for i in result["interfaces"] if i["name"] == "eth0"]
    assert eth0 and eth0[0]["sandbox"] == netns, result
    chain.assert_attached("pod1", netns, result)
    shown = sh("ip", "-n", Path(netns).name, "-o", "-4", "addr", "show", "eth0").stdout
    assert result["ips"][0]["address"] in shown, shown

    chain.ok("check", "pod1", netns)  # libcni sends the cached result as prevResult
    chain.assert_attached("pod1", netns, result)

    chain.ok("del", "pod1", netns)
    chain.assert_nothing_left("pod1")
    assert "eth0" not in sh("ip", "-n", Path(netns).name, "-o", "link").stdout

    chain.ok("del", "pod1", netns)  # runtimes repeat DEL; it must succeed with nothing to do
    chain.assert_nothing_left("pod1")
    done = [json.loads(line) for line in chain.sim.log_file.read_text().splitlines()]
    done = [line["command"] for line in done if line["msg"].endswith(" done")]
    assert done == ["ADD", "CHECK", "DEL", "DEL"], done


def test_check_fails_when_a_service_was_destroyed_behind_the_plugins_back(chain, netns):
    result = json.loads(chain.ok("add", "pod2", netns).stdout)
    chain.assert_attached("pod2", netns, result)
    victim = chain.sim.services()[0]
    device = chain.sim.backend().open(victim.device)
    try:
        device.destroy_svc(victim.desc.svc_id)
    finally:
        device.close()
    proc = chain.call("check", "pod2", netns)
    assert proc.returncode != 0, "CHECK passed with a service gone"
    gone = f"service {victim.desc.svc_id} on {victim.device} no longer exists"
    assert proc.stderr.startswith("CHECK failed: ") and gone in proc.stderr, proc.stderr

    chain.ok("del", "pod2", netns)
    chain.assert_nothing_left("pod2")


def test_del_after_the_namespace_is_gone_still_cleans_up(chain, make_netns):
    netns = make_netns()
    result = json.loads(chain.ok("add", "pod3", netns).stdout)
    chain.assert_attached("pod3", netns, result)
    sh("ip", "netns", "del", Path(netns).name)
    assert not os.path.exists(netns)

    chain.ok("del", "pod3", netns)
    chain.assert_nothing_left("pod3")
    chain.ok("del", "pod3", netns)
    chain.assert_nothing_left("pod3")
