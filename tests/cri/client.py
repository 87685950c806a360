"""A small CRI client over grpcio: the RuntimeService calls a kubelet makes for pod sandboxes,
from runtime.proto (compiled with grpcio-tools into a folder of the caller's choosing)."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path
from types import ModuleType

import grpc

PROTO = Path(__file__).resolve().with_name("runtime.proto")
TIMEOUT = 120


def compile_protocol(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """runtime_pb2 (messages) and runtime_pb2_grpc (the stub), generated from runtime.proto."""
    from grpc_tools import protoc

    if "runtime_pb2" not in sys.modules:
        out_dir.mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{PROTO.parent}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpcio-tools could not compile {PROTO}")
        sys.path.insert(0, str(out_dir))
        try:
            importlib.import_module("runtime_pb2")
            importlib.import_module("runtime_pb2_grpc")
        finally:
            sys.path.remove(str(out_dir))
    return sys.modules["runtime_pb2"], sys.modules["runtime_pb2_grpc"]


class Pod:
    """A pod as the kubelet names it: namespace, name, uid."""

    def __init__(self, namespace: str, name: str, uid: str | None = None):
        self.namespace, self.name = namespace, name
        self.uid = uid or str(uuid.uuid4())

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class CriClient:
    def __init__(self, socket: Path, protos_dir: Path, labels: dict[str, str], cgroup_parent: str):
        self.pb, grpc_module = compile_protocol(protos_dir)
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = grpc_module.RuntimeServiceStub(self.channel)
        self.labels = labels  # put on every sandbox, to list only ours
        self.cgroup_parent = cgroup_parent

    def close(self) -> None:
        self.channel.close()

    def version(self, timeout: float = TIMEOUT):
        return self.stub.Version(self.pb.VersionRequest(version="v1"), timeout=timeout)

    def run_pod(self, pod: Pod, log_dir: Path) -> str:
        config = self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(name=pod.name, namespace=pod.namespace, uid=pod.uid),
            hostname=pod.name, log_directory=str(log_dir / pod.uid), labels=self.labels,
            linux=self.pb.LinuxPodSandboxConfig(cgroup_parent=self.cgroup_parent))
        return self.stub.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config), timeout=TIMEOUT).pod_sandbox_id

    def status(self, sandbox_id: str):
        return self.stub.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                                          timeout=TIMEOUT)

    def netns_path(self, sandbox_id: str) -> str:
        """The network namespace containerd made for the sandbox and gave to CNI: the
        `network` namespace of the sandbox's OCI spec, in the verbose status info."""
        info = json.loads(self.status(sandbox_id).info["info"])
        (path,) = [ns["path"] for ns in info["runtimeSpec"]["linux"]["namespaces"] if ns["type"] == "network"]
        return path

    def stop(self, sandbox_id: str) -> None:
        self.stub.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=TIMEOUT)

    def remove(self, sandbox_id: str) -> None:
        self.stub.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=TIMEOUT)

    def sandboxes(self) -> list:
        """Every sandbox carrying this client's labels."""
        request = self.pb.ListPodSandboxRequest(filter=self.pb.PodSandboxFilter(label_selector=self.labels))
        return list(self.stub.ListPodSandbox(request, timeout=TIMEOUT).items)
