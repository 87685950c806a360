"""One CNI invocation, parsed and checked by the dispatcher, as the plugin's commands see it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CmdArgs:
    """One CNI invocation, parsed and checked."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_path: list[str]
    args: dict[str, str]
    conf: dict
    cni_version: str
    prev_result: dict | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
