"""What cxi adds to a pod's start and stop on the kubelet's path: RunPodSandbox and
StopPodSandbox + RemovePodSandbox through a private containerd (CRI), with a bridge +
host-local chain and with the same chain plus the cxi entry (sim backend), side by side.
Run as root with the project's venv, which has grpcio: `.venv/bin/python bench/cri_bench.py`;
it writes its section of bench/results.md (see --help)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cri.client import Pod  # noqa: E402
from cri.containerd import Containerd  # noqa: E402
from workspace import sim_services  # noqa: E402

from bench import machine, shown  # noqa: E402

HEADING = "## RunPodSandbox through containerd (CRI)"
CHAINS = ("bridge", "bridge + cxi")


def cxi_entry(folder: Path) -> dict:
    return {"type": "cxi", "stateDir": str(folder / "state"), "logFile": str(folder / "cxi.log"),
            "cxi": {"backend": "sim", "simState": str(folder / "sim.db"), "vnis": [100]}}


def summary(ms: list[float]) -> str:
    p95 = statistics.quantiles(ms, n=20)[-1] if len(ms) > 1 else ms[0]
    return f"{statistics.median(ms):.0f} ({p95:.0f})"


class Run:
    def __init__(self, root: Path, binary: str):
        self.root = root
        self.nodes = {label: Containerd(root / f"node{i}", binary) for i, label in enumerate(CHAINS)}
        self.times = {label: {"run": [], "stop": []} for label in CHAINS}
        self.burst: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        for i, (label, node) in enumerate(self.nodes.items()):
            entry = cxi_entry(self.root / "cxi") if "cxi" in label else None
            node.write_conflist(node.bridge_conflist(entry, f"198.18.{200 + i}.0/24"))
            node.start()

    def one(self, label: str, pod: Pod) -> None:
        node = self.nodes[label]
        start = time.perf_counter()
        sandbox_id = node.run_pod(pod)
        ran = time.perf_counter()
        node.stop_and_remove(sandbox_id)
        self.times[label]["run"].append((ran - start) * 1000)
        self.times[label]["stop"].append((time.perf_counter() - ran) * 1000)

    def sequential(self, runs: int) -> None:
        for i in range(runs):
            order = list(CHAINS) if i % 2 == 0 else list(reversed(CHAINS))  # neither always goes first
            for label in order:
                self.one(label, Pod("bench", f"seq-{i}"))

    def concurrent(self, width: int) -> None:
        for label, node in self.nodes.items():
            pods = [Pod("bench", f"burst-{n}") for n in range(width)]
            with ThreadPoolExecutor(width) as pool:
                start = time.perf_counter()
                ids = list(pool.map(node.run_pod, pods))
                ran = time.perf_counter()
                list(pool.map(node.stop_and_remove, ids))
            self.burst[label] = ((ran - start) * 1000, (time.perf_counter() - ran) * 1000)

    def leftovers(self, label: str) -> int:
        node = self.nodes[label]
        count = len(node.client.sandboxes()) + len(node.leases()) + len(node.netns_mounts())
        sim = self.root / "cxi" / "sim.db"
        if "cxi" in label and sim.exists():
            count += sim_services(sim)  # all but the default services
            count += len(list((self.root / "cxi" / "state").glob("*.json")))
        return count

    def plugin_runs(self, command: str) -> list[float]:
        """The plugin's own durations of `command` as it logs them, for the one-after-the-other pods."""
        log = self.root / "cxi" / "cxi.log"
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [line["duration_ms"] for line in lines
                if line.get("msg") == f"{command} done" and line.get("pod", "").startswith("bench/seq-")]

    def close(self) -> list[str]:
        return [item for node in self.nodes.values() for item in node.cleanup()]


def report(run: Run, runs: int, width: int, binary: str, started, desc: str) -> str:
    rows = [f"| {label} | {summary(t['run'])} | {summary(t['stop'])} | {run.burst[label][0]:.0f} | "
            f"{run.burst[label][1]:.0f} | {run.leftovers(label)} |" for label, t in run.times.items()]
    added = [c - b for b, c in zip(run.times["bridge"]["run"], run.times["bridge + cxi"]["run"], strict=True)]
    plugin_adds, plugin_dels = run.plugin_runs("ADD"), run.plugin_runs("DEL")
    return "\n".join([
        HEADING, "",
        f"{started:%Y-%m-%d %H:%M %Z}, `{shown(binary)}` run by containerd 1.6 (one private instance per "
        f"chain), {runs} pods one after the other per chain, alternating, then {width} at once. {desc}.", "",
        "| chain | RunPodSandbox median (p95) ms | Stop+Remove median (p95) ms | "
        f"{width} RunPodSandbox at once, wall ms | their Stop+Remove, wall ms | left after |",
        "|---|---|---|---|---|---|", *rows, "",
        f"cxi adds {statistics.median(added):.0f} ms to RunPodSandbox (median of the paired differences), "
        f"of which {statistics.median(plugin_adds):.0f} ms is the plugin's own ADD work as its log times it; "
        "the rest is starting its process. containerd runs DEL on StopPodSandbox and again on "
        f"RemovePodSandbox: {len(plugin_dels) / runs:.0f} DELs per pod here, "
        f"{statistics.median(plugin_dels):.0f} ms of work each.", ""])


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of results.md (or append it); the rest stays."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", default=str(REPO / "dist" / "cxi"))
    parser.add_argument("--runs", type=int, default=20, help="pods per chain, one after the other (2..200)")
    parser.add_argument("--concurrency", type=int, default=8, help="pods at once (1..32)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.md"))
    opts = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: containerd makes namespaces, mounts and cgroups")
    runs, width = max(2, min(opts.runs, 200)), max(1, min(opts.concurrency, 32))

    root = Path(tempfile.mkdtemp(prefix="cxi-bench-cri-"))
    run = Run(root, opts.binary)
    try:
        started, desc = datetime.datetime.now().astimezone(), machine()
        run.start()
        run.sequential(runs)
        run.concurrent(width)
        section = report(run, runs, width, opts.binary, started, desc)
    finally:
        forced = run.close()
        shutil.rmtree(root, ignore_errors=True)
    print(section)
    write_section(Path(opts.out), section)
    return 1 if forced else 0


if __name__ == "__main__":
    sys.exit(main())
