"""`cxi doctor` through the frozen binary on what the operator needs to know before pods fail:
the node policy, the kubeconfig, the API server and the RBAC the VNI lookups need."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def doctor(cxi_bin, sim, tmp_path, conf: dict, env: dict | None = None) -> tuple[int, dict[str, str]]:
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    run = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **sim.env, **(env or {})})
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    lines = {}
    for line in run.stdout.splitlines()[:-1]:
        status, _, text = line.partition(" ")
        lines[text.strip().split(":", 1)[0].split(" ")[0]] = f"{status} {text.strip()}"
    return run.returncode, lines


def test_a_healthy_kubernetes_setup(cxi_bin, sim, tmp_path, api, kubeconfig):
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(kubeconfig=kubeconfig))
    assert rc == 0, lines
    assert lines["kubeconfig"].startswith("ok") and api.url in lines["kubeconfig"]
    assert lines["API"].startswith("ok") and "v1.30.2-test" in lines["API"]
    assert lines["RBAC"].startswith("ok") and "jobs.batch.volcano.sh" in lines["RBAC"]
    assert any(path.startswith("POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews")
               for path in api.requests)


def test_rbac_that_lacks_a_read_is_named(cxi_bin, sim, tmp_path, api, kubeconfig):
    api.forbidden.add("namespaces")
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(kubeconfig=kubeconfig))
    assert rc == 1 and lines["RBAC"].startswith("FAIL")
    assert "may not get namespaces;" in lines["RBAC"] and "deploy/rbac.yaml" in lines["RBAC"]


@pytest.mark.parametrize("flaw", ["server down", "wrong token", "missing file"])
def test_a_kubeconfig_that_cannot_serve_is_a_failure(cxi_bin, sim, tmp_path, api, kubeconfig, flaw):
    if flaw == "server down":
        api.stop()
    elif flaw == "wrong token":
        data = json.loads(open(kubeconfig).read())
        data["users"][0]["user"]["token"] = "wrong"
        open(kubeconfig, "w").write(json.dumps(data))
    else:
        kubeconfig = str(tmp_path / "absent.kubeconfig")
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(kubeconfig=kubeconfig))
    assert rc == 1 and lines["kubernetes"].startswith("FAIL"), lines
    assert {"server down": "cannot reach", "wrong token": "401",
            "missing file": "absent.kubeconfig"}[flaw] in lines["kubernetes"]


def test_no_kubeconfig_and_no_node_policy_are_warnings(cxi_bin, sim, tmp_path):
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf())
    assert rc == 0
    assert lines["kubernetes"].startswith("warn") and "no kubeconfig" in lines["kubernetes"]
    assert lines["node"].startswith("warn") and "trusted as the admin's" in lines["node"]


def test_the_node_policy_is_shown(cxi_bin, sim, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowedVnis": ["100-199"], "vniSources": ["kubernetes", "config"]}))
    policy.chmod(0o644)
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(), {"CXI_CNI_POLICY": str(policy)})
    assert rc == 0 and lines["node"].startswith("ok") and "allowedVnis 100-199" in lines["node"]
    policy.chmod(0o666)
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(), {"CXI_CNI_POLICY": str(policy)})
    assert rc == 1 and lines["configuration"].startswith("FAIL") and "writable by root alone" in lines[
        "configuration"]
