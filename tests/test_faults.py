"""Faults and hostile input, second round, through the frozen binary, each condition built for
real: malformed prevResults, the host's namespace, a path swapped while ADD waits, non-ASCII
bind mounts, FIFOs, symlinks made by another uid, a tmpfs that fills, a read-only stateDir.
No leak, no hang, no host link touched, and every refusal the plugin's own CNI error."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import reliability
from cnitool import run_cni
from conftest import sh
from mountns import MountNamespace

from cxi_cni.state import attachment_key

CNI_PATH = "/usr/lib/cni"
HANG_LIMIT = 20  # seconds: far past any normal command, far below a runtime's timeout


def nothing_made(sim):
    assert sim.services() == [] and sim.records() == []
    assert not list(sim.state_dir.glob("*.tmp")) if sim.state_dir.exists() else True


def deep(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"x": value}
    return value


PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": []}
BAD_PREV_RESULTS = {
    "interfaces not a list": ({**PREV, "interfaces": "eth0"}, 7, "prevResult.interfaces"),
    "routes an object": ({**PREV, "routes": {"dst": "0.0.0.0/0"}}, 7, "prevResult.routes"),
    "0.4.0 address not a string": ({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": 42}]},
                                   7, "prevResult.ips[0].address"),
    "address not an address": ({**PREV, "ips": [{"address": "10.1.2.300/24"}]}, 7,
                                "prevResult.ips[0].address"),
    "nested 500 deep": ({**PREV, "x": deep(500)}, 6, "nested deeper"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREV_RESULTS))
def test_a_malformed_prev_result_is_refused_before_anything_is_made(cni, sim, netns, case):
    prev, code, needle = BAD_PREV_RESULTS[case]
    conf = {**sim.conf("0.4.0" if "0.4.0" in case else "1.0.0"), "prevResult": prev}
    err = cni("ADD", conf, netns=netns).error(code)
    assert needle in err["msg"], err
    nothing_made(sim)
    reliability.record("hostile", cases=1)


@pytest.fixture
def host_link(make_veth):
    """A macvlan link in the host's namespace (the kind cxi makes) that no DEL may remove."""
    name = f"cxh{uuid.uuid4().hex[:8]}"
    sh("ip", "link", "add", name, "link", make_veth(), "type", "macvlan")
    yield name
    sh("ip", "link", "del", name, check=False)


def host_has(name: str) -> bool:
    return sh("ip", "link", "show", "dev", name, check=False).returncode == 0


def macvlan(sim, tmp_path, master: str) -> dict:
    return sim.conf(master=master, linkType="macvlan",
                    ipam={"type": "host-local", "subnet": "10.233.0.0/24", "dataDir": str(tmp_path / "ipam")})


def test_del_with_the_hosts_namespace_never_touches_a_host_link(cni, sim, tmp_path, netns, make_veth,
                                                                host_link):
    conf = macvlan(sim, tmp_path, make_veth())
    cni("DEL", conf, netns="/proc/self/ns/net", ifname=host_link, cni_path=CNI_PATH).ok()
    assert host_has(host_link)
    cni("ADD", conf, netns=netns, ifname=host_link, cni_path=CNI_PATH).ok()  # the pod's link, same name
    cni("DEL", conf, netns="/proc/self/ns/net", ifname=host_link, cni_path=CNI_PATH).ok()
    assert host_has(host_link), "DEL deleted the host's link"
    assert sim.services() == [] and sim.records() == []
    for command in ("ADD", "CHECK"):
        err = cni(command, conf, netns="/proc/self/ns/net", ifname="eth9", cni_path=CNI_PATH).error(7)
        assert "host's own network namespace" in err["msg"]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (PyInstaller's bootloader runs the program in a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def fd_on_netns(pid: int, inode: int) -> bool:
    for member in process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{member}/fd"):
                st = os.stat(f"/proc/{member}/fd/{fd}")
                if st.st_ino == inode and st.st_dev == os.stat("/proc/self/ns/net").st_dev:
                    return True
        except OSError:
            continue
    return False


def test_a_path_swapped_while_add_waits_changes_nothing(cxi_bin, sim, tmp_path, netns, make_veth):
    """ADD opens CNI_NETNS once; swapping the path for the host's namespace while ADD waits
    for the attachment's lock cannot put the pod's link (and its address) in the host."""
    conf = macvlan(sim, tmp_path, make_veth())
    ifname = f"cxs{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pod-netns"
    path.symlink_to(netns)
    locks = sim.state_dir / "locks"
    locks.mkdir(parents=True, mode=0o700)
    sim.state_dir.chmod(0o700)
    lock = open(locks / attachment_key("ctr1", ifname), "a")
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_EX)
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1",
           "CNI_NETNS": str(path), "CNI_IFNAME": ifname, "CNI_PATH": CNI_PATH}
    add = subprocess.Popen([cxi_bin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    add.stdin.write(json.dumps(conf).encode())
    add.stdin.close()
    deadline = time.monotonic() + HANG_LIMIT
    while not fd_on_netns(add.pid, os.stat(netns).st_ino):
        assert time.monotonic() < deadline and add.poll() is None, "ADD never opened the namespace"
        time.sleep(0.02)
    time.sleep(0.2)  # ADD is at the lock now
    path.unlink()
    path.symlink_to("/proc/self/ns/net")
    lock.close()
    assert add.wait(timeout=HANG_LIMIT) == 0, add.stdout.read()
    assert not host_has(ifname), "the pod's link went into the host's namespace"
    assert sh("ip", "-n", os.path.basename(netns), "link", "show", "dev", ifname,
              check=False).returncode == 0
    cni_del = run_cni(cxi_bin, "DEL", conf, netns=netns, ifname=ifname, cni_path=CNI_PATH)
    cni_del.ok()


@pytest.fixture
def odd_bind_mount(tmp_path):
    """A bind mount of a namespace at a path with non-ASCII bytes, a space and a tab."""
    folder = tmp_path / "pöd ns\tfolder"
    folder.mkdir()
    target = folder / "námespace x"
    target.touch()
    made = []

    def bind(netns: str) -> str:
        sh("mount", "--bind", netns, str(target))
        made.append(target)
        return str(target)

    yield bind
    for path in made:
        sh("umount", str(path), check=False)


def test_gc_keeps_services_of_a_namespace_held_by_a_non_ascii_bind_mount(cni, sim, cxi_bin, tmp_path,
                                                                         make_netns, odd_bind_mount):
    netns = make_netns()
    held = odd_bind_mount(netns)
    cni("ADD", sim.conf(), netns=held, container_id="kept").ok()
    sh("ip", "netns", "del", os.path.basename(netns))  # only the odd bind mount holds it now
    inode = os.stat(held).st_ino
    gc = {**sim.conf("1.1.0"), "cni.dev/valid-attachments": [{"containerID": "kept", "ifname": "eth0"}]}
    cni("GC", gc, container_id=None, ifname=None).ok()
    conf_file = tmp_path / "conf.json"
    conf_file.write_text(json.dumps(sim.conf()))
    out = subprocess.run([cxi_bin, "gc", "--config", str(conf_file)], capture_output=True, text=True,
                         env={**os.environ, **sim.env})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert {s.netns_inode for s in sim.services()} == {inode} and len(sim.services()) == 2
    cni("DEL", sim.conf(), netns=held, container_id="kept").ok()


def test_gc_survives_a_record_without_container_id(cni, sim, cxi_bin, tmp_path, netns):
    cni("ADD", sim.conf(), netns=netns).ok()
    (sim.state_dir / ("0" * 40 + ".json")).write_text(json.dumps(
        {"ifname": "eth0", "netnsInode": 5, "services": [], "complete": True}))
    gc = {**sim.conf("1.1.0"), "cni.dev/valid-attachments": []}
    cni("GC", gc, container_id=None, ifname=None).ok()
    conf_file = tmp_path / "conf.json"
    conf_file.write_text(json.dumps(sim.conf()))
    out = subprocess.run([cxi_bin, "gc", "--config", str(conf_file)], capture_output=True, text=True,
                         env={**os.environ, **sim.env})
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out
    assert sim.services() == []


def test_nothing_blocks_on_a_fifo(cni, sim, cxi_bin, tmp_path, netns, make_veth):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    conf = sim.conf(logFile=str(fifo))
    for command in ("ADD", "DEL"):
        started = time.monotonic()
        err = cni(command, conf, netns=netns, timeout=HANG_LIMIT).error(7)
        assert "logFile" in err["msg"] and "FIFO" in err["msg"] and time.monotonic() - started < 10
    conf_file = tmp_path / "conf.json"
    conf_file.write_text(json.dumps(conf))
    doctor = subprocess.run([cxi_bin, "doctor", "--config", str(conf_file)], capture_output=True,
                            text=True, timeout=HANG_LIMIT, env={**os.environ, **sim.env})
    assert doctor.returncode == 1 and "FIFO" in doctor.stdout
    netns_fifo = tmp_path / "netns.fifo"
    os.mkfifo(netns_fifo)
    cni("DEL", macvlan(sim, tmp_path, make_veth()), netns=str(netns_fifo), cni_path=CNI_PATH,
        timeout=HANG_LIMIT).ok()
    nothing_made(sim)


def test_state_dir_under_a_folder_others_can_write_is_refused(cni, sim, tmp_path, netns):
    parent = tmp_path / "var-lib"
    parent.mkdir(mode=0o755)
    sim.state_dir = parent / "state"
    conf = sim.conf(stateDir=str(sim.state_dir))
    cni("ADD", conf, netns=netns).ok()
    parent.chmod(0o777)  # another user could now move the records away
    err = cni("DEL", conf, netns=netns).error(102)
    assert str(parent) in err["msg"] and "writable by others" in err["msg"]
    assert len(sim.services()) == 2, "DEL answered with the records out of its hands"
    os.chown(parent, 1000, 1000)
    parent.chmod(0o755)
    err = cni("DEL", conf, netns=netns).error(102)
    assert "owned by uid 1000" in err["msg"]
    os.chown(parent, 0, 0)
    cni("DEL", conf, netns=netns).ok()
    nothing_made(sim)


def test_a_state_dir_to_be_made_behind_a_symlink_into_a_users_folder_is_refused(cni, sim, tmp_path,
                                                                                  netns):
    """root's symlink, in a folder of root's, to a folder another user owns: the folders
    root would make below it are that user's to move; refused although they do not exist."""
    users = tmp_path / "users-folder"
    users.mkdir()
    os.chown(users, 1000, 1000)
    (tmp_path / "link").symlink_to(users)
    conf = sim.conf(stateDir=str(tmp_path / "link" / "cxi" / "state"))
    err = cni("ADD", conf, netns=netns).error(102)
    assert "owned by uid 1000" in err["msg"], err
    assert os.listdir(users) == [] and sim.services() == []


def test_log_file_symlink_made_by_another_user_is_not_followed(cni, sim, tmp_path, netns):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "cxi.log"
    link.symlink_to(target)
    os.lchown(link, 1000, 1000)
    err = cni("ADD", sim.conf(logFile=str(link)), netns=netns).error(7)
    assert "logFile" in err["msg"] and "symlink" in err["msg"]
    assert target.read_text() == "keep me\n"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    err = cni("ADD", sim.conf(logFile=str(shared / "cxi.log")), netns=netns).error(7)
    assert "writable by others" in err["msg"]
    nothing_made(sim)


@pytest.fixture
def mount_ns():
    space = MountNamespace()
    yield space
    space.close()


def test_a_full_or_read_only_state_dir_is_code_102_and_leaves_no_temporary(sim, cxi_bin, netns, tmp_path,
                                                                           mount_ns):
    folder = tmp_path / "small"
    folder.mkdir(mode=0o700)
    mount_ns.sh(f"mount -t tmpfs -o size=64k,mode=0700 tmpfs {folder} && mkdir -m 0700 {folder}/state "
                f"&& mkdir -m 0700 {folder}/state/locks && (dd if=/dev/zero of={folder}/fill bs=4k "
                "2>/dev/null || true)")
    conf = sim.conf(stateDir=f"{folder}/state")
    err = mount_ns.cni(cxi_bin, "ADD", conf, netns=netns, cni_path=CNI_PATH).error(102)
    assert "No space left" in err["msg"] and f"{folder}/state" in err["msg"]
    assert [n for n in mount_ns.names(f"{folder}/state") if n.endswith(".tmp")] == []
    assert sim.services() == []
    mount_ns.sh(f"rm {folder}/fill && mount -o remount,ro {folder}")
    for command in ("ADD", "DEL"):
        err = mount_ns.cni(cxi_bin, command, conf, netns=netns, cni_path=CNI_PATH).error(102)
        assert "Read-only file system" in err["msg"]
    assert sim.services() == []


@pytest.mark.parametrize(("case", "code", "needle"), [
    ("logFile /dev/full", 7, "logFile"),
    ("args.cni not an object", 7, "args.cni"),
    ("CNI_IFNAME template", 4, "CNI_IFNAME"),
])
def test_error_hygiene(cni, sim, netns, case, code, needle):
    conf, ifname = sim.conf(), "eth0"
    if case == "logFile /dev/full":
        conf["logFile"] = "/dev/full"
    elif case == "args.cni not an object":
        conf["args"] = {"cni": ["vni", 4242]}
    else:
        ifname = "net%d"
    run = cni("ADD", conf, netns=netns, ifname=ifname)
    err = run.error(code)
    assert needle in err["msg"] and run.stderr == "", run.stderr
    nothing_made(sim)


def test_check_of_a_record_without_netns_inode_is_code_102(cni, sim, netns):
    cni("ADD", sim.conf(), netns=netns).ok()
    [path] = sim.state_dir.glob("*.json")
    record = json.loads(path.read_text())
    del record["netnsInode"]
    path.write_text(json.dumps(record))
    err = cni("CHECK", sim.conf(), netns=netns).error(102)
    assert "netnsInode" in err["msg"]
    cni("DEL", sim.conf(), netns=netns).ok()
    nothing_made(sim)


def test_log_file_on_a_folder_that_does_not_exist_yet_is_made(cni, sim, netns, tmp_path):
    log = tmp_path / "new" / "deeper" / "cxi.log"
    cni("ADD", sim.conf(logFile=str(log)), netns=netns).ok()
    assert json.loads(log.read_text().splitlines()[-1])["command"] == "ADD"
    assert Path(log).stat().st_mode & 0o777 == 0o640


def test_an_ipam_plugin_that_hangs_is_cut_off_and_undone(cni, sim, tmp_path, netns, make_veth):
    plugins = tmp_path / "cni-bin"
    plugins.mkdir()
    hanging = plugins / "host-local"
    hanging.write_text("#!/bin/sh\nexec sleep 300\n")
    hanging.chmod(0o755)
    conf = macvlan(sim, tmp_path, make_veth())
    started = time.monotonic()
    err = cni("ADD", conf, netns=netns, cni_path=str(plugins), timeout=HANG_LIMIT,
              env={"CXI_CNI_DEBUG_IPAM_TIMEOUT": "1"}).error(11)
    assert "did not answer within 1 s" in err["msg"] and time.monotonic() - started < 10
    assert len(sh("ip", "-n", os.path.basename(netns), "-o", "link").stdout.splitlines()) == 1  # lo only
    nothing_made(sim)
    assert sh("pgrep", "-f", f"{hanging}", check=False).returncode != 0, "the IPAM plugin still runs"


@pytest.mark.parametrize("key", ["libcxi", "simState"])
def test_a_fifo_as_the_library_or_the_simulated_devices_does_not_hang(cni, sim, tmp_path, netns, key):
    fifo = tmp_path / f"{key}.fifo"
    os.mkfifo(fifo)
    backend = {"libcxi": {"backend": "libcxi"}, "simState": {}}[key]
    started = time.monotonic()
    err = cni("ADD", sim.conf(cxi={**backend, key: str(fifo)}), netns=netns, timeout=HANG_LIMIT).error(101)
    assert str(fifo) in err["msg"] and "not a regular file" in err["msg"]
    assert time.monotonic() - started < 10
    assert sim.records() == []


def test_fields_a_prev_result_list_does_not_define_pass_through(cni, sim, netns):
    """Only ips and routes hold addresses; an interface entry's other keys (whatever their
    type) are the previous plugin's business and go through untouched."""
    prev = {**PREV, "interfaces": [{"name": "eth0", "gw": {}, "address": 5, "dst": ["x"]}]}
    result = cni("ADD", {**sim.conf(), "prevResult": prev}, netns=netns).ok().json
    assert result["interfaces"][0] == prev["interfaces"][0]
    cni("DEL", sim.conf(), netns=netns).ok()
    nothing_made(sim)


def test_null_lists_in_a_prev_result_count_as_absent(cni, sim, netns):
    for version, prev in (("1.0.0", {"cniVersion": "1.0.0", "interfaces": None, "routes": None,
                                     "ips": None, "dns": None}),
                          ("0.3.0", {"cniVersion": "0.4.0", "ips": None})):
        result = cni("ADD", {**sim.conf(version), "prevResult": prev}, netns=netns).ok().json
        assert result["ips"] == [] and result.get("dns") in (None, {}), result
        cni("DEL", sim.conf(version), netns=netns).ok()
        nothing_made(sim)


@pytest.mark.parametrize("entry", [{"containerID": ["a"], "ifname": "eth0"},
                                   {"containerID": "a", "ifname": {"x": 1}}, None, ["a", "eth0"]])
def test_gc_refuses_valid_attachments_it_cannot_read_and_collects_nothing(cni, sim, netns, entry):
    cni("ADD", sim.conf(), netns=netns).ok()
    gc = {**sim.conf("1.1.0"), "cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"},
                                                              entry]}
    err = cni("GC", gc, container_id=None, ifname=None).error(7)
    assert "valid-attachments" in err["msg"], err
    assert len(sim.services()) == 2 and len(sim.records()) == 1


@pytest.mark.parametrize("change", [
    {"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 0.5}]}},
    {"prevResult": {"cniVersion": "1.0.0", "dns": None, "interfaces": "eth0"}},
    {"cxi": {"tcs": ""}}, {"cxi": {"limits": {"les": {"def": 65535}}}}, {"cxi": {"devices": "master"}},
    {"cxi": {"allowedVnis": ["99999"]}}, {"cxi": {"podVnis": ["0-5"]}}, {"cxi": {"zz": 1}},
    {"mtu": 1}])
def test_del_cleans_up_whatever_prev_result_or_wrong_fields_it_is_handed(cni, sim, netns, change):
    """What ADD made is removed by DEL with a prevResult ADD would refuse, or a configuration
    that turned wrong since (edited, or a later version's stricter rule): DEL needs only
    where the records, the log and the devices are, and logs the fields it set aside."""
    cni("ADD", sim.conf(), netns=netns).ok()
    conf = sim.conf()
    for key, value in change.items():
        conf[key] = {**conf[key], **value} if key == "cxi" else value
    cni("DEL", conf, netns=netns).ok()
    nothing_made(sim)
    if "prevResult" not in change:
        assert any("at their defaults" in line for line in sim.log_file.read_text().splitlines())


@pytest.mark.parametrize("garble", [{"vnis": 5}, {"tcs": 5}, {"devices": 7}, {"pod": {"a": object}}])
def test_a_record_with_a_garbled_field_is_damaged_and_del_and_gc_still_clean_up(cni, sim, make_netns,
                                                                                 garble):
    """A record whose list field holds a number (a disk error, a hand edit) is a damaged
    record: GC goes on, another pod's ADD in the namespace works, and DEL destroys the
    services bound to the pod's namespace that no readable record claims."""
    netns = make_netns()
    cni("ADD", sim.conf(), netns=netns).ok()
    [path] = sim.state_dir.glob("*.json")
    data = json.loads(path.read_text())
    data.update({k: (str(v) if v is object else v) for k, v in garble.items()})
    if "pod" in garble:
        data["pod"] = ["not", "a", "dict"]
    path.write_text(json.dumps(data))
    gc = {**sim.conf("1.1.0"), "cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"}]}
    cni("GC", gc, container_id=None, ifname=None).ok()
    cni("ADD", sim.conf(), netns=make_netns(), container_id="other").ok()
    cni("DEL", sim.conf(), netns=netns).ok()
    assert [r["containerID"] for r in sim.records()] == ["other"]
    assert {s.netns_inode for s in sim.services()} == {os.stat(r["netns"]).st_ino for r in sim.records()}


def test_gc_goes_on_past_an_attachment_whose_lock_is_broken(cni, sim, make_netns):
    """One attachment's lock file is a directory: GC says so (code 11, the runtime retries)
    and still collects the others."""
    broken, gone = make_netns(), make_netns()
    cni("ADD", sim.conf(), netns=broken, container_id="c11").ok()
    cni("ADD", sim.conf(), netns=gone, container_id="c5").ok()
    sh("ip", "netns", "del", os.path.basename(gone))
    key = next(r for r in sim.records() if r["containerID"] == "c11")
    lock = sim.state_dir / "locks" / attachment_key(key["containerID"], key["ifname"])
    lock.unlink(missing_ok=True)
    lock.mkdir()
    err = cni("GC", {**sim.conf("1.1.0"), "cni.dev/valid-attachments": []},
              container_id=None, ifname=None).error(11)
    assert "c11/eth0" in err["msg"], err
    assert [r["containerID"] for r in sim.records()] == ["c11"]
    assert {s.netns_inode for s in sim.services()} == {os.stat(broken).st_ino}
    lock.rmdir()
    cni("DEL", sim.conf(), netns=broken, container_id="c11").ok()
    nothing_made(sim)
