"""Network namespace identity: the nsfs inode of CNI_NETNS, and which inodes are alive."""

from __future__ import annotations

import fcntl
import os

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
NETNS_DIRS = ("/run/netns", "/var/run/netns")


class NetnsError(Exception):
    """CNI_NETNS is missing (`missing`), or is not a network namespace (`invalid`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def own_netns_inode() -> int:
    """The namespace this process runs in: on a node, the host's."""
    return os.stat("/proc/self/ns/net").st_ino


def netns_inode(path: str) -> int:
    """The inode of a network namespace file, after checking that it is one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NetnsError("missing", f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetnsError("invalid", f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_dev != os.stat("/proc/self/ns/net").st_dev:
            raise NetnsError("invalid", f"{path} is not a namespace file (not on nsfs)")
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            raise NetnsError("invalid", f"{path}: cannot read its namespace type: {exc.strerror}") from None
        if nstype != CLONE_NEWNET:
            raise NetnsError("invalid", f"{path} is a namespace but not a network namespace")
        return st.st_ino
    finally:
        os.close(fd)


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
            live.add(netns_inode(path))
        except NetnsError:
            pass
    return live


def nsfs_mount_points() -> list[str]:
    points = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "nsfs":
                    points.append(left.split(" ")[4].encode().decode("unicode_escape"))
    except OSError:
        pass
    return points


def named_netns_paths() -> list[str]:
    paths = []
    for directory in NETNS_DIRS:
        try:
            paths.extend(os.path.join(directory, name) for name in os.listdir(directory))
        except OSError:
            pass
    return paths
