"""Every file in conf-examples/ parses (JSON, YAML, or the JSON/YAML blocks of a Markdown
note), and every cxi entry in it passes the plugin's own configuration parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cxi_cni.config import parse_conf

EXAMPLES = Path(__file__).resolve().parent.parent / "conf-examples"
FENCE = re.compile(r"^```(json|yaml)\n(.*?)^```", re.S | re.M)


def documents(path: Path) -> list:
    """The parsed documents of one example file."""
    text = path.read_text()
    if path.suffix in (".json", ".conflist"):
        return [json.loads(text)]
    if path.suffix in (".yaml", ".yml"):
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if path.suffix == ".md":
        return [json.loads(body) if lang == "json" else yaml.safe_load(body)
                for lang, body in FENCE.findall(text)]
    raise AssertionError(f"{path.name}: unexpected kind of file in conf-examples")


def network_configs(doc) -> list[dict]:
    """The network configurations a document holds: a NAD's spec.config, a conflist, a conf."""
    if not isinstance(doc, dict):
        return []
    if doc.get("kind") == "NetworkAttachmentDefinition":
        return [json.loads(doc["spec"]["config"])]
    if "plugins" in doc or "type" in doc:
        return [doc]
    return []


def plugin_entries(netconf: dict) -> list[dict]:
    """Each plugin's configuration as the runtime hands it over: a conflist's entries get
    the list's cniVersion and name."""
    if "plugins" not in netconf:
        return [netconf]
    return [{"cniVersion": netconf["cniVersion"], "name": netconf["name"], **plugin}
            for plugin in netconf["plugins"]]


def all_examples() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.is_file())


def cxi_entries(path: Path) -> list[dict]:
    return [entry for doc in documents(path) for netconf in network_configs(doc)
            for entry in plugin_entries(netconf) if entry.get("type") == "cxi"]


def test_the_examples_are_all_there():
    names = {p.name for p in all_examples()}
    assert {f"nad-hsn{i}-cxi.yaml" for i in range(4)} <= names
    assert {"nad-hsn0-ipvlan-then-cxi.yaml", "flannel-cni-conf.json", "podman-hpcnet.conflist",
            "k3s-README.md", "README.md"} <= names


@pytest.mark.parametrize("path", [p for p in all_examples() if p.name != "README.md"],
                         ids=lambda p: p.name)
def test_every_cxi_entry_parses(path):
    assert documents(path), f"{path.name} holds nothing to parse"
    entries = cxi_entries(path)
    assert entries, f"{path.name} has no cxi entry"
    for entry in entries:
        conf = parse_conf(entry)
        assert conf.cxi.backend == "libcxi", f"{path.name}: production examples use libcxi"
        assert conf.stateDir == "/var/lib/cni/cxi" and conf.logFile == "/var/log/cxi-cni.log"


@pytest.mark.parametrize("index", range(4))
def test_hsn_nads_are_the_vendors_with_cxi(index):
    (doc,) = documents(EXAMPLES / f"nad-hsn{index}-cxi.yaml")
    assert doc["apiVersion"] == "k8s.cni.cncf.io/v1" and doc["metadata"]["name"] == f"hsn{index}-cxi"
    (entry,) = cxi_entries(EXAMPLES / f"nad-hsn{index}-cxi.yaml")
    conf = parse_conf(entry)
    assert (conf.master, conf.linkType, conf.link_mode) == (f"hsn{index}", "ipvlan", "l2")
    assert conf.ipam == {"type": "whereabouts", "range": f"10.150.1{index}.1/28"}
    assert conf.cxi.devices == "master" and conf.cniVersion == "0.3.1"


def test_chains_put_cxi_after_the_plugins_it_follows():
    def types(path):
        (netconf,) = [n for doc in documents(path) for n in network_configs(doc)]
        return [plugin["type"] for plugin in netconf["plugins"]]

    assert types(EXAMPLES / "nad-hsn0-ipvlan-then-cxi.yaml") == ["ipvlan", "cxi"]
    assert types(EXAMPLES / "flannel-cni-conf.json") == ["flannel", "portmap", "cxi"]
    assert types(EXAMPLES / "podman-hpcnet.conflist") == ["bridge", "portmap", "firewall",
                                                         "tuning", "cxi"]
    for name in ("nad-hsn0-ipvlan-then-cxi.yaml", "flannel-cni-conf.json", "podman-hpcnet.conflist"):
        (entry,) = cxi_entries(EXAMPLES / name)
        assert parse_conf(entry).master is None, f"{name}: a chained cxi makes no link"


def test_k3s_note_names_its_directories():
    text = (EXAMPLES / "k3s-README.md").read_text()
    for path in ("/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/cni",
                 "/var/lib/rancher/k3s/data/current/bin", "--flannel-cni-conf"):
        assert path in text
    blocks = documents(EXAMPLES / "k3s-README.md")
    assert {"flannel-cni-conf"} <= set(blocks[0]) and blocks[1]["plugins"][-1]["type"] == "cxi"
