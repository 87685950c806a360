"""JSON-lines logging to the plugin's log file; stdout belongs to the CNI protocol."""

from __future__ import annotations

import json
import logging
import os
import time

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


def configure(path: str, level: str, context: dict) -> bool:
    """Send the package's log records to `path`; False (and no logging) if it can't be opened."""
    root = logging.getLogger("cxi_cni")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.propagate = False
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        root.addHandler(logging.NullHandler())
        return False
    handler.setFormatter(JsonLines(context))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    return True


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    logger.log(level, msg, extra={"fields": fields})


def undo_step(what: str, step, *argv) -> None:
    """Run one step of undoing a failed ADD; its own failure is logged, not raised, so the
    error that caused the undo is the one the runtime sees."""
    try:
        step(*argv)
    except Exception as exc:
        logging.getLogger("cxi_cni.undo").error("undo after a failed ADD could not %s: %s", what, exc)
