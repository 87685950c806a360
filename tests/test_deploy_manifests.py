"""The manifests in deploy/: parse every object, check its schema, and run the installer's scripts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from kube_apiserver import KubeApiServer, make_pki, new_object, vni_object

from cxi_cni.k8s import READS, pod_vnis

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBECONFIG_ON_HOST = "/etc/cni/net.d/cxi.d/cxi.kubeconfig"
READ_ONLY_VERBS = {"get", "list", "watch"}
# (API group, resource) the plugin reads while walking a pod's owners to its Vni.
NEEDED_READS = set(READS) | {("horizon-opencube.eu", "vniclaims")}


def load_all() -> dict[Path, list[dict]]:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert files, f"no manifests in {DEPLOY}"
    return {f: [doc for doc in yaml.safe_load_all(f.read_text()) if doc is not None] for f in files}


def objects(kind: str) -> list[dict]:
    return [doc for docs in load_all().values() for doc in docs if doc["kind"] == kind]


def only(kind: str, name: str | None = None) -> dict:
    found = [doc for doc in objects(kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", sorted(load_all()), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_object_has_api_version_kind_and_name(path):
    docs = load_all()[path]
    assert docs, f"{path} holds no object"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: an object is not a mapping"
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{path}: apiVersion missing"
        assert isinstance(doc.get("kind"), str) and doc["kind"], f"{path}: kind missing"
        assert isinstance(doc.get("metadata", {}).get("name"), str), f"{path}: metadata.name missing"


def test_rbac_is_read_only_and_covers_every_read():
    role = only("ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= READ_ONLY_VERBS, f"verbs beyond read-only: {rule['verbs']}"
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        granted |= {(group, resource) for group in rule["apiGroups"] for resource in rule["resources"]}
    assert NEEDED_READS <= granted, f"missing: {sorted(NEEDED_READS - granted)}"


def test_binding_ties_the_role_to_the_daemonsets_service_account():
    account, binding, role = only("ServiceAccount"), only("ClusterRoleBinding"), only("ClusterRole")
    daemonset = only("DaemonSet")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kube-system"}
    assert subject in binding["subjects"]
    assert account["metadata"]["namespace"] == daemonset["metadata"]["namespace"] == "kube-system"
    assert daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_daemonset_mounts_the_cni_directories_from_the_host():
    daemonset = only("DaemonSet")
    assert daemonset["apiVersion"] == "apps/v1"
    spec = daemonset["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert set(host_paths.values()) >= {"/opt/cni/bin", "/etc/cni/net.d"}
    mounted = {
        host_paths[m["name"]]
        for container in pod["initContainers"] + pod["containers"]
        for m in container.get("volumeMounts", [])
        if m["name"] in host_paths
    }
    assert mounted >= {"/opt/cni/bin", "/etc/cni/net.d"}
    assert {"operator": "Exists"} in pod["tolerations"], "must run on every node, tainted or not"
    assert pod["hostNetwork"] is True
    assert all(c["image"] for c in pod["initContainers"] + pod["containers"])


def nad_configs() -> dict[str, dict]:
    nads = objects("NetworkAttachmentDefinition")
    return {nad["metadata"]["name"]: (nad, json.loads(nad["spec"]["config"])) for nad in nads}


def test_one_nad_per_nic():
    names = sorted(nad_configs())
    assert names == [f"hsn{n}-cxi" for n in range(4)]


@pytest.mark.parametrize("nic", range(4))
def test_nad_config(nic):
    nad, config = nad_configs()[f"hsn{nic}-cxi"]
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
    assert config["type"] == "cxi"
    assert config["name"] == nad["metadata"]["name"]
    assert config["master"] == f"hsn{nic}"
    assert config["linkType"] == "ipvlan" and config["mode"] == "l2"
    assert config["ipam"]["type"] == "whereabouts" and config["ipam"]["range"]
    assert config["kubeconfig"] == KUBECONFIG_ON_HOST
    assert config["cxi"]["devices"] == "master"
    assert config["cxi"]["vniSources"] == ["kubernetes", "config"]  # never the pod's own cni-args


def test_flannel_patch_appends_cxi_after_flannel_and_portmap():
    configmap = only("ConfigMap", "kube-flannel-cfg")
    conflist = json.loads(configmap["data"]["cni-conf.json"])
    assert [p["type"] for p in conflist["plugins"]] == ["flannel", "portmap", "cxi"]
    assert conflist["plugins"][2]["kubeconfig"] == KUBECONFIG_ON_HOST


def installer_script(container_kind: str) -> str:
    pod = only("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod[container_kind]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def test_install_script_puts_the_binary_and_the_node_policy_in_place(tmp_path):
    (tmp_path / "opt/cni/bin").mkdir(parents=True)
    (tmp_path / "etc/cxi-cni").mkdir(parents=True, mode=0o700)
    binary = tmp_path / "image-cxi"
    binary.write_bytes(b"#!/bin/sh\necho cxi\n")
    policy = tmp_path / "policy-from-configmap.json"
    policy.write_text(only("ConfigMap", "cxi-cni-node-policy")["data"]["policy.json"])
    env = {"PATH": os.environ["PATH"], "CXI_HOST_ROOT": str(tmp_path), "CXI_BINARY": str(binary),
           "CXI_POLICY_SOURCE": str(policy)}
    for _ in range(2):  # a reinstall replaces the files in place
        subprocess.run(["sh", "-c", installer_script("initContainers")], env=env, check=True, capture_output=True)
    installed = tmp_path / "opt/cni/bin/cxi"
    assert installed.read_bytes() == binary.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in installed.parent.iterdir()) == ["cxi"]  # no temporary left behind
    placed = tmp_path / "etc/cxi-cni/policy.json"
    assert placed.read_text() == policy.read_text() and placed.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in placed.parent.iterdir()) == ["policy.json"]


def test_written_kubeconfig_reaches_the_api_server(tmp_path):
    """Run the kubeconfig script as the pod would, then look a VNI up with the file it wrote."""
    pki = make_pki(tmp_path / "pki")
    token = "projected-sa-token-abc123"
    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "token").write_text(token)
    (service_account / "ca.crt").write_text(pki.ca_pem)
    host = tmp_path / "host"
    with KubeApiServer(pki, token) as api:
        env = {
            "PATH": os.environ["PATH"],
            "CXI_HOST_ROOT": str(host),
            "CXI_SA_DIR": str(service_account),
            "CXI_INSTALL_ONCE": "1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api.port),
        }
        subprocess.run(["sh", "-c", installer_script("containers")], env=env, check=True, capture_output=True)
        kubeconfig = host / KUBECONFIG_ON_HOST.lstrip("/")
        config = json.loads(kubeconfig.read_text())  # JSON: the plugin needs no YAML parser for it
        assert config["clusters"][0]["cluster"]["server"] == api.url
        assert (kubeconfig.parent / "token").stat().st_mode & 0o777 == 0o600
        assert kubeconfig.parent.stat().st_mode & 0o777 == 0o700
        job = new_object("batch/v1", "Job", "team-a", "train")
        pod = new_object("v1", "Pod", "team-a", "train-1", owner=job)
        api.add(job, pod, vni_object(job, 4100))
        assert pod_vnis(str(kubeconfig), "team-a", "train-1") == [4100]


def test_the_node_policy_is_one_the_plugin_loads_and_keeps_tenant_sources_off(tmp_path, monkeypatch):
    from cxi_cni.config import policy_validator
    from cxi_cni.nodepolicy import load

    data = only("ConfigMap", "cxi-cni-node-policy")["data"]["policy.json"]
    path = tmp_path / "policy.json"
    path.write_text(data)
    monkeypatch.setenv("CXI_CNI_POLICY", str(path))
    policy = load(policy_validator)
    assert "args" not in policy.vniSources and not policy.podVnis and policy.allowDefaultVni is False
    assert policy.backends == ["libcxi"] and policy.libcxi == ["libcxi.so.1"]
    assert KUBECONFIG_ON_HOST in policy.kubeconfig
    from cxi_cni.cxi.shape import SLURM_MAX  # no pod may reserve more than an eighth of a NIC
    assert {name: cap["res"] for name, cap in policy.limits.items()} == \
        {name: total // 8 for name, total in SLURM_MAX.items()}
    for _, config in nad_configs().values():
        assert set(config["cxi"]["vniSources"]) <= set(policy.vniSources)
