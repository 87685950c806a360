"""Attachment records: one JSON file per (containerID, ifname) under the state directory,
written atomically, with a per-attachment lock so concurrent ADD/DEL of one pod serialise."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time

from .digest import attachment_digest
from .files import replace_file
from .record import AttachmentRecord
from .trust import UntrustedPath, check_parents


class StateError(Exception):
    """The state directory or a record cannot be trusted or used; the message says why."""


# How long an ADD waits for another ADD in the same pod's namespace to finish binding.
NAMESPACE_WAIT = 30.0


class AttachmentBusy(Exception):
    """Another process held an attachment's lock for longer than we were willing to wait."""


def flock_until(fd: int, deadline: float | None) -> None:
    """flock LOCK_EX, waiting forever (deadline None) or until the monotonic deadline."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise AttachmentBusy() from None
            time.sleep(0.02)


def attachment_key(container_id: str, ifname: str) -> str:
    return attachment_digest(container_id, ifname)[:40]


class AttachmentStore:
    """Records under `directory` (mode 0700, owned by us, never a symlink)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.locks = os.path.join(directory, "locks")
        # The index by netns inode: an empty file "<inode>-<key>" per record, made before the
        # record and removed after it, so every record has its entry (a stale entry whose
        # record is gone is skipped). Finding a namespace's records is one listdir, not a
        # read of every record of the node.
        self.index = os.path.join(directory, "netns")
        self.ensured = False

    def ensure(self) -> None:
        """The directories exist, and nobody but root can change them or what leads to
        them (as OpenSSH's StrictModes: every directory from / down). Checked once per
        store, that is per command: what root alone can change stays as it was checked, and
        GC takes a lock per record."""
        if self.ensured:
            return
        try:
            check_parents(self.directory, "stateDir")
        except UntrustedPath as exc:
            raise StateError(str(exc)) from None
        for path in (self.directory, self.locks):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot create state directory {path}: {exc.strerror}") from None
            self._check_dir(path)
        if not os.path.isdir(self.index):
            self._build_index()
        self._check_dir(self.index)
        self.ensured = True

    def _build_index(self) -> None:
        """Index the records of a state directory an earlier version wrote: into a new
        folder renamed into place when complete, then once more for records saved meanwhile."""
        building = f"{self.index}.{os.getpid()}.new"
        try:
            os.makedirs(building, mode=0o700, exist_ok=True)
            for record in self.all():
                self._touch(building, record)
            try:
                os.rename(building, self.index)
            except OSError:  # another process got there first
                import shutil  # only here: it loads bz2 and lzma, 2 ms of every call

                shutil.rmtree(building, ignore_errors=True)
            for record in self.all():
                self._touch(self.index, record)
        except OSError as exc:
            raise StateError(f"cannot index state directory {self.directory}: {exc.strerror}") from None

    def _touch(self, index: str, record: AttachmentRecord) -> None:
        entry = os.path.join(index, f"{record.netns_inode}-{attachment_key(*record.key)}")
        try:
            os.close(os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass

    def records_in(self, inode: int) -> list[AttachmentRecord]:
        """The readable records of the namespace with this inode (damaged ones skipped)."""
        prefix = f"{inode}-"
        keys = [name[len(prefix):] for name in self._names(self.index, "the index")
                if name.startswith(prefix)]
        return [record for record in self._readable(key + ".json" for key in keys)
                if record.netns_inode == inode]

    def _check_dir(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise StateError(f"cannot inspect state directory {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise StateError(f"state directory {path} is a symlink; refusing to follow it")
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state directory {path} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise StateError(f"state directory {path} is writable by others "
                             f"(mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}); "
                             f"make it owned by uid {os.geteuid()} with mode 0700")

    def path(self, container_id: str, ifname: str) -> str:
        return os.path.join(self.directory, attachment_key(container_id, ifname) + ".json")

    @contextlib.contextmanager
    def lock(self, container_id: str, ifname: str, timeout: float | None = None):
        """Exclusive lock of one attachment. Leaving it removes the lock file when the
        attachment has no record any more (so DEL leaves nothing), which is why after taking
        it we make sure it is still the file at its path. With `timeout`, AttachmentBusy if
        it cannot be had within that many seconds."""
        self.ensure()
        path = os.path.join(self.locks, attachment_key(container_id, ifname))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StateError(f"cannot create lock file {path}: {exc.strerror}") from None
            try:
                flock_until(fd, deadline)
            except AttachmentBusy:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield path
        finally:
            try:
                if not os.path.exists(self.path(container_id, ifname)):
                    with contextlib.suppress(OSError):  # gone already, or a read-only dir
                        os.unlink(path)
            finally:
                os.close(fd)

    def lock_held(self, container_id: str, ifname: str) -> bool:
        """Whether a command holds the attachment's lock right now (its ADD or DEL is
        running): a record whose lock is free was left by a command that ended or was
        killed. A shared probe, dropped at once."""
        path = os.path.join(self.locks, attachment_key(container_id, ifname))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def namespace_lock(self, netns_fd: int):
        """Exclusive lock of one network namespace, held on its nsfs file itself (every
        open of a namespace shares one inode), so ADDs of one pod's attachments take turns
        and no lock file outlives the namespace. AttachmentBusy after NAMESPACE_WAIT seconds."""
        flock_until(netns_fd, time.monotonic() + NAMESPACE_WAIT)
        try:
            yield
        finally:
            fcntl.flock(netns_fd, fcntl.LOCK_UN)

    def load(self, container_id: str, ifname: str) -> AttachmentRecord | None:
        """The attachment's record, None if it has none; StateError if it is damaged."""
        return self._read(self.path(container_id, ifname))

    def _read(self, path: str) -> AttachmentRecord | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot open state record {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise StateError(f"cannot read state record {path}: {exc.strerror}") from None
        try:
            return AttachmentRecord.from_json(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # RecordDamaged is a ValueError
            raise StateError(f"state record {path} is damaged: {exc}") from None

    def save(self, record: AttachmentRecord) -> None:
        """Write the record atomically (a temporary file renamed over it); StateError when
        the state directory refuses, leaving no temporary file behind."""
        path = self.path(record.container_id, record.ifname)
        tmp = f"{path}.{os.getpid()}.tmp"
        data = json.dumps(record.to_json(), separators=(",", ":")).encode()
        try:
            self._touch(self.index, record)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            replace_file(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot write state record {path}: {exc.strerror}") from None

    def remove(self, container_id: str, ifname: str, inode: int | None = None) -> None:
        """Remove the record, then its index entry: the one of `inode`, the namespace the
        record was saved with (every save of a record names the same one), else (a record
        too damaged to say) every entry of the attachment, which lists the whole index.
        Its lock file goes when the lock is left."""
        path = self.path(container_id, ifname)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove state record {path}: {exc.strerror}") from None
        key = attachment_key(container_id, ifname)
        try:
            names = [f"{inode}-{key}"] if inode is not None else \
                [name for name in os.listdir(self.index) if name.endswith("-" + key)]
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.index, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot update the index {self.index}: {exc.strerror}") from None

    def claimed(self, records: list[AttachmentRecord] | None = None) -> set[tuple[str, int]]:
        """(device, svc_id) of every service some record claims."""
        return {(b.device, b.svc_id) for r in (self.all() if records is None else records)
                for b in r.services}

    def all(self) -> list[AttachmentRecord]:
        """Every readable record; damaged ones are skipped (they are reported on use)."""
        names = sorted(n for n in self._names(self.directory, "state directory") if n.endswith(".json"))
        return self._readable(names)

    @staticmethod
    def _names(folder: str, what: str) -> list[str]:
        try:
            return os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot list {what} {folder}: {exc.strerror}") from None

    def _readable(self, names) -> list[AttachmentRecord]:
        """The records of these file names that exist and parse; damaged ones are skipped."""
        records = []
        for name in names:
            try:
                record = self._read(os.path.join(self.directory, name))
            except StateError:
                continue
            if record is not None:
                records.append(record)
        return records
