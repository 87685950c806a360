"""Hostile input through the frozen binary: over a thousand cases generated with hypothesis
(malformed and huge stdin, wrong types and unknown keys, bad cniVersion, bad environment,
namespace paths that are not network namespaces, CNI_ARGS injection, unsafe state
directories, damaged records and sim state). Each gives one CNI error JSON and a non-zero
exit, or succeeds where the input is in fact valid; no traceback, nothing left behind, and
the host's own network namespace untouched."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import reliability
from cnitool import run_cni
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cxi_cni.cni.skel import MAX_STDIN
from cxi_cni.cni.version import SUPPORTED_VERSIONS
from cxi_cni.config import CXI_FIELDS, NETCONF_FIELDS
from cxi_cni.cxi.backend import BackendUnavailable
from cxi_cni.cxi.simstate import SimState
from cxi_cni.state import attachment_key

WORKERS = 4
OK = 0  # the expected "code" of a case whose input is valid
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV = 1, 2, 3, 4
IO_FAILURE, DECODE_FAILURE, INVALID_CONFIG = 5, 6, 7
BACKEND_UNAVAILABLE, STATE_FAILURE = 101, 102


@dataclass
class Case:
    """One invocation and what it must give: `expect` is an error code, or OK."""

    kind: str
    expect: int
    needle: str = ""                      # text the error's msg or details must hold
    command: str = "ADD"
    sets: tuple = ()                      # ((path, value), ...) applied to the base conf
    stdin: bytes | None = None            # raw stdin instead of the conf
    env: dict = field(default_factory=dict)  # CNI_* overrides; None unsets
    netns: str = "pod"                    # "pod" (a real netns), or a path kind (NETNS_PATHS)
    prepare: tuple = ()                   # (what, argument): state set up before the call


# ---------------------------------------------------------------- generating the cases

def generate(strategy, count: int) -> list:
    """`count` examples of `strategy`, the same on every run."""
    out = []

    @settings(max_examples=count, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out


def env_text(min_size=0, max_size=40):
    """Text a process environment can hold (no NUL, no lone surrogates)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=min_size, max_size=max_size)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                         allow_infinity=False), env_text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(env_text(max_size=8), inner, max_size=3)),
    max_leaves=8)

# JSON values of one kind that no lax conversion turns into another kind.
KIND_VALUES = {
    "str": env_text(max_size=20).map(lambda s: "x" + s),
    "int": st.one_of(st.integers(min_value=2), st.integers(max_value=-1)),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    "bool": st.booleans(),
    "list": st.lists(JSON_SCALARS, max_size=3),
    "dict": st.dictionaries(env_text(max_size=8).map(lambda s: "k" + s), JSON_SCALARS, max_size=3),
    "null": st.none(),
}
# Every configuration field, the JSON kinds it accepts, and the code for any other kind.
FIELDS = {
    ("cniVersion",): ({"str"}, INCOMPATIBLE_VERSION),
    ("name",): ({"str"}, INVALID_CONFIG), ("type",): ({"str"}, INVALID_CONFIG),
    ("master",): ({"str", "null"}, INVALID_CONFIG), ("linkType",): ({"str"}, INVALID_CONFIG),
    ("mode",): ({"str", "null"}, INVALID_CONFIG),
    ("mtu",): ({"int", "bool"}, INVALID_CONFIG),  # a bool is an int to pydantic's lax mode
    ("linkInContainer",): ({"bool"}, INVALID_CONFIG),
    ("ipam",): ({"dict", "null"}, INVALID_CONFIG), ("stateDir",): ({"str"}, INVALID_CONFIG),
    ("logFile",): ({"str"}, INVALID_CONFIG), ("logLevel",): ({"str"}, INVALID_CONFIG),
    ("kubeconfig",): ({"str", "null"}, INVALID_CONFIG), ("cxi",): ({"dict"}, INVALID_CONFIG),
    ("args",): ({"dict", "null"}, INVALID_CONFIG),
    ("runtimeConfig",): ({"dict", "null"}, INVALID_CONFIG),
    ("cxi", "backend"): ({"str"}, INVALID_CONFIG), ("cxi", "simState"): ({"str"}, INVALID_CONFIG),
    ("cxi", "libcxi"): ({"str"}, INVALID_CONFIG),
    ("cxi", "devices"): ({"str", "list"}, INVALID_CONFIG),
    ("cxi", "vnis"): ({"list"}, INVALID_CONFIG),
    ("cxi", "vnis", 0): ({"int"}, INVALID_CONFIG),  # strict: no bool, no numeric string
    ("cxi", "allowDefaultVni"): ({"bool"}, INVALID_CONFIG),
    ("cxi", "vniSources"): ({"list"}, INVALID_CONFIG),
    ("cxi", "allowedVnis"): ({"list"}, INVALID_CONFIG), ("cxi", "podVnis"): ({"list"}, INVALID_CONFIG),
    ("cxi", "noLookupNamespaces"): ({"list"}, INVALID_CONFIG),
    ("cxi", "maxServicesPerPod"): ({"int"}, INVALID_CONFIG),  # strict: no bool
    ("cxi", "stack"): ({"str"}, INVALID_CONFIG), ("cxi", "defaults"): ({"str"}, INVALID_CONFIG),
    ("cxi", "adjustLimits"): ({"bool"}, INVALID_CONFIG), ("cxi", "cpus"): ({"int"}, INVALID_CONFIG),
    ("cxi", "lnisPerRgid"): ({"str", "int"}, INVALID_CONFIG),
    ("cxi", "destroyRetries"): ({"int"}, INVALID_CONFIG),
    ("cxi", "destroyRetryDelay"): ({"int", "float"}, INVALID_CONFIG),
    ("cxi", "vniPolicy"): ({"str"}, INVALID_CONFIG), ("cxi", "tcs"): ({"list", "str"}, INVALID_CONFIG),
    ("cxi", "limits"): ({"dict"}, INVALID_CONFIG),
    ("cxi", "limits", "les", "max"): ({"int", "bool"}, INVALID_CONFIG),
}


def test_every_configuration_field_is_fuzzed():
    """A field declared in config.py and missing here would never get a wrong type."""
    declared = {(f.name,) for f in NETCONF_FIELDS} | {("cxi", f.name) for f in CXI_FIELDS}
    assert declared <= set(FIELDS), sorted(declared - set(FIELDS))


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@st.composite
def wrong_type(draw):
    path = draw(st.sampled_from(sorted(FIELDS, key=str)))
    accepted, code = FIELDS[path]
    kind = draw(st.sampled_from(sorted(set(KIND_VALUES) - accepted)))
    value = draw(KIND_VALUES[kind])
    needle = "cniVersion" if code == INCOMPATIBLE_VERSION else dotted(path)
    sets = ((("cxi", "limits"), {"les": {"max": 10}}),) if path[-1] == "max" else ()
    return Case(f"wrong type {kind} for {dotted(path)}", code, needle, sets=(*sets, (path, value)))


@st.composite
def ignored_prev_result(draw):
    """A prevResult that is not an object is ignored (there is nothing to pass through)."""
    value = draw(st.one_of(KIND_VALUES["str"], KIND_VALUES["int"], KIND_VALUES["list"]))
    return Case("prevResult not an object", OK, sets=((("prevResult",), value),))


@st.composite
def unknown_key(draw):
    name = "zz" + draw(st.text("abcdefghijklmnopqrstuvwxyz_-.", max_size=12))
    value = draw(JSON_VALUES)
    where = draw(st.sampled_from(["top", "cxi", "limit", "resource"]))
    if where == "top":  # unknown top-level keys are ignored, as runtimes add their own
        return Case("unknown top-level key", OK, sets=(((name,), value),))
    if where == "cxi":
        return Case("unknown key in cxi", UNSUPPORTED_FIELD, f"cxi.{name}",
                    sets=((("cxi", name), value),))
    if where == "limit":
        return Case("unknown key in a limit", UNSUPPORTED_FIELD, "cxi.limits.les",
                    sets=((("cxi", "limits"), {"les": {"max": 10, name: value}}),))
    return Case("unknown resource in limits", INVALID_CONFIG, "cxi.limits",
                sets=((("cxi", "limits"), {name: {"max": 10}}),))


@st.composite
def bad_version(draw):
    version = draw(st.one_of(env_text(max_size=12),
                             st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){0,3}\Z")))
    if version in SUPPORTED_VERSIONS:
        return Case("supported cniVersion", OK, sets=((("cniVersion",), version),))
    return Case("unsupported cniVersion", INCOMPATIBLE_VERSION, "cniVersion",
                sets=((("cniVersion",), version),))


@st.composite
def malformed_stdin(draw):
    how = draw(st.sampled_from(["bytes", "truncated", "not an object", "not UTF-8"]))
    if how == "bytes":
        data = draw(st.binary(max_size=300))
        try:
            parsed = json.loads(data)
        except ValueError:
            return Case("random bytes", DECODE_FAILURE, "decode", stdin=data)
        if not isinstance(parsed, dict):
            return Case("random bytes", DECODE_FAILURE, "object", stdin=data)
        return Case("random bytes", INCOMPATIBLE_VERSION, "cniVersion", stdin=data)
    if how == "truncated":  # any proper prefix of a JSON object is not JSON
        return Case("truncated conf", DECODE_FAILURE, "decode", prepare=(("truncate stdin",
                    draw(st.floats(min_value=0, max_value=0.999))),))
    if how == "not an object":
        value = draw(st.one_of(JSON_SCALARS, st.lists(JSON_VALUES, max_size=3)))
        return Case("conf not an object", DECODE_FAILURE, "object", stdin=json.dumps(value).encode())
    if how == "not UTF-8":  # (Python's json lets UTF-8-coded surrogates through: not here)
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf8\x88\x80\x80\x80",
                                    b"\x80", b"\xc0\xaf"]))
        return Case("conf not UTF-8", DECODE_FAILURE, "decode", prepare=(("bad name", bad),))


BAD_CONTAINER_IDS = st.one_of(
    env_text(max_size=20).map(lambda s: "../" + s),
    st.tuples(env_text(max_size=10), env_text(max_size=10)).map(lambda p: f"{p[0]}\n{p[1]}"),
    st.integers(min_value=1025, max_value=10240).map(lambda n: "a" * n),
    env_text(min_size=1, max_size=20).filter(
        lambda s: any(not (c.isascii() and (c.isalnum() or c in "_.-")) for c in s)),
    st.sampled_from(["-a", ".a", "_a", "..", "."]),
)
BAD_IFNAMES = st.one_of(
    st.integers(min_value=16, max_value=300).map(lambda n: "e" * n),
    st.sampled_from([".", ".."]),
    st.tuples(env_text(max_size=6), st.sampled_from("/: \t\n"), env_text(max_size=6)).map(
        lambda p: (p[0] + p[1] + p[2])[:15]),
)


@st.composite
def bad_env(draw):
    var = draw(st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_COMMAND", "CNI_PATH",
                                "CNI_NETNS"]))
    if var == "CNI_CONTAINERID":
        value = draw(BAD_CONTAINER_IDS)
    elif var == "CNI_IFNAME":
        value = draw(BAD_IFNAMES)
    elif var == "CNI_COMMAND":
        value = draw(env_text(min_size=1, max_size=12).filter(
            lambda s: s not in ("ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC")))
    elif var == "CNI_PATH":
        value = draw(st.sampled_from([None, ""]))
    else:
        value = draw(env_text(min_size=1, max_size=30).filter(lambda s: not s.startswith("/")))
    command = draw(st.sampled_from(["ADD", "CHECK"]))
    if var == "CNI_IFNAME":  # only ADD holds the name to the kernel's rule (it makes the link)
        command = "ADD"
    env = {var: value} if var != "CNI_COMMAND" else {}
    if var == "CNI_COMMAND":
        command = value
    return Case(f"bad {var}", INVALID_ENV, var, command=command, env=env)


# Paths given as CNI_NETNS: what each is, and the code ADD must give.
NETNS_PATHS = {
    "regular file": INVALID_CONFIG, "symlink to a regular file": INVALID_CONFIG,
    "directory": INVALID_CONFIG, "/proc/self/ns/net": INVALID_CONFIG,
    "/proc/1/ns/net": INVALID_CONFIG, "/proc/1/ns/mnt": INVALID_CONFIG,
    "/proc/self/ns/mnt": INVALID_CONFIG, "/proc/self/ns/uts": INVALID_CONFIG,
    "/dev/null": INVALID_CONFIG, "fifo": INVALID_CONFIG, "symlink loop": INVALID_CONFIG,
    "missing path": UNKNOWN_CONTAINER, "symlink to the pod's netns": OK, "pod": OK,
}


@st.composite
def netns_path(draw):
    kind = draw(st.sampled_from(sorted(NETNS_PATHS)))
    command = draw(st.sampled_from(["ADD", "ADD", "DEL"]))
    cid = draw(st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,40}\Z"))
    expect = OK if command == "DEL" else NETNS_PATHS[kind]
    return Case(f"{command} with CNI_NETNS {kind}", expect, "CNI_NETNS" if expect else "",
                command=command, env={"CNI_CONTAINERID": cid}, netns=kind)


ARG_VALUE = env_text(max_size=30).map(lambda s: s.replace(";", "").replace("\n", ""))


@st.composite
def cni_args(draw):
    keys = st.one_of(st.sampled_from(["IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE",
                                      "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"]),
                     st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z").filter(lambda k: k != "VNI"))
    pairs = draw(st.lists(st.tuples(keys, ARG_VALUE.map(lambda v: "../" + v)), max_size=4))
    entries = [f"{k}={v}" for k, v in pairs]
    how = draw(st.sampled_from(["hostile values", "no =", "empty key", "newline", "VNI"]))
    if how == "hostile values":
        return Case("CNI_ARGS with hostile values", OK, env={"CNI_ARGS": ";".join(entries)})
    if how == "VNI":  # a malformed VNI= is refused; one outside cxi.allowedVnis falls back
        vnis = draw(st.lists(st.integers(min_value=-5, max_value=70000), max_size=6))
        good = 1 <= len(vnis) <= 4 and len(set(vnis)) == len(vnis) and all(
            1 <= v <= 65535 for v in vnis)
        entries.append("VNI=" + ",".join(map(str, vnis)))
        return Case("CNI_ARGS VNI", OK if good else INVALID_ENV, "VNI",
                    env={"CNI_ARGS": ";".join(entries)},
                    sets=((("cxi", "vniSources"), ["cniArgs", "config"]),))
    bad = {"no =": draw(ARG_VALUE.filter(lambda v: v and "=" not in v)),
           "empty key": "=" + draw(ARG_VALUE),
           "newline": draw(keys) + "=" + draw(ARG_VALUE) + "\n" + draw(ARG_VALUE)}[how]
    entries.insert(draw(st.integers(min_value=0, max_value=len(entries))), bad)
    return Case(f"CNI_ARGS injection: {how}", INVALID_ENV, "CNI_ARGS",
                env={"CNI_ARGS": ";".join(entries)})


@st.composite
def state_dir(draw):
    how = draw(st.sampled_from(["mode", "mode", "symlink", "regular file", "locks symlink",
                                "locks mode"]))
    if how in ("mode", "locks mode"):
        mode = draw(st.integers(min_value=0, max_value=0o777)) | 0o700
        unsafe = bool(mode & 0o022)
        return Case(f"stateDir {how} {mode:o}", STATE_FAILURE if unsafe else OK,
                    "writable by others" if unsafe else "", prepare=((how, mode),))
    return Case(f"stateDir {how}", STATE_FAILURE, "symlink" if "symlink" in how else "state",
                prepare=((how, None),))


RECORD = {"containerID": "ctr1", "ifname": "eth0", "netns": "/x", "netnsInode": 1, "vnis": [100],
          "tcs": [], "devices": ["cxi0"], "services": [{"device": "cxi0", "svcId": 2}],
          "link": None, "created": 1.0, "complete": True}
DAMAGED_RECORDS = st.one_of(
    st.binary(max_size=100).filter(lambda b: not b.strip().startswith((b"{", b"["))),
    st.floats(min_value=0, max_value=0.999).map(
        lambda f: json.dumps(RECORD).encode()[:int(f * len(json.dumps(RECORD)))]),
    JSON_SCALARS.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([{}, {"services": "x"}, {"services": [1]}, {"services": [{"device": 0}]},
                     {"services": [{"device": "cxi0", "svcId": "2"}]}, {"services": None}]).map(
        lambda r: json.dumps({**RECORD, **r} if r else r).encode()),
)


@st.composite
def damaged_record(draw):
    raw = draw(DAMAGED_RECORDS)
    command = draw(st.sampled_from(["ADD", "DEL", "DEL after ADD"]))
    if command == "ADD":
        return Case("ADD over a damaged record", STATE_FAILURE,
                    f"{attachment_key('ctr1', 'eth0')}.json is damaged",
                    prepare=(("damage record", raw),))
    return Case(f"{command} with a damaged record", OK, command="DEL",
                prepare=(("add first", None),) * (command != "DEL") + (("damage record", raw),))


@st.composite
def damaged_sim_state(draw):
    how = draw(st.sampled_from(["garbage", "other version", "unknown stack"]))
    arg = draw(st.binary(max_size=60) if how == "garbage" else st.integers(3, 99) if
               how == "other version" else st.text("abcdefghij-.0123456789", min_size=1, max_size=12))
    if how == "garbage" and arg == b"":
        how = "empty"  # an empty file is a new state: the default devices
    command = draw(st.sampled_from(["ADD", "ADD", "DEL"]))  # DEL: no record, nothing to do
    fails = command == "ADD" and how != "empty"
    return Case(f"{command} on a {how} sim state", BACKEND_UNAVAILABLE if fails else OK,
                "sim state" if fails else "", command=command, prepare=(("damage sim", (how, arg)),))


# ---------------------------------------------------------------- running them

class Runner:
    """Runs cases, each with its own state directory and simulated devices, and lists
    what went wrong (empty: all as expected)."""

    def __init__(self, binary: str, root: Path, pod_netns: str):
        self.binary, self.root, self.pod_netns = binary, root, pod_netns

    def case_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="case", dir=self.root))

    def conf(self, case: Case, where: Path) -> dict:
        conf = {"cniVersion": "1.0.0", "name": "hostile", "type": "cxi",
                "stateDir": str(where / "state"), "logFile": str(where / "cxi.log"),
                "cxi": {"backend": "sim", "simState": str(where / "sim.db"), "vnis": [100]}}
        for path, value in case.sets:
            target = conf
            for part in path[:-1]:
                target = target[part] if isinstance(target, list) else target.setdefault(part, {})
            target[path[-1]] = value
        return conf

    def netns_path(self, kind: str, where: Path) -> str:
        if kind == "pod":
            return self.pod_netns
        made = where / "netns-path"
        if kind == "regular file":
            made.write_text("not a namespace")
        elif kind == "symlink to a regular file":
            (where / "file").write_text("x")
            made.symlink_to(where / "file")
        elif kind == "directory":
            made.mkdir()
        elif kind == "fifo":
            os.mkfifo(made)
        elif kind == "symlink loop":
            made.symlink_to(made)
        elif kind == "symlink to the pod's netns":
            made.symlink_to(self.pod_netns)
        elif kind == "missing path":
            pass
        else:
            return kind
        return str(made)

    def call(self, command, conf, netns, case: Case, stdin=None):
        env = {k: v for k, v in case.env.items() if k not in ("CNI_CONTAINERID", "CNI_IFNAME",
                                                              "CNI_PATH", "CNI_NETNS")}
        kw = {"container_id": case.env.get("CNI_CONTAINERID", "ctr1"),
              "ifname": case.env.get("CNI_IFNAME", "eth0"),
              "cni_path": case.env.get("CNI_PATH", "/usr/lib/cni"),
              "netns": case.env.get("CNI_NETNS", netns)}
        return run_cni(self.binary, command, conf, stdin_bytes=stdin, env=env, timeout=120, **kw)

    def prepare(self, case: Case, where: Path, conf: dict, netns: str) -> dict:
        state = where / "state"
        for what, arg in case.prepare:
            if what == "truncate stdin":
                case.stdin = json.dumps(conf).encode()[:int(arg * len(json.dumps(conf)))]
            elif what == "bad name":
                case.stdin = json.dumps({**conf, "name": "@"}).encode().replace(b"@", arg)
            elif what == "pad stdin":  # white space up to exactly MAX_STDIN bytes
                case.stdin = json.dumps(conf).encode()
                case.stdin += b" " * (MAX_STDIN - len(case.stdin))
            elif what in ("mode", "locks mode"):
                target = state / "locks" if what == "locks mode" else state
                target.mkdir(parents=True)
                state.chmod(0o700)
                target.chmod(arg)
            elif what == "symlink":
                (where / "elsewhere").mkdir(mode=0o700)
                state.symlink_to(where / "elsewhere")
            elif what == "regular file":
                state.write_text("x")
            elif what == "locks symlink":
                state.mkdir(mode=0o700)
                (where / "elsewhere").mkdir(mode=0o700)
                (state / "locks").symlink_to(where / "elsewhere")
            elif what == "add first":
                run = self.call("ADD", conf, netns, case)
                assert run.rc == 0, run.stdout
            elif what == "damage record":
                state.mkdir(mode=0o700, exist_ok=True)
                cid = case.env.get("CNI_CONTAINERID", "ctr1")
                (state / f"{attachment_key(cid, 'eth0')}.json").write_bytes(arg)
            elif what == "damage sim":
                how, value = arg
                path = where / "sim.db"
                if how in ("garbage", "empty"):
                    path.write_bytes(value)
                else:  # a real state, then the version or stack of another
                    SimState(str(path)).connect().close()
                    with sqlite3.connect(path) as db:
                        key = "version" if how == "other version" else "stack"
                        db.execute("UPDATE meta SET value = ? WHERE key = ?", (str(value), key))
        return conf

    def run(self, case: Case) -> list[str]:
        where = self.case_dir()
        conf = self.conf(case, where)
        netns = self.netns_path(case.netns, where)
        try:
            self.prepare(case, where, conf, netns)
        except AssertionError as exc:
            return [f"{case.kind}: setup failed: {exc}"]
        before = self.files(where)
        stdin = case.stdin if case.stdin is not None else json.dumps(conf).encode()
        run = self.call(case.command, conf, netns, case, stdin=stdin)
        problems = self.judge(case, run)
        if case.expect == OK and run.rc == 0 and case.command == "ADD":
            self.call("DEL", conf, netns, case, stdin=stdin).ok()
        elif case.command == "DEL" and case.prepare and case.prepare[-1][0] == "damage record":
            before = {p for p in before if not p.endswith(".json")}  # DEL removes the record
        left = self.left_behind(where, before)
        return [f"{case.kind}: {p}" for p in problems + left]

    @staticmethod
    def judge(case: Case, run) -> list[str]:
        out = run.stdout + run.stderr
        if "Traceback" in out:
            return [f"traceback: {out[-500:]}"]
        if run.stderr.strip():
            return [f"stderr: {run.stderr[-300:]!r}"]
        if case.expect == OK:
            if run.rc != 0:
                return [f"valid input refused: rc={run.rc} {run.stdout[:300]}"]
            if case.command == "ADD" and "cxi" not in (run.json or {}):
                return [f"no result: {run.stdout[:300]}"]
            return []
        lines = [line for line in run.stdout.splitlines() if line.strip()]
        if run.rc == 0 or len(lines) != 1:
            return [f"expected one error line and rc != 0, got rc={run.rc} {run.stdout[:300]!r}"]
        try:
            err = json.loads(lines[0])
        except ValueError:
            return [f"error is not JSON: {lines[0][:300]!r}"]
        problems = []
        if not set(err) <= {"cniVersion", "code", "msg", "details"} or not err.get("msg"):
            problems.append(f"malformed error {err}")
        if err.get("code") != case.expect:
            problems.append(f"code {err.get('code')}, expected {case.expect}: {err.get('msg')}")
        text = (err.get("msg", "") + err.get("details", "")).lower()
        if case.needle.lower() not in text:
            problems.append(f"error does not name {case.needle!r}: {err.get('msg')}")
        return problems

    @staticmethod
    def files(where: Path) -> set[str]:
        """Records and stray files in the state directory (lock files are not state)."""
        state = where / "state"
        if not state.is_dir() or state.is_symlink():
            return set()
        return {str(p.relative_to(where)) for p in state.rglob("*")
                if not p.is_dir() and p.parent.name != "locks"}

    def left_behind(self, where: Path, before: set[str]) -> list[str]:
        left = [f"left {p}" for p in sorted(self.files(where) - before)]
        sim = where / "sim.db"
        try:
            with SimState(str(sim)).transaction(write=False) as state:
                left += [f"left service {name}/{sid} bound to {svc.get('netns')}"
                         for name, device in state["devices"].items()
                         for sid, svc in device["services"].items() if sid != "1"]
        except BackendUnavailable:
            pass  # a damaged state the case wrote itself
        return left


# ---------------------------------------------------------------- the tests

def host_links() -> dict[str, tuple]:
    return {link["ifname"]: (link.get("mtu"), link.get("address"), link.get("link_type"))
            for link in reliability.ip_links()}


@pytest.fixture(scope="module", autouse=True)
def host_netns_untouched():
    """Links of the host present before and after keep their name, MTU and address, and no
    link of the plugin's kinds or temporary names appears (other test runs may add theirs)."""
    before = host_links()
    yield
    after = host_links()
    changed = [name for name in before.keys() & after.keys() if before[name] != after[name]]
    new = [link["ifname"] for link in reliability.ip_links() if link["ifname"] not in before and (
        reliability.TEMP_LINK_NAME.match(link["ifname"])
        or link.get("linkinfo", {}).get("info_kind") in ("macvlan", "ipvlan"))]
    assert changed == [] and new == [], f"host links changed: {changed}, new: {new}"


@pytest.fixture
def runner(cxi_bin, tmp_path, netns):
    return Runner(cxi_bin, tmp_path, netns)


def run_all(runner: Runner, suite_kind: str, cases: list[Case]) -> None:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(runner.run, cases))
    problems = [p for found in results for p in found]
    leaks = sum(1 for p in problems if ": left " in p)
    reliability.record("hostile", cases=len(cases), leaks=leaks, kind=suite_kind)
    assert problems == [], f"{len(problems)} of {len(cases)} cases went wrong:\n" + "\n".join(
        problems[:40])


CATEGORIES = {
    "malformed stdin": (malformed_stdin(), 120),
    "wrong types": (wrong_type(), 260),
    "prevResult ignored": (ignored_prev_result(), 15),
    "unknown keys": (unknown_key(), 100),
    "bad cniVersion": (bad_version(), 70),
    "bad environment": (bad_env(), 140),
    "CNI_NETNS paths": (netns_path(), 80),
    "CNI_ARGS injection": (cni_args(), 110),
    "unsafe stateDir": (state_dir(), 50),
    "damaged record": (damaged_record(), 60),
    "damaged sim state": (damaged_sim_state(), 40),
}


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_generated_hostile_input(runner, category):
    strategy, count = CATEGORIES[category]
    cases = generate(strategy, count)
    assert len(cases) >= count * 0.8, f"only {len(cases)} cases generated"
    run_all(runner, category, cases)


def test_stdin_size_limit(runner):
    """Up to MAX_STDIN bytes is read (a valid conf padded with white space); one more is refused."""
    cases = [Case("stdin of exactly the limit", OK, prepare=(("pad stdin", None),)),
             Case("stdin over the limit", IO_FAILURE, str(MAX_STDIN), stdin=b" " * (MAX_STDIN + 1)),
             Case("stdin far over the limit", IO_FAILURE, str(MAX_STDIN),
                  stdin=b"{" + b" " * (3 * MAX_STDIN))]
    run_all(runner, "stdin size", cases)


def test_deeply_nested_json_is_a_decode_failure(runner):
    cases = [Case("deeply nested JSON", DECODE_FAILURE, "decode",
                  stdin=b"[" * depth + b"]" * depth) for depth in (10_000, 100_000, 1_000_000)]
    cases += [Case("deeply nested object", DECODE_FAILURE, "decode",
                   stdin=b'{"a":' * 100_000 + b"1" + b"}" * 100_000)]
    run_all(runner, "deep nesting", cases)
