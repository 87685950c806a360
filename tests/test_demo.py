"""The README's first command: `cxi demo` runs ADD, CHECK and DEL and leaves nothing."""

from __future__ import annotations

import subprocess


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_demo_runs_and_cleans_up(cxi_bin):
    before_ns, before_links = netns_names(), links()
    run = subprocess.run([cxi_bin, "demo"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CNI_COMMAND=ADD cxi < conf.json   -> ok" in run.stdout
    assert "CNI_COMMAND=CHECK cxi < conf.json   -> ok" in run.stdout
    assert "after DEL: 0 services made by cxi remain" in run.stdout
    assert "\"svcId\"" in run.stdout and ("macvlan on" in run.stdout or "ipvlan on" in run.stdout)
    assert not {n for n in netns_names() - before_ns if n.startswith("cxi-demo-")}
    assert not {n for n in links() - before_links if n.startswith("cxidemo")}
