"""The CNI protocol through the frozen binary: versions, results, and every error code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
PREV_1X = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
           "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                   {"address": "fd00::5/64", "interface": 0}],
           "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.1.0.1"]}}


def as_old(result: dict, version: str) -> dict:
    out = json.loads(json.dumps(result))
    out["cniVersion"] = version
    for ip in out["ips"]:
        ip["version"] = "6" if ":" in ip["address"] else "4"
    return out


def nothing_made(sim) -> None:
    assert sim.services() == [], "a service was left behind"
    assert sim.records() == [], "an attachment record was left behind"


def test_version_lists_exactly_the_supported_versions(cni):
    for stdin in ('{"cniVersion":"0.4.0"}', ""):
        run = cni("VERSION", stdin, container_id=None, ifname=None, cni_path=None).ok()
        assert run.json["supportedVersions"] == SUPPORTED
        assert run.json["cniVersion"] == ("0.4.0" if stdin else "1.1.0")


def test_version_does_not_import_netlink_or_pydantic():
    env = {**os.environ, "CNI_COMMAND": "VERSION", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxi_cni"],
                          input=b'{"cniVersion":"1.1.0"}', capture_output=True, env=env, check=True)
    imported = proc.stderr.decode()
    assert "cxi_cni.cni.skel" in imported  # the list is real
    for heavy in ("pyroute2", "pydantic", "click", "cxi_cni.plugin", "logging", "dataclasses"):
        assert f" {heavy}\n" not in imported and f" {heavy}." not in imported, \
            f"VERSION imports {heavy}"


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_a_chained_command_imports_only_what_it_uses(sim, netns, command):
    """The hot path of a chained attachment (no link, no Kubernetes, no addresses in the
    prevResult): none of the modules other commands or other configurations need."""
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": netns, "CNI_PATH": "/usr/lib/cni", "PYTHONPATH": str(REPO), **sim.env}
    conf = json.dumps({**sim.conf(), "prevResult": {"cniVersion": "1.0.0", "interfaces": []}})
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxi_cni"], input=conf.encode(),
                          capture_output=True, env=env)
    # What `site` imported (the venv's editable-install finder: pathlib, urllib.parse and
    # ipaddress) is not the plugin's doing, and the frozen program has no such finder.
    imported = proc.stderr.decode().partition("| site\n")[2]
    assert proc.returncode == 0 and "cxi_cni.plugin" in imported, proc.stdout  # the list is real
    for unused in ("pyroute2", "click", "yaml", "shutil", "ipaddress", "cxi_cni.gc", "cxi_cni.k8s",
                   "cxi_cni.doctor", "cxi_cni.podlink", "cxi_cni.cxi.libcxi", "http.client"):
        assert f" {unused}\n" not in imported and f" {unused}." not in imported, \
            f"{command} imports {unused}"


@pytest.mark.parametrize("version", SUPPORTED)
def test_chained_add_passes_prev_result_through_in_the_config_version(cni, sim, netns, version):
    prev = PREV_1X if version.startswith("1.") else as_old(PREV_1X, version)
    conf = sim.conf(version, prevResult=prev)
    result = cni("ADD", conf, netns=netns).ok().json
    assert result["cniVersion"] == version
    expected = PREV_1X if version.startswith("1.") else as_old(PREV_1X, version)
    for key in ("interfaces", "ips", "routes", "dns"):
        assert result[key] == expected[key]
    assert [s["device"] for s in result["cxi"]["services"]] == ["cxi0", "cxi1"]
    assert result["cxi"]["netnsInode"] == os.stat(netns).st_ino


def test_prev_result_is_converted_between_shapes(cni, sim, netns):
    """A 0.3.1-shaped prevResult under a 1.0.0 config loses `version`; a 1.x one under
    0.4.0 gains it."""
    result = cni("ADD", sim.conf("1.0.0", prevResult=as_old(PREV_1X, "0.3.1")), netns=netns).ok().json
    assert all("version" not in ip for ip in result["ips"])
    result = cni("ADD", sim.conf("0.4.0", prevResult=PREV_1X), netns=netns,
                 container_id="ctr2").ok().json
    assert [ip["version"] for ip in result["ips"]] == ["4", "6"]


def test_add_check_del_lifecycle_and_log_lines(cni, sim, netns):
    conf = sim.conf(prevResult=PREV_1X)
    cni("ADD", conf, netns=netns).ok()
    cni("CHECK", conf, netns=netns).ok()
    assert cni("DEL", conf, netns=netns).ok().stdout == ""
    lines = [json.loads(line) for line in sim.log_file.read_text().splitlines()]
    done = [line for line in lines if line["msg"].endswith(" done")]
    assert [d["command"] for d in done] == ["ADD", "CHECK", "DEL"]
    for line in done:
        assert line["containerID"] == "ctr1" and line["ifname"] == "eth0"
        assert line["duration_ms"] > 0 and line["outcome"] == "ok"


def test_log_level_filters(cni, sim, netns):
    cni("ADD", sim.conf(logLevel="error"), netns=netns).ok()
    assert not sim.log_file.exists() or sim.log_file.read_text() == ""


@pytest.mark.parametrize("case", ["no netns", "no prevResult", "twice", "never added"])
def test_del_always_succeeds(cni, sim, netns, case):
    conf = sim.conf()
    if case != "never added":
        cni("ADD", conf, netns=netns).ok()
    if case == "no netns":
        cni("DEL", conf, netns=None).ok()
    else:
        cni("DEL", conf, netns=netns).ok()
    if case == "twice":
        cni("DEL", conf, netns=netns).ok()
    nothing_made(sim)


def test_del_after_failed_add(cni, sim, netns):
    conf = sim.conf(cxi={"limits": {"tles": {"res": 2048}}})  # the default service holds 512
    cni("ADD", conf, netns=netns).error(100)
    cni("DEL", conf, netns=netns).ok()
    nothing_made(sim)


# Every error code, with the input that provokes it; each must leave nothing behind.
def bad_cases(sim, netns, tmp_path):
    regular = tmp_path / "not-a-netns"
    regular.write_text("x")
    state_link = tmp_path / "state-link"
    state_link.symlink_to(tmp_path)
    return {
        "unknown cniVersion": (1, dict(conf=sim.conf("9.9.9")), "cniVersion"),
        "no cniVersion": (1, dict(conf={"type": "cxi"}), "cniVersion"),
        "STATUS before 1.1.0": (1, dict(command="STATUS", conf=sim.conf("1.0.0")), "1.1.0"),
        "unknown cxi key": (2, dict(conf=sim.conf(cxi={"vnii": [5]})), "cxi.vnii"),
        "netns missing": (3, dict(netns="/run/netns/does-not-exist-cxit"), "CNI_NETNS"),
        "no CNI_CONTAINERID": (4, dict(container_id=None), "CNI_CONTAINERID"),
        "CNI_CONTAINERID with ../": (4, dict(container_id="../etc"), "CNI_CONTAINERID"),
        "CNI_CONTAINERID with newline": (4, dict(container_id="a\nb"), "CNI_CONTAINERID"),
        "CNI_IFNAME too long": (4, dict(ifname="x" * 16), "CNI_IFNAME"),
        "CNI_IFNAME over 15 bytes": (4, dict(ifname="é" * 8), "CNI_IFNAME"),  # 8 characters
        "no CNI_NETNS on ADD": (4, dict(netns=None), "CNI_NETNS"),
        "no CNI_PATH": (4, dict(cni_path=None), "CNI_PATH"),
        "bad CNI_COMMAND": (4, dict(command="ADDD"), "CNI_COMMAND"),
        "bad CNI_ARGS": (4, dict(cni_args="K8S_POD_NAME"), "CNI_ARGS"),
        "bad VNI in CNI_ARGS": (4, dict(cni_args="VNI=abc",
                                        conf=sim.conf(cxi={"vniSources": ["cniArgs", "config"]})), "VNI"),
        "stdin unreadable": (5, dict(stdin="write end of a pipe"), "stdin"),
        "stdin not JSON": (6, dict(conf=b"{not json"), "decode"),
        "stdin not an object": (6, dict(conf=b"[1,2]"), "object"),
        "stdin not UTF-8": (6, dict(conf=b'{"a":"\xff"}'), "decode"),
        "VNI out of range": (7, dict(conf=sim.conf(cxi={"vnis": [70000]})), "cxi.vnis[0]"),
        "too many VNIs": (7, dict(conf=sim.conf(cxi={"vnis": [2, 3, 4, 5, 6]})), "cxi.vnis"),
        "VNI 1 without leave": (7, dict(conf=sim.conf(cxi={"vnis": [1]})), "VNI 1"),
        "bad mode": (7, dict(conf=sim.conf(master="eth9", mode="l9", ipam={"type": "host-local"})),
                     "mode"),
        "devices master without master": (7, dict(conf=sim.conf(cxi={"devices": "master"})), "master"),
        "master named '..'": (7, dict(conf=sim.conf(master="..", ipam={"type": "host-local"})),
                              "master"),
        "master not UTF-8": (7, dict(conf=sim.conf(master="\udc80", ipam={"type": "host-local"})),
                             "master"),
        "unknown device": (7, dict(conf=sim.conf(cxi={"devices": ["cxi7"]})), "cxi7"),
        "res above max": (7, dict(conf=sim.conf(cxi={"limits": {"les": {"max": 1, "res": 2}}})),
                          "cxi.limits"),
        "relative stateDir": (7, dict(conf=sim.conf(stateDir="var/x")), "stateDir"),
        "netns is a regular file": (7, dict(netns=str(regular)), "nsfs"),
        "netns is the host's": (7, dict(netns="/proc/self/ns/net"), "host"),
        "no VNI anywhere": (7, dict(conf=sim.conf(cxi={"vnis": [], "vniPolicy": "required"})),
                            "no VNI"),
        "limit beyond a NIC": (7, dict(conf=sim.conf(cxi={"limits": {"acs": {"max": 5000}}})),
                               "cxi.limits.acs.max"),
        "no room on the NIC": (100, dict(conf=sim.conf(cxi={"limits": {"tles": {"res": 2048}}})),
                               "cxi0 has no room"),
        "libcxi missing": (101, dict(conf=sim.conf(cxi={"backend": "libcxi",
                                                        "libcxi": str(tmp_path / "libcxi.so.1")})),
                           "libcxi.so.1"),
        "stateDir is a symlink": (102, dict(conf=sim.conf(stateDir=str(state_link))), "symlink"),
    }


BAD_NAMES = [
    "unknown cniVersion", "no cniVersion", "STATUS before 1.1.0", "unknown cxi key",
    "netns missing", "no CNI_CONTAINERID", "CNI_CONTAINERID with ../",
    "CNI_CONTAINERID with newline", "CNI_IFNAME too long", "CNI_IFNAME over 15 bytes",
    "no CNI_NETNS on ADD", "no CNI_PATH",
    "bad CNI_COMMAND", "bad CNI_ARGS", "bad VNI in CNI_ARGS", "stdin unreadable", "stdin not JSON",
    "stdin not an object", "stdin not UTF-8", "VNI out of range", "too many VNIs",
    "VNI 1 without leave", "bad mode", "devices master without master", "master named '..'",
    "master not UTF-8",
    "unknown device",
    "res above max", "relative stateDir", "netns is a regular file", "netns is the host's",
    "no VNI anywhere", "limit beyond a NIC", "no room on the NIC", "libcxi missing", "stateDir is a symlink",
]


@pytest.mark.parametrize("bad_case", BAD_NAMES)
def test_every_bad_input_is_a_clean_cni_error(cni, sim, netns, tmp_path, bad_case):
    cases = bad_cases(sim, netns, tmp_path)
    assert set(cases) == set(BAD_NAMES)
    code, kw, needle = cases[bad_case]
    kw = dict(kw)
    command = kw.pop("command", "ADD")
    conf = kw.pop("conf", sim.conf())
    kw.setdefault("netns", netns)
    stdin = kw.pop("stdin", None)
    if stdin == "write end of a pipe":
        read_end, write_end = os.pipe()
        try:
            run = cni(command, stdin=write_end, **kw)
        finally:
            os.close(read_end)
            os.close(write_end)
    else:
        run = cni(command, conf, **kw)
    err = run.error(code)
    assert needle.lower() in (err["msg"] + err.get("details", "")).lower(), err
    assert err.get("details"), f"no fix given: {err}"
    nothing_made(sim)


def test_status_ok_and_not_available(cni, sim, tmp_path):
    cni("STATUS", sim.conf("1.1.0"), container_id=None, ifname=None).ok()
    sim.sim_state.write_text('{"version": 1, "devi')  # truncated
    err = cni("STATUS", sim.conf("1.1.0"), container_id=None, ifname=None).error(50)
    assert "damaged" in err["msg"]
    missing = sim.conf("1.1.0", cxi={"backend": "libcxi", "libcxi": str(tmp_path / "nolib.so")})
    err = cni("STATUS", missing, container_id=None, ifname=None).error(50)
    assert "nolib.so" in err["msg"]


def test_status_without_devices_is_not_available(cni, sim):
    sim.seed({})
    err = cni("STATUS", sim.conf("1.1.0"), container_id=None, ifname=None).error(50)
    assert "no CXI devices" in err["msg"]


def test_gc_honours_valid_attachments(cni, sim, make_netns):
    spaces = [make_netns() for _ in range(3)]
    for i, ns in enumerate(spaces):
        cni("ADD", sim.conf("1.1.0"), netns=ns, container_id=f"c{i}").ok()
    assert len(sim.records()) == 3 and len(sim.services()) == 6
    gc_conf = sim.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c0", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]})
    cni("GC", gc_conf, container_id=None, ifname=None).ok()
    assert sorted(r["containerID"] for r in sim.records()) == ["c0", "c2"]
    inodes = {svc.netns_inode for svc in sim.services()}
    assert inodes == {os.stat(spaces[0]).st_ino, os.stat(spaces[2]).st_ino}
    err = cni("GC", sim.conf("1.1.0"), container_id=None, ifname=None).error(7)
    assert "valid-attachments" in err["msg"]


def test_no_traceback_on_internal_error(cni, sim, netns):
    """A state file that is a directory makes the sim fail deep inside; the runtime still
    gets one JSON error and the process exits non-zero."""
    sim.sim_state.mkdir()
    err = cni("ADD", sim.conf(), netns=netns).error()
    assert err["code"] in (101, 999)


def test_no_vni_under_fallback_starts_the_pod_without_a_service(cni, sim, netns):
    """{"type": "cxi"} chained after flannel must not break pods that are not jobs."""
    conf = sim.conf(cxi={"vnis": []}, prevResult=PREV_1X)
    result = cni("ADD", conf, netns=netns).ok().json
    assert result["ips"] == PREV_1X["ips"] and result["cxi"]["services"] == []
    assert sim.services() == []
    cni("CHECK", conf, netns=netns).ok()
    cni("DEL", conf, netns=netns).ok()
    assert sim.records() == []


def test_del_and_check_find_an_attachment_whatever_name_an_older_add_accepted(cni, sim, netns):
    """An older ADD counted 15 characters, not bytes: "é" x 8 (16 bytes) was taken. ADD
    refuses it now, but DEL and CHECK of such an attachment must still reach its record."""
    from cxi_cni.record import AttachmentRecord, Binding
    from cxi_cni.state import AttachmentStore

    name = "é" * 8
    assert "CNI_IFNAME" in cni("ADD", sim.conf(), netns=netns, ifname=name).error(4)["msg"]
    inode = os.stat(netns).st_ino
    made = [Binding(device, sim.bind(device, (100,), inode)) for device in ("cxi0", "cxi1")]
    store = AttachmentStore(sim.conf()["stateDir"])  # what the older ADD made, and its record
    store.ensure()
    store.save(AttachmentRecord("ctr1", name, netns, inode, (100,), (), ["cxi0", "cxi1"],
                                services=made, complete=True))
    cni("CHECK", sim.conf(), netns=netns, ifname=name).ok()
    cni("DEL", sim.conf(), netns=netns, ifname=name).ok()
    nothing_made(sim)
    err = cni("DEL", sim.conf(), netns=netns, ifname="x" * 300).error(4)
    assert "CNI_IFNAME" in err["msg"]
