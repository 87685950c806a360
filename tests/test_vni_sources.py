"""Per-job VNIs through the frozen binary: Multus cni-args, CNI_ARGS, the pod owner's Vni
object read from a real HTTPS API server on 127.0.0.1, and cxi.vnis, first match wins."""

from __future__ import annotations

import json
import time

import pytest
from kube_apiserver import new_object, pod_args, vni_object, write_kubeconfig

NS = "team-b"


def deployment_pod(api, name="train"):
    deploy = new_object("apps/v1", "Deployment", NS, name)
    rs = new_object("apps/v1", "ReplicaSet", NS, f"{name}-6b9f", owner=deploy)
    pod = new_object("v1", "Pod", NS, f"{name}-6b9f-abcde", owner=rs)
    api.add(deploy, rs, pod)
    return deploy, rs, pod


def service_vnis(sim) -> list[list[int]]:
    return [list(s.desc.vnis) for s in sim.services()]


def kube_conf(sim, kubeconfig, **cxi):
    return sim.conf(kubeconfig=kubeconfig, cxi={"vnis": [], **cxi})


def test_deployment_pod_gets_its_deployments_vni(cni, sim, netns, api, kubeconfig):
    deploy, _, pod = deployment_pod(api)
    api.add(vni_object(deploy, 4100))
    conf = kube_conf(sim, kubeconfig)
    result = cni("ADD", conf, netns=netns, cni_args=pod_args(pod)).ok().json
    assert result["cxi"]["vnis"] == [4100]
    assert service_vnis(sim) == [[4100], [4100]]
    assert sim.records()[0]["vnis"] == [4100]
    cni("CHECK", conf, netns=netns, cni_args=pod_args(pod)).ok()
    api.add(vni_object(deploy, 4200))  # the VNI service gave the job another VNI
    err = cni("CHECK", conf, netns=netns, cni_args=pod_args(pod)).error(100)
    assert "VNIs are now [4200]" in err["msg"]


def test_job_owned_pod(cni, sim, netns, api, kubeconfig):
    job = new_object("batch/v1", "Job", NS, "sim-run")
    pod = new_object("v1", "Pod", NS, "sim-run-xyz", owner=job)
    api.add(job, pod, vni_object(job, 5100))
    cni("ADD", kube_conf(sim, kubeconfig), netns=netns, cni_args=pod_args(pod)).ok()
    assert service_vnis(sim) == [[5100], [5100]]


def test_vni_claim_joined_owner_uses_the_claims_vni(cni, sim, netns, api, kubeconfig):
    """Two Deployments annotated with the same claim get their own Vni objects carrying
    the claim's VNI; both pods end up with it."""
    claim = new_object("horizon-opencube.eu/v1", "VniClaim", NS, "shared", spec={"name": "shared"})
    api.add(claim)
    first, _, pod1 = deployment_pod(api, "a")
    second, _, pod2 = deployment_pod(api, "b")
    api.add(vni_object(first, 6100), vni_object(second, 6100))
    cni("ADD", kube_conf(sim, kubeconfig), netns=netns, container_id="p1", cni_args=pod_args(pod1)).ok()
    assert service_vnis(sim) == [[6100], [6100]]


def test_no_vni_object_required_vs_fallback(cni, sim, netns, api, kubeconfig):
    _, _, pod = deployment_pod(api)
    required = kube_conf(sim, kubeconfig, vniSources=["args", "kubernetes"], vniPolicy="required")
    err = cni("ADD", required, netns=netns, cni_args=pod_args(pod)).error(7)
    assert "no VNI for this pod" in err["msg"]
    assert sim.services() == [] and sim.records() == []
    fallback = kube_conf(sim, kubeconfig, vniSources=["args", "kubernetes"], vniPolicy="fallback",
                         vnis=[7100])
    cni("ADD", fallback, netns=netns, cni_args=pod_args(pod)).ok()
    assert service_vnis(sim) == [[7100], [7100]]


def test_api_down_is_try_again_later(cni, sim, netns, api, kubeconfig):
    _, _, pod = deployment_pod(api)
    api.stop()
    err = cni("ADD", kube_conf(sim, kubeconfig), netns=netns, cni_args=pod_args(pod)).error(11)
    assert "cannot reach the Kubernetes API" in err["msg"]
    assert sim.services() == [] and sim.records() == []


def test_wrong_token_is_a_clear_error_without_the_token(cni, sim, netns, api, pki, tmp_path):
    _, _, pod = deployment_pod(api)
    bad = "wrong-token-abcdef987654"
    path = write_kubeconfig(tmp_path / "bad.kubeconfig", api.url, pki.ca_pem, token=bad, as_json=True)
    run = cni("ADD", kube_conf(sim, str(path)), netns=netns, cni_args=pod_args(pod))
    err = run.error(104)
    assert "401" in err["msg"] and bad not in run.stdout + run.stderr
    assert bad not in sim.log_file.read_text()
    assert sim.services() == []


def test_slow_api_times_out(cni, sim, netns, api, kubeconfig):
    _, _, pod = deployment_pod(api)
    api.delay = 30
    started = time.monotonic()
    err = cni("ADD", kube_conf(sim, kubeconfig), netns=netns, cni_args=pod_args(pod)).error(11)
    assert time.monotonic() - started < 15, "the lookup was not bounded"
    assert "cannot reach the Kubernetes API" in err["msg"]


def test_multus_cni_args_override_kubernetes_where_the_admin_allows_it(cni, sim, netns, api, kubeconfig):
    deploy, _, pod = deployment_pod(api)
    api.add(vni_object(deploy, 4100))
    conf = kube_conf(sim, kubeconfig, vnis=[900], vniSources=["args", "kubernetes", "config"],
                     podVnis=["8100-8199"])
    conf["args"] = {"cni": {"vni": [8100, 8101]}}
    cni("ADD", conf, netns=netns, cni_args=pod_args(pod)).ok()
    assert service_vnis(sim) == [[8100, 8101], [8100, 8101]]
    assert not any("/vnis/" in path for path in api.requests), "the Vni was read although cni-args gave the VNIs"


def test_cni_args_vni_and_its_validation(cni, sim, netns):
    conf = sim.conf(cxi={"vniSources": ["cniArgs", "config"]})
    cni("ADD", conf, netns=netns, cni_args="IgnoreUnknown=1;VNI=300,301").ok()
    assert service_vnis(sim) == [[300, 301], [300, 301]]
    err = cni("ADD", conf, netns=netns, container_id="c2", cni_args="VNI=70000").error(4)
    assert "70000" in err["msg"]
    err = cni("ADD", sim.conf(cxi={"vniSources": ["cniArgs"], "vniPolicy": "required"}), netns=netns,
              container_id="c3", cni_args="VNI=1").error(107)
    assert "VNI 1" in err["msg"] and "CNI_ARGS VNI" in err["msg"]


def test_without_kubeconfig_the_kubernetes_source_is_skipped(cni, sim, netns):
    """A node with no kubeconfig: pods still get cxi.vnis (flannel chain default)."""
    cni("ADD", sim.conf(), netns=netns, cni_args="K8S_POD_NAMESPACE=a;K8S_POD_NAME=b").ok()
    assert service_vnis(sim) == [[100], [100]]


def test_log_lines_name_the_pod(cni, sim, netns):
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-b;K8S_POD_NAME=train-0;K8S_POD_UID=1234-abcd"
    cni("ADD", sim.conf(), netns=netns, cni_args=args).ok()
    lines = [json.loads(line) for line in sim.log_file.read_text().splitlines()]
    assert lines and all(line["pod"] == "team-b/train-0" and line["podUID"] == "1234-abcd"
                         for line in lines)


@pytest.mark.parametrize("key,value", [("K8S_POD_NAME", "../../api/v1/secrets"),
                                       ("K8S_POD_NAMESPACE", "Team_B"),
                                       ("K8S_POD_NAME", "x" * 254)])
def test_pod_names_are_checked_before_they_reach_a_url(cni, sim, netns, api, kubeconfig, key, value):
    names = {"K8S_POD_NAMESPACE": NS, "K8S_POD_NAME": "p", key: value}
    args = ";".join(f"{k}={v}" for k, v in names.items())
    err = cni("ADD", kube_conf(sim, kubeconfig), netns=netns, cni_args=args).error(4)
    assert key in err["msg"] and "not a Kubernetes name" in err["msg"]
    assert api.requests == [] and sim.services() == [] and sim.records() == []
