"""The `libcxi` backend: CXI services through ctypes calls into libcxi.so.1.

Devices are discovered through sysfs (`<root>/class/cxi/cxiN`); the root is `/sys`
unless the `CXI_CNI_SYSFS_ROOT` environment variable (a test and debug hook) or the
constructor names another. The library is loaded (libload.py) only when a call needs it,
so importing this module costs no more than ctypes. Which stack the node runs (stacks.py)
follows from the library's symbols: whether it has cxil_svc_set_netns and
cxil_svc_get_netns. The resource calls of older versions (cxil_get_svc_rsrc_use,
LIBCXI_1.5; cxil_set_svc_lpr and cxil_get_svc_lpr, LIBCXI_1.8) the plugin can do without.

A device's resource totals are the driver's own numbers in sysfs
(`device/properties/num_ptes` ... `num_acs`, the same as cxil_devinfo's num_* fields, whose
struct has grown across libcxi releases), else the limits of the default service, which the
driver sets to the totals (but TLEs, of which it reserves a share), else a Cassini NIC's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import replace

from cxi_cni.cxi import abi
from cxi_cni.cxi.backend import (
    DEFAULT_SVC_ID,
    RESOURCES,
    BackendUnavailable,
    CxiError,
    LibraryInfo,
    ListingFilters,
    Service,
    ServiceDesc,
)
from cxi_cni.cxi.libload import file_of, load_library, missing, symbol_versions
from cxi_cni.cxi.shape import CASSINI_TOTALS
from cxi_cni.cxi.stacks import AUTO, NETNS_CALLS, ResolvesStack

SYSFS_ROOT_ENV = "CXI_CNI_SYSFS_ROOT"
DEFAULT_LIB_PATH = "libcxi.so.1"
_CXI_NAME = re.compile(r"cxi(\d+)")
DRIVER_REV = "device/properties/driver_rev"  # under class/cxi/cxiN: the driver's git revision
PROPERTIES = "device/properties"  # under class/cxi/cxiN: num_<resource>, rgids_avail
_UINT32_MAX = 0xFFFFFFFF


def _u32(op: str, device: str, value: int, what: str) -> int:
    """ctypes would truncate silently; an id that does not fit is an invalid argument."""
    if not 0 <= value <= _UINT32_MAX:
        raise CxiError(op, device, errno.EINVAL, f"{what} {value} is not a 32-bit unsigned value")
    return value


class LibcxiDevice(ListingFilters):
    """An open CXI device (struct cxil_dev *) of libcxi."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p, name: str, stack, lib_file: str,
                 properties: str = ""):
        self._lib, self._handle, self.name = lib, handle, name
        self.stack, self._lib_file, self._properties = stack, lib_file, properties

    def __enter__(self) -> LibcxiDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _dev(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError(f"device {self.name} is closed")
        return self._handle

    def _check(self, op: str, rc: int) -> int:
        if rc < 0:
            raise CxiError(op, self.name, -rc)
        return rc

    def _call(self, op: str, svc_id: int, *args, optional: bool = False) -> int | None:
        """Call the library's `op` on service `svc_id`: its answer, CxiError when negative.

        An id that does not fit an unsigned int (ctypes would truncate it) is -EINVAL. A
        call the library lacks is None when `optional`, else BackendUnavailable."""
        function = getattr(self._lib, op, None)
        if function is None:
            if optional:
                return None
            raise missing(self._lib_file, op)
        return self._check(op, function(self._dev(), _u32(op, self.name, svc_id, "service id"), *args))

    def alloc_svc(self, desc: ServiceDesc) -> int:
        try:
            raw = abi.desc_to_struct(desc)
        except ValueError as exc:
            raise CxiError("cxil_alloc_svc", self.name, errno.EINVAL, str(exc)) from None
        fail = abi.CxiSvcFailInfo()
        rc = self._lib.cxil_alloc_svc(self._dev(), ctypes.byref(raw), ctypes.byref(fail))
        if rc == -errno.ENOSPC:
            raise abi.no_resources(self.name, fail, desc)
        return self._check("cxil_alloc_svc", rc)

    def destroy_svc(self, svc_id: int) -> None:
        self._call("cxil_destroy_svc", svc_id)

    def svc_enable(self, svc_id: int, enable: bool) -> None:
        self._call("cxil_svc_enable", svc_id, bool(enable))

    def svc_set_netns(self, svc_id: int, netns_inode: int) -> None:
        inode = _u32("cxil_svc_set_netns", self.name, netns_inode, "netns inode")
        self._call("cxil_svc_set_netns", svc_id, inode)

    def _netns_entry(self, svc_id: int) -> int | None:
        """cxil_svc_get_netns: the inode, None for -EINVAL (no netns entry, or no service)."""
        inode = ctypes.c_uint(0)
        try:
            self._call("cxil_svc_get_netns", svc_id, ctypes.byref(inode))
        except CxiError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return None
        return inode.value

    def _listed_netns(self, svc_id: int) -> int:
        """cxil_svc_get_netns for a listed service: -EINVAL means no netns entry."""
        return self._netns_entry(svc_id) or 0

    def svc_get_netns(self, svc_id: int) -> int:
        """The inode the service is bound to, 0 when it is bound to none. The driver
        answers -EINVAL both for an unknown service and for a service without a netns
        entry, so -EINVAL is 0 only if the service is found to exist."""
        inode = self._netns_entry(svc_id)
        if inode is None:
            try:
                self.get_svc(svc_id)
            except CxiError as exc:
                raise CxiError("cxil_svc_get_netns", self.name, exc.errno, exc.detail) from None
            return 0
        return inode

    def get_svc(self, svc_id: int) -> ServiceDesc:
        raw = abi.CxiSvcDesc()
        self._call("cxil_get_svc", svc_id, ctypes.byref(raw))
        return abi.struct_to_desc(raw)

    def list_services(self, netns: bool = True) -> list[Service]:
        list_ptr = ctypes.c_void_p()
        self._check("cxil_get_svc_list", self._lib.cxil_get_svc_list(self._dev(), ctypes.byref(list_ptr)))
        try:
            raws = abi.svc_list_descs(list_ptr)
        finally:
            self._lib.cxil_free_svc_list(list_ptr)
        services = []
        for raw in raws:
            desc = abi.struct_to_desc(raw)
            inode = self.stack.listed_netns(desc, self._listed_netns) if netns else 0
            services.append(Service(device=self.name, desc=desc, netns_inode=inode))
        return sorted(services, key=lambda service: service.svc_id)

    def _property(self, name: str) -> int | None:
        try:
            with open(os.path.join(self._properties, name)) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def totals(self) -> dict[str, int]:
        found = {name: self._property(f"num_{name}") for name in RESOURCES}
        if None in found.values():
            default = self.get_svc(DEFAULT_SVC_ID).limits
            for name, value in found.items():
                if value is None:
                    found[name] = (default[name].max if name in default and name != "tles"
                                   else CASSINI_TOTALS[name])
        return found

    def rgids_avail(self) -> int | None:
        return self._property("rgids_avail")

    def svc_rsrc_use(self, svc_id: int) -> dict[str, int] | None:
        raw = abi.CxiRsrcUse()
        if self._call("cxil_get_svc_rsrc_use", svc_id, ctypes.byref(raw), optional=True) is None:
            return None
        return abi.rsrc_use_counts(raw, svc_id)

    def svc_set_lpr(self, svc_id: int, lnis_per_rgid: int) -> None:
        self._call("cxil_set_svc_lpr", svc_id, lnis_per_rgid)

    def svc_get_lpr(self, svc_id: int) -> int | None:
        return self._call("cxil_get_svc_lpr", svc_id, optional=True)

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._lib.cxil_close_device(handle)


class LibcxiBackend(ResolvesStack):
    """CXI devices reached through the real libcxi."""

    name = "libcxi"

    def __init__(self, lib_path: str = DEFAULT_LIB_PATH, sysfs_root: str | None = None,
                 stack: str = AUTO):
        self.lib_path, self.stack_choice = lib_path, stack
        self.sysfs_root = sysfs_root or os.environ.get(SYSFS_ROOT_ENV) or "/sys"
        self._lib: ctypes.CDLL | None = None
        self._info: LibraryInfo | None = None

    def _library(self) -> ctypes.CDLL:
        if self._lib is None:
            self._lib = load_library(self.lib_path)
        return self._lib

    def library(self, with_versions: bool = False) -> LibraryInfo:
        if self._info is None:
            lib = self._library()
            self._info = LibraryInfo(file_of(lib, self.lib_path), (),
                                     all(hasattr(lib, name) for name in NETNS_CALLS))
        if with_versions and not self._info.versions:  # reads the file: for doctor, not ADD
            self._info = replace(self._info, versions=symbol_versions(self._info.file))
        return self._info

    def driver_revision(self) -> str | None:
        for name in self.device_names():
            path = os.path.join(self._class_dir("cxi"), name, DRIVER_REV)
            try:
                with open(path) as fh:
                    return f"revision {fh.read().strip() or '(empty)'} ({path})"
            except OSError:
                continue
        return None

    def _class_dir(self, cls: str) -> str:
        return os.path.join(self.sysfs_root, "class", cls)

    def check(self) -> None:
        self.stack  # noqa: B018  (loads the library and resolves the stack, or says why not)
        if not self.device_names():
            raise BackendUnavailable(f"no CXI devices under {self._class_dir('cxi')} (is the cxi_core driver loaded?)")

    def device_names(self) -> list[str]:
        try:
            entries = os.listdir(self._class_dir("cxi"))
        except OSError:
            return []
        numbered = [(int(m.group(1)), name) for name in entries if (m := _CXI_NAME.fullmatch(name))]
        return [name for _, name in sorted(numbered)]

    def device_for_netdev(self, netdev: str) -> str:
        if not netdev or "/" in netdev or netdev in (".", ".."):
            raise BackendUnavailable(f"{netdev!r} is not a network device name")
        net_dir = os.path.join(self._class_dir("net"), netdev)
        if not os.path.exists(net_dir):
            raise BackendUnavailable(f"no network device {netdev} under {self._class_dir('net')}")
        device_link = os.path.join(net_dir, "device")
        if not os.path.exists(device_link):
            raise BackendUnavailable(f"{netdev} is not backed by a PCI device (no {device_link})")
        pci_device = os.path.realpath(device_link)
        for name in self.device_names():
            cxi_device = os.path.join(self._class_dir("cxi"), name, "device")
            if os.path.realpath(cxi_device) == pci_device or os.path.exists(os.path.join(cxi_device, "net", netdev)):
                return name
        raise BackendUnavailable(
            f"{netdev} (PCI device {os.path.basename(pci_device)}) belongs to no CXI device "
            f"under {self._class_dir('cxi')}"
        )

    def open(self, name: str) -> LibcxiDevice:
        match = _CXI_NAME.fullmatch(name)
        if not match or name not in self.device_names():
            raise CxiError("cxil_open_device", name, errno.ENODEV, f"no such CXI device under {self._class_dir('cxi')}")
        lib, stack = self._library(), self.stack
        handle = ctypes.c_void_p()
        rc = lib.cxil_open_device(int(match.group(1)), ctypes.byref(handle))
        if rc < 0:
            raise CxiError("cxil_open_device", name, -rc)
        if not handle.value:
            raise CxiError("cxil_open_device", name, errno.EIO, "the library returned no device")
        opened = ctypes.string_at(handle.value + abi.DEVINFO_NAME_OFFSET, abi.DEVINFO_NAME_LEN)
        opened_name = opened.split(b"\0", 1)[0].decode(errors="replace")
        if opened_name != name:
            lib.cxil_close_device(handle)
            raise BackendUnavailable(
                f"{self.lib_path} opened {opened_name!r} when asked for {name}: "
                "sysfs and the library number devices differently"
            )
        return LibcxiDevice(lib, handle, name, stack, self.library().file,
                            os.path.join(self._class_dir("cxi"), name, PROPERTIES))
