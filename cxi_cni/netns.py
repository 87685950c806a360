"""Network namespaces: one handle per pod namespace (opened once, checked to be a network
namespace, identified by its nsfs inode, entered for netlink work), and which namespaces live."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
from contextlib import contextmanager

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
NETNS_DIRS = ("/run/netns", "/var/run/netns")
OWN_NETNS = "/proc/self/ns/net"
MOUNT_ESCAPE = re.compile(rb"\\([0-7]{3})")


class NetnsMissing(Exception):
    """The namespace path does not exist (the pod is gone)."""


class NetnsInvalid(Exception):
    """The path exists but is no network namespace we may use (a file, another namespace
    type, the host's own network namespace, or unreadable)."""


_libc = None


def setns(fd: int) -> None:
    """Move this thread into the network namespace of `fd`."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def own_identity() -> tuple[int, int]:
    """(device, inode) of the network namespace this process runs in: on a node the host's,
    in a pod (`cxi env`) the pod's."""
    st = os.stat(OWN_NETNS)
    return st.st_dev, st.st_ino


class Netns:
    """A network namespace opened by path, once: every later use (its inode, entering it,
    creating a link in it) goes through this descriptor, so swapping the path afterwards
    changes nothing. Open with `Netns.open(path)`; close it (or use it as a context)."""

    def __init__(self, path: str, fd: int, inode: int, is_host: bool):
        self.path, self.fd, self.inode, self.is_host = path, fd, inode, is_host

    @classmethod
    def open(cls, path: str) -> Netns:
        """NetnsMissing if the path does not exist, NetnsInvalid if it is not a network
        namespace. Opened non-blocking, so a FIFO or device at the path cannot hang us."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise NetnsMissing(f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise NetnsInvalid(f"cannot open network namespace {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            host_dev, host_ino = own_identity()
            if st.st_dev != host_dev:
                raise NetnsInvalid(f"{path} is not a namespace file (not on nsfs)")
            try:
                nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
            except OSError as exc:
                raise NetnsInvalid(f"{path}: cannot read its namespace type: {exc.strerror}") from None
            if nstype != CLONE_NEWNET:
                raise NetnsInvalid(f"{path} is a namespace but not a network namespace")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, st.st_ino, st.st_ino == host_ino)

    def require_pod(self) -> Netns:
        """This namespace, unless it is the host's own: nothing of a pod goes there."""
        if self.is_host:
            raise NetnsInvalid(f"{self.path} is the host's own network namespace; refusing to "
                               "use it as a pod's")
        return self

    @contextmanager
    def entered(self):
        """Run the block with this thread inside the namespace, then come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.fd)
            try:
                yield self
            finally:
                setns(home)
        finally:
            os.close(home)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def inode_of(path: str) -> int:
    """The inode of the network namespace at `path` (NetnsMissing, NetnsInvalid)."""
    with Netns.open(path) as ns:
        return ns.inode


def live_netns_inodes() -> set[int]:
    """Inodes of every network namespace that something still holds: a process, a bind
    mount (podman's and containerd's /run/netns files), or a name in /run/netns."""
    live = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                live.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass
    for path in nsfs_mount_points() + named_netns_paths():
        try:
            live.add(inode_of(path))
        except (NetnsMissing, NetnsInvalid):
            pass
    return live


def nsfs_mount_points() -> list[str]:
    """Where namespace files are bind-mounted. mountinfo gives raw bytes (any encoding)
    with space, tab, newline and backslash written as octal escapes."""
    points = []
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                left, _, right = line.partition(b" - ")
                if right.split(b" ", 1)[0] == b"nsfs":
                    points.append(os.fsdecode(unescape_mount_path(left.split(b" ")[4])))
    except OSError:
        pass
    return points


def unescape_mount_path(raw: bytes) -> bytes:
    return MOUNT_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), raw)


def named_netns_paths() -> list[str]:
    paths = []
    for directory in NETNS_DIRS:
        try:
            paths.extend(os.path.join(directory, name) for name in os.listdir(directory))
        except OSError:
            pass
    return paths
