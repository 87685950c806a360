"""Proof of the VM test tier: Debian's Go ipvlan plugin and a PyInstaller onefile run in a qemu guest."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vm import vmtier

pytestmark = pytest.mark.vm

GO_PLUGINS = Path("/usr/lib/cni")
GUEST_CNI_PATH = "/opt/cni/bin"
SUBNETS = {"l2": "10.99.0.0/24", "l3": "10.98.0.0/24"}
# host-local keeps .1 of a subnet for the gateway and hands out .2 first.
FIRST_ADDRESSES = {"l2": "10.99.0.2/24", "l3": "10.98.0.2/24"}

IPVLAN_SCENARIO = r"""
make_master hsn0
expect_match setup "$(cat /proc/modules; $IP link show hsn0)" '^ipvlan ' '^dummy ' 'hsn0: .*UP'
export CNI_PATH=/opt/cni/bin CNI_IFNAME=net1

ipvlan_cycle() {
    mode=$1 address=$2
    config=/etc/cni/ipvlan-$mode.json
    $IP netns add pod-$mode
    export CNI_CONTAINERID=ctr-$mode CNI_NETNS=/var/run/netns/pod-$mode

    cni ADD $CNI_PATH/ipvlan $config
    expect_ok ${mode}_add
    metric ${mode}_add_ms $CNI_MS
    cp /tmp/cni.out /tmp/$mode.result
    expect_match ${mode}_result "$CNI_OUT" "\"address\": *\"$address\""
    expect_match ${mode}_link "$(link_details pod-$mode net1)" "ipvlan +mode $mode" "inet $address "

    with_prev_result $config /tmp/$mode.result > /tmp/$mode.check.json
    cni CHECK $CNI_PATH/ipvlan /tmp/$mode.check.json
    expect_ok ${mode}_check
    metric ${mode}_check_ms $CNI_MS

    cni DEL $CNI_PATH/ipvlan /tmp/$mode.check.json
    expect_ok ${mode}_del
    metric ${mode}_del_ms $CNI_MS
    expect_cmd_fails ${mode}_link_gone $IP -n pod-$mode link show net1
    cni DEL $CNI_PATH/ipvlan /tmp/$mode.check.json
    expect_ok ${mode}_del_again

    cni CHECK $CNI_PATH/ipvlan /tmp/$mode.check.json
    expect_error ${mode}_check_after_del
}

ipvlan_cycle l2 {l2}
# Negative control: claims the failed CHECK above succeeded, so it must print FAIL.
expect_ok control_check_after_del_claimed_ok
ipvlan_cycle l3 {l3}
"""
IPVLAN_CASES = ["setup"] + [
    f"{mode}_{step}"
    for mode in SUBNETS
    for step in ("add", "result", "link", "check", "del", "link_gone", "del_again", "check_after_del")
]

# A stand-in for a frozen plugin: reads the config on stdin, answers on stdout.
ONEFILE_SOURCE = """
import json, os, sys
config = json.load(sys.stdin)
print(json.dumps({"command": os.environ.get("CNI_COMMAND"), "name": config["name"]}))
"""
ONEFILE_SCENARIO = r"""
echo '{"cniVersion":"1.0.0","name":"hello"}' > /tmp/hello.json
for run in 1 2 3; do
    cni VERSION /opt/cni/bin/hello /tmp/hello.json
    expect_ok onefile_run_$run
    metric onefile_run_${run}_ms $CNI_MS
done
expect_match onefile_output "$CNI_OUT" '"command": "VERSION"' '"name": "hello"'
expect_cmd_fails onefile_removed_its_unpack_dir sh -c 'ls -d /tmp/_MEI*'
"""


def ipvlan_config(mode: str) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": f"hsn-{mode}",
            "type": "ipvlan",
            "master": "hsn0",
            "mode": mode,
            "ipam": {"type": "host-local", "subnet": SUBNETS[mode], "dataDir": f"/tmp/ipam-{mode}"},
        }
    )


@pytest.fixture(scope="module")
def vm_ready():
    reason = vmtier.ensure_tools("containernetworking-plugins")
    if reason:
        pytest.skip(reason)
    return vmtier.kernel()


@pytest.fixture(scope="module")
def go_ipvlan_run(vm_ready):
    image = vmtier.build_initramfs(
        {f"{GUEST_CNI_PATH}/{name}": GO_PLUGINS / name for name in ("ipvlan", "host-local")},
        IPVLAN_SCENARIO.replace("{l2}", FIRST_ADDRESSES["l2"]).replace("{l3}", FIRST_ADDRESSES["l3"]),
        payload_texts={f"/etc/cni/ipvlan-{mode}.json": ipvlan_config(mode) for mode in SUBNETS},
    )
    run = vmtier.boot(image, timeout=150)
    print(run.summary(), run.metrics)
    return run


@pytest.mark.parametrize("case", IPVLAN_CASES)
def test_go_ipvlan_case_passes_in_guest(go_ipvlan_run, case):
    go_ipvlan_run.require_pass(case)


def test_guest_script_ran_to_its_end(go_ipvlan_run):
    assert go_ipvlan_run.finished and go_ipvlan_run.script_rc == 0, go_ipvlan_run.explain("script did not finish")
    assert not go_ipvlan_run.timed_out


def test_negative_control_is_reported_as_fail(go_ipvlan_run):
    control = go_ipvlan_run.cases.get("control_check_after_del_claimed_ok")
    assert control is not None, go_ipvlan_run.explain("negative control printed no verdict")
    assert control.status == "FAIL", go_ipvlan_run.explain("a failed CHECK was not detected")
    assert "rc=" in control.detail and "expected success" in control.detail
    with pytest.raises(AssertionError, match="FAILED"):
        go_ipvlan_run.require_pass("control_check_after_del_claimed_ok")


def test_missing_verdict_is_an_assertion_with_console(go_ipvlan_run):
    with pytest.raises(AssertionError, match="(?s)printed no verdict.*VMTIER-BEGIN"):
        go_ipvlan_run.require_pass("no_such_case")


def test_pyinstaller_onefile_runs_in_guest(vm_ready, tmp_path):
    (tmp_path / "hello.py").write_text(ONEFILE_SOURCE)
    build = subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--onefile", "--noconfirm", "--log-level=WARN",
         "--distpath", str(tmp_path / "dist"), "--workpath", str(tmp_path / "build"),
         "--specpath", str(tmp_path), str(tmp_path / "hello.py")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    image = vmtier.build_initramfs({f"{GUEST_CNI_PATH}/hello": tmp_path / "dist" / "hello"}, ONEFILE_SCENARIO)
    run = vmtier.boot(image, timeout=120)
    print(run.summary(), run.metrics)
    for case in ("onefile_run_1", "onefile_run_2", "onefile_run_3", "onefile_output", "onefile_removed_its_unpack_dir"):
        run.require_pass(case)


def test_hung_guest_is_stopped_and_reported(vm_ready):
    image = vmtier.build_initramfs({}, "pass started\nsleep 600\n")
    run = vmtier.boot(image, timeout=8)
    assert run.timed_out and not run.finished, run.explain("a hung guest was not stopped")
    assert run.seconds < 20
    with pytest.raises(AssertionError, match="timed out"):
        run.require_pass("never_printed")
