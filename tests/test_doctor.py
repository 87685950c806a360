"""`cxi doctor` through the frozen binary on what the operator needs to know before pods fail:
the node policy, the kubeconfig, the API server and the RBAC the VNI lookups need, and the
master link, held to what ADD requires of it."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

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
    policy.write_text(json.dumps({"allowedVnis": ["100-199"], "vniSources": ["kubernetes", "config"],
                                  "limits": {"acs": {"max": 8}}, "tcs": ["best_effort"]}))
    policy.chmod(0o644)
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(), {"CXI_CNI_POLICY": str(policy)})
    assert rc == 0 and lines["node"].startswith("ok"), lines
    for shown in ("allowedVnis 100-199", 'limits {"acs": {"max": 8}}', 'tcs ["best_effort"]'):
        assert shown in lines["node"]
    policy.chmod(0o666)
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(), {"CXI_CNI_POLICY": str(policy)})
    assert rc == 1 and lines["configuration"].startswith("FAIL") and "writable by root alone" in lines[
        "configuration"]


def test_a_master_in_the_pods_namespaces_is_not_looked_for_on_the_node(cxi_bin, sim, tmp_path):
    """linkInContainer: the master lives in each pod's namespace, where ADD looks for it;
    the node not having a link of that name is no failure."""
    master = f"cxp{uuid.uuid4().hex[:8]}"
    assert not os.path.exists(f"/sys/class/net/{master}")
    conf = sim.conf(master=master, linkInContainer=True, ipam={"type": "host-local"})
    rc, lines = doctor(cxi_bin, sim, tmp_path, conf)
    assert rc == 0, lines
    assert lines["master"].startswith("note") and "linkInContainer is true" in lines["master"]


@pytest.mark.parametrize("flaw", [None, "absent", "down", "mtu above the master's"])
def test_the_master_is_held_to_what_add_requires(cxi_bin, sim, tmp_path, make_veth, flaw):
    """On the node, the master must be there, up and have room for the configured MTU, as
    ADD and STATUS require; an up master with a smaller MTU than asked passed before."""
    master = f"cxp{uuid.uuid4().hex[:8]}" if flaw == "absent" else make_veth(up=flaw != "down")
    mtu = {"mtu": 9000} if flaw == "mtu above the master's" else {}
    rc, lines = doctor(cxi_bin, sim, tmp_path, sim.conf(master=master, ipam={"type": "host-local"}, **mtu))
    expected = {None: f"ok master {master}: up, MTU 1500",
                "absent": f"FAIL master {master} does not exist on this node",
                "down": f"FAIL master {master} on this node is down",
                "mtu above the master's": f"FAIL invalid MTU 9000: must be 0..1500, the MTU of "
                                          f"master {master}"}[flaw]
    line = next(line for line in lines.values() if master in line)
    assert line.startswith(expected) and rc == (0 if flaw is None else 1), lines
