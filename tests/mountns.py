"""A private mount namespace for a test: tmpfs, bind and read-only mounts made in it never
reach the host and vanish with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from cnitool import CniRun, run_cni


class MountNamespace:
    """A private mount namespace held open by a sleeping process. Commands run in it through
    nsenter; Python reads its files through /proc/PID/root. Mounts made in it never reach the
    host and vanish with its last process."""

    def __init__(self, setup: str = ""):
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sleep", "infinity"])
        self.children: list[subprocess.Popen] = []
        self.closing: list = []
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make a mount namespace"
            time.sleep(0.01)
        self.enter = (shutil.which("nsenter"), "-t", str(self.holder.pid), "-m", "--")
        if setup:
            self.sh(setup)

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.enter, "sh", "-c", script], capture_output=True, text=True)
        assert not check or proc.returncode == 0, f"{script}: {proc.stderr}"
        return proc

    def spawn(self, script: str, **kw) -> subprocess.Popen:
        """A process in the namespace that lives until the test ends (or is stopped)."""
        child = subprocess.Popen([*self.enter, "sh", "-c", script], **kw)
        self.children.append(child)
        return child

    def view(self, path: str | Path) -> Path:
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def names(self, folder: str | Path) -> list[str]:
        return sorted(os.listdir(self.view(folder)))

    def cni(self, binary: str, command: str, conf, **kw) -> CniRun:
        return run_cni(binary, command, conf, prefix=self.enter, **kw)

    def admin(self, binary: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter, binary, *args], capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], **(env or {})}, timeout=60)

    def close(self):
        for item in self.closing:
            item.close()
        for proc in [*self.children, self.holder]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
