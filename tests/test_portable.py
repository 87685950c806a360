"""The shipped binary does not depend on the host's glibc: every ELF in it is served by the
glibc copy bundled inside, and it runs in a root that has no libc at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import sh
from shipped import Launched

GLIBC_SONAMES = {"ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libpthread.so.0",
                 "libdl.so.2", "librt.so.1", "libutil.so.1", "libresolv.so.2"}


class Shipped(Launched):
    """dist/cxi with its program tree unpacked into a test folder."""

    def __init__(self, binary: Path, out: Path):
        super().__init__(binary)
        self.tree = out / "tree"
        self.tree.mkdir()
        sh("tar", "-xzf", str(self.write_payload(out / "payload.tar.gz")), "-C", str(self.tree))

    def elves(self) -> list[Path]:
        found = []
        for path in sorted(self.tree.rglob("*")):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as fh:
                    if fh.read(4) == b"\x7fELF":
                        found.append(path)
        return found


@pytest.fixture(scope="module")
def shipped(cxi_bin, tmp_path_factory) -> Shipped:
    return Shipped(Path(cxi_bin), tmp_path_factory.mktemp("shipped"))


def version_needs(elf: Path) -> dict[str, set[str]]:
    """{soname: {version names}} from the ELF's .gnu.version_r, as readelf shows it."""
    out = sh("readelf", "-V", "-W", str(elf)).stdout
    needs: dict[str, set[str]] = {}
    section = out.split("Version needs section", 1)
    current = None
    for line in (section[1].splitlines() if len(section) > 1 else []):
        if m := re.search(r"File: (\S+)\s+Cnt:", line):
            current = needs.setdefault(m.group(1), set())
        elif (m := re.search(r"Name: (\S+)\s+Flags", line)) and current is not None:
            current.add(m.group(1))
        elif line.startswith("Version") or line.startswith("Displaying"):
            break
    return needs


def version_defs(elf: Path) -> set[str]:
    out = sh("readelf", "-V", "-W", str(elf)).stdout
    part = out.split("Version definition section", 1)
    if len(part) == 1:
        return set()
    body = part[1].split("Version needs section", 1)[0]
    return set(re.findall(r"Name: (\S+)", body))


def dynamic(elf: Path) -> tuple[list[str], str | None, str | None]:
    """DT_NEEDED entries, RUNPATH and the program interpreter."""
    out = sh("readelf", "-d", "-l", "-W", str(elf)).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    runpath = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", out)
    interp = re.search(r"Requesting program interpreter: (.+?)\]", out)
    return needed, runpath and runpath.group(1), interp and interp.group(1)


def glibc_floor(needs: dict[str, set[str]]) -> tuple[int, ...]:
    versions = [tuple(int(x) for x in v[6:].split("."))
                for names in needs.values() for v in names if re.fullmatch(r"GLIBC_\d+(\.\d+)*", v)]
    return max(versions, default=(0,))


def test_every_elf_is_served_by_the_bundled_glibc(shipped):
    internal = shipped.tree / "_internal"
    bundled = {p.name: p for p in internal.iterdir()}
    assert GLIBC_SONAMES <= set(bundled), f"glibc is not bundled: {GLIBC_SONAMES - set(bundled)}"
    elves = shipped.elves()
    assert len(elves) > 10, elves
    names_in_tree = {p.name for p in elves}
    for elf in elves:
        needed, _, _ = dynamic(elf)
        missing = [lib for lib in needed if lib not in names_in_tree]
        assert not missing, f"{elf.relative_to(shipped.tree)} needs {missing} from the host"
        for soname, versions in version_needs(elf).items():
            provided = version_defs(bundled[soname])
            assert versions <= provided, (f"{elf.name} needs {versions - provided} of {soname}, "
                                          "which the bundled copy does not define")


def test_the_program_starts_on_the_bundled_loader(shipped):
    """The unpack folder is only known at run time: the program names its loader relative to
    its folder, and the launcher starts it from there."""
    program = shipped.tree / "cxi"
    _, runpath, interp = dynamic(program)
    assert interp == "_internal/ld-linux-x86-64.so.2"
    assert runpath == "$ORIGIN/_internal"
    assert (shipped.tree / ".cxi-id").read_text().strip() == shipped.content_id
    assert not (shipped.tree / ".complete").exists(), "only the launcher marks a copy complete"
    assert shipped.launcher.rstrip().endswith('exec ./cxi "$@"')
    assert 'cd "$d"' in shipped.launcher


def test_without_the_bundle_the_floor_would_be_the_build_hosts_glibc(shipped):
    """What the bundled copy buys: the Python runtime alone needs a glibc newer than the
    2.28 of RHEL 8, so it could not start there on the host's libc."""
    libpython = next((shipped.tree / "_internal").glob("libpython3*.so*"))
    assert glibc_floor(version_needs(libpython)) > (2, 28)


@pytest.fixture
def libc_free_root(tmp_path, cxi_bin) -> Path:
    """A root with only a static busybox (for the launcher's sh, tar, ...), util-linux's flock
    (busybox-static has none) and the binary: no libc where any loader looks, nothing else of
    the host's userland. flock brings the host's loader and libc in /hostflock, which only its
    wrapper names: no program finds libraries there (no RUNPATH, no ld.so.cache names it)."""
    busybox = Path("/bin/busybox")
    if not busybox.exists() or dynamic(busybox)[2] is not None:
        pytest.fail("needs busybox-static (a busybox with no program interpreter)")
    root = tmp_path / "root"
    for sub in ("bin", "dev", "run", "proc", "tmp", "data", "hostflock"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    tools = Launched(Path(cxi_bin)).tools
    for tool in ["sh", *tools]:
        if tool != "flock":
            (root / "bin" / tool).symlink_to("busybox")
    flock = Path(shutil.which("flock") or pytest.fail("needs flock (util-linux)"))
    libs = re.findall(r"(/\S+\.so[.\d]*) \(0x", sh("ldd", str(flock)).stdout)
    for path in [flock, *map(Path, libs)]:
        shutil.copy2(path.resolve(), root / "hostflock" / path.name)
    (root / "bin" / "flock").write_text(
        "#!/bin/sh\nexec /hostflock/ld-linux-x86-64.so.2 --library-path /hostflock /hostflock/flock \"$@\"\n")
    (root / "bin" / "flock").chmod(0o755)
    shutil.copy2(cxi_bin, root / "cxi")
    libc_like = [p for p in root.rglob("*") if p.name.startswith(("libc.", "ld-linux"))
                 and p.parent != root / "hostflock"]
    assert libc_like == []
    return root


def in_root(root: Path, script: str, netns: str | None = None) -> subprocess.CompletedProcess:
    """Run a busybox sh script chrooted into root, in a private mount namespace with /run
    mounted as Debian and Ubuntu do (noexec), a fresh /proc and the host's /dev/null; netns,
    if given, appears as /data/ns."""
    bind = f"touch {root}/data/ns && mount --bind {netns} {root}/data/ns && " if netns else ""
    outer = (f"mount -t tmpfs -o nodev,noexec,nosuid tmpfs {root}/run && "
             f"mount -t proc proc {root}/proc && mount -t tmpfs tmpfs {root}/tmp && "
             f"touch {root}/dev/null && mount --bind /dev/null {root}/dev/null && {bind}"
             f"exec chroot {root} /bin/sh -c '{script}'")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", outer],
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_runs_in_a_root_without_any_libc(libc_free_root, netns):
    root = libc_free_root
    conf = {"cniVersion": "1.0.0", "name": "net", "type": "cxi", "stateDir": "/data/state",
            "logFile": "/data/cxi.log",
            "cxi": {"backend": "sim", "simState": "/data/sim.db", "vnis": [100]}}
    (root / "data" / "conf.json").write_text(json.dumps(conf))
    env = "CNI_CONTAINERID=c1 CNI_NETNS=/data/ns CNI_IFNAME=eth0 CNI_PATH=/bin"
    script = ("set -e; for i in 1 2 3 4; do echo {} | CNI_COMMAND=VERSION /cxi > /tmp/v$i & done; wait; "
              "cat /tmp/v1; echo; cd /data && /cxi version; "
              f"{env} CNI_COMMAND=ADD /cxi < /data/conf.json; echo; "
              "/cxi services --json --config conf.json > /data/services.json; "
              f"{env} CNI_COMMAND=DEL /cxi < /data/conf.json; "
              "ls -a / /run")
    proc = in_root(root, script, netns)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert json.loads(lines[0])["supportedVersions"][-1] == "1.1.0"
    assert lines[1].startswith("cxi ") and "1.1.0" in lines[1]
    added = json.loads(lines[2])
    assert {s["device"] for s in added["cxi"]["services"]} == {"cxi0", "cxi1"}
    services = json.loads((root / "data" / "services.json").read_text())  # a relative --config
    assert {s["netns_inode"] for s in services} == {os.stat(netns).st_ino}
    # Four concurrent first runs left exactly one unpacked copy beside the binary, no
    # half-made folders, and nothing in the noexec /run.
    listing = lines[3:]
    top, run = listing[1:listing.index("/run:")], listing[listing.index("/run:") + 1:]
    assert [name for name in top if name.startswith(".cxi")] == \
        sorted([Launched(root / "cxi").folder, ".cxi.lock"]), top
    assert sorted(run) == [".", ".."], run
    assert (root / "data" / "sim.db").read_bytes().startswith(b"SQLite format 3")  # the sim state is in /data
    records = list((root / "data" / "state").glob("*.json"))
    assert records == [], "DEL left a record"
