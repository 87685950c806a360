"""Entry point of the `cxi` binary: the CNI protocol when CNI_COMMAND is set, else the admin CLI."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def load_plugin():
    from .plugin import CxiPlugin

    return CxiPlugin()


def log_finish(command: str, args, failure, duration: float) -> None:
    if "logging" not in sys.modules:  # nothing configured a log (VERSION, early errors)
        return
    import logging

    logger = logging.getLogger("cxi_cni")
    if not logger.handlers:
        return
    fields = {"duration_ms": round(duration * 1000, 1), "outcome": "ok" if failure is None else "error"}
    if failure is not None:
        fields["error"] = str(failure)
        fields["code"] = getattr(failure, "code", 999)
    exc_info = failure if failure is not None and not hasattr(failure, "code") else None
    logger.log(logging.INFO if failure is None else logging.ERROR, f"{command} done",
               extra={"fields": fields}, exc_info=exc_info)


def restore_caller() -> None:
    """dist/cxi's launcher starts the program inside its own folder (its glibc loader is named
    relative to it) and says where the caller was and which file it ran: go back there, so
    relative paths mean what the caller meant, and run that file when running this program
    again (`cxi demo`). Child processes see neither variable."""
    cwd = os.environ.pop("CXI_CNI_CWD", None)
    launcher = os.environ.pop("CXI_CNI_LAUNCHER", None)
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:  # the caller's folder is gone: anywhere but the program's own folder
            os.chdir("/")
    if launcher:
        sys.executable = launcher


def exit_now(code: int) -> NoReturn:
    """End a CNI command without the interpreter's teardown (freeing every module and
    object: 10-20 ms of each call, for nothing a process that ends needs): the answer on
    stdout, stderr and the log are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


def main() -> int:
    restore_caller()
    if "CNI_COMMAND" in os.environ:
        from .cni.skel import dispatch

        exit_now(dispatch("cxi", load_plugin, dict(os.environ), on_finish=log_finish))
    from .cli import cli

    return cli.main(prog_name="cxi", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main())
