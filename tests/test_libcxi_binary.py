"""The frozen binary on nodes whose libcxi cannot serve: an old library (no
cxil_svc_set_netns) with a driver that has no NET_NS member either, the same library with a
call stack forced, and no libcxi at all. ADD, STATUS, doctor and `cxi env` say so in the
plugin's own words, naming the file, and nothing is made."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import LibcxiSetup, libcxi_setup


def admin(cxi_bin, command, path, env) -> subprocess.CompletedProcess:
    """An admin command with a clean environment (no LD_LIBRARY_PATH of the caller's)."""
    return subprocess.run([cxi_bin, command, "--config", str(path)], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], **env})


@pytest.fixture
def old_node(request, tmp_path, monkeypatch):
    """SHS 13: libcxi without the netns calls, a driver without member type NET_NS."""
    return libcxi_setup(request, tmp_path, monkeypatch, "shs-13")


def test_a_node_that_can_bind_no_service_is_told_why(cxi_bin, cni, tmp_path, netns, old_node):
    conf = old_node.conf("1.1.0")
    err = cni("ADD", conf, netns=netns, env=old_node.env).error(101)
    assert "refuses a service member of type NET_NS" in err["msg"], err
    assert f"{old_node.lib.resolve()} has no cxil_svc_set_netns" in err["msg"], err
    assert "install SHS 14.0.1 or later" in err["msg"]
    assert old_node.records() == [] and old_node.services() == []
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    run = admin(cxi_bin, "doctor", path, old_node.env)
    assert run.returncode == 1, run.stdout
    assert "FAIL  stack: none works on this node: " in run.stdout
    assert "library: " + str(old_node.lib.resolve()) in run.stdout
    assert "cxil_svc_set_netns absent" in run.stdout and "revision standin-shs-13" in run.stdout
    assert old_node.services() == []  # the probe destroyed what it made


def test_a_driver_older_than_its_library_is_named(cxi_bin, cni, request, tmp_path, monkeypatch,
                                                   netns):
    """libcxi of SHS 14 (with cxil_svc_set_netns) over a 13.x driver, which has no
    SVC_SET_NETNS op and answers it -EINVAL, as for a service that does not exist."""
    node = LibcxiSetup(tmp_path, request.getfixturevalue("standin_lib"), monkeypatch, "shs-13")
    conf = node.conf()
    err = cni("ADD", conf, netns=netns, env=node.env).error(101)
    assert "cxil_svc_set_netns on cxi0 answers -EINVAL for service 2, which exists: the CXI " \
           "driver has no SVC_SET_NETNS (it predates SHS 14.0.0)" in err["msg"], err
    assert node.records() == [] and node.services() == []
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    run = admin(cxi_bin, "doctor", path, node.env)
    assert run.returncode == 1
    assert "FAIL  stack: none works on this node: " in run.stdout
    assert "has no SVC_SET_NETNS (it predates SHS 14.0.0" in run.stdout
    assert node.services() == []


def test_a_forced_call_stack_names_the_missing_symbol_everywhere(cxi_bin, cni, tmp_path, netns,
                                                                 old_node):
    conf = old_node.conf("1.1.0", cxi={"stack": "shs-14.0.1"})
    for command, code in (("STATUS", 50), ("ADD", 101)):
        err = cni(command, conf, netns=netns, env=old_node.env).error(code)
        assert f"{old_node.lib.resolve()} has no cxil_svc_set_netns" in err["msg"], err
        assert "cxi.stack 'shs-14.0.1' needs" in err["msg"], err
    assert old_node.records() == []
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    run = admin(cxi_bin, "doctor", path, old_node.env)
    assert run.returncode == 1
    assert "cxil_svc_set_netns" in run.stdout and str(old_node.lib.resolve()) in run.stdout


@pytest.mark.parametrize("libcxi", ["libcxi.so.1", "/opt/no-such-dir/libcxi.so.1"])
def test_no_libcxi_is_told_in_the_plugins_words(cxi_bin, cni, tmp_path, netns, sim, libcxi):
    """Not PyInstaller's "not found when the application was frozen", which points at the
    build: which file, where the loader looked, and what to install."""
    conf = sim.conf(cxi={"backend": "libcxi", "libcxi": libcxi})
    err = cni("ADD", conf, netns=netns).error(101)
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    outputs = [err["msg"], admin(cxi_bin, "doctor", path, {}).stdout,
               admin(cxi_bin, "env", path, {}).stderr]
    for text in outputs:
        assert f"cannot load the CXI library {libcxi}: " in text, text
        assert "install libcxi" in text and "frozen" not in text and "dynlib" not in text, text
        if "/" not in libcxi:
            assert "libcxi is not installed on this node" in text
            assert "LD_LIBRARY_PATH (unset), /etc/ld.so.cache" in text
    assert sim.records() == []


def test_a_libcxi_built_for_a_newer_glibc_than_the_bundled_one_is_named(cxi_bin, cni, request,
                                                                        tmp_path, monkeypatch, netns):
    """cxi carries the build host's glibc; a node whose libcxi was linked against a newer one
    (here the stand-in, made to need GLIBC_9.9) gets the loader's words and the way out."""
    built = request.getfixturevalue("standin_lib").read_bytes()
    assert b"GLIBC_2.7\0" in built  # .dynstr (and the symbol table, which does not matter)
    newer = tmp_path / "newer" / "libcxi.so.1"
    newer.parent.mkdir()
    newer.write_bytes(built.replace(b"GLIBC_2.7\0", b"GLIBC_9.9\0"))
    node = LibcxiSetup(tmp_path, newer, monkeypatch, "shs-14.0.1")
    err = cni("ADD", node.conf(), netns=netns, env=node.env).error(101)
    assert "version `GLIBC_9.9' not found" in err["msg"] and str(newer) in err["msg"], err
    assert "bundled into it (glibc 2." in err["msg"] and "build cxi (build.sh) on a host" in err["msg"]
    assert node.records() == []
