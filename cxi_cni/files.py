"""Opening the files a configuration names (log, kubeconfig, token, simulated devices) the way
root must: never blocking on a FIFO or device, regular files only, and where asked never
through a last symlink; and putting a new file in the place of an old one atomically
without waiting for the disk (replace_file)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1
_libc = None


class FileProblem(Exception):
    """The file cannot be used as asked; the message names it and says why."""


def open_regular(path: str, flags: int, what: str, follow: bool = True, mode: int = 0o600) -> int:
    """An fd of the regular file at `path`, opened without blocking (a FIFO without a
    writer or reader cannot stall us), then switched back to blocking I/O."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        st = None  # absent (to be made), or the open below says why
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symlink; refusing to follow it" if stat.S_ISLNK(st.st_mode) else describe(st.st_mode)
        raise FileProblem(f"{what} {path} is {kind}" if stat.S_ISLNK(st.st_mode) else
                          f"{what} {path} is not a regular file ({kind})")
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:  # the last component is a symlink
            raise FileProblem(f"{what} {path} is a symlink; refusing to follow it") from None
        raise FileProblem(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"{what} {path} is not a regular file ({describe(st.st_mode)})")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, what: str, limit: int = 1 << 20) -> bytes:
    """The whole regular file (at most `limit` bytes, else FileProblem)."""
    fd = open_regular(path, os.O_RDONLY, what)
    try:
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileProblem(f"{what} {path} is larger than {limit} bytes")
    except OSError as exc:
        raise FileProblem(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def describe(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def replace_file(new: str, path: str) -> None:
    """Put the file `new` in the place of `path` atomically: readers see the old file or the
    new one, never neither. An existing `path` is swapped with renameat2(RENAME_EXCHANGE)
    and the old file unlinked, because ext4 flushes the new file's data to disk before a
    rename that replaces a file (auto_da_alloc): 0.2-3 ms per record write on a busy node,
    for a durability a record does not need (a node that loses power loses its pods)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(path), RENAME_EXCHANGE) == 0:
        os.unlink(new)
        return
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS):  # no file there yet, or no exchange here
        os.replace(new, path)
        return
    raise OSError(err, os.strerror(err), path)
