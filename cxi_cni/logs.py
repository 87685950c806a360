"""JSON-lines logging to the plugin's log file; stdout belongs to the CNI protocol."""

from __future__ import annotations

import json
import logging
import os
import time

from .files import FileProblem, open_regular
from .trust import check_parents

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class JsonLines(logging.Formatter):
    """One JSON object per line with the invocation's context (command, containerID, ifname)."""

    def __init__(self, context: dict):
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            **self.context,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# CNI_ARGS keys that name the pod (containerd, CRI-O and podman set them) -> log field.
POD_KEYS = (("K8S_POD_NAMESPACE", "podNamespace"), ("K8S_POD_NAME", "podName"),
            ("K8S_POD_UID", "podUID"))
MAX_FIELD = 253


def pod_fields(cni_args: dict[str, str]) -> dict[str, str]:
    """The pod an attachment belongs to, as log fields, when the runtime names it."""
    fields = {field: cni_args[key][:MAX_FIELD] for key, field in POD_KEYS if cni_args.get(key)}
    if "podNamespace" in fields and "podName" in fields:
        fields["pod"] = f"{fields.pop('podNamespace')}/{fields.pop('podName')}"
    return fields


class QuietHandler(logging.StreamHandler):
    """Writes records to the log file; a write that fails (a full disk) is dropped, never
    printed: stderr and the outcome of the command are not the log's to change."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def open_log(path: str) -> int | None:
    """An fd appending to the log file, None for /dev/null. FileProblem or UntrustedPath when
    root must not write there: a FIFO or device (it would block or fail), a symlink as
    the last component, a directory above it that another user could change."""
    if path == os.devnull:
        return None
    check_parents(path, "logFile")
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    except OSError as exc:
        raise FileProblem(f"cannot create the folder of logFile {path}: {exc.strerror}") from None
    return open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "logFile", follow=False,
                        mode=0o640)


def configure(path: str, level: str, context: dict) -> None:
    """Send the package's log records to `path` (FileProblem, UntrustedPath: see open_log)."""
    root = logging.getLogger("cxi_cni")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.propagate = False
    fd = open_log(path)
    if fd is None:
        root.addHandler(logging.NullHandler())
        return
    handler = QuietHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(JsonLines(context))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    logger.log(level, msg, extra={"fields": fields})


def undo_step(what: str, step, *argv) -> None:
    """Run one step of undoing a failed ADD; its own failure is logged, not raised, so the
    error that caused the undo is the one the runtime sees."""
    try:
        step(*argv)
    except Exception as exc:
        logging.getLogger("cxi_cni.undo").error("undo after a failed ADD could not %s: %s", what, exc)
