"""A private containerd 1.6 with its own config, root, state, socket and CNI folders, the way
a kubelet's node runs it; everything it makes is removed by cleanup(), even after failures.

containerd still puts a few things outside its folders whatever the config says: shim
sockets under /run/containerd/s and libcni's result cache under /var/lib/cni/results.
cleanup() removes the entries of this instance's sandboxes there, and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from cri.client import CriClient
from cri.network import bridge_chain, leases
from cri.oci_image import pause_archive

GO_PLUGINS = Path("/usr/lib/cni")
RESULTS_CACHE = Path("/var/lib/cni/results")
SHIM_SOCKETS = Path("/run/containerd/s")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NAMESPACE = "k8s.io"
START_TIMEOUT = 60
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; containerd adds ".ttrpc" for its second socket


def require_tools() -> None:
    missing = [tool for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc") if not shutil.which(tool)]
    missing += [str(GO_PLUGINS / p) for p in ("bridge", "host-local", "loopback") if not (GO_PLUGINS / p).exists()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: tests/run.sh installs containerd, runc and "
                           "containernetworking-plugins")


def config_toml(root: Path, sandbox_image: str) -> str:
    """Each setting below is needed here: runc cannot set oom_score_adj -998 in this
    sandbox (restrict_oom_score_adj), there is no systemd (SystemdCgroup = false), and the
    netns bind mounts, runc state and opt folder stay under the instance's own folders."""
    return f"""version = 2
root = "{root / 'lib'}"
state = "{root / 'run'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{root / 'containerd.sock'}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{root / 'cni-bin'}"
    conf_dir = "{root / 'net.d'}"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{root / 'runc'}"
"""


class Containerd:
    """One containerd instance under `root`. The CNI network is a conflist written before
    start (containerd 1.6 does not pick up a conflist renamed into its folder later)."""

    def __init__(self, root: Path, cxi_binary: str):
        require_tools()
        self.root = root
        self.run_id = uuid.uuid4().hex[:10]
        self.socket = root / "containerd.sock"
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise RuntimeError(f"{self.socket} is too long for a unix socket: use a shorter temporary folder")
        self.conf_dir, self.bin_dir = root / "net.d", root / "cni-bin"
        self.pod_logs = root / "pods"
        for folder in (self.conf_dir, self.bin_dir, self.pod_logs):
            folder.mkdir(parents=True, exist_ok=True)
        for plugin in GO_PLUGINS.iterdir():
            (self.bin_dir / plugin.name).symlink_to(plugin)
        shutil.copy2(cxi_binary, self.bin_dir / "cxi")  # a whole file: a rebuild cannot pull it away
        self.sandbox_image = f"localhost/cxi-cni-test-pause:{self.run_id}"
        self.cgroup_parent = f"/cxi-cni-test-{self.run_id}"  # the sandboxes' cgroups, ours alone
        self.config = root / "containerd.toml"
        self.config.write_text(config_toml(root, self.sandbox_image))
        self.log = root / "containerd.log"
        self.process: subprocess.Popen | None = None
        self.client: CriClient | None = None
        self.image_imported = False
        self.sandbox_ids: set[str] = set()
        self.network_names: set[str] = set()
        self.bridges: set[str] = set()
        self.had_shim_dir = SHIM_SOCKETS.exists()

    # --- the network ---------------------------------------------------------------------
    def bridge_conflist(self, cxi_entry: dict | None, subnet: str) -> dict:
        """A network of this instance's own (name, bridge device, IPAM folder)."""
        name = f"cxicri-{self.run_id}-{len(self.network_names)}"
        bridge = f"cxc{uuid.uuid4().hex[:8]}"
        self.network_names.add(name)
        self.bridges.add(bridge)
        return bridge_chain(name, bridge, self.root / "ipam", subnet, cxi_entry)

    def write_conflist(self, conflist: dict) -> Path:
        path = self.conf_dir / "10-test.conflist"
        path.write_text(json.dumps(conflist, indent=2))
        return path

    def leases(self) -> list[str]:
        return leases(self.root / "ipam")

    # --- the daemon ----------------------------------------------------------------------
    def start(self) -> CriClient:
        """Start the daemon and wait for its CRI; the first start imports the pause image
        (containerd's CRI picks up images imported while it runs, as on a k3s node)."""
        self._spawn()
        if self.client is None:
            self.client = CriClient(self.socket, self.root / "protos", {"cxi-cni-test": self.run_id},
                                    self.cgroup_parent)
        self._wait_ready()
        if not self.image_imported:
            archive = self.root / "pause.tar"
            pause_archive(archive, self.sandbox_image)
            self.ctr("images", "import", str(archive))
            self.image_imported = True
        return self.client

    def _spawn(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start (rc={self.process.poll()}):\n{self.log_tail()}")
            time.sleep(0.05)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.client.version(timeout=5)
                return
            except Exception as error:  # grpc.RpcError until the CRI plugin serves
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"containerd's CRI did not answer: {error}\n{self.log_tail()}") from error
                time.sleep(0.1)

    def ctr(self, *args: str) -> str:
        proc = subprocess.run(["ctr", "-a", str(self.socket), "-n", NAMESPACE, *args], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def stop(self) -> None:
        """Stop the daemon (SIGTERM; the shims and the pods live on, as on a node)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.socket.unlink(missing_ok=True)

    def restart(self) -> CriClient:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    # --- sandboxes -----------------------------------------------------------------------
    def run_pod(self, pod) -> str:
        """RunPodSandbox, remembering the id for cleanup as soon as containerd gives it."""
        sandbox_id = self.client.run_pod(pod, self.pod_logs)
        self.sandbox_ids.add(sandbox_id)
        return sandbox_id

    def stop_and_remove(self, sandbox_id: str) -> None:
        self.client.stop(sandbox_id)
        self.client.remove(sandbox_id)

    def shim_socket(self, sandbox_id: str) -> Path:
        """Where the runc v2 shim of a sandbox listens: sha256 of containerd's address, the
        namespace and the sandbox id, under /run/containerd/s."""
        key = os.path.join(str(self.socket), NAMESPACE, sandbox_id)
        return SHIM_SOCKETS / hashlib.sha256(key.encode()).hexdigest()

    def recorded_sandbox_ids(self) -> set[str]:
        """Sandboxes containerd or runc have a record of, even ones whose RunPodSandbox
        never returned an id to us."""
        folders = [self.root / "lib" / "io.containerd.grpc.v1.cri" / "sandboxes",
                   self.root / "run" / "io.containerd.runtime.v2.task" / NAMESPACE, self.root / "runc" / NAMESPACE]
        return {entry.name for folder in folders if folder.is_dir() for entry in folder.iterdir()}

    def results_cache(self, sandbox_id: str) -> list[Path]:
        """libcni's cached results for a sandbox, as containerd stores them."""
        return sorted(RESULTS_CACHE.glob(f"*-{sandbox_id}-*")) if RESULTS_CACHE.exists() else []

    def netns_mounts(self) -> list[str]:
        """Mount points under this instance's folders (netns bind mounts, rootfs overlays)."""
        mounts = []
        with open("/proc/self/mountinfo") as info:
            for line in info:
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(str(self.root) + "/"):
                    mounts.append(point)
        return mounts

    def shims(self) -> list[int]:
        """Pids of runc shims serving this instance (their command line names our socket)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                pids.append(int(proc.name))
        return pids

    def cgroup_dirs(self) -> list[Path]:
        """This instance's cgroup parent and everything under it, in every hierarchy (cgroup
        v1 controllers, v2, or both on a hybrid host), deepest first."""
        name = self.cgroup_parent.lstrip("/")
        tops = [CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")]
        found = [d for top in tops if top.is_dir() for d in (top, *top.rglob("*")) if d.is_dir()]
        return sorted(found, key=lambda path: len(path.parts), reverse=True)

    def sandbox_cgroups(self) -> list[str]:
        """The sandboxes' own cgroups (children of the parent) that still exist."""
        return sorted({d.name for d in self.cgroup_dirs() if d.name != self.cgroup_parent.lstrip("/")})

    def cleanup(self) -> list[str]:
        """Remove everything this instance made; returns what had to be removed by force
        (sandboxes containerd did not remove itself), for the caller's report."""
        forced = []
        if self.process and self.process.poll() is None and self.client:
            try:
                for sandbox in self.client.sandboxes():
                    self.sandbox_ids.add(sandbox.id)
                    forced.append(f"sandbox {sandbox.id}")
                    self.stop_and_remove(sandbox.id)
            except Exception as error:  # keep cleaning; the daemon goes next
                forced.append(f"CRI cleanup failed: {error}")
        self.stop()
        if self.client:
            self.client.close()
        runc_root = self.root / "runc" / NAMESPACE
        for state in sorted(runc_root.iterdir()) if runc_root.exists() else []:
            forced.append(f"container {state.name}")  # its process outlives a killed shim
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", state.name], capture_output=True)
        for pid in self.shims():
            forced.append(f"shim {pid}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for point in sorted(self.netns_mounts(), key=len, reverse=True):
            forced.append(f"mount {point}")
            subprocess.run(["umount", "-l", point], capture_output=True)
        for sandbox_id in self.sandbox_ids | self.recorded_sandbox_ids():
            self.shim_socket(sandbox_id).unlink(missing_ok=True)
            for cached in self.results_cache(sandbox_id):
                cached.unlink(missing_ok=True)
        for name in self.network_names:
            for cached in RESULTS_CACHE.glob(f"{name}-*"):
                cached.unlink(missing_ok=True)
        for bridge in self.bridges:
            if Path(f"/sys/class/net/{bridge}").exists():
                subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        forced += [f"cgroup {name}" for name in self.sandbox_cgroups()]
        for cgroup in self.cgroup_dirs():
            try:
                cgroup.rmdir()  # only empty cgroups can go; runc delete emptied ours
            except OSError:
                pass
        if not self.had_shim_dir:
            for folder in (SHIM_SOCKETS, SHIM_SOCKETS.parent):
                try:
                    folder.rmdir()
                except OSError:
                    break
        return forced
