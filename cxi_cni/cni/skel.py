"""The CNI dispatcher: reads the environment and stdin, negotiates the version, calls the
plugin's command, and writes its result or the spec's error JSON on stdout."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import version as cniversion
from .errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_ENV,
    IO_FAILURE,
    CniError,
)

if TYPE_CHECKING:
    from .args import CmdArgs

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC")

# Variables each command needs (CNI spec, "Parameters").
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
# STATUS and GC exist from spec 1.1.0 on.
MIN_VERSION = {"STATUS": "1.1.0", "GC": "1.1.0"}

CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
IFNAMSIZ = 16  # the kernel's longest link name, with its terminating NUL
# Bytes the kernel refuses in a link name (dev_valid_name): '/', ':' and what its isspace()
# takes for white space, Latin-1's no-break space 0xA0 among them (so "à" in UTF-8, C3 A0);
# and NUL, which would end the name early.
IFNAME_REFUSED = frozenset(b"/:\t\n\v\f\r \xa0\x00")
# A link made with '%' in its name is named by the kernel from it as a template (net%d).
IFNAME_REFUSED_NEW = IFNAME_REFUSED | {ord("%")}
MAX_IFNAME_LOOKUP = 256  # DEL, CHECK, GC: bounds what goes into logs, nothing more
MAX_STDIN = 16 * 1024 * 1024
MAX_DEPTH = 64  # network configurations and results are a few levels deep


class Plugin(Protocol):
    def add(self, args: CmdArgs) -> dict: ...
    def delete(self, args: CmdArgs) -> None: ...
    def check(self, args: CmdArgs) -> None: ...
    def status(self, args: CmdArgs) -> None: ...
    def gc(self, args: CmdArgs) -> None: ...


FinishHook = Callable[[str, "CmdArgs | None", "BaseException | None", float], None]


def env_error(var: str, problem: str, fix: str) -> CniError:
    return CniError(INVALID_ENV, f"{var} {problem}", fix)


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is "K=V;K2=V2"; anything else is an invalid environment variable."""
    out: dict[str, str] = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key or "\n" in pair:
            raise env_error(
                "CNI_ARGS", f"has an entry {pair[:64]!r} that is not KEY=VALUE",
                "pass CNI_ARGS as KEY=VALUE pairs separated by ';'",
            )
        out[key] = value
    return out


def valid_ifname(name: str, new: bool = False) -> bool:
    """Whether the kernel takes `name` as a link's name: 1 to 15 bytes, not "." or "..",
    none of the bytes it refuses; for a link to be made (`new`), no '%' either. The bytes
    are the name's UTF-8: a name that is not UTF-8 (the environment's stray bytes, a lone
    surrogate JSON can write) is refused, since netlink calls could not encode it."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (0 < len(raw) < IFNAMSIZ and raw not in (b".", b"..")
            and (IFNAME_REFUSED_NEW if new else IFNAME_REFUSED).isdisjoint(raw))


def check_env(command: str, env: dict[str, str]) -> None:
    for var in REQUIRED_ENV[command]:
        if not env.get(var):
            raise env_error(var, f"is required for {command} but is not set",
                            f"the container runtime must set {var}")
    cid = env.get("CNI_CONTAINERID", "")
    if cid and (len(cid) > 1024 or not CONTAINER_ID_RE.match(cid)):
        raise env_error(
            "CNI_CONTAINERID", f"{cid[:64]!r} is not a valid container ID",
            "it must start with a letter or digit and hold only letters, digits, '_', '.' "
            "and '-' (at most 1024 characters)",
        )
    # ADD makes a link of that name, so the kernel's rule; other commands only look up
    # what ADD recorded (by a digest of the name), and must not strand an attachment an
    # older, laxer ADD accepted.
    ifname = env.get("CNI_IFNAME", "")
    if command == "ADD" and ifname and not valid_ifname(ifname, new=True):
        raise env_error(
            "CNI_IFNAME", f"{ifname[:64]!r} is not a valid interface name",
            "use at most 15 bytes, none of '/', ':', '%' or white space, not '.' or '..'",
        )
    if len(ifname) > MAX_IFNAME_LOOKUP:
        raise env_error("CNI_IFNAME", f"is {len(ifname)} characters long",
                        f"no interface name is longer than {IFNAMSIZ - 1} bytes")
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise env_error("CNI_NETNS", f"{netns[:64]!r} is not an absolute path",
                        "pass the path of the container's network namespace")


def read_stdin(stream) -> bytes:
    try:
        data = stream.buffer.read(MAX_STDIN + 1) if hasattr(stream, "buffer") else stream.read()
    except (OSError, ValueError) as exc:
        raise CniError(IO_FAILURE, f"cannot read the network configuration from stdin: {exc}",
                       "pass the configuration as JSON on standard input") from None
    if len(data) > MAX_STDIN:
        raise CniError(IO_FAILURE, f"stdin holds more than {MAX_STDIN} bytes",
                       "pass one network configuration as JSON on standard input")
    return data


def decode_conf(data: bytes) -> dict:
    try:
        conf = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CniError(DECODE_FAILURE, f"cannot decode the network configuration: {exc}",
                       "stdin must hold one JSON object") from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration is not a JSON object",
                       "stdin must hold one JSON object")
    if nesting(conf) > MAX_DEPTH:
        raise CniError(DECODE_FAILURE, f"the network configuration is nested deeper than "
                       f"{MAX_DEPTH} levels", "stdin must hold one network configuration")
    return conf


def nesting(value) -> int:
    """How deeply lists and objects nest in a decoded JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    return depth + 1
                stack.append((child, depth + 1))
        deepest = max(deepest, depth)
    return deepest


def version_info(data: bytes) -> dict:
    requested = cniversion.LATEST
    if data.strip():
        conf = decode_conf(data)
        asked = conf.get("cniVersion")
        if isinstance(asked, str) and asked in cniversion.SUPPORTED_VERSIONS:
            requested = asked
    return {"cniVersion": requested, "supportedVersions": list(cniversion.SUPPORTED_VERSIONS)}


def config_version(conf: dict) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(INCOMPATIBLE_VERSION, "the network configuration has no cniVersion",
                       f"set cniVersion to one of {', '.join(cniversion.SUPPORTED_VERSIONS)}")
    return cniversion.require_supported(version)


def build_args(command: str, env: dict[str, str], conf: dict, version: str) -> CmdArgs:
    from .args import CmdArgs

    minimum = MIN_VERSION.get(command)
    if minimum and not cniversion.at_least(version, minimum):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion {minimum} or later, "
                       f"the configuration says {version}", f"set cniVersion to {minimum}")
    check_env(command, env)
    # Only ADD and CHECK use the previous result; DEL must clean up whatever it is handed.
    prev = conf.get("prevResult") if command in ("ADD", "CHECK") else None
    if isinstance(prev, dict):
        cniversion.check_result(prev)
    return CmdArgs(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        cni_path=[p for p in env.get("CNI_PATH", "").split(":") if p],
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        conf=conf,
        cni_version=version,
        prev_result=cniversion.normalize_result(prev) if isinstance(prev, dict) else None,
        env=env,
    )


def run_command(plugin: Plugin, args: CmdArgs):
    handler = {
        "ADD": plugin.add, "DEL": plugin.delete, "CHECK": plugin.check,
        "STATUS": plugin.status, "GC": plugin.gc,
    }[args.command]
    result = handler(args)
    return cniversion.result_for(result, args.cni_version) if args.command == "ADD" else None


def dispatch(name: str, load_plugin: Callable[[], Plugin], env: dict[str, str], stdin=None,
             stdout=None, on_finish: FinishHook | None = None) -> int:
    """Run one CNI command of the plugin called `name` (as errors name it); returns the
    process exit code. Never raises. The plugin is loaded only for commands other than
    VERSION, which must stay cheap."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    started = time.monotonic()
    command = env.get("CNI_COMMAND", "")
    error_version = cniversion.LATEST
    args: CmdArgs | None = None
    failure: BaseException | None = None
    try:
        if command not in COMMANDS:
            raise env_error("CNI_COMMAND", f"{command[:32]!r} is not a CNI command",
                            f"use one of {', '.join(COMMANDS)}")
        data = read_stdin(stdin)
        if command == "VERSION":
            output = version_info(data)
        else:
            conf = decode_conf(data)
            version = config_version(conf)
            error_version = version
            args = build_args(command, env, conf, version)
            output = run_command(load_plugin(), args)
        if output is not None:
            stdout.write(json.dumps(output) + "\n")
        stdout.flush()
        return 0
    except CniError as exc:
        failure = exc
        return emit_error(stdout, exc, error_version, name)
    except BaseException as exc:  # the runtime must get JSON, never a traceback
        failure = exc
        internal = CniError(999, f"internal error: {type(exc).__name__}: {exc}",
                            f"this is a bug in the {name} plugin; see its log file")
        return emit_error(stdout, internal, error_version, name)
    finally:
        if on_finish is not None:
            try:
                on_finish(command, args, failure, time.monotonic() - started)
            except Exception:  # logging must never change the outcome
                pass


def emit_error(stdout, exc: CniError, version: str, name: str) -> int:
    try:
        stdout.write(json.dumps(exc.to_json(version)) + "\n")
        stdout.flush()
    except (OSError, ValueError):
        sys.stderr.write(f"{name}: {exc.msg}\n")
    return 1
