"""The `libcxi` backend: CXI services through ctypes calls into libcxi.so.1.

Devices are discovered through sysfs (`<root>/class/cxi/cxiN`); the root is `/sys`
unless the `CXI_CNI_SYSFS_ROOT` environment variable (a test and debug hook) or the
constructor names another. The library is loaded only when a call needs it, so importing
this module costs no more than ctypes. Which stack the node runs (stacks.py) follows from
the library's symbols: cxil_svc_set_netns and cxil_svc_get_netns are declared when present,
like the resource calls of older versions the plugin can do without (cxil_get_svc_rsrc_use,
LIBCXI_1.5; cxil_set_svc_lpr and cxil_get_svc_lpr, LIBCXI_1.8).

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
import stat
import sys
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
from cxi_cni.cxi.shape import CASSINI_TOTALS
from cxi_cni.cxi.stacks import AUTO, SET_NETNS_NEEDED, ResolvesStack

SYSFS_ROOT_ENV = "CXI_CNI_SYSFS_ROOT"
DEFAULT_LIB_PATH = "libcxi.so.1"
_CXI_NAME = re.compile(r"cxi(\d+)")
_SYMBOL_VERSION = re.compile(rb"LIBCXI_(\d+)\.(\d+)\0")
# Where libcxi packages put the library, looked at only to explain a failed load. The
# loader itself searches LD_LIBRARY_PATH, /etc/ld.so.cache and its default directories
# (for the bundled Debian loader /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib
# and /usr/lib: not /usr/lib64, where RHEL and SLES packages install it).
LIBCXI_DIRS = ("/usr/lib64", "/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/opt/cray/lib64")
DRIVER_REV = "device/properties/driver_rev"  # under class/cxi/cxiN: the driver's git revision
PROPERTIES = "device/properties"  # under class/cxi/cxiN: num_<resource>, rgids_avail
_UINT32_MAX = 0xFFFFFFFF

_dev_p = ctypes.c_void_p
_uint = ctypes.c_uint

# name: (restype, argtypes, first symbol version, what it is needed for)
_FUNCTIONS = {
    "cxil_open_device": (ctypes.c_int, [ctypes.c_uint32, ctypes.POINTER(_dev_p)], "1.0", "open a CXI device"),
    "cxil_close_device": (None, [_dev_p], "1.0", "close a CXI device"),
    "cxil_alloc_svc": (
        ctypes.c_int,
        [_dev_p, ctypes.POINTER(abi.CxiSvcDesc), ctypes.POINTER(abi.CxiSvcFailInfo)],
        "1.0",
        "create a service",
    ),
    "cxil_destroy_svc": (ctypes.c_int, [_dev_p, _uint], "1.0", "destroy a service"),
    "cxil_get_svc_list": (ctypes.c_int, [_dev_p, ctypes.POINTER(ctypes.c_void_p)], "1.0", "list services"),
    "cxil_free_svc_list": (None, [ctypes.c_void_p], "1.0", "free a service list"),
    "cxil_get_svc": (ctypes.c_int, [_dev_p, _uint, ctypes.POINTER(abi.CxiSvcDesc)], "1.2", "read a service"),
    "cxil_svc_enable": (ctypes.c_int, [_dev_p, _uint, ctypes.c_bool], "1.9", "enable or disable a service"),
}
# Declared when present: the netns calls of LIBCXI_1.10 (SHS >= 14.0.0), which the call
# stacks need and the member stack does without, and calls the plugin does not use.
_NETNS_FUNCTIONS = ("cxil_svc_set_netns", "cxil_svc_get_netns")
_OPTIONAL_FUNCTIONS = {
    "cxil_svc_set_netns": (ctypes.c_int, [_dev_p, _uint, _uint]),
    "cxil_svc_get_netns": (ctypes.c_int, [_dev_p, _uint, ctypes.POINTER(_uint)]),
    "cxil_svc_set_vni_range": (ctypes.c_int, [_dev_p, _uint, ctypes.c_uint16, ctypes.c_uint16]),
    "cxil_get_svc_rsrc_use": (ctypes.c_int, [_dev_p, _uint, ctypes.POINTER(abi.CxiRsrcUse)]),
    "cxil_set_svc_lpr": (ctypes.c_int, [_dev_p, _uint, _uint]),
    "cxil_get_svc_lpr": (ctypes.c_int, [_dev_p, _uint]),
}
LPR_NEEDED = "libcxi >= 1.8 / LIBCXI_1.8 needed to share resource groups between LNIs"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _file_of(lib: ctypes.CDLL, lib_path: str) -> str:
    """The file the dynamic loader actually mapped for `lib` (falls back to lib_path)."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        symbol = next(name for name in _FUNCTIONS if hasattr(lib, name))
        info = _DlInfo()
        if dladdr(ctypes.cast(getattr(lib, symbol), ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(os.fsdecode(info.dli_fname))
    except (AttributeError, OSError, StopIteration):
        pass
    return lib_path


def load_library(lib_path: str) -> ctypes.CDLL:
    """dlopen libcxi and declare every function's types; BackendUnavailable with the
    file and the missing symbol, or why the library cannot be loaded, when it cannot serve."""
    if "/" in lib_path:  # a path, not a soname: the loader would block on a FIFO there
        try:
            mode = os.stat(lib_path).st_mode
        except OSError:
            mode = stat.S_IFREG  # absent or unreadable: the loader's own error says so below
        if not stat.S_ISREG(mode):
            raise BackendUnavailable(f"cannot load the CXI library {lib_path}: not a regular file")
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as exc:
        raise not_loaded(lib_path, exc) from None
    for name, (restype, argtypes, version, purpose) in _FUNCTIONS.items():
        if not hasattr(lib, name):
            raise BackendUnavailable(
                f"{_file_of(lib, lib_path)} has no {name} (libcxi >= {version} / LIBCXI_{version} needed to {purpose})"
            )
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    for name, (restype, argtypes) in _OPTIONAL_FUNCTIONS.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
    return lib


def not_loaded(lib_path: str, exc: OSError) -> BackendUnavailable:
    """Why the loader could not load `lib_path`, in the words of a node's operator. The
    frozen program's ctypes wraps the loader's error in PyInstaller's own ("not found when
    the application was frozen"), which would send the reader to the build: the loader's
    message is its cause."""
    reason = str(exc.__cause__ or exc)
    head = f"cannot load the CXI library {lib_path}: "
    install = ("install libcxi (the HPE Slingshot host software's libcxi package) on the node, "
               "or set cxi.libcxi to the library's full path")
    if "No such file or directory" not in reason:
        return BackendUnavailable(head + reason)
    if "/" in lib_path:
        return BackendUnavailable(f"{head}no such file (No such file or directory); {install}")
    found = [os.path.join(d, lib_path) for d in LIBCXI_DIRS if os.path.isfile(os.path.join(d, lib_path))]
    # The frozen program's bootloader sets its own folder, keeping the caller's value in _ORIG.
    frozen = getattr(sys, "frozen", False)
    ld_path = os.environ.get("LD_LIBRARY_PATH_ORIG" if frozen else "LD_LIBRARY_PATH") or "unset"
    search = f"LD_LIBRARY_PATH ({ld_path}), /etc/ld.so.cache and its default directories"
    if found:
        return BackendUnavailable(
            f"{head}it is at {found[0]}, but the dynamic loader does not look there (it searched "
            f"{search}); run ldconfig so that /etc/ld.so.cache lists it, or set cxi.libcxi to "
            f"{found[0]}")
    return BackendUnavailable(
        f"{head}libcxi is not installed on this node (No such file or directory: the dynamic "
        f"loader searched {search}, and it is in none of {', '.join(LIBCXI_DIRS)}); {install}")


def symbol_versions(path: str) -> tuple[str, ...]:
    """The LIBCXI_x.y symbol versions a library file names, oldest first (what release of
    the library it is: LIBCXI_1.10, with the netns calls, came with SHS 14.0.0)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 << 20)
    except OSError:
        return ()
    found = {(int(major), int(minor)) for major, minor in _SYMBOL_VERSION.findall(data)}
    return tuple(f"LIBCXI_{major}.{minor}" for major, minor in sorted(found))


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

    def _check(self, op: str, rc: int, detail: str = "") -> int:
        if rc < 0:
            raise CxiError(op, self.name, -rc, detail)
        return rc

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
        svc_id = _u32("cxil_destroy_svc", self.name, svc_id, "service id")
        self._check("cxil_destroy_svc", self._lib.cxil_destroy_svc(self._dev(), svc_id))

    def svc_enable(self, svc_id: int, enable: bool) -> None:
        svc_id = _u32("cxil_svc_enable", self.name, svc_id, "service id")
        self._check("cxil_svc_enable", self._lib.cxil_svc_enable(self._dev(), svc_id, bool(enable)))

    def _netns_call(self, name: str):
        if not hasattr(self._lib, name):
            raise BackendUnavailable(f"{self._lib_file} has no {name} ({SET_NETNS_NEEDED})")
        return getattr(self._lib, name)

    def svc_set_netns(self, svc_id: int, netns_inode: int) -> None:
        set_netns = self._netns_call("cxil_svc_set_netns")
        svc_id = _u32("cxil_svc_set_netns", self.name, svc_id, "service id")
        inode = _u32("cxil_svc_set_netns", self.name, netns_inode, "netns inode")
        self._check("cxil_svc_set_netns", set_netns(self._dev(), svc_id, inode))

    def _get_netns_rc(self, svc_id: int) -> tuple[int, int]:
        inode = _uint(0)
        rc = self._netns_call("cxil_svc_get_netns")(self._dev(), svc_id, ctypes.byref(inode))
        return rc, inode.value

    def _listed_netns(self, svc_id: int) -> int:
        """cxil_svc_get_netns for a listed service: -EINVAL means no netns entry."""
        rc, inode = self._get_netns_rc(svc_id)
        if rc == -errno.EINVAL:
            return 0
        self._check("cxil_svc_get_netns", rc)
        return inode

    def svc_get_netns(self, svc_id: int) -> int:
        """The inode the service is bound to, 0 when it is bound to none. The driver
        answers -EINVAL both for an unknown service and for a service without a netns
        entry, so -EINVAL is 0 only if the service is found to exist."""
        svc_id = _u32("cxil_svc_get_netns", self.name, svc_id, "service id")
        rc, inode = self._get_netns_rc(svc_id)
        if rc == -errno.EINVAL:
            try:
                self.get_svc(svc_id)
            except CxiError as exc:
                raise CxiError("cxil_svc_get_netns", self.name, exc.errno, exc.detail) from None
            return 0
        self._check("cxil_svc_get_netns", rc)
        return inode

    def get_svc(self, svc_id: int) -> ServiceDesc:
        svc_id = _u32("cxil_get_svc", self.name, svc_id, "service id")
        raw = abi.CxiSvcDesc()
        self._check("cxil_get_svc", self._lib.cxil_get_svc(self._dev(), svc_id, ctypes.byref(raw)))
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
        if not hasattr(self._lib, "cxil_get_svc_rsrc_use"):
            return None
        svc_id = _u32("cxil_get_svc_rsrc_use", self.name, svc_id, "service id")
        raw = abi.CxiRsrcUse()
        self._check("cxil_get_svc_rsrc_use",
                    self._lib.cxil_get_svc_rsrc_use(self._dev(), svc_id, ctypes.byref(raw)))
        return abi.rsrc_use_counts(raw, svc_id)

    def svc_set_lpr(self, svc_id: int, lnis_per_rgid: int) -> None:
        if not hasattr(self._lib, "cxil_set_svc_lpr"):
            raise BackendUnavailable(f"{self._lib_file} has no cxil_set_svc_lpr ({LPR_NEEDED})")
        svc_id = _u32("cxil_set_svc_lpr", self.name, svc_id, "service id")
        self._check("cxil_set_svc_lpr", self._lib.cxil_set_svc_lpr(self._dev(), svc_id, lnis_per_rgid))

    def svc_get_lpr(self, svc_id: int) -> int | None:
        if not hasattr(self._lib, "cxil_get_svc_lpr"):
            return None
        svc_id = _u32("cxil_get_svc_lpr", self.name, svc_id, "service id")
        return self._check("cxil_get_svc_lpr", self._lib.cxil_get_svc_lpr(self._dev(), svc_id))

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
            self._info = LibraryInfo(_file_of(lib, self.lib_path), (),
                                     all(hasattr(lib, name) for name in _NETNS_FUNCTIONS))
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
        handle = _dev_p()
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
