"""Kill points for crash-consistency tests: with CXI_CNI_DEBUG_KILL_AT=STEP in its
environment, the plugin SIGKILLs itself when it reaches STEP (a documented debug option)."""

from __future__ import annotations

import os
import signal

KILL_AT = os.environ.get("CXI_CNI_DEBUG_KILL_AT", "")


def point(step: str) -> None:
    if KILL_AT and KILL_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)
