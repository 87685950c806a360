"""Reliability figures (cases run, kills survived, leaks found) recorded by the crash,
concurrency and hostile-input tests into a JSON-lines file, printed as totals at the end of
the pytest run, and what counts as a leak. Register it with `pytest_plugins = ["reliability"]`
in conftest.py."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

FIGURES = ("cases", "kills", "leaks")
ENV_FILE = "CXI_RELIABILITY_FILE"
# The plugin creates the pod's link under a temporary name "cxi" + 11 hex digits.
TEMP_LINK_NAME = re.compile(r"^cxi[0-9a-f]{11}$")


def figures_file() -> Path:
    """Where this run's figures go: set by the plugin hook at the start of the run, or a
    file in the temporary directory when the tests run without the plugin."""
    return Path(os.environ.get(ENV_FILE) or Path(tempfile.gettempdir()) / "cxi-reliability.jsonl")


def record(suite: str, cases: int = 0, kills: int = 0, leaks: int = 0, **detail) -> None:
    """Add one test's figures: `cases` inputs run, `kills` SIGKILLed ADDs cleaned up after,
    `leaks` left-behind services, links, leases or records found (the test then fails)."""
    line = {"suite": suite, "cases": cases, "kills": kills, "leaks": leaks, **detail}
    path = figures_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(line) + "\n")


def totals(path: Path | None = None) -> dict[str, dict[str, int]]:
    """Sums per suite and overall ("all") of the figures in the file."""
    sums: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))
    try:
        lines = (path or figures_file()).read_text().splitlines()
    except FileNotFoundError:
        return {}
    for text in lines:
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        for suite in (entry.get("suite", "?"), "all"):
            for name in FIGURES:
                sums[suite][name] += int(entry.get(name, 0))
    return dict(sums)


def ip_links(netns: str | None = None) -> list[dict]:
    """`ip -d -j link show` in a named netns (by its /run/netns path) or the host."""
    prefix = ["ip", "-n", os.path.basename(netns)] if netns else ["ip"]
    proc = subprocess.run([*prefix, "-d", "-j", "link", "show"], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def leaks(setup, spaces=(), ipam_dir: Path | None = None, master: str | None = None,
          unpack_dir: Path | None = None, binary: str | None = None) -> list[str]:
    """Everything an attachment may leave behind, as readable lines (empty: nothing):
    CXI services but the default one, records or stray files in the state directory, links
    in the given namespaces and temporary or master-hung links in the host's, IPAM leases,
    files the frozen binary unpacked into `unpack_dir` (its TMPDIR), and half-unpacked
    folders its launcher left beside `binary` (.cxi-<id>.tmp.*)."""
    found = [f"service {s.device}/{s.svc_id} bound to netns inode {s.netns_inode} "
             f"(VNIs {list(s.desc.vnis)})" for s in setup.services()]
    if setup.state_dir.exists():
        found += [f"state file {p.relative_to(setup.state_dir)}" for p in setup.state_dir.rglob("*")
                  if p.relative_to(setup.state_dir).as_posix() not in ("locks", "netns")]  # the folders
    for netns in spaces:
        if os.path.exists(netns):
            found += [f"link {link['ifname']} in {netns}" for link in ip_links(netns)
                      if link["ifname"] != "lo"]
    for link in ip_links():
        kind = link.get("linkinfo", {}).get("info_kind")
        if TEMP_LINK_NAME.match(link["ifname"]) or (
                master and link.get("link") == master and kind in ("macvlan", "ipvlan")):
            found.append(f"link {link['ifname']} ({kind}) in the host's netns")
    if ipam_dir is not None and ipam_dir.exists():
        found += [f"IPAM lease {p.relative_to(ipam_dir)}" for p in ipam_dir.rglob("*")
                  if p.is_file() and p.name != "lock" and not p.name.startswith("last_reserved_ip")]
    if unpack_dir is not None and unpack_dir.exists():
        found += [f"unpacked file {p.name} in TMPDIR" for p in unpack_dir.iterdir()]
    if binary is not None:
        found += [f"half-unpacked folder {p}" for p in Path(binary).parent.glob(".cxi-*.tmp.*")]
    return found


def pytest_configure(config):
    """A fresh figures file per run, under the pytest cache (or the temporary directory)."""
    cache = getattr(config, "cache", None)
    folder = Path(cache.mkdir("cxi-reliability")) if cache else Path(tempfile.mkdtemp())
    path = folder / "figures.jsonl"
    path.write_text("")
    os.environ[ENV_FILE] = str(path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sums = totals()
    if not sums:
        return
    terminalreporter.section("reliability figures")
    for suite in sorted(s for s in sums if s != "all") + ["all"]:
        row = sums[suite]
        terminalreporter.write_line(f"{suite:12} cases run {row['cases']:6}   kills survived "
                                    f"{row['kills']:4}   leaks found {row['leaks']:3}")
    terminalreporter.write_line(f"figures file: {figures_file()}")
