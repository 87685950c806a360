"""Benchmark of the frozen cxi plugin against Debian's Go reference plugins, side by side in
one process tree: per-command latency and peak RSS, 64 concurrent attachments, and DEL cost
on a crowded device. Run as root: `python3 bench/bench.py` (see --help)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import (  # noqa: E402
    Workspace,
    ip,
    leases,
    records,
    seed_attachments,
    seed_services,
    sim_services,
)

REPO = Path(__file__).resolve().parent.parent
GO_PLUGINS = Path("/usr/lib/cni")
TIMEOUT = 120
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)


@dataclass
class Call:
    rc: int
    ms: float
    rss_kib: int
    cpu_ms: float
    stdout: str


def invoke(binary: str, command: str, conf: dict, netns: str | None, container: str,
           ifname: str = "eth0") -> Call:
    """One plugin run with a runtime's environment: wall time; the peak RSS of the plugin's
    process tree as GNU time reports it (a child forked straight from this Python process
    would start its peak RSS at this process's size); the tree's CPU time (user + system)
    from wait4, to the microsecond (GNU time prints it in 10 ms steps)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
           "CNI_CONTAINERID": container, "CNI_IFNAME": ifname, "CNI_PATH": str(GO_PLUGINS)}
    if netns:
        env["CNI_NETNS"] = netns
    with tempfile.NamedTemporaryFile("r", prefix="cxi-bench-rss-") as rss:
        start = time.perf_counter()
        proc = subprocess.Popen([TIME, "-q", "-f", "%M", "-o", rss.name, binary], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        watchdog = threading.Timer(TIMEOUT, proc.kill)
        watchdog.start()
        try:
            proc.stdin.write(json.dumps(conf).encode())
            proc.stdin.close()
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
            proc.stdout.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = (time.perf_counter() - start) * 1000
        peak = rss.read().strip().splitlines()
    return Call(proc.returncode, elapsed, int(peak[-1]) if peak else 0,
                (usage.ru_utime + usage.ru_stime) * 1000, stdout.decode())


@dataclass
class Series:
    """Timings of one (scenario, plugin, command)."""
    scenario: str
    plugin: str
    command: str
    ms: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: int = 0
    failures: int = 0

    def add(self, call: Call) -> Call:
        self.ms.append(call.ms)
        self.cpu.append(call.cpu_ms)
        self.rss = max(self.rss, call.rss_kib)
        self.failures += call.rc != 0
        return call

    def row(self) -> list[str]:
        ordered = sorted(self.ms)
        p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
        return [self.scenario, self.plugin, self.command, str(len(ordered)),
                f"{statistics.median(ordered):.1f}", f"{p95:.1f}",
                f"{statistics.median(self.cpu):.1f}", f"{self.rss / 1024:.1f}", str(self.failures)]


class Bench:
    def __init__(self, ws: Workspace, binary: str, runs: int):
        self.ws, self.binary, self.runs = ws, binary, runs
        self.series: dict[tuple[str, str, str], Series] = {}
        self.notes: list[str] = []

    def series_for(self, scenario: str, plugin: str, command: str) -> Series:
        key = (scenario, plugin, command)
        if key not in self.series:
            self.series[key] = Series(scenario, plugin, command)
        return self.series[key]

    def cxi_conf(self, name: str, master: bool, vnis=(100,)) -> dict:
        folder = self.ws.folder(name)
        conf = {"cniVersion": "1.0.0", "name": name, "type": "cxi",
                "stateDir": str(folder / "state"), "logFile": str(folder / "cxi.log"),
                "cxi": {"backend": "sim", "simState": str(folder / "sim.db"), "vnis": list(vnis)}}
        if master:
            conf.update(master=self.ws.master, linkType="macvlan", ipam=self.ipam(folder))
        return conf

    def macvlan_conf(self, name: str) -> dict:
        return {"cniVersion": "1.0.0", "name": name, "type": "macvlan", "master": self.ws.master,
                "mode": "bridge", "ipam": self.ipam(self.ws.folder(name))}

    @staticmethod
    def ipam(folder: Path) -> dict:
        return {"type": "host-local", "dataDir": str(folder / "ipam"),
                "ranges": [[{"subnet": "198.19.0.0/16"}]]}

    def lifecycle(self, scenario: str, plugins: dict[str, tuple[str, dict]], commands,
                  with_eth0: bool = False, prev: dict | None = None) -> None:
        """Each run: a fresh netns per plugin, then the commands in order; the ADD result
        (or the given prevResult) is the prevResult of CHECK and DEL, as runtimes send it."""
        for i in range(self.runs):
            order = list(plugins.items())
            if i % 2:
                order.reverse()  # neither plugin always runs on a warmer cache
            for label, (binary, conf) in order:
                netns = self.ws.netns(with_eth0=with_eth0) if "ADD" in commands else None
                base = dict(conf, prevResult=prev(netns)) if prev else dict(conf)
                container = f"bench-{scenario}-{i}"
                result = None
                for command in commands:
                    sent = dict(base)
                    if command in ("CHECK", "DEL") and result is not None:
                        sent["prevResult"] = result
                    call = self.series_for(scenario, label, command).add(
                        invoke(binary, command, sent, netns, container))
                    if command == "ADD" and call.rc == 0:
                        result = {k: v for k, v in json.loads(call.stdout).items() if k != "cxi"}
                self.drop_netns(netns)

    def drop_netns(self, netns: str | None) -> None:
        if netns:
            name = Path(netns).name
            ip("netns", "del", name, check=False)
            self.ws.namespaces.remove(name)

    def link_plugins(self, others: dict[str, str]) -> None:
        """VERSION, then ADD/CHECK/DEL with a macvlan link, interleaved run by run with the
        Go plugin and the other builds of cxi (label: binary) being compared."""
        plugins = {"cxi": (self.binary, self.cxi_conf("link-cxi", master=True)),
                   "go macvlan": (str(GO_PLUGINS / "macvlan"), self.macvlan_conf("link-go"))}
        for label, (binary, _) in plugins.items():
            for _ in range(self.runs):
                self.series_for("link", label, "VERSION").add(
                    invoke(binary, "VERSION", {"cniVersion": "1.0.0"}, None, "v"))
        for label, other in others.items():
            plugins[label] = (other, self.cxi_conf(f"link-cmp-{label}", master=True))
        self.lifecycle("link", plugins, ("ADD", "CHECK", "DEL"))

    def chained(self) -> None:
        def prev(netns):
            return {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
                    "ips": []}

        tuning = {"cniVersion": "1.0.0", "name": "chain-go", "type": "tuning",
                  "sysctl": {"net.core.somaxconn": "512"}}
        plugins = {"cxi": (self.binary, self.cxi_conf("chain-cxi", master=False)),
                   "go tuning": (str(GO_PLUGINS / "tuning"), tuning)}
        self.lifecycle("chained", plugins, ("ADD", "DEL"), with_eth0=True, prev=prev)

    def concurrent(self, width: int) -> None:
        """`width` ADDs at once on distinct netns, then `width` DELs; then count leftovers."""
        plugins = {"cxi": (self.binary, self.cxi_conf("many-cxi", master=True)),
                   "go macvlan": (str(GO_PLUGINS / "macvlan"), self.macvlan_conf("many-go"))}
        for label, (binary, conf) in plugins.items():
            spaces = [self.ws.netns() for _ in range(width)]
            results: dict[int, dict] = {}
            phases = {}
            for command in ("ADD", "DEL"):
                sends = [(binary, command, dict(conf, prevResult=results[i]) if i in results else conf,
                          spaces[i], f"many-{i}") for i in range(width)]
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=width) as pool:
                    calls = list(pool.map(lambda send: invoke(*send), sends))
                phases[command] = ((time.perf_counter() - start) * 1000, sum(c.rc != 0 for c in calls))
                for i, call in enumerate(calls):
                    if command == "ADD" and call.rc == 0:
                        results[i] = {k: v for k, v in json.loads(call.stdout).items() if k != "cxi"}
            folder = self.ws.root / ("many-cxi" if label == "cxi" else "many-go")
            leaked_links = sum(self.ws.pod_links(ns) for ns in spaces)
            single = self.series_for("link", label, "ADD")
            ratio = phases["ADD"][0] / (width * statistics.median(single.ms)) if single.ms else 0
            floor = statistics.median(single.cpu) / statistics.median(single.ms) / (os.cpu_count() or 1) \
                if single.ms else 0
            self.notes.append(
                f"| {label} | {width} | {phases['ADD'][0]:.0f} | {ratio:.2f} | {floor:.2f} | "
                f"{phases['DEL'][0]:.0f} | "
                f"{phases['ADD'][1] + phases['DEL'][1]} | {sim_services(folder / 'sim.db')} | "
                f"{leaked_links} | {records(folder / 'state')} | {leases(folder / 'ipam')} |")
            for ns in spaces:
                self.drop_netns(ns)

    def crowded_device(self) -> None:
        """ADD and DEL on a node holding 1 versus 1,000 attachments, with as many bound
        services per device; then GC of all of them when their namespaces are gone."""
        for crowd in (1, 1000):
            conf = self.cxi_conf(f"crowd-{crowd}", master=False)
            sim_state = Path(conf["cxi"]["simState"])
            seed_ns = self.ws.netns()
            invoke(self.binary, "ADD", conf, seed_ns, "seed")
            held = {dev: seed_services(sim_state, dev, crowd) for dev in ("cxi0", "cxi1")}
            invoke(self.binary, "DEL", conf, seed_ns, "seed")
            self.drop_netns(seed_ns)
            attached = seed_attachments(sim_state, Path(conf["stateDir"]))
            scenario = f"{crowd} pods"
            for i in range(self.runs):
                netns = self.ws.netns()
                self.series_for(scenario, "cxi", "ADD").add(invoke(self.binary, "ADD", conf, netns, f"c{i}"))
                self.series_for(scenario, "cxi", "DEL").add(invoke(self.binary, "DEL", conf, netns, f"c{i}"))
                self.drop_netns(netns)
            gc_conf = {**conf, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}
            gc = invoke(self.binary, "GC", gc_conf, None, "gc")
            self.notes.append(f"crowd {crowd}: {attached} attachments, services held per device "
                              f"{held}; GC of them all took {gc.ms:.0f} ms (exit {gc.rc}) and left "
                              f"{sim_services(sim_state)} services, {records(Path(conf['stateDir']))} records")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem} GiB, Linux {platform.release()}, "
            f"load average at start {os.getloadavg()[0]:.2f}")


def shown(path: str) -> str:
    """A binary's path relative to the repository when it lies inside it, else its name."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else full.name


def compare_label(binary: str, i: int) -> str:
    """How the rows name another build: its file name, unless that is the main binary's."""
    name = Path(binary).name
    return name if name != "cxi" else f"cxi-{i + 2}"


def table(rows: list[list[str]]) -> str:
    head = ["scenario", "plugin", "command", "runs", "median ms", "p95 ms", "median CPU ms",
            "peak RSS MiB", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", default=str(REPO / "dist" / "cxi"))
    parser.add_argument("--runs", type=int, default=20, help="runs per command (1..200)")
    parser.add_argument("--concurrency", type=int, default=64, help="parallel ADDs (1..128)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.md"))
    parser.add_argument("--compare", action="append", default=[], metavar="BINARY",
                        help="another build of cxi to time on the chained commands")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark makes namespaces and links")
    opts.runs = max(1, min(opts.runs, 200))
    opts.concurrency = max(1, min(opts.concurrency, 128))

    ws = Workspace()
    try:
        bench = Bench(ws, opts.binary, opts.runs)
        started = datetime.datetime.now().astimezone()
        desc = machine()
        others = {compare_label(other, i): other for i, other in enumerate(opts.compare)}
        bench.link_plugins(others)
        bench.chained()
        for label, other in others.items():
            conf = bench.cxi_conf(f"cmp-{label}", master=False)
            for _ in range(opts.runs):
                bench.series_for("build", label, "VERSION").add(
                    invoke(other, "VERSION", {"cniVersion": "1.0.0"}, None, "v"))
            bench.lifecycle("build", {label: (other, conf)}, ("ADD", "DEL"), with_eth0=True,
                            prev=lambda ns: {"cniVersion": "1.0.0", "ips": [],
                                             "interfaces": [{"name": "eth0", "sandbox": ns}]})
        bench.concurrent(opts.concurrency)
        bench.crowded_device()
    finally:
        ws.close()

    rows = [s.row() for s in bench.series.values()]
    many = [n for n in bench.notes if n.startswith("|")]
    report = "\n".join([
        f"# cxi benchmark, {started:%Y-%m-%d %H:%M %Z}", "",
        f"Machine: {desc}.", f"Binary: `{shown(opts.binary)}`, {opts.runs} runs per command"
        + (f"; `build` rows and the extra `link` rows: other builds timed alongside "
           f"({', '.join(f'{label} = {shown(other)}' for label, other in others.items())})."
           if opts.compare else "."), "",
        table(rows), "",
        f"{opts.concurrency} concurrent ADDs on distinct netns, then as many DELs "
        "(wall time of each phase; leftovers counted after the DELs):", "",
        "(CPU floor: the lowest ratio the cores allow, one ADD's CPU time over its wall time "
        "divided by the cores.)", "",
        "| plugin | pods | ADD wall ms | / (pods x one ADD) | CPU floor | DEL wall ms | failures | "
        "leaked services | leaked links | leaked records | leaked leases |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *many, "",
        *[f"- {n}" for n in bench.notes if not n.startswith("|")], ""])
    print(report)
    out = Path(opts.out)
    # Sections (## headings) of the old file are kept: notes written by hand, and what
    # other benchmarks (cri_bench.py) wrote there.
    kept = out.read_text().partition("\n## ") if out.exists() else ("", "", "")
    out.write_text(report + (f"\n## {kept[2]}" if kept[1] else ""))
    leaked = any(int(x) for n in many for x in n.strip("|").split("|")[6:])
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
