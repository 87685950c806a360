"""Test helpers around the libcxi stand-in: build it with gcc, make a fake sysfs tree,
and read or edit its state file (format described at the top of fake_libcxi.c)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cxi_cni.cxi.backend import RESOURCES
from cxi_cni.cxi.shape import CASSINI_TOTALS

SOURCE = Path(__file__).with_name("fake_libcxi.c")
STATE_ENV = "FAKE_LIBCXI_STATE"
DEV_DIR_ENV = "FAKE_LIBCXI_DEV_DIR"
HPE_VENDOR = "0x17db"
# The drivers the stand-in emulates (the `driver` line of its state) and whether the real
# library of that stack has cxil_svc_set_netns / cxil_svc_get_netns.
DRIVERS = {"shs-14.0.1": True, "shs-14.0.0": True, "netns-member": False, "shs-13": False}

# Symbol versions as in the real library, so lookups go through versioned symbols.
_VERSIONS = (
    (
        "LIBCXI_1.0",
        (
            "cxil_open_device",
            "cxil_close_device",
            "cxil_alloc_svc",
            "cxil_destroy_svc",
            "cxil_get_svc_list",
            "cxil_free_svc_list",
        ),
    ),
    ("LIBCXI_1.2", ("cxil_get_svc",)),
    ("LIBCXI_1.5", ("cxil_get_svc_rsrc_use",)),
    ("LIBCXI_1.8", ("cxil_set_svc_lpr", "cxil_get_svc_lpr")),
    ("LIBCXI_1.9", ("cxil_svc_enable", "cxil_svc_set_vni_range")),
    ("LIBCXI_1.10", ("cxil_svc_set_netns", "cxil_svc_get_netns")),
)
_NETNS_SYMBOLS = {"cxil_svc_set_netns", "cxil_svc_get_netns"}


def _version_script(with_netns: bool) -> str:
    blocks, previous = [], ""
    for index, (version, symbols) in enumerate(_VERSIONS):
        symbols = [s for s in symbols if with_netns or s not in _NETNS_SYMBOLS]
        if not symbols:
            continue
        body = "".join(f"  {s};\n" for s in symbols)
        if index == 0:
            body = "global:\n  fake_libcxi_*;\n" + body + "local:\n  *;\n"
        blocks.append(f"{version} {{\n{body}}}{(' ' + previous) if previous else ''};\n")
        previous = version
    return "".join(blocks)


def build(out_dir: Path, with_netns: bool = True) -> Path:
    """Compile the stand-in into out_dir/libcxi.so.1 and return its path."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build the libcxi stand-in")
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "libcxi.map"
    script.write_text(_version_script(with_netns))
    target = out_dir / "libcxi.so.1"
    command = [
        "gcc",
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O1",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-Wl,-soname,libcxi.so.1",
        f"-Wl,--version-script={script}",
        "-o",
        str(target),
        str(SOURCE),
    ]
    if not with_netns:
        command.insert(1, "-DNO_NETNS")
    subprocess.run(command, check=True, capture_output=True, text=True)
    return target


TOTALS = tuple(CASSINI_TOTALS[name] for name in RESOURCES)


@dataclass(frozen=True)
class Nic:
    """One fake NIC: its CXI device, its Ethernet netdev and PCI address, and what the
    driver shows of it in sysfs: resource totals (None: no num_* files) and resource groups
    left."""

    cxi: str
    netdev: str
    pci: str
    totals: tuple[int, ...] | None = TOTALS
    rgids_avail: int = 255


def make_sysfs(root: Path, nics: list[Nic], plain_netdevs: tuple[str, ...] = (),
               driver_rev: str | None = None) -> Path:
    """class/cxi/<cxi>/device and class/net/<netdev>/device point at the same fake PCI
    device (vendor 0x17db, with net/<netdev>, and properties/: num_<resource> and
    rgids_avail as the driver shows them, and driver_rev, its revision, when given);
    plain_netdevs have no device link."""
    for nic in nics:
        pci_dir = root / "devices" / "pci0000:00" / nic.pci
        (pci_dir / "net" / nic.netdev).mkdir(parents=True, exist_ok=True)
        (pci_dir / "vendor").write_text(HPE_VENDOR + "\n")
        properties = pci_dir / "properties"
        properties.mkdir(exist_ok=True)
        if driver_rev is not None:
            (properties / "driver_rev").write_text(driver_rev + "\n")
        for name, total in zip(RESOURCES, nic.totals or (), strict=False):
            (properties / f"num_{name}").write_text(f"{total}\n")
        (properties / "rgids_avail").write_text(f"{nic.rgids_avail}\n")
        for cls, name in (("cxi", nic.cxi), ("net", nic.netdev)):
            entry = root / "class" / cls / name
            entry.mkdir(parents=True, exist_ok=True)
            (entry / "device").symlink_to(os.path.relpath(pci_dir, entry))
    for name in plain_netdevs:
        (root / "class" / "net" / name).mkdir(parents=True, exist_ok=True)
    (root / "class" / "cxi").mkdir(parents=True, exist_ok=True)
    return root


def state_lines(state: Path) -> list[list[str]]:
    return [line.split() for line in state.read_text().splitlines() if line.strip()]


def write_driver(state: Path, driver: str) -> None:
    """Choose the driver the library talks to (one of DRIVERS), before the first call."""
    assert driver in DRIVERS, driver
    with state.open("a") as f:
        f.write(f"driver {driver}\n")


def write_device(state: Path, dev_id: int, is_vf: bool = False,
                 totals: tuple[int, ...] = TOTALS) -> None:
    """Declare a device before its first open (a VF, or other resource totals)."""
    with state.open("a") as f:
        f.write(f"dev {dev_id} {int(is_vf)} {','.join(map(str, totals))}\n")


def write_service(state: Path, dev_id: int, raw_desc: bytes, netns: int = 0) -> None:
    """Store a service with exactly these 68 descriptor bytes (svc_id inside them)."""
    assert len(raw_desc) == 68
    svc_id = int.from_bytes(raw_desc[64:68], "little")
    with state.open("a") as f:
        f.write(f"svc {dev_id} {svc_id} 0 {netns} 0 0 1 0,0,0,0,0,0,0,0 {raw_desc.hex()}\n")


def _set_field(state: Path, dev_id: int, svc_id: int, index: int, value: str) -> None:
    """Replace field `index` of a service's line, under the stand-in's own lock."""
    with state.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines, found = [], False
        for line in f.read().splitlines():
            fields = line.split()
            if fields[:3] == ["svc", str(dev_id), str(svc_id)]:
                fields[index], found = value, True
            lines.append(" ".join(fields))
        assert found, f"no service {svc_id} on device {dev_id} in {state}"
        f.seek(0)
        f.truncate()
        f.write("\n".join(lines) + "\n")


def set_busy(state: Path, dev_id: int, svc_id: int, busy: int) -> None:
    """Mark a service as used by `busy` LNIs (destroy then fails with -EBUSY)."""
    _set_field(state, dev_id, svc_id, 3, str(busy))


def set_in_use(state: Path, dev_id: int, svc_id: int, in_use: dict[str, int]) -> None:
    """What the service's processes use, by resource name (cxil_get_svc_rsrc_use)."""
    _set_field(state, dev_id, svc_id, 8, ",".join(str(in_use.get(r, 0)) for r in RESOURCES))
