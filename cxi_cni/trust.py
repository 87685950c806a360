"""Whether root may trust a path: every directory from `/` down is owned by root (or by
us) and writable by nobody else, as OpenSSH's StrictModes checks a user's files. A sticky
directory (like /tmp) counts when the entry in it is ours: others cannot move that away."""

from __future__ import annotations

import os
import stat

FIX = "make it root's and writable by root alone: chown root, chmod go-w; or use another path"


class UntrustedPath(Exception):
    """Someone other than root could change what the path leads to; the message says who."""


def trusted_uids() -> set[int]:
    return {0, os.geteuid()}


def check_parents(path: str, what: str) -> None:
    """The directories that lead to `path` (not `path` itself) are root's alone, as far as
    they exist. `path` must be absolute. UntrustedPath naming the first directory that is
    not. A symlink among them is followed only if it is root's in a directory of root's."""
    if not os.path.isabs(path):
        raise UntrustedPath(f"{what} {path} is not an absolute path")
    normal = os.path.normpath(path)
    parts = normal.split(os.sep)[1:]
    current, linked = "/", False
    for name in parts:
        try:
            st = os.lstat(current)
        except OSError:
            break  # the rest does not exist yet: we, root, are about to make it
        linked = linked or stat.S_ISLNK(st.st_mode)
        check_dir_step(st, current, os.path.join(current, name), what, path)
        current = os.path.join(current, name)
    if linked:  # symlinks on the way: their targets too
        real = os.path.realpath(os.path.dirname(normal))
        if real != os.path.dirname(normal):
            check_parents(os.path.join(real, parts[-1]), what)


def check_dir_step(st: os.stat_result, parent: str, child: str, what: str, path: str) -> None:
    """`parent` (whose lstat is `st`) must be trusted to keep `child` as it is."""
    uids = trusted_uids()
    if stat.S_ISLNK(st.st_mode) and st.st_uid in uids:
        return  # root's symlink in a folder of root's: its target is checked on its own
    if st.st_uid not in uids:
        raise UntrustedPath(f"{what} {path}: {parent} is owned by uid {st.st_uid}, not root; "
                            f"another user could replace what lies below it ({FIX})")
    if st.st_mode & 0o022:
        sticky_and_ours = False
        if st.st_mode & stat.S_ISVTX:
            try:
                sticky_and_ours = os.lstat(child).st_uid in uids
            except FileNotFoundError:
                sticky_and_ours = True  # we are about to create it ourselves
            except OSError:
                sticky_and_ours = False
        if not sticky_and_ours:
            raise UntrustedPath(f"{what} {path}: {parent} is writable by others (mode "
                                f"{stat.S_IMODE(st.st_mode):o}); another user could move "
                                f"or replace what lies below it ({FIX})")


def check_file(path: str, what: str, st: os.stat_result) -> None:
    """A file we read as root: owned by root (or us) and writable by nobody else."""
    if st.st_uid not in trusted_uids() or st.st_mode & 0o022:
        raise UntrustedPath(f"{what} {path} is owned by uid {st.st_uid} with mode "
                            f"{stat.S_IMODE(st.st_mode):o}; it must be root's and writable "
                            "by root alone")


def check_root_file(path: str, what: str) -> os.stat_result | None:
    """A file root will run or write as told by a configuration: `path` and every directory
    leading to it (through symlinks too) root's alone, the file itself root's and writable
    by root alone. Its stat, or None when it does not exist yet; UntrustedPath otherwise."""
    check_parents(path, what)
    real = os.path.realpath(path)
    if real != os.path.normpath(path):
        check_parents(real, what)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    check_file(path, what, st)
    return st
