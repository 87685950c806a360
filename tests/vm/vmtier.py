"""VM test tier: run binaries inside qemu on a Debian cloud kernel that has ipvlan.

The host kernel of a CI machine may lack ipvlan or dummy links.  This module boots a
Debian cloud kernel (downloaded with apt, unpacked into a cache, nothing installed on
the host's boot) under qemu with software emulation (TCG), from a busybox initramfs
holding the binaries under test, and reads the verdicts the guest prints on its serial
console.  It does not depend on pytest.

Typical use from a test (tests/ is on sys.path, as for conftest)::

    from vm import vmtier

    reason = vmtier.ensure_tools("containernetworking-plugins")
    if reason:
        pytest.skip(reason)
    image = vmtier.build_initramfs(
        {"/opt/cni/bin/cxi": "dist/cxi", "/opt/cni/bin/host-local": "/usr/lib/cni/host-local"},
        script,                                 # /bin/sh text, run after guest-lib.sh
        payload_texts={"/etc/cni/l2.json": config_json},
    )
    run = vmtier.boot(image, timeout=120)
    run.require_pass("l2_add")                  # AssertionError with the console if not

The guest script is sourced after ``guest-lib.sh`` (next to this file), whose helpers
run a CNI command with its config on stdin and print marker lines on the console:

    CASE <name> PASS|FAIL <detail>      one verdict; a FAIL wins over a PASS of the same name
    METRIC <name> <number>              a measurement, e.g. milliseconds of an ADD

The guest cannot hand an exit code back to qemu, so the host decides from these lines;
``VMTIER-END rc=N`` tells that the script ran to its end.  Boot and power-off take 2-5 s
under TCG; a Go plugin runs in 0.1-0.5 s there, a PyInstaller onefile binary needs 1-3 s
just to start, so put all the steps of a scenario into one boot.

Environment:
    CXI_VM_CACHE            cache folder (default: .cache/vm in the repository)
    CXI_VM_KERNEL_PACKAGE   kernel package to fetch (default: what linux-image-cloud-amd64
                            depends on).  Delete the cache folder to fetch a new kernel.
    CXI_VM_ACCEL            qemu accelerator (default: tcg)
    CXI_VM_MACHINE          qemu machine type (default: pc)
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_LIB = Path(__file__).with_name("guest-lib.sh")
GUEST_LIB_PATH = "/lib/vmtier/guest-lib.sh"
GUEST_SCRIPT_PATH = "/lib/vmtier/test.sh"

TOOL_PACKAGES = ("qemu-system-x86", "busybox-static", "cpio", "kmod", "iproute2")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
MODULES = {  # load order: name -> path under lib/modules/<version>/kernel
    "dummy": "drivers/net/dummy.ko",
    "veth": "drivers/net/veth.ko",
    "macvlan": "drivers/net/macvlan.ko",
    "ipvlan": "drivers/net/ipvlan/ipvlan.ko",
}
# glibc parts that are loaded at run time rather than listed by ldd (a PyInstaller
# onefile binary unpacks a libpython that needs libm, for example).
GLIBC_RUNTIME = ("libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1")
IPROUTE2 = Path("/sbin/ip")
BUSYBOX = Path("/bin/busybox")
KEEP_IMAGES = 8

CASE_LINE = re.compile(r"^CASE (\S+) (PASS|FAIL)\b ?(.*)$")
METRIC_LINE = re.compile(r"^METRIC (\S+) (-?[0-9.]+)\s*$")
END_LINE = re.compile(r"^VMTIER-END rc=(\d+)")
TERMINAL_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[@-~])")  # the firmware clears the screen


def cache_dir() -> Path:
    """Folder holding the kernel and the initramfs images; created on demand."""
    path = Path(os.environ.get("CXI_VM_CACHE") or REPO_ROOT / ".cache" / "vm")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(name: str):
    """Serialise work on the cache between concurrent test processes."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _missing_packages(packages: tuple[str, ...]) -> list[str]:
    query = _run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages])
    installed = {line.split()[0] for line in query.stdout.splitlines() if line.endswith(" installed")}
    return [package for package in packages if package not in installed]


def ensure_tools(*extra_packages: str) -> str | None:
    """Install qemu, busybox-static, cpio, kmod, iproute2 and extra_packages if missing.

    Returns None when everything is there, else the reason it cannot be (for a skip).
    """
    packages = TOOL_PACKAGES + extra_packages
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        return f"VM tier needs a Debian-like host with apt to install {' '.join(packages)}"
    missing = _missing_packages(packages)
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"VM tier needs {' '.join(missing)}; cannot install them without root"
    with _locked("apt"):
        install = _run(
            ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    still_missing = _missing_packages(packages)
    if install.returncode != 0 or still_missing:
        tail = (install.stdout + install.stderr).strip().splitlines()[-5:]
        return f"VM tier could not install {' '.join(still_missing or missing)}: " + " | ".join(tail)
    return None


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: its image and the network driver modules the tier loads."""

    version: str
    vmlinuz: Path
    modules: dict[str, Path]


def _offered_kernel_package() -> str:
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    found = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)\s*$", depends, re.M)
    if found:
        return found[0]
    search = _run(["apt-cache", "search", "--names-only", r"^linux-image-[0-9].*-cloud-amd64$"]).stdout
    names = [line.split()[0] for line in search.splitlines() if line.strip()]
    if not names:
        raise RuntimeError(f"apt offers no cloud-amd64 kernel: {depends.strip()}")

    def version_key(name: str) -> list[int]:
        return [int(number) for number in re.findall(r"\d+", name)]

    return max(names, key=version_key)


def _load_kernel(folder: Path) -> Kernel:
    return Kernel(
        version=(folder / "VERSION").read_text().strip(),
        vmlinuz=folder / "vmlinuz",
        modules={name: folder / f"{name}.ko" for name in MODULES},
    )


def _copy_module(source_base: Path, target: Path) -> None:
    """Copy a module, uncompressing an .ko.xz (busybox insmod wants plain modules)."""
    if source_base.exists():
        shutil.copyfile(source_base, target)
        return
    packed = source_base.with_name(source_base.name + ".xz")
    if not packed.exists():
        raise RuntimeError(f"kernel package has no {source_base.name} (looked for .ko and .ko.xz)")
    target.write_bytes(lzma.decompress(packed.read_bytes()))


def kernel() -> Kernel:
    """Fetch and unpack the Debian cloud kernel once; later calls read the cache."""
    folder = cache_dir() / "kernel"
    with _locked("kernel"):
        if (folder / "VERSION").exists():
            return _load_kernel(folder)
        package = os.environ.get("CXI_VM_KERNEL_PACKAGE") or _offered_kernel_package()
        work = Path(tempfile.mkdtemp(prefix="kernel-", dir=cache_dir()))
        try:
            download = _run(["apt-get", "download", package], cwd=work)
            debs = list(work.glob("*.deb"))
            if download.returncode != 0 or not debs:
                raise RuntimeError(f"apt-get download {package} failed: {download.stderr.strip()}")
            subprocess.run(["dpkg", "-x", str(debs[0]), str(work / "root")], check=True)
            module_roots = list((work / "root" / "lib" / "modules").iterdir())
            version = module_roots[0].name
            staged = work / "kernel"
            staged.mkdir()
            shutil.copyfile(work / "root" / "boot" / f"vmlinuz-{version}", staged / "vmlinuz")
            for name, relative in MODULES.items():
                _copy_module(module_roots[0] / "kernel" / relative, staged / f"{name}.ko")
            (staged / "VERSION").write_text(f"{version}\n")
            staged.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _load_kernel(folder)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"\x7fELF"


def _shared_libraries(binary: Path) -> set[str]:
    """Absolute paths of the libraries and loader ldd lists for a dynamic binary."""
    listing = _run(["ldd", str(binary)])
    if listing.returncode != 0:  # static binary: "not a dynamic executable"
        return set()
    libraries = set()
    for line in listing.stdout.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libraries.add(match.group(1))
    return libraries


def _runtime_libraries(libraries: set[str]) -> set[str]:
    """The GLIBC_RUNTIME libraries that sit next to the libc already collected."""
    libc = next((lib for lib in libraries if Path(lib).name == "libc.so.6"), None)
    if libc is None:
        return set()
    folder = Path(libc).parent
    return {str(folder / name) for name in GLIBC_RUNTIME if (folder / name).exists()}


def _init_script(kern: Kernel) -> str:
    modules = " ".join(kern.modules)
    return f"""#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for module in {modules}; do
    insmod /lib/modules/$module.ko || echo "VMTIER insmod $module failed"
done
/sbin/ip link set lo up
read uptime _ < /proc/uptime
echo "VMTIER-BEGIN kernel={kern.version} uptime=$uptime"
/bin/sh -c '. {GUEST_LIB_PATH}; . {GUEST_SCRIPT_PATH}'
rc=$?
read uptime _ < /proc/uptime
echo "VMTIER-END rc=$rc uptime=$uptime"
poweroff -f
"""


@dataclass
class _Tree:
    """What goes into an initramfs: files (host path or text), symlinks, folders."""

    files: dict[str, Path | str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for guest, source in sorted(self.files.items()):
            if isinstance(source, Path):
                stat = source.stat()
                hasher.update(f"F{guest}\0{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            else:
                hasher.update(f"T{guest}\0{source}\0".encode())
        for guest, target in sorted(self.links.items()):
            hasher.update(f"L{guest}\0{target}\0".encode())
        hasher.update("\0".join(sorted(self.folders)).encode())
        return hasher.hexdigest()[:20]

    def write(self, root: Path) -> None:
        for folder in self.folders:
            (root / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for guest, source in self.files.items():
            target = root / guest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, target)
                target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)
            else:
                target.write_text(source)
                target.chmod(0o755 if source.startswith("#!") else 0o644)
        for guest, link_target in self.links.items():
            link = root / guest.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(link_target)


def _base_tree(kern: Kernel) -> _Tree:
    tree = _Tree(folders={"/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc", "/usr/bin", "/usr/sbin"})
    tree.files["/bin/busybox"] = BUSYBOX
    applets = _run([str(BUSYBOX), "--list-full"]).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            tree.links["/" + applet] = "/bin/busybox"
    tree.links.pop(str(IPROUTE2), None)
    tree.files[str(IPROUTE2)] = IPROUTE2.resolve()
    tree.links["/var/run"] = "../run"
    for name, module in kern.modules.items():
        tree.files[f"/lib/modules/{name}.ko"] = module
    tree.files["/etc/passwd"] = "root:x:0:0:root:/root:/bin/sh\n"
    tree.files["/etc/group"] = "root:x:0:\n"
    tree.files["/init"] = _init_script(kern)
    tree.files[GUEST_LIB_PATH] = GUEST_LIB.read_text()
    return tree


def _prune_images(folder: Path) -> None:
    images = sorted(folder.glob("*.cpio"), key=lambda image: image.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES:]:
        old.unlink(missing_ok=True)


def build_initramfs(
    payload_files: dict[str, str | Path],
    script: str,
    *,
    payload_texts: dict[str, str] | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Make an uncompressed newc initramfs running script; return its path.

    payload_files maps guest paths to host files (ELF binaries get the libraries ldd
    lists, and the loader); payload_texts maps guest paths to file contents.  Images are
    named after their inputs, so building the same one twice reuses the first.
    """
    missing = [str(host) for host in payload_files.values() if not Path(host).is_file()]
    if missing:
        raise FileNotFoundError(f"payload files not found: {', '.join(missing)}")
    kern = kernel()
    tree = _base_tree(kern)
    libraries = _shared_libraries(IPROUTE2)
    for guest, host in payload_files.items():
        tree.files[guest] = Path(host).resolve()
        if _is_elf(Path(host)):
            libraries |= _shared_libraries(Path(host))
    for library in libraries | _runtime_libraries(libraries):
        tree.files.setdefault(library, Path(library).resolve())
    tree.files.update(payload_texts or {})
    tree.files[GUEST_SCRIPT_PATH] = script

    folder = Path(out_dir) if out_dir else cache_dir() / "initramfs"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{tree.digest()}.cpio"
    if image.exists():
        image.touch()
        return image
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=folder) as staging:
        root = Path(staging) / "root"
        root.mkdir()
        tree.write(root)
        names = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
        partial = Path(staging) / "image.cpio"
        with open(partial, "wb") as output:
            subprocess.run(
                ["cpio", "--create", "--format=newc", "--null", "--quiet", "--owner=0:0"],
                input="\0".join(names).encode(),
                stdout=output,
                cwd=root,
                check=True,
            )
        os.replace(partial, image)
    _prune_images(folder)
    return image


@dataclass(frozen=True)
class CaseResult:
    status: str  # PASS or FAIL
    detail: str


@dataclass
class VmRun:
    """What one boot printed: the console, the parsed verdicts and measurements."""

    console: str
    returncode: int
    seconds: float
    timeout: float
    cases: dict[str, CaseResult] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    script_rc: int | None = None

    @property
    def timed_out(self) -> bool:
        return self.returncode in (124, 137)

    @property
    def finished(self) -> bool:
        """True when the guest script ran to its end."""
        return self.script_rc is not None

    def summary(self) -> str:
        state = "timed out" if self.timed_out else f"qemu rc={self.returncode}"
        if "VMTIER-BEGIN" not in self.console:
            state += ", guest never reached /init"
        verdicts = ", ".join(f"{name}={case.status}" for name, case in self.cases.items()) or "no cases"
        return f"VM run {self.seconds:.1f}s ({state}, script rc={self.script_rc}): {verdicts}"

    def explain(self, headline: str) -> str:
        return f"{headline}\n{self.summary()}\n----- guest console -----\n{self.console}"

    def require_pass(self, name: str) -> CaseResult:
        """Return the PASS verdict of case name, else raise AssertionError with the console."""
        case = self.cases.get(name)
        if case is None:
            raise AssertionError(self.explain(f"case {name!r} printed no verdict"))
        if case.status != "PASS":
            raise AssertionError(self.explain(f"case {name!r} FAILED: {case.detail}"))
        return case

    @classmethod
    def parse(cls, console: str, returncode: int, seconds: float, timeout: float) -> VmRun:
        run = cls(console=console, returncode=returncode, seconds=seconds, timeout=timeout)
        for line in console.splitlines():
            line = line.strip()
            if case := CASE_LINE.match(line):
                name, status, detail = case.groups()
                if run.cases.get(name, CaseResult("PASS", "")).status == "PASS":
                    run.cases[name] = CaseResult(status, detail)
            elif metric := METRIC_LINE.match(line):
                run.metrics[metric.group(1)] = float(metric.group(2))
            elif end := END_LINE.match(line):
                run.script_rc = int(end.group(1))
        return run


def boot(initramfs: Path, timeout: float = 120, memory_mb: int = 512) -> VmRun:
    """Boot the cached kernel with initramfs under qemu; wait at most timeout seconds."""
    kern = kernel()
    command = [
        "timeout", "--kill-after=5", str(timeout),
        "qemu-system-x86_64",
        "-accel", os.environ.get("CXI_VM_ACCEL", "tcg"),
        "-M", os.environ.get("CXI_VM_MACHINE", "pc"), "-cpu", "qemu64,+rdrand",
        "-m", str(memory_mb), "-smp", "1",
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kern.vmlinuz),
        "-initrd", str(initramfs),
        "-append", "console=ttyS0 quiet panic=-1",
    ]  # fmt: skip
    # Machine "pc", not "microvm": under TCG the kernel calibrates its TSC against the
    # PIT; when that fails (often, on a loaded host) microvm has no HPET or ACPI PM
    # timer to fall back on and the boot hangs before /init.  No NIC: the guest
    # reaches nothing outside itself.  RDRAND lets the kernel
    # seed its random pool at boot; without it the first getrandom() caller (a Go
    # plugin, Python seeding its hashes) waits about a second for entropy.
    started = time.monotonic()
    qemu = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    console = TERMINAL_ESCAPE.sub("", qemu.stdout.decode(errors="replace").replace("\r", ""))
    return VmRun.parse(console, qemu.returncode, seconds, timeout)
