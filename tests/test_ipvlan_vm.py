"""Real ipvlan links from the frozen plugin, in one boot of a Debian kernel under qemu.

A dummy hsn0 stands in for the Slingshot netdev. For each ipvlan mode the guest runs
ADD, CHECK, DEL, DEL again and CHECK after DEL through the frozen binary (sim CXI
backend, Go host-local IPAM), then the same configuration through the Go reference
ipvlan plugin in another netns with its own host-local dataDir, and finally ADD on a
master that does not exist. The guest prints verdicts of the commands and, as DATA
lines, what the host checks here: results, the pod's link, addresses and routes, the
leases, the sim state and the netns inodes.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shutil
from pathlib import Path

import pytest
from test_reference_compare import comparable, link_state
from vm import vmtier

from cxi_cni.cni.errors import INVALID_CONFIG
from cxi_cni.cxi.backend import DEFAULT_SVC_ID, MEMBER_NET_NS

pytestmark = pytest.mark.vm

GO_PLUGINS = Path("/usr/lib/cni")
GUEST_CNI_PATH = "/opt/cni/bin"
NETWORK = "hsn"
MODES = ("l2", "l3", "l3s")
PLUGINS = {"cxi": "cxi", "go": "ipvlan"}  # who -> plugin binary in the guest
SIM_STATE = "/tmp/sim.db"
STATE_DIR = "/tmp/cxi-state"
SIM_DEVICES = ("cxi0", "cxi1")  # the sim backend's default NICs
STEPS = ("add", "link", "check", "del", "link_gone", "del_again", "check_after_del")
BOOT_TIMEOUT = 360  # about 100 s on an idle 2-core host, 175 s under heavy load
DATA_LINE = re.compile(r"^DATA (\S+) ?(.*)$")


def subnet(mode: str) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.97.{MODES.index(mode)}.0/24")


def first_address(mode: str) -> str:
    """host-local keeps .1 for the gateway and hands out .2 first."""
    return f"{subnet(mode)[2]}/24"


def data_dir(who: str, mode: str) -> str:
    return f"/tmp/ipam-{who}-{mode}"


def netns_path(tag: str) -> str:
    return f"/var/run/netns/pod-{tag}"


def net_conf(who: str, mode: str, master: str = "hsn0", ipam_dir: str | None = None) -> dict:
    """The configuration a NAD would carry: `type` and the `cxi` keys set cxi apart."""
    net = subnet(mode)
    conf = {
        "cniVersion": "1.0.0", "name": NETWORK, "type": PLUGINS[who], "master": master, "mode": mode,
        "ipam": {
            "type": "host-local", "dataDir": ipam_dir or data_dir(who, mode),
            "ranges": [[{"subnet": str(net), "gateway": str(net[1])}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.232.0.0/16", "gw": str(net[254])}],
        },
    }  # fmt: skip
    if who == "cxi":
        conf.update(
            stateDir=STATE_DIR, logFile="/tmp/cxi.log", cxi={"backend": "sim", "simState": SIM_STATE, "vnis": [100]}
        )
    return conf


GUEST_SCRIPT = r"""
make_master hsn0
expect_match setup "$(cat /proc/modules; $IP link show hsn0)" '^ipvlan ' '^dummy ' 'hsn0: .*UP'
export CNI_PATH=/opt/cni/bin CNI_IFNAME=net1

# data NAME TEXT / data_file NAME FILE: one DATA line for the host to read.
data() { printf 'DATA %s %s\n' "$1" "$(printf '%s' "$2" | tr '\n' ' ')"; }
data_file() { printf 'DATA %s %s\n' "$1" "$(tr '\n' ' ' < "$2")"; }
leases() { ls "$1/hsn" 2>/dev/null; }

data hsn0 "$($IP -j link show hsn0)"

# attach WHO PLUGIN MODE ADDRESS: one attachment's life through PLUGIN, in netns pod-WHO_MODE.
# The namespaces stay until power-off, so that no two pods share a netns inode.
attach() {
    who=$1 plugin=$CNI_PATH/$2 mode=$3 address=$4
    tag=${who}_$mode
    config=/etc/cni/$tag.json
    ipam=/tmp/ipam-$who-$mode
    $IP netns add pod-$tag
    export CNI_CONTAINERID=ctr-$tag CNI_NETNS=/var/run/netns/pod-$tag
    data ${tag}_inode "$(stat -L -c %i $CNI_NETNS)"

    cni ADD $plugin $config
    expect_ok ${tag}_add
    metric ${tag}_add_ms $CNI_MS
    cp /tmp/cni.out /tmp/$tag.result
    data_file ${tag}_result /tmp/$tag.result
    expect_match ${tag}_link "$(link_details pod-$tag net1)" "ipvlan +mode $mode( |\$)" "inet $address "
    data ${tag}_link "$($IP -n pod-$tag -j -d link show dev net1)"
    data ${tag}_addr "$($IP -n pod-$tag -j addr show dev net1)"
    data ${tag}_routes "$($IP -n pod-$tag -j route show table all)"
    data ${tag}_leases_after_add "$(leases $ipam)"
    [ $who = cxi ] && $plugin services --all --json --config $config > /tmp/svc.json
    [ $who = cxi ] && data_file ${tag}_sim_after_add /tmp/svc.json

    with_prev_result $config /tmp/$tag.result > /tmp/$tag.prev.json
    cni CHECK $plugin /tmp/$tag.prev.json
    expect_ok ${tag}_check
    metric ${tag}_check_ms $CNI_MS

    cni DEL $plugin /tmp/$tag.prev.json
    expect_ok ${tag}_del
    metric ${tag}_del_ms $CNI_MS
    expect_cmd_fails ${tag}_link_gone $IP -n pod-$tag link show net1
    data ${tag}_leases_after_del "$(leases $ipam)"
    [ $who = cxi ] && $plugin services --all --json --config $config > /tmp/svc.json
    [ $who = cxi ] && data_file ${tag}_sim_after_del /tmp/svc.json
    [ $who = cxi ] && data ${tag}_records_after_del "$(ls $STATE_DIR | grep '\.json$')"

    cni DEL $plugin /tmp/$tag.prev.json
    expect_ok ${tag}_del_again
    metric ${tag}_del_again_ms $CNI_MS
    cni CHECK $plugin /tmp/$tag.prev.json
    expect_error ${tag}_check_after_del
    data_file ${tag}_check_after_del_error /tmp/cni.out
}

@ATTACHMENTS@

# ADD on a master that does not exist: an error, and nothing left behind.
$IP netns add pod-err
export CNI_CONTAINERID=ctr-err CNI_NETNS=/var/run/netns/pod-err
data err_inode "$(stat -L -c %i $CNI_NETNS)"
cni ADD $CNI_PATH/cxi /etc/cni/cxi_missing_master.json
expect_error missing_master
metric cxi_missing_master_ms $CNI_MS
data_file missing_master_error /tmp/cni.out
data missing_master_links "$($IP -n pod-err -j link show)"
data missing_master_leases "$(leases /tmp/ipam-err)"
$CNI_PATH/cxi services --all --json --config /etc/cni/cxi_missing_master.json > /tmp/svc.json
data_file missing_master_sim /tmp/svc.json
data missing_master_records "$(ls $STATE_DIR | grep '\.json$')"

echo "----- last lines of the cxi log -----"
tail -n 25 /tmp/cxi.log
"""


def guest_script() -> str:
    # Go first in each mode: the kernel gives every ipvlan link on one master the mode of
    # the newest, and refuses one address on two of them, so the two never overlap.
    attachments = "\n".join(
        f"attach {who} {plugin} {mode} {first_address(mode)}"
        for mode in MODES
        for who, plugin in sorted(PLUGINS.items(), key=lambda item: item[0] != "go")
    )
    return GUEST_SCRIPT.replace("@ATTACHMENTS@", attachments).replace("$STATE_DIR", STATE_DIR)


class GuestRun:
    """One boot's console, verdicts and DATA lines; every failed lookup shows the console."""

    def __init__(self, run: vmtier.VmRun):
        self.run = run
        self.data: dict[str, str] = {}
        for line in run.console.splitlines():
            if match := DATA_LINE.match(line.strip()):
                self.data.setdefault(match.group(1), match.group(2).strip())

    def text(self, name: str) -> str:
        if name not in self.data:
            raise AssertionError(self.run.explain(f"the guest printed no DATA {name}"))
        return self.data[name]

    def json(self, name: str):
        text = self.text(name)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise AssertionError(self.run.explain(f"DATA {name} is not JSON ({exc}): {text}")) from None

    def words(self, name: str) -> list[str]:
        return self.text(name).split()

    def check(self, condition: bool, headline: str) -> None:
        if not condition:
            raise AssertionError(self.run.explain(headline))


def shows_console(test):
    """Let a failed assertion or lookup in `test` (which takes `guest`) carry the console."""

    @functools.wraps(test)
    def wrapped(**kwargs):
        try:
            return test(**kwargs)
        except (AssertionError, LookupError, TypeError) as exc:
            if isinstance(exc, AssertionError) and "guest console" in str(exc):
                raise
            raise AssertionError(kwargs["guest"].run.explain(f"{type(exc).__name__}: {exc}")) from exc

    return wrapped


@pytest.fixture(scope="module")
def guest(cxi_bin) -> GuestRun:
    reason = vmtier.ensure_tools("containernetworking-plugins")
    if reason:
        pytest.skip(reason)
    # dist/cxi's first run unpacks it under util-linux's flock, which busybox-static lacks.
    payload = {f"{GUEST_CNI_PATH}/cxi": cxi_bin, "/usr/bin/flock": shutil.which("flock")}
    payload |= {f"{GUEST_CNI_PATH}/{name}": GO_PLUGINS / name for name in ("host-local", "ipvlan")}
    configs = {f"/etc/cni/{who}_{mode}.json": json.dumps(net_conf(who, mode)) for who in PLUGINS for mode in MODES}
    configs["/etc/cni/cxi_missing_master.json"] = json.dumps(
        net_conf("cxi", "l2", master="hsn9", ipam_dir="/tmp/ipam-err")
    )
    image = vmtier.build_initramfs(payload, guest_script(), payload_texts=configs)
    run = vmtier.boot(image, timeout=BOOT_TIMEOUT)
    print(run.summary())
    for name, value in sorted(run.metrics.items()):
        print(f"  {name}: {value:.0f} ms")
    return GuestRun(run)


def sim_services(rows: list[dict]) -> dict[str, list[dict]]:
    """Every service but the default one, per sim device, from `cxi services --all --json`."""
    out: dict[str, list[dict]] = {device: [] for device in SIM_DEVICES}
    for row in rows:
        if row["svc_id"] != DEFAULT_SVC_ID:
            out.setdefault(row["device"], []).append(row)
    return out


def link_index(link: dict) -> int:
    return link[0].get("link_index", link[0]["ifindex"])


def pod_state(guest: GuestRun, tag: str) -> dict:
    """The pod's link, global addresses and routes (protocol included: both add routes as
    "boot"), without ifindexes and MACs."""
    link = guest.json(f"{tag}_link")[0]
    addrs = guest.json(f"{tag}_addr")[0]["addr_info"]
    return {
        **link_state(link, addrs),
        "routes": sorted(json.dumps(route, sort_keys=True)
                          for route in guest.json(f"{tag}_routes") if route.get("dev") == "net1"
                          and not route["dst"].startswith("fe80")),
    }  # fmt: skip


def test_guest_script_ran_to_its_end(guest):
    guest.check(guest.run.finished and guest.run.script_rc == 0, "the guest script did not finish")
    guest.check(not guest.run.timed_out, "the VM timed out")


@pytest.mark.parametrize(
    "case",
    ["setup", "missing_master"] + [f"{who}_{mode}_{step}" for mode in MODES for who in PLUGINS for step in STEPS],
)
def test_guest_step_passes(guest, case):
    guest.run.require_pass(case)


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_add_result_names_the_pod_link_and_its_address(guest, mode):
    result = guest.json(f"cxi_{mode}_result")
    hsn0_mac = guest.json("hsn0")[0]["address"]
    guest.check(
        result["interfaces"] == [{"name": "net1", "mac": hsn0_mac, "sandbox": netns_path(f"cxi_{mode}")}],
        f"interfaces of the {mode} result: {result['interfaces']} (ipvlan shares hsn0's MAC {hsn0_mac})",
    )
    guest.check(
        result["ips"] == [{"interface": 0, "address": first_address(mode), "gateway": str(subnet(mode)[1])}],
        f"ips of the {mode} result: {result['ips']}",
    )
    inode = int(guest.text(f"cxi_{mode}_inode"))
    cxi = result["cxi"]
    guest.check(cxi["netnsInode"] == inode and cxi["vnis"] == [100], f"cxi key {cxi}, netns inode {inode}")
    guest.check(sorted(s["device"] for s in cxi["services"]) == list(SIM_DEVICES), f"cxi services {cxi}")


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_pod_link_is_ipvlan_on_hsn0_with_the_address(guest, mode):
    link = guest.json(f"cxi_{mode}_link")
    info = link[0]["linkinfo"]
    guest.check(info["info_kind"] == "ipvlan" and info["info_data"]["mode"] == mode, f"link in the pod: {link}")
    hsn0 = guest.json("hsn0")[0]["ifindex"]
    guest.check(link_index(link) == hsn0, f"net1 hangs off ifindex {link_index(link)}, hsn0 is {hsn0}")
    guest.check("UP" in link[0]["flags"], f"net1 is not up: {link[0]['flags']}")
    local = [f"{a['local']}/{a['prefixlen']}" for a in guest.json(f"cxi_{mode}_addr")[0]["addr_info"]]
    guest.check(first_address(mode) in local, f"net1 addresses {local}")


@shows_console
def test_every_pod_has_its_own_netns_inode(guest):
    inodes = [guest.text(f"{who}_{mode}_inode") for who in PLUGINS for mode in MODES] + [guest.text("err_inode")]
    guest.check(len(set(inodes)) == len(inodes), f"netns inodes repeat: {inodes}")


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_one_service_per_device_bound_to_the_netns_until_del(guest, mode):
    inode = int(guest.text(f"cxi_{mode}_inode"))
    result_services = {s["device"]: s["svcId"] for s in guest.json(f"cxi_{mode}_result")["cxi"]["services"]}
    added = sim_services(guest.json(f"cxi_{mode}_sim_after_add"))
    for device in SIM_DEVICES:
        services = added[device]
        guest.check(len(services) == 1, f"{device} after ADD in {mode}: {services}")
        svc = services[0]
        guest.check(svc["netns_inode"] == inode,
                    f"{device} service netns {svc['netns_inode']}, pod netns inode {inode}")
        # restricted to no uid/gid: the netns binding is the only way in
        guest.check(svc["restricted_members"] and svc["enabled"], f"{device} service {svc}")
        guest.check(all(m["type"] == MEMBER_NET_NS for m in svc["members"]), f"{device} members {svc}")
        guest.check(svc["vnis"] == [100], f"{device} VNIs {svc['vnis']}")
        guest.check(svc["svc_id"] == result_services[device], f"{device}: {svc} vs result {result_services}")
    left = sim_services(guest.json(f"cxi_{mode}_sim_after_del"))
    guest.check(not any(left.values()), f"services left after DEL in {mode}: {left}")
    guest.check(guest.words(f"cxi_{mode}_records_after_del") == [], "attachment record left after DEL")


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_lease_taken_on_add_and_released_on_del(guest, mode):
    leased = [name for name in guest.words(f"cxi_{mode}_leases_after_add") if name[0].isdigit()]
    guest.check(leased == [first_address(mode).split("/")[0]], f"host-local leases after ADD: {leased}")
    left = [name for name in guest.words(f"cxi_{mode}_leases_after_del") if name[0].isdigit()]
    guest.check(left == [], f"host-local leases after DEL: {left}")


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_check_after_del_names_the_missing_attachment(guest, mode):
    error = guest.json(f"cxi_{mode}_check_after_del_error")
    guest.check(isinstance(error.get("code"), int) and "ctr-cxi_" + mode in error.get("msg", ""), f"{error}")


@pytest.mark.parametrize("mode", MODES)
@shows_console
def test_cxi_and_go_ipvlan_agree(guest, mode):
    results = {who: guest.json(f"{who}_{mode}_result") for who in PLUGINS}
    guest.check("cxi" in results["cxi"] and "cxi" not in results["go"], "only cxi adds the cxi key")
    same = {who: comparable(results[who], netns_path(f"{who}_{mode}")) for who in PLUGINS}
    guest.check(same["cxi"] == same["go"], f"results differ in {mode}:\n cxi {same['cxi']}\n go  {same['go']}")
    states = {who: pod_state(guest, f"{who}_{mode}") for who in PLUGINS}
    guest.check(
        states["cxi"] == states["go"], f"pod netns differ in {mode}:\n cxi {states['cxi']}\n go  {states['go']}"
    )
    guest.check(link_index(guest.json(f"go_{mode}_link")) == link_index(guest.json(f"cxi_{mode}_link")), "masters")


@shows_console
def test_missing_master_is_a_clear_error_that_leaves_nothing(guest):
    error = guest.json("missing_master_error")
    guest.check(error.get("code") == INVALID_CONFIG and "hsn9" in error.get("msg", ""), f"error: {error}")
    links = [link["ifname"] for link in guest.json("missing_master_links")]
    guest.check(links == ["lo"], f"links left in the pod netns: {links}")
    guest.check(guest.words("missing_master_leases") == [], "a lease was left")
    left = sim_services(guest.json("missing_master_sim"))
    guest.check(not any(left.values()), f"services left: {left}")
    guest.check(guest.words("missing_master_records") == [], "attachment record left")
