"""dist/cxi's launcher puts the program where it may run, beside the binary (or in
/var/lib/cxi-cni), once per node under any burst of first runs; a killed or partial unpack
never blocks later runs; superseded versions go when no process uses them; every failure is
one CNI error JSON line. Each test runs in its own mount namespace, with Debian's noexec /run,
a private /var/lib and tmpfs bin dirs, so nothing on the host changes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import reliability
from cnitool import CniRun, run_cni
from mountns import MountNamespace
from shipped import Launched

KILL_ENV = "CXI_CNI_DEBUG_KILL_AT"
WAIT_ENV = "CXI_CNI_DEBUG_UNPACK_WAIT"
UNPACK_STEPS = ["unpack-locked", "unpack-extracted", "unpack-before-rename"]
FALLBACK = "/var/lib/cxi-cni"
VERSION_CONF = {"cniVersion": "1.0.0"}
MiB = 1 << 20
LAUNCHER_FAILURE = 106
TRY_AGAIN_LATER = 11


class LauncherNamespace(MountNamespace):
    """A mount namespace with Debian's and Ubuntu's noexec /run and a private /var/lib (so the
    fallback folder is ours), and the launcher's bin dirs and lock."""

    def __init__(self):
        super().__init__("mount -t tmpfs -o nodev,noexec,nosuid,size=16m tmpfs /run && "
                         "mount -t tmpfs -o size=64m tmpfs /var/lib")

    def bin_dir(self, path: Path, binary: str, size: int = 96 * MiB, options: str = "") -> str:
        """A tmpfs at path (a host folder that stays empty) holding a copy of binary."""
        path.mkdir(exist_ok=True)
        self.sh(f"mount -t tmpfs -o size={size}{options} tmpfs {path} && cp {binary} {path}/cxi")
        return f"{path}/cxi"

    def cni(self, binary: str, command: str = "VERSION", conf=None, **kw) -> CniRun:
        return super().cni(binary, command, VERSION_CONF if conf is None else conf, **kw)

    def hold_lock(self, folder: Path):
        """Take the launcher's lock of a bin dir, as a run that unpacks would."""
        lock = open(self.view(folder) / ".cxi.lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        self.closing.append(lock)
        return lock


@pytest.fixture
def ns():
    space = LauncherNamespace()
    yield space
    space.close()


@pytest.fixture(scope="module")
def launched(cxi_bin) -> Launched:
    return Launched(Path(cxi_bin))


def version_ok(run: CniRun) -> None:
    run.ok()
    assert run.json["supportedVersions"][-1] == "1.1.0", run.stdout


def copies(ns: LauncherNamespace, folder: str) -> list[str]:
    """The launcher's folders in a directory: unpacked copies and temporary folders."""
    return [name for name in ns.names(folder) if name.startswith(".cxi-")]


def test_runs_although_run_is_noexec(ns, cxi_bin, launched, tmp_path):
    ns.sh("printf '#!/bin/sh\\necho ran\\n' > /run/probe && chmod 755 /run/probe")
    assert ns.sh("/run/probe", check=False).returncode == 126, "/run is not noexec here"
    binary = ns.bin_dir(tmp_path / "bin", cxi_bin)
    for _ in range(2):  # the first run unpacks, the second starts what it found
        version_ok(ns.cni(binary))
    assert ns.names(tmp_path / "bin") == sorted([launched.folder, ".cxi.lock", "cxi"])
    assert (ns.view(tmp_path / "bin") / launched.folder / ".complete").exists()
    assert [name for name in ns.names("/run") if "cxi" in name] == []  # (mount(8) keeps utab there)
    assert ns.names("/var/lib") == []


def test_first_runs_at_once_unpack_one_copy(ns, cxi_bin, launched, tmp_path):
    """32 first runs together on a bin dir with room for the binary and one unpacked copy
    (the old launcher unpacked a copy per run): all succeed and one copy is made."""
    one_copy = launched.unpacked_bytes(tmp_path / "payload.tar.gz")
    size = os.path.getsize(cxi_bin) + one_copy + 2 * MiB
    assert size < os.path.getsize(cxi_bin) + 2 * one_copy
    binary = ns.bin_dir(tmp_path / "bin", cxi_bin, size=size)
    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        runs = list(pool.map(lambda _: ns.cni(binary), range(32)))
    elapsed = time.monotonic() - start
    failed = [run for run in runs if run.rc != 0]
    left = copies(ns, tmp_path / "bin")
    reliability.record("launcher", cases=32, leaks=len(left) - 1, test="burst",
                       seconds=round(elapsed, 2))
    assert failed == [], failed[0]
    for run in runs:
        version_ok(run)
    assert left == [launched.folder]
    assert ns.names(FALLBACK.rsplit("/", 1)[0]) == []


@pytest.mark.parametrize("step", UNPACK_STEPS)
def test_killed_unpack_never_blocks_later_runs(ns, cxi_bin, launched, tmp_path, step):
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    killed = ns.cni(binary, env={KILL_ENV: step})
    assert killed.rc == -signal.SIGKILL, f"not killed at {step}: {killed.rc} {killed.stdout}"
    assert killed.stdout == ""
    temporary = [name for name in copies(ns, folder) if ".tmp." in name]
    assert len(temporary) == (step != "unpack-locked"), copies(ns, folder)
    assert launched.folder not in copies(ns, folder)
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: ns.cni(binary), range(8)))
    for run in runs:
        version_ok(run)
    left = copies(ns, folder)
    reliability.record("launcher", cases=9, kills=1, leaks=len(left) - 1, test="kill", step=step)
    assert left == [launched.folder]


def test_incomplete_folder_is_replaced(ns, cxi_bin, launched, tmp_path):
    """A folder of the right name without .complete (cut short, or from another tool) is not
    trusted: the next run replaces it instead of failing for good."""
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    partial = f"{folder}/{launched.folder}"
    ns.sh(f"mkdir -p {partial}/_internal && head -c 1000 {binary} > {partial}/cxi && "
          f"chmod 755 {partial}/cxi")
    version_ok(ns.cni(binary))
    tree = ns.view(partial)
    assert (tree / ".complete").exists() and (tree / "_internal" / "libc.so.6").exists()
    assert copies(ns, folder) == [launched.folder]


def start_version_run(ns: LauncherNamespace, tree: str) -> subprocess.Popen:
    """The program of an unpacked tree, running: VERSION waits for its stdin to close."""
    return ns.spawn(f"cd {tree} && CNI_COMMAND=VERSION exec ./cxi", stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_upgrade_removes_superseded_versions_no_process_uses(ns, cxi_bin, launched, tmp_path):
    """Other versions' folders beside the binary go when the new version unpacks, except
    those a live process maps, holds open or stands in; a stale temporary folder goes too."""
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin, size=256 * MiB)
    version_ok(ns.cni(binary))
    here = f"{folder}/{launched.folder}"
    old = {kind: f"{folder}/.cxi-{n:016x}" for n, kind in
           enumerate(["running", "open", "cwd", "unused"], start=0xA0)}
    stale = f"{folder}/.cxi-{0xB0:016x}.tmp.Ab12Cd"
    ns.sh("; ".join(f"cp -a {here} {tree}" for tree in [*old.values(), stale]) +
          f"; rm -rf {here}")  # the new version's first run comes next
    running = start_version_run(ns, old["running"])
    holders = [ns.spawn(f"exec 3< {old['open']}/_internal/libc.so.6; exec sleep 600"),
               ns.spawn(f"cd {old['cwd']} && exec sleep 600")]
    wait_for(lambda: any("libpython" in line for line in
                         Path(f"/proc/{running.pid}/maps").read_text().splitlines()),
             "the old version to start")
    wait_for(lambda: os.path.exists(f"/proc/{holders[0].pid}/fd/3")
             and os.readlink(f"/proc/{holders[1].pid}/cwd") == old["cwd"], "the holders")

    version_ok(ns.cni(binary))  # unpacks the new version, removes what no one uses
    kept = {kind for kind, tree in old.items() if ns.view(tree).exists()}
    assert kept == {"running", "open", "cwd"}
    assert not ns.view(stale).exists()
    out, _ = running.communicate(json.dumps(VERSION_CONF).encode(), timeout=30)
    assert running.returncode == 0 and json.loads(out)["cniVersion"] == "1.0.0", \
        "the old version's run did not finish after the upgrade"

    for holder in holders:
        holder.kill()
        holder.wait()
    ns.sh(f"rm -rf {here}")  # the next upgrade: now nothing holds the old folders
    version_ok(ns.cni(binary))
    assert copies(ns, folder) == [launched.folder]


def test_read_only_bin_dir_falls_back_to_var_lib(ns, cxi_bin, launched, tmp_path):
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    ns.sh(f"mount -o remount,ro {folder}")
    for _ in range(2):
        version_ok(ns.cni(binary))
    assert ns.names(folder) == ["cxi"]
    assert ns.names(FALLBACK) == sorted([launched.folder, ".cxi.lock"])


def test_fast_path_runs_no_other_process_and_takes_no_lock(ns, cxi_bin, launched, tmp_path):
    binary = ns.bin_dir(tmp_path / "bin", cxi_bin)
    version_ok(ns.cni(binary))  # unpacked
    trace = tmp_path / "trace"
    strace = shutil.which("strace") or pytest.fail("needs strace")
    run = run_cni(binary, "VERSION", VERSION_CONF,
                  prefix=(*ns.enter, strace, "-f", "-qq", "-e", "trace=execve,flock", "-o", str(trace)))
    version_ok(run)
    calls = trace.read_text().splitlines()
    assert not [c for c in calls if "flock(" in c], calls
    programs = [re.search(r'execve\("([^"]+)"', c).group(1) for c in calls if "execve(" in c]
    assert programs[0] == binary and programs[1] == "./cxi", programs
    assert all(launched.folder in p for p in programs[2:]), programs


def test_caller_folder_and_launcher_path_reach_the_program(cxi_bin, sim, tmp_path):
    """The program starts inside its folder; a relative --config still means the caller's."""
    (tmp_path / "conf.json").write_text(json.dumps(sim.conf()))
    proc = subprocess.run([cxi_bin, "services", "--json", "--config", "conf.json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr


# Each way the launcher can fail: how to bring it about in the namespace, the environment of
# the run, the code, and a phrase the message must carry.
def read_only_everywhere(ns, folder, launched):
    ns.sh(f"mount -o remount,ro {folder} && mount -o remount,ro /var/lib")


def noexec_fallback(ns, folder, launched):
    ns.sh(f"mount -o remount,ro {folder} && mount -o remount,noexec /var/lib")


def full_everywhere(ns, folder, launched):
    ns.sh(f"mount -o remount,size={os.path.getsize(ns.view(folder) / 'cxi') + MiB} {folder} && "
          "mount -o remount,size=1m /var/lib")


def lock_held(ns, folder, launched):
    ns.hold_lock(folder)


def incomplete_and_in_use(ns, folder, launched):
    ns.sh(f"mkdir {folder}/{launched.folder}")
    holder = ns.spawn(f"cd {folder}/{launched.folder} && exec sleep 600")
    wait_for(lambda: os.readlink(f"/proc/{holder.pid}/cwd").endswith(launched.folder), "the holder")


FAILURES = {
    "read-only": (read_only_everywhere, {}, LAUNCHER_FAILURE, "is not writable"),
    "noexec": (noexec_fallback, {}, LAUNCHER_FAILURE, "noexec"),
    "full": (full_everywhere, {}, LAUNCHER_FAILURE, "no space left"),
    "lock held": (lock_held, {WAIT_ENV: "1"}, TRY_AGAIN_LATER, "for 1 s"),
    "incomplete in use": (incomplete_and_in_use, {}, LAUNCHER_FAILURE, "in use"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_every_failure_is_one_cni_error(ns, cxi_bin, launched, tmp_path, case):
    make, env, code, phrase = FAILURES[case]
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    ns.sh(f"touch {folder}/.cxi.lock")
    make(ns, folder, launched)
    runs = [ns.cni(binary, env=env) for _ in range(2)]
    for run in runs:
        err = run.error(code)
        assert run.stderr == "", run.stderr
        assert phrase in err["msg"] and err["details"], err
    admin = ns.admin(binary, "version", env=env)  # no CNI_COMMAND: a person reads stderr
    assert admin.returncode == 1 and admin.stdout == "", admin
    assert admin.stderr.startswith("cxi: ") and "cxi: fix: " in admin.stderr, admin.stderr
    temporary = [name for place in (folder, FALLBACK) if ns.view(place).exists()
                 for name in copies(ns, place) if ".tmp." in name]
    reliability.record("launcher", cases=3, leaks=len(temporary), test="failure", case=case)
    assert temporary == []


def test_missing_flock_is_named(ns, cxi_bin, launched, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in launched.tools:
        if tool != "flock":
            (tools / tool).symlink_to(shutil.which(tool))
    binary = ns.bin_dir(tmp_path / "bin", cxi_bin)
    run = ns.cni(binary, env={"PATH": str(tools)})
    err = run.error(LAUNCHER_FAILURE)
    assert run.stderr == "" and "flock" in err["msg"] and "util-linux" in err["details"], err


def test_waits_for_a_run_that_unpacks(ns, cxi_bin, launched, tmp_path):
    """Runs that find the lock held wait for it (here 2 s) rather than unpack a copy each."""
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    ns.sh(f"touch {folder}/.cxi.lock")
    lock = ns.hold_lock(folder)
    with ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(ns.cni, binary) for _ in range(4)]
        time.sleep(2)
        assert not any(run.done() for run in runs)
        fcntl.flock(lock, fcntl.LOCK_UN)
        for run in runs:
            version_ok(run.result())
    assert copies(ns, folder) == [launched.folder]


def test_the_program_runs_with_the_callers_umask(ns, cxi_bin, launched, tmp_path, sim):
    """The launcher sets umasks of its own to unpack (022) and for its lock (077); the program
    and what it starts get the caller's back, on the run that unpacks and on one that waited
    while another unpacked. The log file, created 0640 less the umask, shows which it got."""
    folder, other = tmp_path / "bin", tmp_path / "other"
    binary = ns.bin_dir(folder, cxi_bin)
    ns.bin_dir(other, cxi_bin)
    version_ok(ns.cni(f"{other}/cxi"))  # a complete copy to hand over while a run waits

    def status(umask: str, log: str) -> int:
        prefix = (*ns.enter, "sh", "-c", f'umask {umask}; exec "$0"')
        run_cni(binary, "STATUS", sim.conf("1.1.0", logFile=str(tmp_path / log)), prefix=prefix).ok()
        return (tmp_path / log).stat().st_mode & 0o777

    assert status("077", "unpacking.log") == 0o600
    ns.sh(f"rm -rf {folder}/{launched.folder}")
    lock = ns.hold_lock(folder)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(status, "022", "waited.log")
        time.sleep(1)
        ns.sh(f"cp -a {other}/{launched.folder} {folder}/")
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert waiting.result() == 0o640
    assert status("027", "fast.log") == 0o640 and status("077", "fast2.log") == 0o600


def test_a_run_that_cannot_see_the_hosts_processes_removes_no_version(ns, cxi_bin, launched,
                                                                       tmp_path):
    """From a PID namespace of its own (a pod without hostPID that has the bin dir), a
    process of the host using an old version is invisible: the old version stays."""
    folder = tmp_path / "bin"
    binary = ns.bin_dir(folder, cxi_bin)
    version_ok(ns.cni(binary))
    here, old = f"{folder}/{launched.folder}", f"{folder}/.cxi-{0xC0:016x}"
    ns.sh(f"cp -a {here} {old} && rm -rf {here}")
    holder = ns.spawn(f"cd {old} && exec sleep 600")
    wait_for(lambda: os.readlink(f"/proc/{holder.pid}/cwd") == old, "the holder")
    pod = (*ns.enter, "unshare", "--pid", "--fork", "--mount-proc")
    version_ok(run_cni(binary, "VERSION", VERSION_CONF, prefix=pod))
    assert sorted(copies(ns, folder)) == sorted([launched.folder, old.rsplit("/", 1)[1]])
    holder.kill()
    holder.wait()
