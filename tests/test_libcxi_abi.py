"""ABI and behaviour tests of the libcxi backend against a C stand-in for libcxi.so.1.

The stand-in is compiled with gcc during the session from tests/libcxi_standin; its
struct definitions are written independently from the documented layout, so the byte
tests compare two separate readings of the same facts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from libcxi_standin import standin

from cxi_cni.cxi import abi
from cxi_cni.cxi.backend import (
    MEMBER_GID,
    MEMBER_IGNORE,
    MEMBER_NET_NS,
    MEMBER_UID,
    BackendUnavailable,
    CxiError,
    Limit,
    Member,
    NoResources,
    ServiceDesc,
)
from cxi_cni.cxi.libcxi import LibcxiBackend
from cxi_cni.cxi.shape import CASSINI_TOTALS

REPO = Path(__file__).resolve().parents[1]
NETNS_INODE = 4026532281


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def lib_path(tmp_path_factory) -> Path:
    return standin.build(tmp_path_factory.mktemp("libcxi"))


@pytest.fixture(scope="session")
def lib_without_netns(tmp_path_factory) -> Path:
    return standin.build(tmp_path_factory.mktemp("libcxi-1.9"), with_netns=False)


@pytest.fixture(scope="session")
def helpers(lib_path) -> ctypes.CDLL:
    """The stand-in's own layout helpers (fake_libcxi_*), which libcxi does not have."""
    lib = ctypes.CDLL(str(lib_path))
    lib.fake_libcxi_layout.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.fake_libcxi_describe.argtypes = [ctypes.POINTER(abi.CxiSvcDesc), ctypes.c_char_p, ctypes.c_size_t]
    lib.fake_libcxi_sample_desc.argtypes = [ctypes.POINTER(abi.CxiSvcDesc)]
    lib.fake_libcxi_sample_desc.restype = None
    return lib


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "libcxi.state"
    monkeypatch.setenv(standin.STATE_ENV, str(path))
    return path


@pytest.fixture
def sysfs(tmp_path) -> Path:
    return standin.make_sysfs(
        tmp_path / "sys",
        [
            standin.Nic("cxi0", "hsn0", "0000:21:00.0"),
            standin.Nic("cxi1", "hsn1", "0000:41:00.0"),
        ],
    )


@pytest.fixture
def backend(lib_path, sysfs, state) -> LibcxiBackend:
    return LibcxiBackend(lib_path=str(lib_path), sysfs_root=str(sysfs))


@pytest.fixture
def cxi0(backend):
    device = backend.open("cxi0")
    yield device
    device.close()


def errno_of(excinfo) -> int:
    return excinfo.value.errno


# ---------------------------------------------------------------- (a) byte layout


def test_c_and_ctypes_agree_on_layout(helpers):
    buf = ctypes.create_string_buffer(512)
    helpers.fake_libcxi_layout(buf, len(buf))
    c_side = dict(item.split("=") for item in buf.value.decode().split())
    py_side = {
        "size": ctypes.sizeof(abi.CxiSvcDesc),
        "align": ctypes.alignment(abi.CxiSvcDesc),
        "num_vld_vnis": abi.CxiSvcDesc.num_vld_vnis.offset,
        "vnis": abi.CxiSvcDesc.vnis.offset,
        "tcs": abi.CxiSvcDesc.tcs.offset,
        "members": abi.CxiSvcDesc.members.offset,
        "member_size": ctypes.sizeof(abi.SvcMember),
        "limits": abi.CxiSvcDesc.limits.offset,
        "svc_id": abi.CxiSvcDesc.svc_id.offset,
        "fail_size": ctypes.sizeof(abi.CxiSvcFailInfo),
        "list_descs": abi.SVC_LIST_DESCS_OFFSET,
        "devinfo_name": abi.DEVINFO_NAME_OFFSET,
    }
    assert {k: int(v) for k, v in c_side.items()} == py_side
    assert py_side == {
        "size": 68,
        "align": 4,
        "num_vld_vnis": 1,
        "vnis": 2,
        "tcs": 10,
        "members": 16,
        "member_size": 8,
        "limits": 32,
        "svc_id": 64,
        "fail_size": 20,
        "list_descs": 4,
        "devinfo_name": 28,
    }


ENCODE_CASES = [
    (
        ServiceDesc.for_netns(
            [5, 4095], tcs=("low_latency", "eth"), limits={"les": Limit(100, 10), "acs": Limit(4, 2)}
        ),
        "rm=1 rv=1 rt=1 rl=1 en=1 sys=0 pool=0 nvnis=2 vnis=5,4095,0,0 tcs=0,1,0,0,1 "
        "m0=0:0 m1=0:0 limits=0/0,0/0,0/0,0/0,0/0,100/10,0/0,4/2 svc_id=0",
    ),
    (
        ServiceDesc(
            svc_id=0x01020304,
            is_system_svc=True,
            cntr_pool_id=3,
            vnis=(1, 2, 3, 65535),
            tcs=frozenset({"dedicated_access", "best_effort"}),
            members=(Member(1000, MEMBER_UID), Member(77, MEMBER_GID)),
            limits={"ptes": Limit(65535, 1), "tles": Limit(8, 8)},
        ),
        "rm=0 rv=0 rt=0 rl=0 en=0 sys=1 pool=3 nvnis=4 vnis=1,2,3,65535 tcs=1,0,0,1,0 "
        "m0=1000:1 m1=77:2 limits=65535/1,0/0,0/0,0/0,0/0,0/0,8/8,0/0 svc_id=16909060",
    ),
    (
        ServiceDesc(
            restricted_members=True,
            resource_limits=True,
            members=(Member(0, MEMBER_IGNORE), Member(NETNS_INODE, MEMBER_NET_NS)),
            limits={
                name: Limit(i + 1, i)
                for i, name in enumerate(("ptes", "txqs", "tgqs", "eqs", "cts", "les", "tles", "acs"))
            },
        ),
        "rm=1 rv=0 rt=0 rl=1 en=0 sys=0 pool=0 nvnis=0 vnis=0,0,0,0 tcs=0,0,0,0,0 "
        f"m0=0:0 m1={NETNS_INODE}:3 limits=1/0,2/1,3/2,4/3,5/4,6/5,7/6,8/7 svc_id=0",
    ),
]


@pytest.mark.parametrize("desc,seen_by_c", ENCODE_CASES)
def test_c_reads_what_python_encodes(helpers, desc, seen_by_c):
    raw = abi.desc_to_struct(desc)
    buf = ctypes.create_string_buffer(512)
    helpers.fake_libcxi_describe(ctypes.byref(raw), buf, len(buf))
    assert buf.value.decode() == seen_by_c


def reference_bytes(flags, vnis, tcs, members, limits, svc_id) -> bytes:
    """The 68 bytes of a desc packed straight from the facts table (no ctypes)."""
    padded_vnis = list(vnis) + [0] * (4 - len(vnis))
    flat_members = [v for member in members for v in member]
    flat_limits = [v for pair in limits for v in pair]
    return struct.pack(
        "<BB4H5Bx" + "Ii" * 2 + "16H" + "I", flags, len(vnis), *padded_vnis, *tcs, *flat_members, *flat_limits, svc_id
    )


def test_encoded_bytes_match_the_facts_table():
    desc = ServiceDesc.for_netns(
        [5, 4095], tcs=("low_latency", "eth"), limits={"les": Limit(100, 10), "acs": Limit(4, 2)}
    )
    expected = reference_bytes(
        flags=0b0001_1111,
        vnis=[5, 4095],
        tcs=[0, 1, 0, 0, 1],
        members=[(0, 0), (0, 0)],
        limits=[(0, 0)] * 5 + [(100, 10), (0, 0), (4, 2)],
        svc_id=0,
    )
    assert bytes(abi.desc_to_struct(desc)) == expected
    assert len(expected) == 68


def test_python_decodes_what_c_fills(helpers):
    raw = abi.CxiSvcDesc()
    helpers.fake_libcxi_sample_desc(ctypes.byref(raw))
    desc = abi.struct_to_desc(raw)
    assert desc == ServiceDesc(
        svc_id=0xA1B2C3D4,
        restricted_members=True,
        restricted_tcs=True,
        enable=True,
        cntr_pool_id=2,
        vnis=(1, 0x1234, 65535),
        tcs=frozenset({"low_latency", "eth"}),
        members=(Member(1000, MEMBER_UID), Member(4026531840, MEMBER_NET_NS)),
        limits={},
    )  # resource_limits is off: limits carry no meaning
    raw.flags |= abi.FLAG_RESOURCE_LIMITS
    assert abi.struct_to_desc(raw).limits == {
        "ptes": Limit(100, 0),
        "txqs": Limit(200, 1),
        "tgqs": Limit(300, 2),
        "eqs": Limit(400, 3),
        "cts": Limit(500, 4),
        "les": Limit(600, 5),
        "tles": Limit(700, 6),
        "acs": Limit(800, 7),
    }


def test_get_and_list_decode_the_bytes_the_library_stores(backend, state):
    stored = reference_bytes(
        flags=0b1010_0101,
        vnis=[300, 301, 302],
        tcs=[1, 1, 0, 0, 0],
        members=[(0, 0), (0, 0)],
        limits=[(9, 1)] + [(0, 0)] * 7,
        svc_id=42,
    )
    with backend.open("cxi1") as first_open:  # creates device 1 with its default service
        assert first_open.name == "cxi1"
    standin.write_service(state, 1, stored, netns=NETNS_INODE)
    expected = ServiceDesc(
        svc_id=42,
        restricted_members=True,
        restricted_tcs=True,
        is_system_svc=True,
        cntr_pool_id=2,
        vnis=(300, 301, 302),
        tcs=frozenset({"dedicated_access", "low_latency"}),
    )
    with backend.open("cxi1") as device:
        assert device.get_svc(42) == expected
        listed = {s.svc_id: s for s in device.list_services()}
    assert sorted(listed) == [1, 42]
    assert listed[42].desc == expected and listed[42].netns_inode == NETNS_INODE
    assert listed[42].device == "cxi1"
    default = listed[1]
    assert default.netns_inode == 0
    assert default.desc.vnis == (1, 10) and not default.desc.enable
    assert default.desc.limits["tles"] == Limit(512, 512)


def test_alloc_round_trips_through_the_library(cxi0):
    desc = ServiceDesc.for_netns([7, 8], tcs=("bulk_data",), limits={"les": Limit(64, 16)})
    svc_id = cxi0.alloc_svc(desc)
    stored = cxi0.get_svc(svc_id)
    assert stored.svc_id == svc_id
    stored.svc_id = 0
    assert stored == desc


# ---------------------------------------------------------------- (b) behaviour


def test_binding_sequence_lists_and_destroys(cxi0):
    svc_id = cxi0.alloc_svc(ServiceDesc.for_netns([1024]))
    assert svc_id > 1
    assert cxi0.svc_get_netns(svc_id) == 0
    cxi0.svc_enable(svc_id, False)
    assert not cxi0.get_svc(svc_id).enable
    cxi0.svc_set_netns(svc_id, NETNS_INODE)
    cxi0.svc_enable(svc_id, True)
    assert cxi0.get_svc(svc_id).enable
    assert cxi0.svc_get_netns(svc_id) == NETNS_INODE
    services = {s.svc_id: s for s in cxi0.list_services()}
    assert services[svc_id].netns_inode == NETNS_INODE
    assert services[svc_id].desc.vnis == (1024,)
    cxi0.destroy_svc(svc_id)
    assert svc_id not in {s.svc_id for s in cxi0.list_services()}
    with pytest.raises(CxiError) as exc:
        cxi0.svc_get_netns(svc_id)
    assert errno_of(exc) == errno.EINVAL


def test_lowest_free_id_is_reused_and_devices_are_separate(backend):
    """Like the driver (xa_alloc), a new service takes the lowest free id."""
    with backend.open("cxi0") as cxi0, backend.open("cxi1") as cxi1:
        first, second = (cxi0.alloc_svc(ServiceDesc.for_netns([2])) for _ in range(2))
        assert (first, second) == (2, 3)
        cxi0.destroy_svc(first)
        assert cxi0.alloc_svc(ServiceDesc.for_netns([2])) == first
        assert cxi0.alloc_svc(ServiceDesc.for_netns([2])) == 4
        assert [s.svc_id for s in cxi1.list_services()] == [1]


@pytest.mark.parametrize(
    "desc,why",
    [
        (ServiceDesc(restricted_vnis=True), "restricted VNIs without any VNI"),
        (ServiceDesc.for_netns([0]), "VNI 0"),
        (ServiceDesc.for_netns([1, 2, 3, 4, 5]), "five VNIs"),
        (ServiceDesc.for_netns([70000]), "VNI above 65535"),
        (ServiceDesc.for_netns([3], limits={"les": Limit(max=5, res=6)}), "res > max"),
        (ServiceDesc.for_netns([3], limits={"acs": Limit(max=1023)}), "max > device total"),
        (ServiceDesc(restricted_members=True, members=(Member(1, 4), Member())), "member type 4"),
        (ServiceDesc(restricted_members=True, members=(Member(1, -1), Member())), "member type -1"),
        (ServiceDesc(restricted_members=True, members=(Member(1, 2**32 + MEMBER_UID), Member())),
         "member type truncated to UID"),
    ],
)
def test_alloc_rejects_invalid_descs(cxi0, desc, why):
    with pytest.raises(CxiError) as exc:
        cxi0.alloc_svc(desc)
    assert errno_of(exc) == errno.EINVAL, why
    assert [s.svc_id for s in cxi0.list_services()] == [1]


def test_alloc_short_of_resources_says_what_was_available(cxi0):
    """fail_info read through the ABI: the first reservation short (the driver checks LEs
    before ACs and stops there), with what was free."""
    cxi0.alloc_svc(ServiceDesc.for_netns([3], limits={"acs": Limit(1000, 1000)}))
    with pytest.raises(NoResources) as exc:
        cxi0.alloc_svc(ServiceDesc.for_netns([4], limits={"les": Limit(20, 10), "acs": Limit(30, 30)}))
    assert errno_of(exc) == errno.ENOSPC
    assert (exc.value.short, exc.value.avail["les"], exc.value.avail["acs"]) == ("acs", 16384, 22)
    assert exc.value.detail == "acs: reserves 30, 22 free"
    assert not (exc.value.no_le_pools or exc.value.no_tle_pools or exc.value.no_cntr_pools)


def test_totals_without_sysfs_come_from_the_default_service(lib_path, tmp_path, state):
    """A driver that shows no num_* properties: the default service's limits are the device's
    totals (but TLEs, which it reserves 512 of: the Cassini count, 2048)."""
    root = standin.make_sysfs(tmp_path / "bare", [standin.Nic("cxi0", "hsn0", "0000:21:00.0", None)])
    (root / "devices" / "pci0000:00" / "0000:21:00.0" / "properties" / "rgids_avail").unlink()
    standin.write_device(state, 0, totals=(100, 90, 80, 70, 60, 50, 40, 30))
    with LibcxiBackend(str(lib_path), str(root)).open("cxi0") as device:
        assert device.totals() == {"ptes": 100, "txqs": 90, "tgqs": 80, "eqs": 70, "cts": 60,
                                   "les": 50, "tles": 2048, "acs": 30}
        assert device.rgids_avail() is None


def test_totals_the_default_service_does_not_show_are_a_cassinis(lib_path, tmp_path, state):
    """No num_* properties and a default service that limits LEs only: the other totals
    are a Cassini NIC's, each its own (not the TLE count)."""
    root = standin.make_sysfs(tmp_path / "bare", [standin.Nic("cxi0", "hsn0", "0000:21:00.0", None)])
    standin.write_device(state, 0)
    default = ServiceDesc(svc_id=1, restricted_vnis=True, vnis=(1, 10), resource_limits=True,
                          limits={"les": Limit(50, 0)})
    standin.write_service(state, 0, bytes(abi.desc_to_struct(default)))
    with LibcxiBackend(str(lib_path), str(root)).open("cxi0") as device:
        assert device.totals() == {**CASSINI_TOTALS, "les": 50}


def test_resource_use_of_another_layout_is_not_read():
    """The driver answers svc_id 0 for one service; any other id means a struct of another
    layout, whose counts would be read at the wrong offsets."""
    raw = abi.CxiRsrcUse(svc_id=0, tle_pool_id=2)
    raw.in_use[1] = 7
    assert abi.rsrc_use_counts(raw, 5)["txqs"] == 7
    raw.svc_id = 5
    assert abi.rsrc_use_counts(raw, 5)["txqs"] == 7
    raw.svc_id = 0x70000
    assert abi.rsrc_use_counts(raw, 5) is None


def test_destroy_errors(cxi0, state):
    for svc_id in (1, 999):
        with pytest.raises(CxiError) as exc:
            cxi0.destroy_svc(svc_id)
        assert errno_of(exc) == errno.EINVAL
    svc_id = cxi0.alloc_svc(ServiceDesc.for_netns([5]))
    standin.set_busy(state, 0, svc_id, 1)
    with pytest.raises(CxiError) as exc:
        cxi0.destroy_svc(svc_id)
    assert errno_of(exc) == errno.EBUSY
    assert "cxil_destroy_svc on cxi0" in str(exc.value) and "EBUSY" in str(exc.value)
    standin.set_busy(state, 0, svc_id, 0)
    cxi0.destroy_svc(svc_id)


def test_set_netns_rules(cxi0):
    open_svc = cxi0.alloc_svc(ServiceDesc(restricted_vnis=True, vnis=(6,), enable=True))
    uid_svc = cxi0.alloc_svc(
        ServiceDesc(
            restricted_members=True, restricted_vnis=True, vnis=(6,), members=(Member(1000, MEMBER_UID), Member())
        )
    )
    gid_svc = cxi0.alloc_svc(
        ServiceDesc(
            restricted_members=True, restricted_vnis=True, vnis=(6,), members=(Member(), Member(50, MEMBER_GID))
        )
    )
    for svc_id in (open_svc, uid_svc, gid_svc):
        with pytest.raises(CxiError) as exc:
            cxi0.svc_set_netns(svc_id, NETNS_INODE)
        assert errno_of(exc) == errno.EEXIST
        assert cxi0.svc_get_netns(svc_id) == 0
    with pytest.raises(CxiError) as exc:
        cxi0.svc_set_netns(999, NETNS_INODE)
    assert errno_of(exc) == errno.EINVAL


def test_unknown_ids_and_out_of_range_values(cxi0):
    for call in (lambda: cxi0.get_svc(999), lambda: cxi0.svc_enable(999, True), lambda: cxi0.svc_get_netns(999)):
        with pytest.raises(CxiError) as exc:
            call()
        assert errno_of(exc) == errno.EINVAL
    svc_id = cxi0.alloc_svc(ServiceDesc.for_netns([5]))
    # 2**32 + svc_id would reach svc_id if ctypes truncated it
    with pytest.raises(CxiError) as exc:
        cxi0.destroy_svc(2**32 + svc_id)
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(CxiError):
        cxi0.svc_set_netns(svc_id, 2**32 + 5)
    assert svc_id in {s.svc_id for s in cxi0.list_services()}
    assert cxi0.svc_get_netns(svc_id) == 0


def test_closed_device_refuses_calls(backend):
    device = backend.open("cxi0")
    device.close()
    device.close()
    with pytest.raises(ValueError, match="closed"):
        device.list_services()


def test_open_only_devices_present_in_sysfs(backend):
    with pytest.raises(CxiError) as exc:
        backend.open("cxi7")
    assert errno_of(exc) == errno.ENODEV and "cxil_open_device on cxi7" in str(exc.value)


_CHILD = """
import sys
from cxi_cni.cxi.backend import Limit, ServiceDesc
from cxi_cni.cxi.libcxi import LibcxiBackend
backend = LibcxiBackend(sys.argv[1], sys.argv[2])
with backend.open("cxi0") as device:
    ids = [device.alloc_svc(ServiceDesc.for_netns([int(sys.argv[3])], limits={"txqs": Limit(4, 0)}))
           for _ in range(5)]
print(" ".join(map(str, ids)))
"""


def test_state_is_shared_by_concurrent_processes(lib_path, sysfs, state):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(lib_path), str(sysfs), str(100 + n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    ids = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        ids += [int(x) for x in out.split()]
    assert sorted(ids) == list(range(2, 32))
    backend = LibcxiBackend(str(lib_path), str(sysfs))
    with backend.open("cxi0") as device:
        listed = {s.svc_id: s.desc.vnis for s in device.list_services()}
    assert sorted(listed) == [1] + list(range(2, 32))
    assert {vnis for svc_id, vnis in listed.items() if svc_id > 1} == {(100 + n,) for n in range(6)}


# ---------------------------------------------------------------- (c) availability


def test_missing_set_netns_is_reported_with_the_file(lib_without_netns, sysfs, state):
    """A library without the netns calls serves the member stack (auto), and names the
    symbol and the file when a call stack is asked for or a netns call is made."""
    auto = LibcxiBackend(lib_path=str(lib_without_netns), sysfs_root=str(sysfs))
    auto.check()
    info = auto.library(with_versions=True)
    assert (info.file, info.netns_calls) == (str(lib_without_netns.resolve()), False)
    assert info.versions == ("LIBCXI_1.0", "LIBCXI_1.2", "LIBCXI_1.5", "LIBCXI_1.8", "LIBCXI_1.9")
    assert (auto.stack.name, auto.stack.chosen_by) == (
        "netns-member", f"{lib_without_netns.resolve()} has no cxil_svc_set_netns")
    with auto.open("cxi0") as device, pytest.raises(BackendUnavailable) as exc:
        device.svc_set_netns(1, NETNS_INODE)
    assert str(exc.value) == (
        f"{lib_without_netns.resolve()} has no cxil_svc_set_netns (libcxi >= 1.10 / "
        "LIBCXI_1.10 needed to bind a service to a network namespace)"
    )
    forced = LibcxiBackend(lib_path=str(lib_without_netns), sysfs_root=str(sysfs), stack="shs-14.0.1")
    with pytest.raises(BackendUnavailable, match="has no cxil_svc_set_netns .*cxi.stack 'shs-14.0.1' needs"):
        forced.check()
    with pytest.raises(BackendUnavailable, match="cxil_svc_set_netns"):
        forced.open("cxi0")


def test_library_and_driver_are_described(backend, lib_path, tmp_path):
    assert backend.library().versions == ()  # not read for ADD
    info = backend.library(with_versions=True)
    assert info.netns_calls and info.versions[-1] == "LIBCXI_1.10"
    assert backend.stack.name == "netns-call"
    assert backend.driver_revision() is None  # this fake sysfs has no properties/driver_rev
    root = standin.make_sysfs(tmp_path / "sys-rev", [standin.Nic("cxi0", "hsn0", "0000:21:00.0")],
                              driver_rev="bb11c85")
    rev = LibcxiBackend(str(lib_path), str(root)).driver_revision()
    assert rev == f"revision bb11c85 ({root}/class/cxi/cxi0/device/properties/driver_rev)"


def test_unloadable_library_is_reported_with_the_loader_error(tmp_path, sysfs):
    missing = tmp_path / "nowhere" / "libcxi.so.1"
    backend = LibcxiBackend(lib_path=str(missing), sysfs_root=str(sysfs))  # no load yet
    assert backend.device_names() == ["cxi0", "cxi1"]
    with pytest.raises(BackendUnavailable) as exc:
        backend.check()
    assert str(exc.value).startswith(f"cannot load the CXI library {missing}: ")
    assert "No such file or directory" in str(exc.value)
    not_elf = tmp_path / "libcxi.so.1"
    not_elf.write_text("not a library\n" * 20)
    with pytest.raises(BackendUnavailable, match="invalid ELF header"):
        LibcxiBackend(lib_path=str(not_elf), sysfs_root=str(sysfs)).check()


def test_a_library_where_the_loader_does_not_look_is_found_and_named(lib_path, sysfs, tmp_path,
                                                                    monkeypatch):
    """RHEL and SLES put libcxi in /usr/lib64, which the bundled Debian loader searches only
    through /etc/ld.so.cache: say where the file is and how to make it found."""
    from cxi_cni.cxi import libload

    folder = tmp_path / "lib64"
    folder.mkdir()
    name = "libcxi-standin-elsewhere.so.1"
    shutil.copy(lib_path, folder / name)
    monkeypatch.setattr(libload, "LIBCXI_DIRS", (str(tmp_path / "nowhere"), str(folder)))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    with pytest.raises(BackendUnavailable) as exc:
        LibcxiBackend(lib_path=name, sysfs_root=str(sysfs)).check()
    assert str(exc.value) == (
        f"cannot load the CXI library {name}: it is at {folder / name}, but the dynamic loader "
        "does not look there (it searched LD_LIBRARY_PATH (/opt/other), /etc/ld.so.cache and its "
        f"default directories); run ldconfig so that /etc/ld.so.cache lists it, or set "
        f"cxi.libcxi to {folder / name}")


def test_no_devices_is_reported(lib_path, tmp_path):
    empty = standin.make_sysfs(tmp_path / "empty-sys", [])
    backend = LibcxiBackend(lib_path=str(lib_path), sysfs_root=str(empty))
    with pytest.raises(BackendUnavailable, match="no CXI devices under .*class/cxi"):
        backend.check()


def test_check_passes_with_a_complete_library(backend):
    backend.check()


# ---------------------------------------------------------------- (d) sysfs discovery


def test_netdev_matched_through_the_pci_device_not_digits(tmp_path, lib_path):
    root = standin.make_sysfs(
        tmp_path / "sys",
        [
            standin.Nic("cxi0", "hsn1", "0000:21:00.0"),
            standin.Nic("cxi1", "hsn0", "0000:41:00.0"),
            standin.Nic("cxi2", "hsn2", "0000:61:00.0"),
        ],
        plain_netdevs=("eth0",),
    )
    backend = LibcxiBackend(lib_path=str(lib_path), sysfs_root=str(root))
    assert backend.device_for_netdev("hsn1") == "cxi0"
    assert backend.device_for_netdev("hsn0") == "cxi1"
    assert backend.device_for_netdev("hsn2") == "cxi2"
    with pytest.raises(BackendUnavailable, match="no network device hsn9"):
        backend.device_for_netdev("hsn9")
    with pytest.raises(BackendUnavailable, match="eth0 is not backed by a PCI device"):
        backend.device_for_netdev("eth0")
    with pytest.raises(BackendUnavailable, match="not a network device name"):
        backend.device_for_netdev("../cxi/cxi0")


def test_netdev_of_a_pci_device_without_cxi(tmp_path, lib_path):
    root = standin.make_sysfs(tmp_path / "sys", [standin.Nic("cxi0", "hsn0", "0000:21:00.0")])
    other_pci = root / "devices" / "pci0000:00" / "0000:03:00.0"
    other_pci.mkdir(parents=True)
    (root / "class" / "net" / "enp3s0").mkdir()
    (root / "class" / "net" / "enp3s0" / "device").symlink_to(other_pci)
    backend = LibcxiBackend(lib_path=str(lib_path), sysfs_root=str(root))
    with pytest.raises(BackendUnavailable, match=r"enp3s0 \(PCI device 0000:03:00.0\) belongs to no CXI"):
        backend.device_for_netdev("enp3s0")


def test_device_names_sorted_by_number_and_root_from_env(tmp_path, monkeypatch, lib_path):
    root = standin.make_sysfs(
        tmp_path / "sys", [standin.Nic(f"cxi{n}", f"hsn{n}", f"0000:{n + 16:02x}:00.0") for n in (10, 2, 0)]
    )
    (root / "class" / "cxi" / "cxi_extra").mkdir()
    monkeypatch.setenv("CXI_CNI_SYSFS_ROOT", str(root))
    backend = LibcxiBackend(lib_path=str(lib_path))
    assert backend.sysfs_root == str(root)
    assert backend.device_names() == ["cxi0", "cxi2", "cxi10"]
    assert backend.device_for_netdev("hsn10") == "cxi10"


def test_open_uses_the_sysfs_number_as_dev_id(backend, state):
    with backend.open("cxi1"):
        pass
    assert [fields[:2] for fields in standin.state_lines(state) if fields[0] == "dev"] == [["dev", "1"]]


# What the backend must not bring in: each costs milliseconds on every CNI call.
HEAVY = ("pyroute2", "pydantic_core", "ssl", "http.client", "yaml", "asyncio", "subprocess",
         "socket", "logging")


def test_import_is_light():
    """Importing the backend maps no libcxi and loads none of the heavy modules."""
    code = (
        "import sys; import cxi_cni.cxi.libcxi; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
        "print(any('libcxi' in line for line in open('/proc/self/maps')))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["[]", "False"], out


def test_a_library_without_the_lpr_calls(caplog):
    """libcxi before 1.8 has no cxil_set_svc_lpr: a configured number of LNIs per resource
    group names what is missing; a computed one is logged and the service used as it is."""
    from types import SimpleNamespace

    from cxi_cni.cxi.libcxi import LibcxiDevice
    from cxi_cni.cxi.services import share_rgids
    from cxi_cni.cxi.shape import Shape

    device = LibcxiDevice(SimpleNamespace(), object(), "cxi0", None, "/usr/lib64/libcxi.so.1.4.0")
    device.rgids_avail = lambda: 2
    assert device.svc_get_lpr(2) is None and device.svc_rsrc_use(2) is None
    with pytest.raises(BackendUnavailable) as exc:
        share_rgids(device, 2, Shape(lnis_per_rgid=4), 1)
    assert str(exc.value) == ("/usr/lib64/libcxi.so.1.4.0 has no cxil_set_svc_lpr (libcxi >= 1.8 / "
                              "LIBCXI_1.8 needed to share resource groups between LNIs)")
    share_rgids(device, 2, Shape(cpus=8), 1)  # auto: 8 CPUs over 2 groups left
    assert "4 LNIs per resource group needed on cxi0, not set" in caplog.text
    device._handle = None  # nothing to close
