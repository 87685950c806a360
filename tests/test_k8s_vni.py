"""pod_vnis against a real HTTPS Kubernetes API server on 127.0.0.1: owner walks, auth, TLS, outages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from kube_apiserver import (
    TOKEN,
    KubeApiServer,
    make_ca,
    new_object,
    vni_object,
    write_kubeconfig,
)

from cxi_cni import k8s
from cxi_cni import kubeconfig as kubeconfig_module
from cxi_cni.k8s import KubeError, KubeUnavailable, pod_vnis

REPO = Path(__file__).resolve().parents[1]
NS = "team-a"


@pytest.fixture
def kubeconfig(api, pki, tmp_path) -> str:
    return str(write_kubeconfig(tmp_path / "cxi.kubeconfig", api.url, pki.ca_pem, token=TOKEN))


def deployment_pod(api: KubeApiServer, name: str = "web") -> tuple[dict, dict, dict]:
    deploy = new_object("apps/v1", "Deployment", NS, name)
    rs = new_object("apps/v1", "ReplicaSet", NS, f"{name}-5d4f8c", owner=deploy)
    pod = new_object("v1", "Pod", NS, f"{name}-5d4f8c-x2x7q", owner=rs)
    api.add(deploy, rs, pod)
    return deploy, rs, pod


def pod_of(owner: dict, name: str) -> dict:
    return new_object("v1", "Pod", owner["metadata"]["namespace"], name, owner=owner)


def test_deployment_pod_gets_the_deployments_vni(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001))
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"]) == [3001]
    assert api.requests[-1] == f"/apis/horizon-opencube.eu/v1/namespaces/{NS}/vnis/vni-{deploy['metadata']['uid']}"


def test_nearest_owner_wins(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001), vni_object(rs, 3002))
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"]) == [3002]
    assert not any("/deployments/" in path for path in api.requests), "walked past the nearest owner"


def test_the_walk_uses_one_tls_connection(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001))
    pod_vnis(kubeconfig, NS, pod["metadata"]["name"])
    # the pod, the ReplicaSet, its Vni (none), the Deployment, its Vni
    assert len(api.requests) == 5
    assert api.connections_accepted == 1


def test_server_that_closes_each_connection(api, kubeconfig):
    api.close_connections = True
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001))
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"]) == [3001]
    assert api.connections_accepted == 5


def test_job_owned_pod(api, kubeconfig):
    job = new_object("batch/v1", "Job", NS, "train")
    pod = pod_of(job, "train-8kq2z")
    api.add(job, pod, vni_object(job, 4100))
    assert pod_vnis(kubeconfig, NS, "train-8kq2z") == [4100]


def test_daemonset_owned_pod(api, kubeconfig):
    ds = new_object("apps/v1", "DaemonSet", NS, "agent")
    api.add(ds, pod_of(ds, "agent-7hj4k"), vni_object(ds, 4200))
    assert pod_vnis(kubeconfig, NS, "agent-7hj4k") == [4200]


def test_volcano_job_owned_pod(api, kubeconfig):
    vcjob = new_object("batch.volcano.sh/v1alpha1", "Job", NS, "mpi")
    api.add(vcjob, pod_of(vcjob, "mpi-worker-0"), vni_object(vcjob, 4300))
    assert pod_vnis(kubeconfig, NS, "mpi-worker-0") == [4300]


def test_volcano_job_found_after_walking_past_it(api, kubeconfig):
    # No Vni for the volcano Job itself: the walk reads the Job to find its owner's Vni.
    outer = new_object("apps/v1", "Deployment", NS, "launcher")
    vcjob = new_object("batch.volcano.sh/v1alpha1", "Job", NS, "mpi", owner=outer)
    api.add(outer, vcjob, pod_of(vcjob, "mpi-worker-1"), vni_object(outer, 4301))
    assert pod_vnis(kubeconfig, NS, "mpi-worker-1") == [4301]
    assert f"/apis/batch.volcano.sh/v1alpha1/namespaces/{NS}/jobs/mpi" in api.requests


def test_owners_joined_to_a_vni_claim_share_its_vni(api, kubeconfig):
    claim = new_object("horizon-opencube.eu/v1", "VniClaim", NS, "shared", spec={"name": "shared"})
    first = new_object("batch/v1", "Job", NS, "solver")
    second = new_object("batch/v1", "Job", NS, "viz")
    for job in (first, second):
        job["metadata"]["annotations"] = {"vni": "shared"}
    api.add(claim, first, second, pod_of(first, "solver-1"), pod_of(second, "viz-1"))
    api.add(vni_object(first, 5005), vni_object(second, 5005))  # what the VNI service makes for a claim
    assert pod_vnis(kubeconfig, NS, "solver-1") == [5005]
    assert pod_vnis(kubeconfig, NS, "viz-1") == [5005]
    assert not any("/vniclaims/" in path for path in api.requests)


def test_vni_list_in_spec(api, kubeconfig):
    job = new_object("batch/v1", "Job", NS, "multi")
    api.add(job, pod_of(job, "multi-1"), vni_object(job, [10, 11]))
    assert pod_vnis(kubeconfig, NS, "multi-1") == [10, 11]


def test_malformed_spec_vni_is_an_error(api, kubeconfig):
    job = new_object("batch/v1", "Job", NS, "odd")
    api.add(job, pod_of(job, "odd-1"), vni_object(job, "3001"))
    with pytest.raises(KubeError, match=r"spec.vni = '3001'"):
        pod_vnis(kubeconfig, NS, "odd-1")


def test_no_vni_object_gives_none(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"]) is None
    bare = new_object("v1", "Pod", NS, "static-pod")
    api.add(bare)
    assert pod_vnis(kubeconfig, NS, "static-pod") is None


def test_deleted_owner_ends_the_walk(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001))
    api.remove(rs)
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"]) is None


def test_a_pod_the_api_does_not_know_has_no_vni(api, kubeconfig):
    """A static pod before its mirror pod exists: 404, no Vni, no error."""
    assert pod_vnis(kubeconfig, NS, "ghost") is None
    with k8s.PodLookup(kubeconfig, NS, "ghost") as lookup:
        assert lookup.facts().found is False


def test_api_down_is_unavailable(api, kubeconfig):
    api.stop()
    with pytest.raises(KubeUnavailable, match="cannot reach the API server"):
        pod_vnis(kubeconfig, NS, "any")


def test_server_error_is_unavailable(api, kubeconfig):
    deployment_pod(api)
    api.fail_status = 500
    with pytest.raises(KubeUnavailable, match="answered 500"):
        pod_vnis(kubeconfig, NS, "web-5d4f8c-x2x7q")


def test_wrong_token_is_a_clear_error_without_the_token(api, pki, tmp_path):
    wrong = "wrong-token-that-must-never-be-printed"
    path = write_kubeconfig(tmp_path / "k", api.url, pki.ca_pem, token=wrong)
    deployment_pod(api)
    with pytest.raises(KubeError) as caught:
        pod_vnis(str(path), NS, "web-5d4f8c-x2x7q")
    message = str(caught.value)
    assert "401" in message and str(path) in message and "credentials" in message
    rendered = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert wrong not in rendered and TOKEN not in rendered


def test_forbidden_resource_names_the_cluster_role(api, kubeconfig):
    outer = new_object("apps/v1", "Deployment", NS, "launcher")
    vcjob = new_object("batch.volcano.sh/v1alpha1", "Job", NS, "mpi", owner=outer)
    api.add(vcjob, pod_of(vcjob, "mpi-worker-0"))
    api.forbidden.add("jobs")
    with pytest.raises(KubeError, match=r"403.*cannot get resource \"jobs\".*ClusterRole"):
        pod_vnis(kubeconfig, NS, "mpi-worker-0")


def test_slow_api_times_out_within_the_bound(api, kubeconfig):
    deployment_pod(api)
    api.delay = 10.0
    started = time.monotonic()
    with pytest.raises(KubeUnavailable, match="timed out|in time"):
        pod_vnis(kubeconfig, NS, "web-5d4f8c-x2x7q", timeout=1.0)
    assert time.monotonic() - started < 1.5


def test_deadline_covers_the_whole_owner_walk(api, kubeconfig):
    deploy, rs, pod = deployment_pod(api)
    api.add(vni_object(deploy, 3001))
    api.delay = 0.3  # each request alone is fast enough; five of them are not
    started = time.monotonic()
    with pytest.raises(KubeUnavailable):
        pod_vnis(kubeconfig, NS, pod["metadata"]["name"], timeout=1.0)
    assert time.monotonic() - started < 1.5
    assert pod_vnis(kubeconfig, NS, pod["metadata"]["name"], timeout=4.0) == [3001]


def test_wrong_ca_fails_tls_verification(api, tmp_path):
    other_ca, _ = make_ca(tmp_path, "some-other-ca")
    path = write_kubeconfig(tmp_path / "k", api.url, other_ca.read_text(), token=TOKEN)
    with pytest.raises(KubeError, match=r"TLS verification of https://127\.0\.0\.1:\d+ failed .*certificate authority"):
        pod_vnis(str(path), NS, "any")
    assert api.requests == []  # nothing, not even the token, was sent


@pytest.mark.parametrize(("name", "works"), [("localhost", True), ("kubernetes.default.svc", False)])
def test_tls_server_name_is_verified(api, pki, tmp_path, name, works):
    path = tmp_path / "k.json"
    write_kubeconfig(path, api.url, pki.ca_pem, token=TOKEN, as_json=True)
    config = json.loads(path.read_text())
    config["clusters"][0]["cluster"]["tls-server-name"] = name
    path.write_text(json.dumps(config))
    api.add(new_object("v1", "Pod", NS, "p"))
    if works:
        assert pod_vnis(str(path), NS, "p") is None
    else:
        with pytest.raises(KubeError, match="Hostname mismatch|TLS verification"):
            pod_vnis(str(path), NS, "p")


def test_client_certificate_login(api, pki, tmp_path):
    path = write_kubeconfig(tmp_path / "k", api.url, pki.ca_pem, client_cert=pki.client_cert, client_key=pki.client_key)
    job = new_object("batch/v1", "Job", NS, "train")
    api.add(job, pod_of(job, "train-1"), vni_object(job, 4100))
    assert pod_vnis(str(path), NS, "train-1") == [4100]


def test_token_file_relative_to_the_kubeconfig(api, pki, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = write_kubeconfig(tmp_path / "k", api.url, pki.ca_pem, token_file="token")
    job = new_object("batch/v1", "Job", NS, "train")
    api.add(job, pod_of(job, "train-1"), vni_object(job, 4100))
    assert pod_vnis(str(path), NS, "train-1") == [4100]


def test_in_cluster_service_account(api, pki, tmp_path, monkeypatch):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "ca.crt").write_text(pki.ca_pem)
    monkeypatch.setattr(kubeconfig_module, "SERVICE_ACCOUNT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    ds = new_object("apps/v1", "DaemonSet", NS, "agent")
    api.add(ds, pod_of(ds, "agent-1"), vni_object(ds, 4200))
    assert pod_vnis(None, NS, "agent-1") == [4200]


def test_no_kubeconfig_outside_a_pod(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="set `kubeconfig`"):
        pod_vnis(None, NS, "p")


def test_bad_kubeconfigs_name_the_file_and_the_key(api, pki, tmp_path):
    missing = tmp_path / "absent.kubeconfig"
    with pytest.raises(KubeError, match=f"cannot open the file {missing}: No such file"):
        pod_vnis(str(missing), NS, "p")

    broken = tmp_path / "broken.kubeconfig"
    broken.write_text(f"users:\n- name: u\n  user:\n    token: {TOKEN}\n   bad: [\n")
    with pytest.raises(KubeError, match=f"{broken} is neither valid JSON nor valid YAML at line") as caught:
        pod_vnis(str(broken), NS, "p")
    assert TOKEN not in str(caught.value)

    no_user = write_kubeconfig(tmp_path / "no-user", api.url, pki.ca_pem)
    with pytest.raises(KubeError, match=f"{no_user}: users.*no token, tokenFile or client certificate"):
        pod_vnis(str(no_user), NS, "p")

    insecure = tmp_path / "insecure.json"
    write_kubeconfig(insecure, api.url, None, token=TOKEN, as_json=True)
    config = json.loads(insecure.read_text())
    config["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
    insecure.write_text(json.dumps(config))
    with pytest.raises(KubeError, match="insecure-skip-tls-verify is refused"):
        pod_vnis(str(insecure), NS, "p")

    bad_ca = write_kubeconfig(tmp_path / "bad-ca", api.url, "not a certificate", token=TOKEN)
    with pytest.raises(KubeError, match="certificate authority is not a valid PEM"):
        pod_vnis(str(bad_ca), NS, "p")
    assert api.requests == []


def _run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_module_loads_nothing_heavy():
    out = _run_python(
        "import sys; before = set(sys.modules); import cxi_cni.k8s; "
        "print(sorted({'ssl', 'http.client', 'yaml'} & (set(sys.modules) - before)))"
    )
    assert out.strip() == "[]"


def test_json_kubeconfig_needs_no_yaml(api, pki, tmp_path):
    path = write_kubeconfig(tmp_path / "k.json", api.url, pki.ca_pem, token=TOKEN, as_json=True)
    job = new_object("batch/v1", "Job", NS, "train")
    api.add(job, pod_of(job, "train-1"), vni_object(job, 4100))
    out = _run_python(
        "import sys; from cxi_cni.k8s import pod_vnis; "
        f"print(pod_vnis({str(path)!r}, {NS!r}, 'train-1'), 'yaml' in sys.modules)"
    )
    assert out.strip() == "[4100] False"


def misshapen(obj: dict, field: str, value) -> dict:
    """`obj` with the dotted `field` set to `value` (the API server's answer gone wrong)."""
    *parents, last = field.split(".")
    target = obj
    for name in parents:
        target = target.setdefault(name, {})
    target[last] = value
    return obj


@pytest.mark.parametrize(("which", "field", "value"), [
    ("pod", "metadata", "s"), ("pod", "metadata.ownerReferences", 5), ("pod", "spec", "x"),
    ("pod", "spec.containers", ["x"]), ("replicaset", "metadata", [1]), ("vni", "spec", 5)])
def test_an_answer_not_shaped_as_kubernetes_writes_it_is_a_kube_error(api, kubeconfig, which, field,
                                                                      value):
    """The plugin trusts the API server for facts, not for never sending nonsense: a field of
    the wrong type is a KubeError naming the pod (code 104 in ADD), not an internal error."""
    from kube_apiserver import path_of

    deploy, rs, pod = deployment_pod(api)
    vni = vni_object(deploy, 4100)
    api.add(vni)
    obj = {"pod": pod, "replicaset": rs, "vni": vni}[which]
    path = path_of(obj)
    api.objects[path] = misshapen(json.loads(json.dumps(obj)), field, value)
    with pytest.raises(KubeError, match="not shaped as Kubernetes writes it"):
        with k8s.PodLookup(kubeconfig, NS, pod["metadata"]["name"]) as lookup:
            lookup.facts()


@pytest.mark.parametrize("kubeconfig_text", ['{"contexts": 5}', '{"contexts": ["x"]}',
                                             '[' * 5000 + ']' * 5000,
                                             '{"clusters": [{"name": "c", "cluster": {"server": "https://[::1"}}]}'])
def test_a_kubeconfig_not_shaped_as_kubectl_writes_it_is_a_kube_error(tmp_path, kubeconfig_text):
    path = tmp_path / "odd.kubeconfig"
    path.write_text(kubeconfig_text)
    path.chmod(0o600)
    with pytest.raises(KubeError):
        k8s.PodLookup(str(path), NS, "web")
