"""Loading libcxi.so.1, and why a library cannot serve.

The library is opened with the types of the functions the plugin calls declared; when it
cannot serve (not installed, not where the loader looks, too old for a call), the error says
so in an operator's words, and symbol_versions tells which release a library file is.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
import sys
from ctypes import POINTER, c_bool, c_int, c_uint, c_uint32, c_void_p

from cxi_cni.cxi import abi
from cxi_cni.cxi.backend import BackendUnavailable
from cxi_cni.trust import UntrustedPath, check_root_file

_SYMBOL_VERSION = re.compile(rb"LIBCXI_(\d+)\.(\d+)\0")
# Where libcxi packages put the library, looked at only to explain a failed load. The
# loader itself searches LD_LIBRARY_PATH, /etc/ld.so.cache and its default directories
# (for the bundled Debian loader /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib
# and /usr/lib: not /usr/lib64, where RHEL and SLES packages install it).
LIBCXI_DIRS = ("/usr/lib64", "/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/opt/cray/lib64")

_dev_p = c_void_p  # struct cxil_dev *

# name: (restype, argtypes, first symbol version, what it is needed for)
_FUNCTIONS = {
    "cxil_open_device": (c_int, [c_uint32, POINTER(_dev_p)], "1.0", "open a CXI device"),
    "cxil_close_device": (None, [_dev_p], "1.0", "close a CXI device"),
    "cxil_alloc_svc": (c_int, [_dev_p, POINTER(abi.CxiSvcDesc), POINTER(abi.CxiSvcFailInfo)], "1.0",
                       "create a service"),
    "cxil_destroy_svc": (c_int, [_dev_p, c_uint], "1.0", "destroy a service"),
    "cxil_get_svc_list": (c_int, [_dev_p, POINTER(c_void_p)], "1.0", "list services"),
    "cxil_free_svc_list": (None, [c_void_p], "1.0", "free a service list"),
    "cxil_get_svc": (c_int, [_dev_p, c_uint, POINTER(abi.CxiSvcDesc)], "1.2", "read a service"),
    "cxil_svc_enable": (c_int, [_dev_p, c_uint, c_bool], "1.9", "enable or disable a service"),
}
# Declared when present: the netns calls of LIBCXI_1.10 (SHS >= 14.0.0), which the call
# stacks need and the member stack does without, and resource calls the plugin can do
# without. Calling one the library lacks is `missing`.
_OPTIONAL_FUNCTIONS = {
    "cxil_svc_set_netns": (c_int, [_dev_p, c_uint, c_uint], "1.10",
                           "bind a service to a network namespace"),
    "cxil_svc_get_netns": (c_int, [_dev_p, c_uint, POINTER(c_uint)], "1.10",
                           "bind a service to a network namespace"),
    "cxil_get_svc_rsrc_use": (c_int, [_dev_p, c_uint, POINTER(abi.CxiRsrcUse)], "1.5",
                              "read what a service's processes use"),
    "cxil_set_svc_lpr": (c_int, [_dev_p, c_uint, c_uint], "1.8", "share resource groups between LNIs"),
    "cxil_get_svc_lpr": (c_int, [_dev_p, c_uint], "1.8", "share resource groups between LNIs"),
}


def missing(lib_file: str, name: str) -> BackendUnavailable:
    """The library file has no function `name`: which release has it, and what for."""
    _, _, version, purpose = {**_FUNCTIONS, **_OPTIONAL_FUNCTIONS}[name]
    return BackendUnavailable(
        f"{lib_file} has no {name} (libcxi >= {version} / LIBCXI_{version} needed to {purpose})")


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def file_of(lib: ctypes.CDLL, lib_path: str) -> str:
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
    """dlopen libcxi and declare the types of its functions.

    BackendUnavailable when it cannot serve: why it cannot be loaded, or the file and the
    function it lacks."""
    if "/" in lib_path:  # a path, not a soname: root runs the code of whatever lies there
        try:
            st = check_root_file(lib_path, "cxi.libcxi")
        except UntrustedPath as exc:
            raise BackendUnavailable(f"cannot load the CXI library {lib_path}: {exc}") from None
        except OSError:
            st = None  # unreadable: the loader's own error says so below
        if st is not None and not stat.S_ISREG(st.st_mode):  # the loader would block on a FIFO
            raise BackendUnavailable(f"cannot load the CXI library {lib_path}: not a regular file")
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as exc:
        raise not_loaded(lib_path, exc) from None
    for name, (restype, argtypes, _, _) in {**_FUNCTIONS, **_OPTIONAL_FUNCTIONS}.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        elif name in _FUNCTIONS:
            raise missing(file_of(lib, lib_path), name)
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
    if "version `GLIBC_" in reason:  # built for a newer glibc than the one cxi carries
        return BackendUnavailable(
            f"{head}{reason}; cxi runs on the glibc bundled into it ({os.confstr('CS_GNU_LIBC_VERSION')}), "
            "older than the one this libcxi was built for: build cxi (build.sh) on a host whose "
            "glibc is at least the node's, and install that binary")
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
    """The LIBCXI_x.y symbol versions a library file names, oldest first.

    They tell what release of the library it is: LIBCXI_1.10, with the netns calls, came
    with SHS 14.0.0."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 << 20)
    except OSError:
        return ()
    found = {(int(major), int(minor)) for major, minor in _SYMBOL_VERSION.findall(data)}
    return tuple(f"LIBCXI_{major}.{minor}" for major, minor in sorted(found))
