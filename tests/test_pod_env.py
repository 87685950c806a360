"""`cxi env` as a pod runs it: the frozen binary inside a real network namespace (ip netns
exec) whose services a real ADD made, on both backends and every stack; as an unprivileged
user; and when there is no device, no service, or a choice to make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import LibcxiSetup

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


def in_pod(netns: str, binary: str, conf_path: Path, env: dict, *args: str, user=()):
    """`cxi env` run inside the namespace `netns`, with a clean environment."""
    command = ["ip", "netns", "exec", os.path.basename(netns), *user, binary, "env",
               "--config", str(conf_path), *args]
    return subprocess.run(command, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def write_conf(setup, path: Path, **cxi) -> Path:
    path.write_text(json.dumps(setup.conf(cxi=cxi)))
    return path


def exports(devices, svc_ids, vnis) -> str:
    return (f"export SLINGSHOT_DEVICES={','.join(devices)}\n"
            f"export SLINGSHOT_SVC_IDS={','.join(map(str, svc_ids))}\n"
            f"export SLINGSHOT_VNIS={','.join(map(str, vnis))}\n")


def test_env_names_the_services_of_the_pods_own_namespace(cni, cxi_setup, make_netns, cxi_bin,
                                                          tmp_path):
    pod, other = make_netns(), make_netns()
    conf = write_conf(cxi_setup, tmp_path / "conf.json", vnis=[2001, 100])
    result = cni("ADD", json.loads(conf.read_text()), netns=pod).ok().json
    cni("ADD", cxi_setup.conf(cxi={"vnis": [300]}), netns=other, container_id="other").ok()
    ids = {s["device"]: s["svcId"] for s in result["cxi"]["services"]}
    run = in_pod(pod, cxi_bin, conf, cxi_setup.env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == exports(["cxi0", "cxi1"], [ids["cxi0"], ids["cxi1"]], [2001, 100])
    assert run.stderr == ""
    script = f'eval "$({cxi_bin} env --config {conf})" && echo "$SLINGSHOT_SVC_IDS $SLINGSHOT_VNIS"'
    shell = subprocess.run(["ip", "netns", "exec", os.path.basename(pod), "sh", "-c", script],
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"], **cxi_setup.env})
    assert shell.stdout == f"{ids['cxi0']},{ids['cxi1']} 2001,100\n", shell.stderr


def test_env_without_a_service_in_the_namespace_says_so(cni, sim, make_netns, cxi_bin, tmp_path):
    bare = make_netns()
    conf = write_conf(sim, tmp_path / "conf.json")
    cni("ADD", json.loads(conf.read_text()), netns=make_netns()).ok()  # another pod's
    run = in_pod(bare, cxi_bin, conf, sim.env)
    assert run.returncode == 1 and run.stdout == ""
    inode = os.stat(bare).st_ino
    assert (f"no CXI service is bound to this network namespace (inode {inode}) on cxi0, cxi1"
            in run.stderr), run.stderr


def test_two_services_on_a_device_need_a_choice(cni, sim, netns, cxi_bin, tmp_path):
    """A pod with a chained attachment (VNI 100) and a NAD attachment (VNI 200)."""
    conf = write_conf(sim, tmp_path / "conf.json")
    first = cni("ADD", sim.conf(), netns=netns, ifname="eth0").ok().json
    second = cni("ADD", sim.conf(cxi={"vnis": [200]}), netns=netns, ifname="net1").ok().json
    run = in_pod(netns, cxi_bin, conf, sim.env)
    assert run.returncode == 1
    assert "cxi0 has 2 services bound to this namespace" in run.stderr
    assert "choose one with --vni" in run.stderr
    for result, vni in ((first, 100), (second, 200)):
        ids = [s["svcId"] for s in result["cxi"]["services"]]
        run = in_pod(netns, cxi_bin, conf, sim.env, "--vni", str(vni))
        assert run.stdout == exports(["cxi0", "cxi1"], ids, [vni]), run.stderr
    run = in_pod(netns, cxi_bin, conf, sim.env, "--vni", "300")
    assert "no CXI service granting VNI 300 is bound" in run.stderr


def test_env_without_devices_says_what_the_pod_lacks(cni, request, tmp_path, monkeypatch, netns,
                                                     cxi_bin):
    setup = LibcxiSetup(tmp_path, request.getfixturevalue("standin_lib"), monkeypatch)
    conf = write_conf(setup, tmp_path / "conf.json")
    cni("ADD", json.loads(conf.read_text()), netns=netns, env=setup.env).ok()
    no_dev = tmp_path / "dev"
    no_dev.mkdir()
    run = in_pod(netns, cxi_bin, conf, {**setup.env, "FAKE_LIBCXI_DEV_DIR": str(no_dev)})
    assert run.returncode == 1
    assert "cannot open any CXI device (cxil_open_device on cxi0 failed: No such file or " \
           "directory (-ENOENT): this container has no /dev/cxi0" in run.stderr, run.stderr
    assert "device plugin or CDI" in run.stderr
    (no_dev / "cxi1").touch()  # one device given to the pod: it is used, the other named
    run = in_pod(netns, cxi_bin, conf, {**setup.env, "FAKE_LIBCXI_DEV_DIR": str(no_dev)})
    assert run.returncode == 0 and run.stdout.startswith("export SLINGSHOT_DEVICES=cxi1\n")
    assert "cxi env: skipped cxil_open_device on cxi0 failed" in run.stderr
    setup.seed({})
    run = in_pod(netns, cxi_bin, conf, setup.env)
    assert "no CXI device on this node (libcxi backend lists none)" in run.stderr, run.stderr


@pytest.fixture
def open_dir():
    """A folder an unprivileged user can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="cxi-env-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_env_needs_no_root(cni, request, monkeypatch, netns, cxi_bin, open_dir):
    """As nobody: the listing calls of libcxi, no state directory, no log file."""
    lib = open_dir / "libcxi.so.1"
    shutil.copy(request.getfixturevalue("standin_lib"), lib)
    setup = LibcxiSetup(open_dir, lib, monkeypatch)
    binary = open_dir / "cxi"
    shutil.copy(cxi_bin, binary)
    subprocess.run([binary, "version"], check=True, capture_output=True)  # unpacks, as root
    conf = write_conf(setup, open_dir / "conf.json")
    result = cni("ADD", json.loads(conf.read_text()), netns=netns, env=setup.env).ok().json
    setup.lib_state.chmod(0o666)  # what /dev/cxiN's mode is to the real library
    devices = open_dir / "dev"
    devices.mkdir(mode=0o755)
    for name in ("cxi0", "cxi1"):
        (devices / name).touch()
        (devices / name).chmod(0o666)
    env = {**setup.env, "FAKE_LIBCXI_DEV_DIR": str(devices)}
    files = sorted((p, p.stat().st_mtime_ns) for p in open_dir.rglob("*") if p != setup.lib_state)
    run = in_pod(netns, str(binary), conf, env, user=NOBODY)
    ids = [s["svcId"] for s in result["cxi"]["services"]]
    assert run.returncode == 0, run.stderr
    assert run.stdout == exports(["cxi0", "cxi1"], ids, [100])
    (devices / "cxi1").chmod(0o600)  # a device the pod may not open is named and skipped
    run = in_pod(netns, str(binary), conf, env, user=NOBODY)
    assert run.stdout == exports(["cxi0"], ids[:1], [100])
    assert "this container may not open /dev/cxi1" in run.stderr
    # no record, no log line, nothing written but what the library itself keeps
    assert sorted((p, p.stat().st_mtime_ns) for p in open_dir.rglob("*") if p != setup.lib_state) == files


def test_devices_with_different_vnis_need_a_choice(cni, sim, netns, cxi_bin, tmp_path):
    conf = write_conf(sim, tmp_path / "conf.json")
    eth0 = cni("ADD", sim.conf(cxi={"devices": ["cxi0"]}), netns=netns, ifname="eth0").ok().json
    net1 = cni("ADD", sim.conf(cxi={"devices": ["cxi1"], "vnis": [200]}), netns=netns,
               ifname="net1").ok().json
    run = in_pod(netns, cxi_bin, conf, sim.env)
    assert run.returncode == 1
    assert (f"VNI 100 (the first VNI of service {eth0['cxi']['services'][0]['svcId']} on cxi0) "
            "is not granted on cxi1: choose the VNI with --vni") in run.stderr, run.stderr
    run = in_pod(netns, cxi_bin, conf, sim.env, "--vni", "200")
    assert run.stdout == exports(["cxi1"], [net1["cxi"]["services"][0]["svcId"]], [200])
