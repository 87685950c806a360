"""Run the frozen `cxi` binary as a container runtime would: env, stdin, stdout, exit code."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

DEFAULT_CNI_PATH = "/opt/cni/bin:/usr/lib/cni"


@dataclass
class CniRun:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout) if self.stdout.strip() else None

    def ok(self) -> CniRun:
        assert self.rc == 0, f"plugin failed rc={self.rc}: {self.stdout} {self.stderr}"
        return self

    def error(self, code: int | None = None) -> dict:
        """Assert a spec-shaped error (one JSON object on stdout, non-zero exit, no traceback)."""
        assert self.rc != 0, f"expected failure, got rc=0: {self.stdout}"
        assert "Traceback" not in self.stdout + self.stderr, self.stdout + self.stderr
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout, got {self.stdout!r}"
        err = json.loads(lines[0])
        assert set(err) <= {"cniVersion", "code", "msg", "details"}, err
        assert isinstance(err["code"], int) and isinstance(err["msg"], str) and err["msg"], err
        assert "cniVersion" in err, err
        if code is not None:
            assert err["code"] == code, err
        return err


def run_cni(binary: str, command: str, conf=None, *, container_id: str | None = "ctr1",
            netns: str | None = None, ifname: str | None = "eth0",
            cni_path: str | None = DEFAULT_CNI_PATH, cni_args: str | None = None,
            env: dict | None = None, stdin_bytes: bytes | None = None,
            stdin=None, timeout: float = 60, prefix: tuple[str, ...] = ()) -> CniRun:
    """One plugin invocation with a clean environment holding only CNI_* (and PATH);
    `prefix` is a command that runs the binary (such as nsenter into a mount namespace)."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command}
    for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns),
                       ("CNI_IFNAME", ifname), ("CNI_PATH", cni_path), ("CNI_ARGS", cni_args)):
        if value is not None:
            full_env[key] = value
    full_env.update(env or {})
    if stdin_bytes is None and stdin is None:
        stdin_bytes = (conf if isinstance(conf, bytes) else
                       (conf if isinstance(conf, str) else json.dumps(conf or {})).encode())
    proc = subprocess.run([*prefix, binary], input=stdin_bytes, stdin=stdin, capture_output=True,
                          env=full_env, timeout=timeout)
    return CniRun(proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"))
