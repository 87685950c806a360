"""The kubelet's path: a private containerd 1.6 runs the frozen plugin over CRI (RunPodSandbox,
StopPodSandbox, RemovePodSandbox) with a bridge + host-local + cxi conflist, as on a k3s or
kubeadm node with flannel. Each test starts its own containerd (config, root, state, socket
and CNI folders under its tmp dir) and removes all it made, even when it fails."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import SimSetup
from cri.client import Pod
from cri.containerd import CGROUP_ROOT, Containerd
from cri.network import chain_entry

pytestmark = pytest.mark.cri

SUBNET = "198.18.{}.0/24"


class Node:
    """A containerd with the sim CXI backend behind its conflist, and what to check on it."""

    def __init__(self, containerd: Containerd, sim: SimSetup):
        self.containerd, self.sim = containerd, sim
        self.conflist_path: Path | None = None

    def network(self, **cxi) -> dict:
        subnet = SUBNET.format(int(self.containerd.run_id[:4], 16) % 250)
        conflist = self.containerd.bridge_conflist(chain_entry(self.sim.conf(cxi=cxi)), subnet)
        self.conflist_path = self.containerd.write_conflist(conflist)
        return conflist

    def start(self, **cxi):
        self.network(**cxi)
        return self.containerd.start()

    def log_lines(self, sandbox_id: str) -> list[dict]:
        if not self.sim.log_file.exists():
            return []
        lines = [json.loads(line) for line in self.sim.log_file.read_text().splitlines()]
        return [line for line in lines if line.get("containerID") == sandbox_id]

    def listed_services(self) -> list[dict]:
        """`cxi services --json` for the conflist's cxi entry, run from containerd's bin dir."""
        proc = subprocess.run([str(self.containerd.bin_dir / "cxi"), "services", "--json", "--config",
                               str(self.conflist_path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def assert_attached(self, sandbox_id: str) -> int:
        """One service per sim device, bound to the inode of the sandbox's netns (the path
        containerd gave CNI, the namespace of the sandbox's process), recorded by the plugin.
        Returns the inode."""
        client = self.containerd.client
        path = client.netns_path(sandbox_id)
        inode = os.stat(path).st_ino
        pid = json.loads(client.status(sandbox_id).info["info"])["pid"]
        assert inode == os.stat(f"/proc/{pid}/ns/net").st_ino, "the netns path is not the sandbox's namespace"
        devices = sorted(self.sim.backend().device_names())
        mine = [s for s in self.sim.services() if s.netns_inode == inode]
        assert sorted(s.device for s in mine) == devices, (mine, devices)
        assert all(s.desc.enable and s.desc.vnis == (100,) for s in mine), mine
        (record,) = [r for r in self.sim.records() if r["containerID"] == sandbox_id]
        assert (record["netns"], record["netnsInode"], record["ifname"], record["complete"]) == (
            path, inode, "eth0", True), record
        assert sorted((s["device"], s["svcId"]) for s in record["services"]) == sorted(
            (s.device, s.desc.svc_id) for s in mine)
        rows = [r for r in self.listed_services() if r["container_id"] == sandbox_id]
        assert sorted(r["device"] for r in rows) == devices and {r["netns_inode"] for r in rows} == {inode}, rows
        return inode

    def assert_nothing_left(self, sandbox_ids=()) -> None:
        """No service, record, sandbox, netns, mount, shim, lease or cached result remains."""
        containerd = self.containerd
        assert self.sim.services() == [], "a service outlived its pod"
        assert self.sim.records() == [], "an attachment record outlived its pod"
        assert containerd.client.sandboxes() == [], "containerd still lists a sandbox"
        assert containerd.netns_mounts() == [], "a netns or rootfs mount is left"
        netns_dir = containerd.root / "run" / "io.containerd.grpc.v1.cri" / "netns"
        assert not netns_dir.exists() or list(netns_dir.iterdir()) == [], "a netns file is left"
        assert containerd.shims() == [], "a shim still runs"
        assert containerd.sandbox_cgroups() == [], "a sandbox cgroup is left"
        assert containerd.leases() == [], "host-local still holds an address"
        for sandbox_id in sandbox_ids:
            assert not containerd.shim_socket(sandbox_id).exists(), "a shim socket is left"
            assert containerd.results_cache(sandbox_id) == [], "libcni's result cache is left"


@pytest.fixture
def node(cxi_bin, tmp_path):
    containerd = Containerd(tmp_path / "containerd", cxi_bin)
    try:
        yield Node(containerd, SimSetup(tmp_path / "sim"))
    finally:
        forced = containerd.cleanup()
        print("cleanup had to remove:", forced or "nothing")


def test_sandbox_gets_a_service_per_device_bound_to_its_netns(node):
    client = node.start()
    assert client.version().runtime_api_version == "v1"
    pod = Pod("team-a", "train-0")
    sandbox_id = node.containerd.run_pod(pod)
    path = client.netns_path(sandbox_id)
    inode = node.assert_attached(sandbox_id)
    assert inode > 0 and client.status(sandbox_id).status.network.ip.startswith("198.18.")

    node.containerd.stop_and_remove(sandbox_id)
    assert not os.path.exists(path)
    node.assert_nothing_left([sandbox_id])


def test_pod_namespace_name_and_uid_reach_every_log_line(node):
    """containerd sends K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID in CNI_ARGS; the
    plugin names the pod on every line it logs for the attachment, ADD and DEL alike."""
    node.start()
    pod = Pod("team-b", "web-7d4f9")
    sandbox_id = node.containerd.run_pod(pod)
    node.containerd.stop_and_remove(sandbox_id)
    lines = node.log_lines(sandbox_id)
    done = [line["command"] for line in lines if line["msg"].endswith(" done")]
    assert done[0] == "ADD" and "DEL" in done and set(done) <= {"ADD", "DEL"}, done
    for line in lines:
        assert (line.get("pod"), line.get("podUID")) == (pod.ref, pod.uid), line
    node.assert_nothing_left([sandbox_id])


@pytest.mark.parametrize("cxi, expected", [
    ({"devices": ["cxi7"]}, "cxi7"),
    ({"vnis": [], "vniPolicy": "required", "vniSources": ["args", "config"]}, "no VNI for this pod"),
], ids=["unknown-device", "required-vni-missing"])
def test_failing_add_fails_run_pod_sandbox_and_leaves_nothing(node, cxi, expected):
    node.start(**cxi)
    pod = Pod("team-c", "broken")
    with pytest.raises(grpc.RpcError) as failure:
        node.containerd.run_pod(pod)
    message = failure.value.details()
    assert 'plugin type="cxi" failed (add)' in message, message
    add_errors = [line for line in node.sim.log_file.read_text().splitlines()
                  if '"ADD"' in line and '"error"' in line]
    assert add_errors, "the plugin logged no failed ADD"
    plugin_msg = json.loads(add_errors[-1]).get("error", "")
    assert expected in message and plugin_msg and plugin_msg in message, (message, plugin_msg)
    node.assert_nothing_left()
    assert not list(Path("/var/lib/cni/results").glob(f"cxicri-{node.containerd.run_id}-*"))


def test_eight_pods_at_once_all_get_their_services(node):
    node.start()
    pods = [Pod("team-d", f"worker-{n}") for n in range(8)]
    with ThreadPoolExecutor(len(pods)) as pool:
        sandbox_ids = list(pool.map(node.containerd.run_pod, pods))
    inodes = [node.assert_attached(sandbox_id) for sandbox_id in sandbox_ids]
    assert len(set(inodes)) == len(pods), "two pods share a namespace inode"
    assert len(node.sim.services()) == len(pods) * len(node.sim.backend().device_names())

    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(node.containerd.stop_and_remove, sandbox_ids))
    node.assert_nothing_left(sandbox_ids)


def test_stop_and_remove_clean_up_after_a_containerd_restart(node):
    node.start()
    pod = Pod("team-e", "survivor")
    sandbox_id = node.containerd.run_pod(pod)
    before = node.assert_attached(sandbox_id)

    first_daemon = node.containerd.process.pid
    client = node.containerd.restart()
    assert node.containerd.process.pid != first_daemon
    assert [s.id for s in client.sandboxes()] == [sandbox_id]
    assert node.assert_attached(sandbox_id) == before, "the restart changed the pod's namespace"

    node.containerd.stop_and_remove(sandbox_id)
    node.assert_nothing_left([sandbox_id])
    done = [line["command"] for line in node.log_lines(sandbox_id) if line["msg"].endswith(" done")]
    assert done[0] == "ADD" and done.count("ADD") == 1, f"the restart re-ran ADD: {done}"



def test_cleanup_after_containerd_is_killed_leaves_nothing_on_the_host(node):
    """The harness's own promise: a test that dies with containerd gone still leaves no
    process, mount, cgroup, shim socket or cached result behind."""
    containerd = node.containerd
    client = node.start()
    sandbox_id = containerd.run_pod(Pod("team-f", "orphan"))
    pid = json.loads(client.status(sandbox_id).info["info"])["pid"]
    assert containerd.shims() and containerd.netns_mounts() and containerd.sandbox_cgroups()
    assert containerd.shim_socket(sandbox_id).exists() and containerd.results_cache(sandbox_id)
    containerd.process.kill()
    containerd.process.wait()

    forced = containerd.cleanup()
    assert f"container {sandbox_id}" in forced, forced
    assert not os.path.exists(f"/proc/{pid}"), "the sandbox's process outlived the cleanup"
    assert containerd.shims() == [] and containerd.netns_mounts() == [] and containerd.sandbox_cgroups() == []
    assert not containerd.shim_socket(sandbox_id).exists() and containerd.results_cache(sandbox_id) == []
    assert not any(CGROUP_ROOT.glob(f"*{containerd.cgroup_parent}")), "the cgroup parent is left"
