"""The DaemonSet's image, built by deploy/build-image.sh, runs the installer containers of
deploy/daemonset.yaml under podman as kubelet would (their command, args and volume mounts
from the YAML, a host root of the test's, a service-account folder): the binary lands where
runtimes run it and works, and the kubeconfig is one the plugin reads. containerd imports
the same archive, as the header of daemonset.yaml tells k3s users to."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from cnitool import run_cni
from conftest import REPO
from cri.containerd import Containerd
from kube_apiserver import TOKEN, new_object, vni_object
from test_deploy_manifests import KUBECONFIG_ON_HOST, only

from cxi_cni.k8s import load_access, pod_vnis

pytestmark = pytest.mark.podman

BUILD_IMAGE = REPO / "deploy" / "build-image.sh"
PODMAN_CONF = REPO / "tests" / "podman" / "containers.conf"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# busybox-static and its applet links, beside the binary: all the image holds.
BUSYBOX_ALLOWANCE = 3 * 1024 * 1024


@pytest.fixture(scope="session")
def image(cxi_bin, tmp_path_factory) -> tuple[str, Path]:
    """(image name, OCI archive) of the installer image, built from the binary under test."""
    name = f"localhost/cxi-cni-test-installer:{uuid.uuid4().hex[:10]}"
    archive = tmp_path_factory.mktemp("image") / "cxi-cni-image.tar"
    proc = subprocess.run([str(BUILD_IMAGE), name, str(archive)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CXI_BINARY": cxi_bin})
    assert proc.returncode == 0, f"deploy/build-image.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return name, archive


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)})
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed rc={proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def loaded_image(image) -> str:
    name, archive = image
    if subprocess.run(["sh", "-c", "command -v podman"], capture_output=True).returncode != 0:
        pytest.fail("podman is missing: tests/run.sh installs it")
    podman("load", "-q", "-i", str(archive))
    try:
        yield name
    finally:
        podman("rmi", "-f", name, check=False)


def run_container(image_name: str, kind: str, host_root: Path, env: dict[str, str], *extra: str) -> str:
    """Run the DaemonSet's (only) container of `kind` as kubelet would: its command as the
    entrypoint, its args, each volumeMount bound to its hostPath under `host_root`
    (DirectoryOrCreate), host networking left out (the scripts need none)."""
    pod = only("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod[kind]
    sources = {}
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            sources[volume["name"]] = host_root / volume["hostPath"]["path"].lstrip("/")
        else:  # a ConfigMap: its data as files, as kubelet projects them
            folder = host_root.parent / f"configmap-{volume['name']}"
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in only("ConfigMap", volume["configMap"]["name"])["data"].items():
                (folder / key).write_text(text)
            sources[volume["name"]] = folder
    mounts = []
    for mount in container["volumeMounts"]:
        sources[mount["name"]].mkdir(parents=True, exist_ok=True)
        mounts += ["-v", f"{sources[mount['name']]}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
    name = f"cxit-install-{uuid.uuid4().hex[:10]}"
    try:
        proc = podman("run", "--rm", "--name", name, "--network", "none", *mounts, *extra,
                      *[f"--env={key}={value}" for key, value in env.items()],
                      "--entrypoint", json.dumps(container["command"]), image_name, *container["args"])
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    return proc.stdout


def archive_contents(archive: Path) -> tuple[list[str], dict[str, tarfile.TarInfo]]:
    """The image names in an OCI archive's index, and the files of its one layer."""
    with tarfile.open(archive) as outer:
        def blob(digest: str):
            return outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1])

        index = json.load(outer.extractfile("index.json"))
        names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        (layer,) = json.load(blob(index["manifests"][0]["digest"]))["layers"]
        with tarfile.open(fileobj=blob(layer["digest"])) as files:
            return names, {m.name.lstrip("./"): m for m in files.getmembers() if m.name.strip("./")}


def test_image_is_busybox_and_the_binary_only(image, cxi_bin):
    name, archive = image
    size = archive.stat().st_size
    print(f"installer image archive: {size / 2**20:.1f} MiB")
    assert size <= Path(cxi_bin).stat().st_size + BUSYBOX_ALLOWANCE, f"the image grew to {size} bytes"
    names, members = archive_contents(archive)
    assert names == [name]
    assert {path.split("/")[0] for path in members} == {"bin", "tmp", "cxi"}, sorted(members)
    applets = [m for path, m in members.items() if path.startswith("bin/") and path != "bin/busybox"]
    assert len(applets) > 100 and all(m.issym() and m.linkname == "busybox" for m in applets)
    assert members["cxi"].size == Path(cxi_bin).stat().st_size and members["cxi"].mode & 0o777 == 0o755


def test_installer_containers_install_the_binary_and_a_kubeconfig_the_plugin_reads(
        loaded_image, cxi_bin, tmp_path, pki, api):
    host = tmp_path / "host"
    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "token").write_text(TOKEN)
    (service_account / "ca.crt").write_text(pki.ca_pem)
    kube_env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}

    out = run_container(loaded_image, "initContainers", host, kube_env)
    installed = host / "opt/cni/bin/cxi"
    assert "installed /host/opt/cni/bin/cxi" in out, out
    policy = host / "etc/cxi-cni/policy.json"
    assert json.loads(policy.read_text())["vniSources"] == ["kubernetes", "config", "cniArgs"]
    assert policy.stat().st_mode & 0o777 == 0o644 and policy.parent.stat().st_mode & 0o777 == 0o755
    assert installed.read_bytes() == Path(cxi_bin).read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in installed.parent.iterdir()) == ["cxi"], "a temporary file is left"
    version = run_cni(str(installed), "VERSION", {"cniVersion": "1.0.0"}).ok().json
    assert "1.0.0" in version["supportedVersions"], version

    run_container(loaded_image, "containers", host, {**kube_env, "CXI_INSTALL_ONCE": "1"},
                  "-v", f"{service_account}:{SERVICE_ACCOUNT}:ro")
    kubeconfig = host / KUBECONFIG_ON_HOST.lstrip("/")
    assert kubeconfig.parent.stat().st_mode & 0o777 == 0o700
    assert (kubeconfig.parent / "token").stat().st_mode & 0o777 == 0o600
    access = load_access(str(kubeconfig))
    assert access.server == api.url
    assert access.ca_pem.strip() == pki.ca_pem.strip()
    assert Path(access.token_file).read_text() == TOKEN
    job = new_object("batch/v1", "Job", "team-a", "train")
    pod = new_object("v1", "Pod", "team-a", "train-1", owner=job)
    api.add(job, pod, vni_object(job, 4242))
    assert pod_vnis(str(kubeconfig), "team-a", "train-1") == [4242]


@pytest.mark.cri
def test_containerd_imports_the_archive_under_its_name(image, cxi_bin, tmp_path):
    """What the header of daemonset.yaml tells k3s users: `ctr -n k8s.io images import`."""
    name, archive = image
    containerd = Containerd(tmp_path / "containerd", cxi_bin)
    try:
        containerd.write_conflist(containerd.bridge_conflist(None, "198.18.0.0/24"))
        containerd.start()
        containerd.ctr("images", "import", str(archive))
        assert name in containerd.ctr("images", "ls", "-q").split()
    finally:
        containerd.cleanup()
