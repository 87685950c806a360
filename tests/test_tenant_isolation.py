"""Tenant isolation through the frozen binary against the test API server: a pod gets only the
VNIs its job was given unless the admin allowed more (SECURITY.md names who writes what).
Every refusal is a CNI error or a pod without a service, as vniPolicy says, with nothing
made and a log line naming the refused source."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from kube_apiserver import namespace_object, new_object, pod_args, vni_object

NS = "team-c"
OTHER_JOBS_VNI = 4242


def job_pod(api, name: str = "train", vni=None, namespace: str = NS):
    job = new_object("batch/v1", "Job", namespace, name)
    pod = new_object("v1", "Pod", namespace, f"{name}-x7k2p", owner=job)
    api.add(job, pod)
    if vni is not None:
        api.add(vni_object(job, vni))
    return job, pod


def bare_pod(api, name: str, refs: list[dict]):
    pod = new_object("v1", "Pod", NS, name)
    pod["metadata"]["ownerReferences"] = refs
    api.add(pod)
    return pod


def job_ref(name: str, uid: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": True}


def conf_for(sim, kubeconfig, multus_vni=None, **cxi):
    conf = sim.conf(kubeconfig=kubeconfig, cxi={"vnis": [], **cxi})
    if multus_vni is not None:
        conf["args"] = {"cni": {"vni": multus_vni}}
    return conf


def service_vnis(sim) -> list[list[int]]:
    return sorted(list(s.desc.vnis) for s in sim.services())


def log_lines(sim) -> list[dict]:
    return [json.loads(line) for line in sim.log_file.read_text().splitlines()]


def logged(sim, *needles: str) -> bool:
    return any(all(n in line["msg"] for n in needles) for line in log_lines(sim))


def nothing_made(sim):
    assert sim.services() == [] and sim.records() == []


ARGS_ON = {"vniSources": ["args", "kubernetes", "config"]}


def test_cni_args_cannot_pick_another_jobs_vni_under_defaults(cni, sim, netns, make_netns, api,
                                                              kubeconfig):
    _, own = job_pod(api, "mine", vni=4100)
    cni("ADD", conf_for(sim, kubeconfig, OTHER_JOBS_VNI), netns=netns, cni_args=pod_args(own)).ok()
    assert service_vnis(sim) == [[4100], [4100]]
    _, bare = job_pod(api, "novni")  # an owner without a Vni object
    other = make_netns()
    result = cni("ADD", conf_for(sim, kubeconfig, OTHER_JOBS_VNI), netns=other, container_id="c2",
                 cni_args=pod_args(bare)).ok().json
    assert result["cxi"]["vnis"] == [] and OTHER_JOBS_VNI not in sum(service_vnis(sim), [])
    assert logged(sim, "args.cni.vni", "ignored")


@pytest.mark.parametrize("policy", ["fallback", "required"])
def test_cni_args_outside_the_allow_list(cni, sim, netns, api, kubeconfig, policy):
    _, pod = job_pod(api, vni=4100)
    conf = conf_for(sim, kubeconfig, OTHER_JOBS_VNI, podVnis=["2000-2099"], vniPolicy=policy, **ARGS_ON)
    run = cni("ADD", conf, netns=netns, cni_args=pod_args(pod))
    if policy == "required":
        err = run.error(107)
        assert "args.cni.vni" in err["msg"] and "2000-2099" in err["msg"]
        nothing_made(sim)
    else:
        assert run.ok().json["cxi"]["vnis"] == [4100]  # the next source: the job's own Vni
        assert service_vnis(sim) == [[4100], [4100]]
        assert logged(sim, "args.cni.vni", "refused")


def test_cni_args_inside_the_node_and_namespace_allow_lists(cni, sim, make_netns, api, kubeconfig):
    _, pod = job_pod(api, vni=4100)
    conf = conf_for(sim, kubeconfig, 2050, podVnis=["2000-2099"], **ARGS_ON)
    cni("ADD", conf, netns=make_netns(), cni_args=pod_args(pod)).ok()
    assert service_vnis(sim) == [[2050], [2050]]
    api.add(namespace_object(NS, {"cxi-cni/pod-vnis": "3000-3009, 3100"}))
    cni("ADD", conf_for(sim, kubeconfig, 3100, **ARGS_ON), netns=make_netns(), container_id="c2",
        cni_args=pod_args(pod)).ok()
    assert [3100] in service_vnis(sim)
    cni("ADD", conf_for(sim, kubeconfig, 3010, vniPolicy="required", **ARGS_ON), netns=make_netns(),
        container_id="c3", cni_args=pod_args(pod)).error(107)


def test_a_replaced_pod_never_gets_the_new_pods_vni(cni, sim, netns, api, kubeconfig):
    """The sandbox was made for pod UID A; the API's pod of that name is B (recreated)."""
    _, pod = job_pod(api, vni=4100)
    err = cni("ADD", conf_for(sim, kubeconfig), netns=netns,
              cni_args=pod_args(pod, uid="0aa0-old-pod")).error(3)
    assert "replaced" in err["msg"] and "0aa0-old-pod" in err["msg"]
    nothing_made(sim)
    cni("ADD", conf_for(sim, kubeconfig), netns=netns, cni_args=pod_args(pod, uid="")).ok()
    assert service_vnis(sim) == [[4100], [4100]]


@pytest.mark.parametrize("policy", ["fallback", "required"])
def test_an_owner_reference_whose_uid_does_not_match_is_refused(cni, sim, netns, api, kubeconfig,
                                                                policy):
    victim, _ = job_pod(api, "victim", vni=OTHER_JOBS_VNI)
    job_pod(api, "decoy")
    pod = bare_pod(api, "sneaky", [job_ref("decoy", victim["metadata"]["uid"])])
    run = cni("ADD", conf_for(sim, kubeconfig, vniPolicy=policy), netns=netns, cni_args=pod_args(pod))
    if policy == "required":
        assert "ownerReference to Job team-c/decoy names UID" in run.error(107)["msg"]
        nothing_made(sim)
    else:
        assert run.ok().json["cxi"]["vnis"] == []
        assert logged(sim, "owners of pod team-c/sneaky", "refused")
    assert OTHER_JOBS_VNI not in sum(service_vnis(sim), [])
    assert not any(f"vni-{victim['metadata']['uid']}" in path for path in api.requests)


def test_a_vni_object_of_another_owner_is_refused(cni, sim, netns, api, kubeconfig):
    victim, _ = job_pod(api, "victim")
    job, pod = job_pod(api, "mine")
    stolen = vni_object(job, OTHER_JOBS_VNI)
    stolen["metadata"]["ownerReferences"][0]["uid"] = victim["metadata"]["uid"]
    api.add(stolen)
    err = cni("ADD", conf_for(sim, kubeconfig, vniPolicy="required"), netns=netns,
              cni_args=pod_args(pod)).error(107)
    assert "belongs to another owner" in err["msg"]
    nothing_made(sim)


def test_a_reference_out_of_the_pods_namespace_is_never_followed(cni, sim, netns, api, kubeconfig):
    """ownerReferences name no namespace: the walk reads the pod's own, where no such Job is."""
    elsewhere, _ = job_pod(api, "train", vni=OTHER_JOBS_VNI, namespace="team-d")
    pod = bare_pod(api, "visitor", [job_ref("train", elsewhere["metadata"]["uid"])])
    assert cni("ADD", conf_for(sim, kubeconfig), netns=netns, cni_args=pod_args(pod)).ok().json[
        "cxi"]["vnis"] == []
    assert not any("/namespaces/team-d/" in path for path in api.requests)


@pytest.mark.parametrize("name", ["../../../team-d/jobs/train", "train/../../../../team-d/jobs/train",
                                  "train%2F..", "Train", "train\n"])
def test_an_owner_name_that_is_not_a_kubernetes_name_never_reaches_a_path(cni, sim, netns, api,
                                                                          kubeconfig, name):
    """ownerReferences are written by whoever writes the pod: their name must not steer the GET."""
    elsewhere, _ = job_pod(api, "train", vni=OTHER_JOBS_VNI, namespace="team-d")
    pod = bare_pod(api, "climber", [job_ref(name, elsewhere["metadata"]["uid"])])
    err = cni("ADD", conf_for(sim, kubeconfig, vniPolicy="required"), netns=netns,
              cni_args=pod_args(pod)).error(107)
    assert "ownerReference to Job names" in err["msg"] and "DNS subdomain" in err["msg"]
    nothing_made(sim)
    assert api.requests and not any("/jobs/" in path for path in api.requests)


@pytest.mark.parametrize("vni", [1, 50])
def test_vni_1_and_out_of_range_vnis_from_each_source(cni, sim, make_netns, api, kubeconfig, vni):
    config = sim.conf(cxi={"vnis": [vni]})
    err = cni("ADD", config, netns=make_netns()).error(7)
    assert "cxi.vnis" in err["msg"]
    required = {"vniPolicy": "required", "podVnis": ["1-65535"]}
    err = cni("ADD", conf_for(sim, kubeconfig, vni, **ARGS_ON, **required), netns=make_netns()).error(107)
    assert "args.cni.vni" in err["msg"]
    err = cni("ADD", conf_for(sim, kubeconfig, vniSources=["cniArgs"], **required), netns=make_netns(),
              cni_args=f"VNI={vni}").error(107)
    assert "CNI_ARGS VNI" in err["msg"]
    _, pod = job_pod(api, vni=vni)
    err = cni("ADD", conf_for(sim, kubeconfig, **required), netns=make_netns(),
              cni_args=pod_args(pod)).error(107)
    assert "Vni team-c/vni-" in err["msg"]
    nothing_made(sim)
    result = cni("ADD", conf_for(sim, kubeconfig), netns=make_netns(), cni_args=pod_args(pod)).ok().json
    assert result["cxi"]["vnis"] == [] and logged(sim, "Vni team-c/vni-", "refused")


def test_the_jobs_primary_vni_goes_first(cni, sim, netns, api, kubeconfig):
    _, pod = job_pod(api, vni=[5001, 5000])
    result = cni("ADD", conf_for(sim, kubeconfig), netns=netns, cni_args=pod_args(pod)).ok().json
    assert result["cxi"]["vnis"] == [5001, 5000]
    assert all(list(s.desc.vnis) == [5001, 5000] for s in sim.services())
    assert sim.records()[0]["vnis"] == [5001, 5000]


def test_a_pod_without_vni_reaps_a_dead_pods_service_on_its_inode(cni, sim, netns):
    """A dead pod's namespace inode (its services never destroyed) goes to a pod that gets
    no VNI: that pod must not hold the dead job's VNI."""
    inode = os.stat(netns).st_ino
    cni("ADD", sim.conf(cxi={"vnis": [666]}), netns=netns, container_id="dead").ok()
    novni = sim.conf(cxi={"vnis": []})
    assert cni("ADD", novni, netns=netns, container_id="new").ok().json["cxi"]["vnis"] == []
    assert [s for s in sim.services() if s.netns_inode == inode] == []
    cni("CHECK", novni, netns=netns, container_id="new").ok()
    assert next(r for r in sim.records() if r["containerID"] == "dead")["services"] == []
    cni("DEL", sim.conf(cxi={"vnis": [666]}), netns=netns, container_id="dead").ok()
    cni("DEL", novni, netns=netns, container_id="new").ok()
    nothing_made(sim)


def test_stale_services_are_reaped_on_devices_the_attachment_does_not_use(cni, sim, netns):
    cni("ADD", sim.conf(cxi={"vnis": [666]}), netns=netns, container_id="dead").ok()
    cni("ADD", sim.conf(cxi={"devices": ["cxi0"]}), netns=netns, container_id="new").ok()
    assert sorted((s.device, list(s.desc.vnis)) for s in sim.services()) == [("cxi0", [100])]


def test_one_pod_listing_a_nad_many_times_gets_a_bounded_share(cni, sim, netns):
    conf = sim.conf()
    cni("ADD", conf, netns=netns, ifname="eth0").ok()
    cni("ADD", conf, netns=netns, ifname="net1").ok()
    err = cni("ADD", conf, netns=netns, ifname="net2").error(107)
    assert "maxServicesPerPod is 2" in err["msg"] and "eth0" in err["msg"] and "net1" in err["msg"]
    assert len(sim.services()) == 4 and len(sim.records()) == 2
    cni("ADD", sim.conf(cxi={"maxServicesPerPod": 3}), netns=netns, ifname="net2").ok()
    assert len(sim.services()) == 6


def test_system_pods_start_while_the_api_is_down(cni, sim, make_netns, api, kubeconfig):
    sys_pod = new_object("v1", "Pod", "kube-system", "coredns-5d78c9869d-abcde")
    _, job = job_pod(api, vni=4100)
    api.stop()
    cni("ADD", conf_for(sim, kubeconfig), netns=make_netns(), cni_args=pod_args(sys_pod)).ok()
    err = cni("ADD", conf_for(sim, kubeconfig), netns=make_netns(), container_id="c2",
              cni_args=pod_args(job)).error(11)
    assert "cannot reach the Kubernetes API" in err["msg"]


def test_a_pod_the_api_does_not_know_starts_without_a_service(cni, sim, netns, api, kubeconfig):
    static = new_object("v1", "Pod", NS, "etcd-node-1")  # not in the API: its mirror pod is not made yet
    assert cni("ADD", conf_for(sim, kubeconfig), netns=netns, cni_args=pod_args(static)).ok().json[
        "cxi"]["vnis"] == []
    err = cni("ADD", conf_for(sim, kubeconfig, vniPolicy="required"), netns=netns, container_id="c2",
              cni_args=pod_args(static)).error(7)
    assert "no VNI for this pod" in err["msg"]


def test_a_tenants_nad_cannot_widen_the_node_policy(cni, sim, make_netns, api, kubeconfig, node_policy):
    """A NAD in the tenant's namespace is a network configuration the tenant wrote: it may
    enable args, allow every VNI and name any library; the node policy holds regardless."""
    env = node_policy(allowedVnis=["4000-4999"], podVnis=[], vniSources=["kubernetes", "config"],
                      allowDefaultVni=False, backends=["sim"], maxServicesPerPod=1)
    _, pod = job_pod(api, vni=4100)
    greedy = conf_for(sim, kubeconfig, 4242, vniSources=["args", "kubernetes"], podVnis=["1-65535"],
                      allowedVnis=["1-65535"], allowDefaultVni=True)
    err = cni("ADD", greedy, netns=make_netns(), cni_args=pod_args(pod), env=env).error(7)
    assert "cxi.vniSources" in err["msg"] and "'args' is not allowed by the node policy" in err["msg"]
    nothing_made(sim)
    err = cni("ADD", sim.conf(cxi={"vnis": [5000]}), netns=make_netns(), env=env).error(7)
    assert "VNI 5000 is outside" in err["msg"]
    _, other = job_pod(api, "other", vni=5100)  # a Vni the VNI service made, outside the node's range
    result = cni("ADD", conf_for(sim, kubeconfig, allowedVnis=["1-65535"]), netns=make_netns(),
                 cni_args=pod_args(other), env=env).ok().json
    assert result["cxi"]["vnis"] == [] and logged(sim, "VNI 5100 is outside cxi.allowedVnis (4000-4999)")
    netns = make_netns()
    cni("ADD", conf_for(sim, kubeconfig), netns=netns, cni_args=pod_args(pod), env=env).ok()
    err = cni("ADD", conf_for(sim, kubeconfig, maxServicesPerPod=8), netns=netns, ifname="net1",
              cni_args=pod_args(pod), env=env).error(107)
    assert "maxServicesPerPod is 1" in err["msg"]


def test_a_nad_cannot_make_root_load_a_library_the_node_policy_does_not_list(cni, sim, netns, tmp_path,
                                                                          node_policy):
    env = node_policy(libcxi=["libcxi.so.1"])
    planted = tmp_path / "planted.so"
    planted.write_text("not even a library")
    conf = sim.conf(cxi={"backend": "libcxi", "libcxi": str(planted)})
    err = cni("ADD", conf, netns=netns, env=env).error(7)
    assert "cxi.libcxi" in err["msg"] and "not allowed by the node policy" in err["msg"]
    err = cni("DEL", conf, netns=netns, env=env).error(7)  # DEL must not load it either
    assert "cxi.libcxi" in err["msg"]


def test_del_removes_what_was_made_before_a_stricter_policy(cni, sim, netns, node_policy):
    conf = sim.conf(cxi={"vnis": [2500], "vniSources": ["cniArgs", "config"]})
    cni("ADD", conf, netns=netns).ok()
    env = node_policy(allowedVnis=["4000-4999"], vniSources=["kubernetes", "config"])
    cni("CHECK", conf, netns=netns, env=env).error(7)
    cni("DEL", conf, netns=netns, env=env).ok()
    nothing_made(sim)


@pytest.mark.parametrize("flaw", ["writable by others", "owned by another user", "not JSON",
                                  "unknown key", "symlink", "tcs", "vniSources"])
def test_a_node_policy_that_cannot_be_trusted_is_refused(cni, sim, netns, node_policy, flaw):
    env = node_policy(allowedVnis=["100-999"])
    path = node_policy.path
    if flaw == "writable by others":
        path.chmod(0o666)
    elif flaw == "owned by another user":
        os.chown(path, 1000, 1000)
    elif flaw == "not JSON":
        path.write_text("{")
    elif flaw == "unknown key":
        path.write_text(json.dumps({"allowedVnis": ["100-999"], "zz": 1}))
    elif flaw in ("tcs", "vniSources"):  # an empty list would read as "no bound" somewhere
        path.write_text(json.dumps({flaw: []}))
    else:
        target = path.with_name("real.json")
        path.rename(target)
        path.symlink_to(target)
    err = cni("ADD", sim.conf(), netns=netns, env=env).error(7)
    assert str(path) in err["msg"] and "policy" in err["details"]
    assert flaw not in ("tcs", "vniSources") or flaw in err["msg"]
    nothing_made(sim)


def test_vni_1_needs_the_admins_allowed_vnis_too(cni, sim, make_netns, node_policy):
    """A NAD may set allowDefaultVni itself; VNI 1 still has to be in the VNIs the node
    policy allows, at configuration time and whatever vniPolicy says."""
    env = node_policy(allowedVnis=["4000-4999"])
    for policy in ("fallback", "required"):
        nad = sim.conf(cxi={"vnis": [1], "allowDefaultVni": True, "vniPolicy": policy})
        err = cni("ADD", nad, netns=make_netns(), env=env).error(7)
        assert "VNI 1 is the default service" in err["msg"] and "cxi.vnis" in err["msg"]
        nothing_made(sim)
    err = cni("ADD", sim.conf(cxi={"vnis": [1], "allowDefaultVni": True}), netns=make_netns()).error(7)
    assert "1 in cxi.allowedVnis (100-65534)" in err["msg"]  # the default holds it not
    admitted = sim.conf(cxi={"vnis": [1], "allowDefaultVni": True, "allowedVnis": ["1", "100-65534"]})
    assert cni("ADD", admitted, netns=make_netns()).ok().json["cxi"]["vnis"] == [1]


def planted_library(folder, marker) -> str:
    """A shared library whose constructor, run by whoever loads it, leaves `marker`."""
    source = folder / "planted.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void ran(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    library = folder / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


@pytest.mark.parametrize("flaw", ["folder writable by others", "owned by another user",
                                  "relative path", "none"])
def test_root_loads_no_library_that_another_user_could_have_changed(cni, sim, netns, tmp_path,
                                                                     flaw):
    """Without a node policy a NAD names the library root loads: only a file that root alone
    could have written, by an absolute path, is loaded ("none" shows the test would see it)."""
    folder = tmp_path / "lib"
    folder.mkdir(mode=0o755)
    marker = tmp_path / "constructor-ran"
    library = planted_library(folder, marker)
    if flaw == "folder writable by others":
        folder.chmod(0o777)
    elif flaw == "owned by another user":
        os.chown(library, 1000, 1000)
    elif flaw == "relative path":
        library = os.path.relpath(library)
    err = cni("ADD", sim.conf(cxi={"backend": "libcxi", "libcxi": library}), netns=netns).error(101)
    assert marker.exists() == (flaw == "none"), err
    assert library in err["msg"]
    if flaw != "none":
        assert "cxi.libcxi" in err["msg"], err
    nothing_made(sim)


def test_root_makes_no_sim_state_where_another_user_steers_it(cni, sim, netns, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    state = shared / "sim" / "state.db"
    err = cni("ADD", sim.conf(cxi={"simState": str(state)}), netns=netns).error(101)
    assert "cxi.simState" in err["msg"] and "writable by others" in err["msg"], err
    assert not (shared / "sim").exists()


def test_a_nad_naming_a_device_twice_is_refused(cni, sim, netns):
    """A device listed again would get another service of the pod on that NIC past
    maxServicesPerPod (and its reservations), one ADD at a time."""
    err = cni("ADD", sim.conf(cxi={"devices": ["cxi0"] * 8}), netns=netns).error(7)
    assert "cxi.devices" in err["msg"] and "more than once" in err["msg"], err
    nothing_made(sim)


def test_a_node_policy_without_the_config_source_takes_no_vnis_from_a_nad(cni, sim, netns,
                                                                           node_policy):
    env = node_policy(vniSources=["kubernetes"])
    for sources in (["kubernetes"], []):
        conf = sim.conf(cxi={"vnis": [4242], "vniSources": sources})
        err = cni("ADD", conf, netns=netns, env=env).error(7)
        assert "cxi.vnis" in err["msg"] and "no VNIs from configurations" in err["msg"], err
        nothing_made(sim)
    cni("ADD", sim.conf(cxi={"vnis": [], "vniSources": ["kubernetes"]}), netns=netns, env=env).ok()


def test_a_relative_sim_state_is_refused(cni, sim, netns):
    err = cni("ADD", sim.conf(cxi={"simState": "sub/rel.db"}), netns=netns).error(101)
    assert "cxi.simState" in err["msg"] and "absolute" in err["msg"], err
