"""`cxi demo`: ADD, CHECK and DEL through this very binary on simulated CXI devices, in a
throwaway network namespace with a veth standing in for the Slingshot netdev."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from .cxi.simstate import STATE_VERSION, SimState, new_device

IPAM_DIRS = ("/opt/cni/bin", "/usr/lib/cni")


def self_command() -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "cxi_cni"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def find_ipam() -> str | None:
    for directory in IPAM_DIRS:
        if os.access(os.path.join(directory, "host-local"), os.X_OK):
            return directory
    return None


class Demo:
    def __init__(self, keep: bool):
        self.keep = keep
        self.tag = f"{os.getpid() % 100000}"
        self.netns = f"cxi-demo-{self.tag}"
        self.master = f"cxidemo{self.tag}"
        self.root = tempfile.mkdtemp(prefix="cxi-demo-")
        self.made: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def setup(self) -> None:
        ip("netns", "add", self.netns)
        self.made.append("netns")
        ip("link", "add", self.master, "type", "veth", "peer", "name", self.master + "p")
        self.made.append("link")
        for name in (self.master, self.master + "p"):
            ip("link", "set", name, "up")
        state = {"version": STATE_VERSION, "devices": {
            "cxi0": new_device(self.master, "0000:41:00.0"),
            "cxi1": new_device("hsn1", "0000:42:00.0")}}
        SimState(os.path.join(self.root, "sim.db")).reset(state)
        self.say(f"made: network namespace {self.netns} (the pod), veth {self.master} "
                 "(stands in for hsn0)")
        self.say(f"made: simulated NICs cxi0 (behind {self.master}) and cxi1 (behind hsn1) "
                 f"in {self.root}/sim.db")

    def conf(self, ipam_dir: str | None) -> dict:
        conf = {
            "cniVersion": "1.0.0", "name": "hsn0-demo", "type": "cxi",
            "stateDir": f"{self.root}/state", "logFile": f"{self.root}/cxi.log",
            "cxi": {"backend": "sim", "simState": f"{self.root}/sim.db", "devices": "all",
                    "vnis": [1024], "tcs": ["low_latency", "best_effort"]},
        }
        if ipam_dir:
            link = "ipvlan" if os.path.exists("/sys/module/ipvlan") else "macvlan"
            conf.update(master=self.master, linkType=link,
                        ipam={"type": "host-local", "subnet": "10.250.0.0/24",
                              "dataDir": f"{self.root}/ipam"})
        else:
            conf["prevResult"] = {"cniVersion": "1.0.0", "interfaces": [
                {"name": "eth0", "sandbox": f"/run/netns/{self.netns}"}],
                "ips": [{"address": "10.250.0.2/24", "interface": 0}]}
        return conf

    def cni(self, command: str, conf: dict, ipam_dir: str | None) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "CNI_COMMAND": command, "CNI_CONTAINERID": f"demo{self.tag}",
               "CNI_NETNS": f"/run/netns/{self.netns}", "CNI_IFNAME": "net1",
               "CNI_PATH": ipam_dir or "/opt/cni/bin"}
        return subprocess.run(self_command(), input=json.dumps(conf).encode(), env=env,
                              capture_output=True)

    def services(self, conf: dict) -> str:
        path = os.path.join(self.root, "conf.json")
        with open(path, "w") as fh:
            json.dump(conf, fh)
        out = subprocess.run([*self_command(), "services", "--config", path],
                             capture_output=True, text=True)
        return out.stdout.rstrip()

    def step(self, command: str, conf: dict, ipam_dir: str | None) -> dict | None:
        run = self.cni(command, conf, ipam_dir)
        out = run.stdout.decode().strip()
        verdict = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
        self.say(f"\n$ CNI_COMMAND={command} cxi < conf.json   -> {verdict}")
        if out:
            self.say(json.dumps(json.loads(out), indent=2))
        if run.returncode != 0:
            raise RuntimeError(f"{command} failed: {out} {run.stderr.decode()[-500:]}")
        return json.loads(out) if out else None

    def run(self) -> int:
        self.setup()
        ipam_dir = find_ipam()
        conf = self.conf(ipam_dir)
        if ipam_dir:
            self.say(f"mode: interface plugin ({conf['linkType']} on {self.master}, host-local "
                     f"IPAM from {ipam_dir})")
        else:
            self.say("mode: chained (no host-local IPAM plugin found in /opt/cni/bin or "
                     "/usr/lib/cni; install containernetworking-plugins for the link mode)")
        inode = os.stat(f"/run/netns/{self.netns}").st_ino
        self.say(f"pod network namespace inode: {inode}")
        result = self.step("ADD", conf, ipam_dir)
        self.say("\nCXI services now on the devices (cxi services):")
        self.say(self.services(conf))
        if ipam_dir:
            addrs = subprocess.run(["ip", "-n", self.netns, "-br", "addr", "show", "net1"],
                                   capture_output=True, text=True).stdout.strip()
            self.say(f"\nin the pod: {addrs}")
        self.step("CHECK", {**conf, "prevResult": result}, ipam_dir)
        self.step("DEL", {**conf, "prevResult": result}, ipam_dir)
        left = self.services(conf).splitlines()[1:]
        self.say(f"\nafter DEL: {len(left)} services made by cxi remain "
                 f"{'(as it should be)' if not left else left}")
        return 0 if not left else 1

    def cleanup(self) -> None:
        if "link" in self.made:
            subprocess.run(["ip", "link", "del", self.master], capture_output=True)
        if "netns" in self.made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        if self.keep:
            self.say(f"kept: {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        self.say("removed: the demo's namespace, veth pair and files")


def run_demo(keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("cxi demo makes a network namespace and links: run it as root", file=sys.stderr)
        return 1
    demo = Demo(keep)
    try:
        return demo.run()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
