"""podman 4 drives the frozen plugin through CNI networks: services follow the container's
life, a failing ADD leaks nothing, and a macvlan network gives the container a second link.

Each test gets its own podman settings (CONTAINERS_CONF) whose plugin and network folders
are test-owned temporary folders: the plugin under test is found there as `cxi`, and no
file in the host's /etc/cni/net.d or /opt/cni/bin is touched."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import REPO, SimSetup, sh

pytestmark = pytest.mark.podman

SETUP = REPO / "tests" / "podman" / "setup.sh"
BASE_CONF = REPO / "tests" / "podman" / "containers.conf"
IMAGE = "localhost/cxi-cni-busybox"
LABEL = "cxi-cni-test"
FIREWALL_CHAINS = ("CNI-FORWARD", "CNI-ADMIN")


@pytest.fixture(scope="session")
def podman_host() -> None:
    """podman, runc, the Go plugins and the busybox image, installed by the CI's own script."""
    proc = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"tests/podman/setup.sh failed:\n{proc.stdout}\n{proc.stderr}")


class IptablesSnapshot:
    """The filter and nat rules before a test, to remove what the test's networks leave
    (the firewall plugin keeps its rules when ADD fails, as it gets no prevResult on DEL)."""

    TABLES = ("filter", "nat")

    def __init__(self):
        self.before = {t: self.read(t) for t in self.TABLES}

    @staticmethod
    def read(table: str) -> tuple[set[str], list[str]]:
        text = sh("iptables-save", "-t", table).stdout
        chains = {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}
        rules = [line for line in text.splitlines() if line.startswith("-A ")]
        return chains, rules

    def clean(self, subnets: list, names: list[str]) -> None:
        for table in self.TABLES:
            old_chains, old_rules = self.before[table]
            chains, rules = self.read(table)
            new_chains = {c for c in chains - old_chains if c.startswith("CNI-")}
            for rule in rules:
                if rule not in old_rules and rule_is_ours(rule, subnets, names):
                    sh("iptables", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            self.drop_empty(table, new_chains)

    @staticmethod
    def drop_empty(table: str, new_chains: set[str]) -> None:
        """Remove chains the test made that hold nothing of anyone's any more: per-container
        chains emptied above, and the firewall plugin's skeleton if it was new."""
        def rules_of(chain):
            out = sh("iptables", "-t", table, "-S", chain, check=False).stdout.splitlines()
            return [r for r in out if r.startswith("-A ")]

        skeleton = [r for c in FIREWALL_CHAINS if c in new_chains for r in rules_of(c)]
        if all(r.split()[-1] in FIREWALL_CHAINS for r in skeleton):
            for chain in FIREWALL_CHAINS:
                if chain in new_chains:
                    sh("iptables", "-t", table, "-F", chain, check=False)
        for chain in new_chains:
            if rules_of(chain):
                continue
            for rule in sh("iptables-save", "-t", table).stdout.splitlines():
                if rule.startswith("-A ") and rule.split()[-1] == chain:
                    sh("iptables", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
        for chain in new_chains:
            if not rules_of(chain):
                sh("iptables", "-t", table, "-X", chain, check=False)


def rule_is_ours(rule: str, subnets: list, names: list[str]) -> bool:
    for name in names:
        if f'name: \\"{name}\\"' in rule or f'name: "{name}"' in rule:
            return True
    for token in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", rule):
        net = ipaddress.ip_network(token, strict=False)
        if any(net.subnet_of(s) for s in subnets):
            return True
    return False


class PodmanSandbox:
    """podman with test-owned plugin and network folders; removes all it made."""

    def __init__(self, root: Path, cxi_bin: str):
        self.run_id = uuid.uuid4().hex[:10]
        self.root = root
        self.plugin_dir = root / "cni-bin"
        self.net_dir = root / "net.d"
        self.plugin_dir.mkdir(parents=True)
        self.net_dir.mkdir()
        (self.plugin_dir / "cxi").symlink_to(cxi_bin)
        self.conf_file = root / "containers.conf"
        self.conf_file.write_text(self.settings())
        self.networks: list[str] = []
        self.bridges: list[str] = []
        self.subnets: list = []
        self.iptables = IptablesSnapshot()

    def settings(self) -> str:
        text = BASE_CONF.read_text()
        text = re.sub(r"(?m)^cni_plugin_dirs = .*$",
                      f'cni_plugin_dirs = ["{self.plugin_dir}", "/usr/lib/cni"]', text)
        return re.sub(r"(?m)^network_config_dir = .*$",
                      f'network_config_dir = "{self.net_dir}"', text)

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "CONTAINERS_CONF": str(self.conf_file)}
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed rc={proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def unique(self, kind: str) -> str:
        return f"cxit-{kind}-{self.run_id}-{len(self.networks)}"

    def conflist_path(self, name: str) -> Path:
        return self.net_dir / f"{name}.conflist"

    def bridge_network(self, cxi_entry: dict | None) -> str:
        """podman's own bridge network (bridge, portmap, firewall, tuning) with the cxi
        entry appended (if given), on a bridge device with a name of our own."""
        name = self.unique("br")
        self.podman("network", "create", "--driver", "bridge", "--label", f"{LABEL}={self.run_id}",
                    name)
        self.networks.append(name)
        conflist = json.loads(self.conflist_path(name).read_text())
        bridge = conflist["plugins"][0]
        bridge["bridge"] = f"cxb{uuid.uuid4().hex[:8]}"
        self.bridges.append(bridge["bridge"])
        for rng in bridge["ipam"]["ranges"]:
            self.subnets.extend(ipaddress.ip_network(r["subnet"]) for r in rng)
        if cxi_entry is not None:
            conflist["plugins"].append(cxi_entry)
        self.conflist_path(name).write_text(json.dumps(conflist, indent=2))
        return name

    def cxi_network(self, cxi_entry: dict) -> str:
        """A network whose only plugin is cxi (with master, link type and IPAM)."""
        name = self.unique("hsn")
        self.networks.append(name)
        conflist = {"cniVersion": "1.0.0", "name": name, "plugins": [cxi_entry]}
        self.conflist_path(name).write_text(json.dumps(conflist, indent=2))
        return name

    def run(self, *networks: str, check: bool = True) -> tuple[str, subprocess.CompletedProcess]:
        name = f"cxit-ctr-{self.run_id}-{uuid.uuid4().hex[:6]}"
        net_args = [arg for net in networks for arg in ("--network", net)]
        proc = self.podman("run", "-d", "--init", "--name", name, "--label",
                           f"{LABEL}={self.run_id}", *net_args, IMAGE, "sleep", "3600",
                           check=check)
        return name, proc

    def inspect(self, container: str) -> dict:
        return json.loads(self.podman("inspect", container).stdout)[0]

    def netns(self, container: str) -> tuple[str, int]:
        """The container's netns path (podman's SandboxKey) and its inode, which must be
        the inode of /proc/PID/ns/net of the container's first process."""
        info = self.inspect(container)
        path = info["NetworkSettings"]["SandboxKey"]
        inode = os.stat(path).st_ino
        assert inode == os.stat(f"/proc/{info['State']['Pid']}/ns/net").st_ino
        return path, inode

    def cleanup(self) -> None:
        ours = self.podman("ps", "-a", "-q", "--filter", f"label={LABEL}={self.run_id}",
                           check=False).stdout.split()
        if ours:
            self.podman("rm", "-f", "-t", "0", *ours, check=False)
        if self.networks:
            self.podman("network", "rm", "-f", *self.networks, check=False)
        for bridge in self.bridges:
            if Path(f"/sys/class/net/{bridge}").exists():
                sh("ip", "link", "del", bridge, check=False)
        self.iptables.clean(self.subnets, self.networks)
        for name in self.networks:
            sh("rm", "-rf", f"/var/lib/cni/networks/{name}", check=False)


@pytest.fixture(scope="session")
def plugin_copy(cxi_bin, tmp_path_factory) -> str:
    """A private copy of the binary under test: podman runs it by name from a folder of
    ours, and a rebuild of dist/cxi during the run cannot pull it away mid-test."""
    copy = tmp_path_factory.mktemp("plugin") / "cxi"
    shutil.copy2(cxi_bin, copy)
    return str(copy)


@pytest.fixture
def pod(podman_host, plugin_copy, tmp_path):
    box = PodmanSandbox(tmp_path / "podman", plugin_copy)
    try:
        yield box
    finally:
        box.cleanup()


def cxi_entry(sim: SimSetup, **extra) -> dict:
    """The cxi plugin's entry for a conflist (cniVersion and name come from the list)."""
    entry = sim.conf(**extra)
    del entry["cniVersion"], entry["name"]
    return entry


def listed_services(binary: str, conflist: Path) -> list[dict]:
    """`cxi services --json` for the network's cxi entry: the services the plugin made."""
    proc = subprocess.run([binary, "services", "--json", "--config", str(conflist)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_one_service_per_device(plugin_copy, pod, sim, net, container) -> int:
    """Exactly one service on every sim device, bound to the container's netns inode and
    claimed by its record; nothing else bound anywhere. Returns the inode."""
    netns_path, inode = pod.netns(container)
    container_id = pod.inspect(container)["Id"]
    rows = listed_services(plugin_copy, pod.conflist_path(net))
    devices = sorted(sim.backend().device_names())
    assert devices, "the sim has no devices"
    assert sorted(r["device"] for r in rows) == devices, rows
    for row in rows:
        assert row["netns_inode"] == inode, (row, inode)
        assert row["container_id"] == container_id and row["ifname"] == "eth0", row
        assert row["netns"] == netns_path and row["vnis"] == [100] and row["enabled"], row
    assert len(sim.services()) == len(devices), f"leftover services: {sim.services()}"
    records = sim.records()
    assert [(r["containerID"], r["netnsInode"], r["complete"]) for r in records] == [
        (container_id, inode, True)]
    return inode


def assert_nothing_left(plugin_copy, pod, sim, net) -> None:
    assert listed_services(plugin_copy, pod.conflist_path(net)) == []
    assert sim.services() == [], "a service outlived its container"
    assert sim.records() == [], "an attachment record outlived its container"


def test_run_binds_one_service_per_device_to_the_container_netns(plugin_copy, pod, sim):
    net = pod.bridge_network(cxi_entry(sim))
    container, _ = pod.run(net)
    assert_one_service_per_device(plugin_copy, pod, sim, net, container)
    lines = [json.loads(line) for line in sim.log_file.read_text().splitlines()]
    assert [line["command"] for line in lines if line["msg"].endswith(" done")] == ["ADD"]


def test_stop_start_restart_and_rm_follow_the_container(plugin_copy, pod, sim):
    net = pod.bridge_network(cxi_entry(sim))
    container, _ = pod.run(net)
    first = assert_one_service_per_device(plugin_copy, pod, sim, net, container)

    pod.podman("stop", "-t", "0", container)
    assert_nothing_left(plugin_copy, pod, sim, net)

    pod.podman("start", container)
    assert_one_service_per_device(plugin_copy, pod, sim, net, container)

    pod.podman("restart", "-t", "0", container)
    after_restart = assert_one_service_per_device(plugin_copy, pod, sim, net, container)
    assert os.path.exists(pod.netns(container)[0])
    assert first > 0 and after_restart > 0

    pod.podman("rm", "-f", "-t", "0", container)
    assert_nothing_left(plugin_copy, pod, sim, net)
    done = [json.loads(line) for line in sim.log_file.read_text().splitlines()]
    commands = [line["command"] for line in done if line["msg"].endswith(" done")]
    assert commands == ["ADD", "DEL", "ADD", "DEL", "ADD", "DEL"], commands
    assert all(line["outcome"] == "ok" for line in done if line["msg"].endswith(" done"))


def test_failing_add_reaches_podman_and_leaks_nothing(plugin_copy, pod, sim):
    net = pod.bridge_network(cxi_entry(sim, cxi={"limits": {"tles": {"res": 2048}}}))
    container, proc = pod.run(net, check=False)
    assert proc.returncode != 0, proc.stdout
    assert 'plugin type="cxi" failed (add)' in proc.stderr, proc.stderr
    assert "cxi0 has no room for this pod's CXI service" in proc.stderr, proc.stderr
    assert "reserves 2048" in proc.stderr, proc.stderr
    assert "cxi doctor" in proc.stderr, "the plugin's fix did not reach the user"
    assert pod.inspect(container)["State"]["Status"] != "running"
    assert_nothing_left(plugin_copy, pod, sim, net)


def test_macvlan_network_gives_a_second_link_with_its_ipam_address(plugin_copy, pod, sim, tmp_path,
                                                                     make_veth):
    master = make_veth()
    subnet = ipaddress.ip_network(f"198.18.{int(pod.run_id[:4], 16) % 250}.0/24")
    ipam_dir = tmp_path / "host-local"
    hsn = pod.cxi_network(cxi_entry(sim, master=master, linkType="macvlan", ipam={
        "type": "host-local", "dataDir": str(ipam_dir), "ranges": [[{"subnet": str(subnet)}]]}))
    bridge_net = pod.bridge_network(None)
    container, _ = pod.run(bridge_net, f"{hsn}:interface_name=hsn0")
    netns_path, inode = pod.netns(container)

    address = pod.inspect(container)["NetworkSettings"]["Networks"][hsn]["IPAddress"]
    assert ipaddress.ip_address(address) in subnet
    shown = pod.podman("exec", container, "ip", "-o", "-4", "addr", "show", "hsn0").stdout
    assert f"inet {address}/{subnet.prefixlen}" in shown, shown
    link = json.loads(sh("ip", "-n", Path(netns_path).name, "-d", "-j", "link", "show",
                         "hsn0").stdout)[0]
    assert link["linkinfo"]["info_kind"] == "macvlan", link
    master_index = int(Path(f"/sys/class/net/{master}/ifindex").read_text())
    assert link["link_index"] == master_index, (link, master_index)
    assert (ipam_dir / hsn / address).exists(), "host-local holds no lease for the address"

    rows = listed_services(plugin_copy, pod.conflist_path(hsn))
    assert sorted(r["device"] for r in rows) == sorted(sim.backend().device_names())
    assert {r["netns_inode"] for r in rows} == {inode} and {r["ifname"] for r in rows} == {"hsn0"}

    pod.podman("rm", "-f", "-t", "0", container)
    assert_nothing_left(plugin_copy, pod, sim, hsn)
    assert not (ipam_dir / hsn / address).exists(), "the address was not released"
