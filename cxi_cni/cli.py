"""The admin CLI (`cxi version|doctor|services|gc|env|demo`), run when CNI_COMMAND is not set.
Each command imports what it needs when it runs: `cxi env` in a pod loads neither the node's
checks nor the state files nor the simulator."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .cni.errors import CniError
from .cni.version import LATEST, SUPPORTED_VERSIONS
from .cxi.backend import RESOURCES, TRAFFIC_CLASSES, BackendUnavailable, CxiError

CONFIG_HELP = "plugin config or .conflist (its cxi entry is used); default: {\"type\":\"cxi\"}"


def load_plugin_conf(path: str | None) -> dict:
    """A plugin config from a file: a single config, or the `cxi` entry of a conflist
    (which takes the list's cniVersion and name, as runtimes pass them)."""
    if path is None:
        return {"cniVersion": LATEST, "name": "cxi", "type": "cxi"}
    from .files import FileProblem, read_regular

    try:  # a FIFO or /dev/zero must not hang or fill the admin's shell
        data = json.loads(read_regular(path, "--config"))
    except (FileProblem, ValueError, RecursionError) as exc:
        raise click.ClickException(f"cannot read {path}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path} does not hold a JSON object")
    if "plugins" in data:
        if not isinstance(data["plugins"], list):
            raise click.ClickException(f"{path}: plugins is not a list")
        entries = [p for p in data["plugins"] if isinstance(p, dict) and p.get("type") == "cxi"]
        if not entries:
            raise click.ClickException(f"{path} is a conflist with no entry of type cxi")
        conf = dict(entries[0])
        conf.setdefault("cniVersion", data.get("cniVersion", LATEST))
        conf.setdefault("name", data.get("name", "cxi"))
        return conf
    conf = dict(data)
    conf.setdefault("cniVersion", LATEST)
    return conf


def invocation_for(path: str | None, command: str = "CLI", cni_path: str = ""):
    """An Invocation (config, backend, records) for admin commands."""
    from .cni.args import CmdArgs
    from .invocation import Invocation

    conf = load_plugin_conf(path)
    args = CmdArgs(command=command, container_id="", netns="", ifname="",
                   cni_path=[p for p in cni_path.split(":") if p],
                   args={}, conf=conf, cni_version=conf.get("cniVersion", LATEST))
    try:
        return Invocation(args)
    except CniError as exc:
        raise click.ClickException(f"{exc.msg} ({exc.details})") from None


@click.group(help="cxi: per-pod CXI services on HPE Slingshot NICs, as a CNI plugin. "
             "Container runtimes run this binary with CNI_COMMAND set; these commands are "
             "for the people who run the nodes.")
def cli():
    pass


@cli.command(help="Print the plugin version and the CNI versions it speaks.")
def version():
    click.echo(f"cxi {__version__}, CNI spec versions {', '.join(SUPPORTED_VERSIONS)}")


def service_rows(inv, include_all: bool) -> list[dict]:
    """Services on the configured backend's devices, joined with this plugin's records:
    each with its TCs (None: all, unrestricted), its limits (None: none, the driver's
    defaults) and LNIs per resource group (None: the library cannot tell)."""
    claims = {(b.device, b.svc_id): record for record in inv.store.all() for b in record.services}
    rows = []
    for name in inv.backend.device_names():
        dev = inv.backend.open(name)
        try:
            listed = [(svc, claims.get((name, svc.svc_id))) for svc in dev.list_services()]
            listed = [(svc, record, dev.svc_get_lpr(svc.svc_id)) for svc, record in listed
                      if record is not None or include_all]
        finally:
            dev.close()
        for svc, record, lpr in listed:
            desc = svc.desc
            rows.append({
                "device": name, "svc_id": svc.svc_id, "netns_inode": svc.netns_inode,
                "vnis": list(desc.vnis),
                "tcs": [tc for tc in TRAFFIC_CLASSES if tc in desc.tcs] if desc.restricted_tcs else None,
                "limits": {r: {"max": desc.limits[r].max, "res": desc.limits[r].res}
                           for r in RESOURCES if r in desc.limits} if desc.resource_limits else None,
                "lnis_per_rgid": lpr,
                "enabled": desc.enable, "system": desc.is_system_svc,
                "restricted_members": desc.restricted_members,
                "members": [{"type": m.type, "id": m.id} for m in desc.members if m.type],
                "container_id": record.container_id if record else None,
                "ifname": record.ifname if record else None,
                "netns": record.netns if record else None,
            })
    return rows


def limits_text(row: dict) -> str:
    """ "ptes 0/2048 ... acs 2/4" (reserved/max; a resource not listed cannot be used)."""
    if row["limits"] is None:
        return "none (the driver's defaults)"
    return " ".join(f"{name} {lim['res']}/{lim['max']}" for name, lim in row["limits"].items()) or "-"


@cli.command(help="List the CXI services this plugin made (with --all: every service).")
@click.option("--config", "config_path", type=click.Path(), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
@click.option("--all", "include_all", is_flag=True, help="include services not made by cxi")
def services(config_path, as_json, include_all):
    inv = invocation_for(config_path)
    rows = guarded(lambda: service_rows(inv, include_all))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'DEVICE':8} {'SVC':>5} {'NETNS INODE':>12} {'ENABLED':8} {'VNIS':14} "
               f"{'TCS':24} CONTAINER/IFNAME")
    for r in rows:
        owner = f"{r['container_id'][:24]}/{r['ifname']}" if r["container_id"] else "-"
        tcs = ",".join(r["tcs"]) if r["tcs"] is not None else "all"
        click.echo(f"{r['device']:8} {r['svc_id']:>5} {r['netns_inode']:>12} "
                   f"{str(r['enabled']).lower():8} {','.join(map(str, r['vnis'])) or '-':14} "
                   f"{tcs:24} {owner}")
        lpr = f"; LNIs per resource group: {r['lnis_per_rgid']}" if r["lnis_per_rgid"] else ""
        click.echo(f"{'':14} limits (reserved/max): {limits_text(r)}{lpr}")


def guarded(fn):
    from .state import StateError

    try:
        return fn()
    except (BackendUnavailable, CxiError, StateError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(help="Remove records of dead pods and every service bound to a dead namespace.")
@click.option("--config", "config_path", type=click.Path(), help=CONFIG_HELP)
@click.option("--valid", multiple=True, metavar="CONTAINERID/IFNAME",
              help="keep only these attachments (as CNI GC's valid-attachments); repeatable")
@click.option("--cni-path", default="/opt/cni/bin", show_default=True,
              help="where the IPAM plugin lives, to release the leases of removed attachments")
def gc(config_path, valid, cni_path):
    from .gc import collect

    inv = invocation_for(config_path, "GC", cni_path)
    keep = {tuple(v.rsplit("/", 1)) for v in valid} if valid else None
    report = guarded(lambda: collect(inv, keep))
    for key, label in (("removedAttachments", "removed attachment"),
                       ("reapedServices", "destroyed service"), ("failures", "FAILED")):
        for item in report[key]:
            click.echo(f"{label}: {item}")
    click.echo(f"gc: {len(report['removedAttachments'])} attachments removed, "
               f"{len(report['reapedServices'])} dead-namespace services destroyed, "
               f"{len(report['failures'])} failures")
    sys.exit(1 if report["failures"] else 0)


@cli.command(help="Check that this node can serve ADD: backend, devices, state, logging, the "
             "node policy, the Kubernetes API and its RBAC, the master link.")
@click.option("--config", "config_path", type=click.Path(), help=CONFIG_HELP)
def doctor(config_path):
    from .doctor import run_checks

    failed = 0
    for status, line in run_checks(load_plugin_conf(config_path)):
        click.echo({True: "ok    ", False: "FAIL  "}.get(status, f"{status:6}") + line)
        failed += status is False
    click.echo("doctor: all checks passed" if not failed else f"doctor: {failed} check(s) failed")
    sys.exit(1 if failed else 0)


@cli.command("env", help="Inside a pod: print `export SLINGSHOT_*=...` for the CXI services "
             "bound to this network namespace, for `eval \"$(cxi env)\"` in an entrypoint "
             "(Cray MPICH and libfabric before 2.5 need them). Needs /dev/cxiN and libcxi, "
             "not root.")
@click.option("--config", "config_path", type=click.Path(),
              help="a plugin config naming the backend or cxi.libcxi; default: libcxi.so.1")
@click.option("--vni", type=click.IntRange(1, 65535),
              help="the VNI to put first, choosing among several services on one device")
def env(config_path, vni):
    from . import podenv
    from .config import parse_conf
    from .invocation import open_backend
    from .netns import own_identity

    try:
        backend = open_backend(parse_conf(load_plugin_conf(config_path)))
    except CniError as exc:
        raise click.ClickException(f"{exc.msg} ({exc.details})") from None
    try:
        backend.library()
    except BackendUnavailable as exc:
        raise click.ClickException(f"{exc}; in a pod, the image needs libcxi (or the node's "
                                   "libcxi.so.1 mounted into it)") from None
    try:
        found = podenv.find(backend, own_identity()[1])
        variables = podenv.exports(found, vni)
    except (BackendUnavailable, CxiError, podenv.PodEnvError) as exc:
        raise click.ClickException(str(exc)) from None
    for skipped in found.skipped:
        click.echo(f"cxi env: skipped {skipped}", err=True)
    click.echo(podenv.shell(variables), nl=False)


@cli.command(help="Show the plugin at work on simulated CXI devices: a throwaway netns and "
             "master link, then ADD, CHECK and DEL through this binary. Needs root.")
@click.option("--keep", is_flag=True, help="leave the demo's files in place for a look")
def demo(keep):
    from .demo import run_demo

    sys.exit(run_demo(keep=keep))
