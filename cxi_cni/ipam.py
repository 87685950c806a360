"""Delegated IPAM: run the `ipam.type` plugin found in CNI_PATH as the CNI spec's delegation
protocol says (same CNI_* environment, the whole network configuration on stdin) and turn
its answer into a 1.x-shaped result or a CniError carrying the IPAM plugin's own code."""

from __future__ import annotations

import json
import os
import subprocess

from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, TRY_AGAIN_LATER, CniError
from .cni.version import normalize_result
from .errors import IPAM_FAILURE

# The delegated IPAM plugin gets this long (whereabouts asks the API server); a plugin that
# hangs must not hold the pod's ADD past the runtime's own timeout.
IPAM_TIMEOUT = float(os.environ.get("CXI_CNI_DEBUG_IPAM_TIMEOUT") or 60)


def find_plugin(ipam_type: str, cni_path: list[str]) -> str:
    """The executable named `ipam_type` in the first CNI_PATH directory that has one."""
    if not ipam_type or "/" in ipam_type or ipam_type in (".", ".."):
        raise CniError(INVALID_CONFIG, f"ipam.type {ipam_type!r} is not a plugin name",
                       'set ipam.type to the name of an IPAM plugin, e.g. "host-local"')
    for directory in cni_path:
        candidate = os.path.join(directory, ipam_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type!r} is not in CNI_PATH "
                   f"({':'.join(cni_path) or 'empty'})",
                   f"install the {ipam_type} plugin in one of those directories or fix ipam.type")


def delegate_env(args: CmdArgs, command: str) -> dict[str, str]:
    """Our own environment with CNI_COMMAND replaced; the frozen binary's loader path is
    put back as it was so the delegate loads its own libraries."""
    env = dict(args.env or os.environ)
    env["CNI_COMMAND"] = command
    frozen = any(key.startswith("_PYI_") or key == "_MEIPASS2" for key in env)
    for key in [k for k in env if k.startswith("_PYI_") or k == "_MEIPASS2"]:
        del env[key]
    original = env.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        env["LD_LIBRARY_PATH"] = original
    elif frozen:
        env.pop("LD_LIBRARY_PATH", None)
    return env


def run(command: str, args: CmdArgs, stdin: dict | None = None) -> dict | None:
    """Run the IPAM plugin of args.conf for `command`; its parsed stdout, or None if empty."""
    ipam_type = (args.conf.get("ipam") or {}).get("type", "")
    binary = find_plugin(ipam_type, args.cni_path)
    payload = json.dumps(args.conf if stdin is None else stdin).encode()
    try:
        proc = subprocess.run([binary], input=payload, capture_output=True,
                              env=delegate_env(args, command), close_fds=True, timeout=IPAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CniError(TRY_AGAIN_LATER, f"{ipam_type}: {command} did not answer within "
                       f"{IPAM_TIMEOUT:.0f} s", f"see the {ipam_type} plugin's own logs; the "
                       "runtime will retry") from None
    except OSError as exc:
        raise CniError(IPAM_FAILURE, f"{ipam_type}: cannot run {binary}: {exc.strerror}",
                       "check that the IPAM plugin is an executable for this node") from None
    answer = parse_output(proc.stdout)
    if proc.returncode != 0:
        raise ipam_error(ipam_type, command, proc, answer)
    return answer if isinstance(answer, dict) else None


def parse_output(data: bytes):
    text = data.decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def ipam_error(ipam_type: str, command: str, proc, answer) -> CniError:
    if isinstance(answer, dict) and isinstance(answer.get("code"), int) and answer.get("msg"):
        details = answer.get("details") or f"the {ipam_type} IPAM plugin refused {command}"
        msg = str(answer["msg"])
        if not msg.startswith(f"{ipam_type}:"):
            msg = f"{ipam_type}: {msg}"
        return CniError(answer["code"], msg, str(details))
    said = (answer if isinstance(answer, str) else "") or proc.stderr.decode(errors="replace")
    said = " ".join(said.split())[:300] or f"exit status {proc.returncode}"
    return CniError(IPAM_FAILURE, f"{ipam_type}: {command} failed: {said}",
                    f"see the {ipam_type} plugin's own logs")


def add(args: CmdArgs) -> dict:
    """IPAM ADD: addresses, routes and DNS in the 1.x shape; at least one address."""
    ipam_type = args.conf["ipam"]["type"]
    raw = run("ADD", args)
    if not isinstance(raw, dict):
        raise CniError(IPAM_FAILURE, f"{ipam_type}: ADD returned no result",
                       "the IPAM plugin must print a CNI result on success")
    result = normalize_result(raw)
    if not result.get("ips"):
        raise CniError(IPAM_FAILURE, f"{ipam_type}: ADD returned no IP addresses",
                       f"check the ranges of the {ipam_type} configuration")
    return result


def delete(args: CmdArgs) -> None:
    run("DEL", args)


def check(args: CmdArgs) -> None:
    run("CHECK", args)


def supports(args: CmdArgs, version: str) -> bool:
    """Whether the IPAM plugin's VERSION lists `version` (STATUS and GC need 1.1.0)."""
    answer = run("VERSION", args, stdin={"cniVersion": version})
    return isinstance(answer, dict) and version in (answer.get("supportedVersions") or [])


def status(args: CmdArgs) -> None:
    run("STATUS", args)


def gc(args: CmdArgs) -> None:
    run("GC", args)
