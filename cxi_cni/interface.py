"""The pod's link as one unit, as the reference ipvlan/macvlan plugins make it: checks on the
master, the link created into the pod's netns, delegated IPAM, addresses and routes, and the
matching DEL, CHECK, STATUS and GC. Whatever ADD made is undone if a later step fails."""

from __future__ import annotations

import logging

from . import faults
from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, NOT_AVAILABLE, UNKNOWN_CONTAINER, CniError
from .cni.version import at_least

log = logging.getLogger("cxi_cni.interface")

# The plugin's own code for link failures (the spec leaves 100 and up to plugins).
LINK_FAILURE = 103
MAX_NAMES_SHOWN = 12


class AddedInterface:
    """What ADD made: the result for our interface, the record to keep, and how to undo it."""

    def __init__(self, conf, args: CmdArgs, result: dict, record: dict):
        self.conf, self.args, self.result, self.record = conf, args, result, record

    def undo(self) -> None:
        """Remove the link and release the addresses; failures are logged, not raised,
        so the error that caused the undo is the one the runtime sees."""
        for step in (remove_link, release_addresses):
            try:
                step(self.conf, self.args)
            except Exception as exc:
                log.error("undo of the pod's link: %s", exc)


def creation_error(exc, conf) -> CniError:
    """The kernel refused to create the link: explain the refusals we know."""
    if exc.errno == 95:  # EOPNOTSUPP: the kernel has no such link kind
        if conf.linkType == "ipvlan":
            return CniError(LINK_FAILURE, "this kernel has no ipvlan module; load it with "
                            "modprobe ipvlan or use linkType macvlan",
                            "ipvlan needs CONFIG_IPVLAN; check with modinfo ipvlan")
        return CniError(LINK_FAILURE, "this kernel has no macvlan module; load it with "
                        "modprobe macvlan or use linkType ipvlan",
                        "macvlan needs CONFIG_MACVLAN; check with modinfo macvlan")
    if exc.errno == 16 and conf.linkType == "macvlan" and conf.link_mode == "passthru":
        return CniError(LINK_FAILURE, f"{exc}: master {conf.master} already has a passthru "
                        "macvlan", "passthru allows one link per master; use mode bridge")
    return link_error(exc, conf)


def link_error(exc, conf) -> CniError:
    return CniError(LINK_FAILURE, str(exc), "check the master's state with ip -d link show "
                    f"{conf.master}")


def open_pod_netns(args: CmdArgs) -> int:
    from . import link

    try:
        return link.open_netns(args.netns)
    except link.NetnsGone as exc:
        raise CniError(UNKNOWN_CONTAINER, f"CNI_NETNS: {exc}",
                       "pass the path of the container's network namespace") from None


def require_master(conf, rtnl, args: CmdArgs):
    """The master link, present, up and with room for the requested MTU."""
    master = rtnl.find(conf.master)
    where = (f"in the pod's network namespace {args.netns} (linkInContainer is true)"
             if conf.linkInContainer else "on this node")
    if master is None:
        names = [n for n in rtnl.names() if n != "lo"]
        shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN]) or "none but lo"
        raise CniError(INVALID_CONFIG, f"master {conf.master} does not exist {where}: set master "
                       f"to one of the links there ({shown})",
                       "master names the hsnN netdev the pod's link hangs off")
    if not master.up:
        raise CniError(LINK_FAILURE, f"master {conf.master} {where} is down",
                       f"bring it up (ip link set {conf.master} up) or pick another master")
    if conf.mtu and conf.mtu > master.mtu:
        raise CniError(INVALID_CONFIG, f"invalid MTU {conf.mtu}: must be 0..{master.mtu}, the "
                       f"MTU of master {conf.master}", "lower mtu or leave it out (0 inherits "
                       "the master's)")
    return master


def add_interface(conf, args: CmdArgs) -> AddedInterface:
    """Create, address and bring up the pod's link; undo everything on any failure."""
    import os

    from . import ipam, link

    netns_fd = open_pod_netns(args)
    undo: list = []
    pod = host = None
    try:
        pod = link.Rtnl(netns_fd)
        host = pod if conf.linkInContainer else link.Rtnl()
        master = require_master(conf, host, args)
        if pod.find(args.ifname) is not None:
            raise CniError(LINK_FAILURE, f"interface {args.ifname} already exists in network "
                           f"namespace {args.netns}",
                           "another plugin made it: give this attachment another interface "
                           "name (Multus: the \"interface\" key of the network selection)")
        temp = temp_link_name(args)
        remove_own_link(conf, pod, temp)  # left by an ADD killed before its rename
        try:
            host.create(conf.linkType, conf.link_mode, master.index, conf.mtu,
                        None if conf.linkInContainer else netns_fd, name=temp)
        except link.LinkError as exc:
            raise creation_error(exc, conf) from None
        made = pod.find(temp)
        if made is None:
            raise link.LinkError(f"the new {conf.linkType} link {temp} is not in {args.netns}")
        undo.append(lambda: pod.delete(made.index))
        faults.point("after-link")
        pod.rename(made.index, args.ifname)
        leased = ipam.add(args)
        undo.append(lambda: ipam.delete(args))
        faults.point("after-ipam")
        ips = [{**ip, "interface": 0} for ip in leased["ips"]]
        routes = leased.get("routes") or []
        link.configure(pod, made.index, args.ifname, ips, routes)
        final = pod.find(args.ifname)
        result = {"interfaces": [{"name": args.ifname, "mac": final.mac, "sandbox": args.netns}],
                  "ips": ips, "routes": routes}
        dns = args.conf.get("dns") or leased.get("dns")
        if dns:
            result["dns"] = dns
        record = {"type": conf.linkType, "mode": conf.link_mode, "master": conf.master,
                  "masterIndex": master.index, "linkInContainer": conf.linkInContainer,
                  "ifname": args.ifname, "netns": args.netns, "mac": final.mac,
                  "ipam": conf.ipam["type"], "ips": [ip["address"] for ip in ips],
                  "routes": routes}
        log.info("link %s (%s %s on %s) in %s with %s", args.ifname, conf.linkType,
                 conf.link_mode, conf.master, args.netns, ", ".join(record["ips"]))
        return AddedInterface(conf, args, result, record)
    except BaseException as exc:
        for step in reversed(undo):
            try:
                step()
            except Exception as undo_exc:
                log.error("rollback after a failed ADD: %s", undo_exc)
        if isinstance(exc, link.LinkError):
            raise link_error(exc, conf) from None
        raise
    finally:
        for rtnl in {id(r): r for r in (pod, host) if r is not None}.values():
            rtnl.close()
        os.close(netns_fd)


def temp_link_name(args: CmdArgs) -> str:
    """The pod's link's name between its creation and its rename to CNI_IFNAME: fixed per
    attachment, so DEL and GC find it after an ADD killed in between."""
    import hashlib

    return "cxi" + hashlib.sha256(f"{args.container_id}\0{args.ifname}".encode()).hexdigest()[:11]


def remove_own_link(conf, pod, name: str) -> None:
    """Delete `name` in the pod's netns if it is a link of our kind."""
    from . import link

    found = pod.find(name)
    if found is None:
        return
    if found.kind != conf.linkType:
        log.warning("%s is a %s link, not ours: left alone", name, found.kind or "plain")
        return
    try:
        pod.delete(found.index)
    except link.LinkError as exc:
        if exc.errno != 19:  # ENODEV: gone meanwhile
            raise


def remove_link(conf, args: CmdArgs, inode: int = 0) -> None:
    """Delete our link (named CNI_IFNAME, or still its temporary name) from the pod's
    netns; nothing to do if the netns or link is gone, or if `inode` is given and the
    path now holds another namespace. A link of another kind is not ours and is left alone."""
    import os

    from . import link

    if not args.netns:
        return
    try:
        netns_fd = link.open_netns(args.netns)
    except link.NetnsGone as exc:
        log.info("no link to delete: %s", exc)
        return
    try:
        if inode and os.fstat(netns_fd).st_ino != inode:
            log.info("no link to delete: %s is another namespace now", args.netns)
            return
        with link.Rtnl(netns_fd) as pod:
            for name in (args.ifname, temp_link_name(args)):
                remove_own_link(conf, pod, name)
    except OSError as exc:  # setns refused: the path is no longer a network namespace
        log.info("no link to delete: %s is not a network namespace (%s)", args.netns, exc)
    except link.LinkError as exc:
        raise CniError(LINK_FAILURE, f"cannot delete {args.ifname} in {args.netns}: {exc}",
                       "the runtime will retry DEL") from None
    finally:
        os.close(netns_fd)


def release_addresses(conf, args: CmdArgs) -> None:
    from . import ipam

    ipam.delete(args)


def del_interface(conf, args: CmdArgs) -> None:
    """DEL: the link (if the netns still exists), then IPAM DEL always. Idempotent."""
    remove_link(conf, args)
    release_addresses(conf, args)


def prev_interface(args: CmdArgs) -> tuple[int | None, dict | None]:
    """Index and entry of our interface in prevResult (name CNI_IFNAME, sandbox CNI_NETNS)."""
    for i, entry in enumerate((args.prev_result or {}).get("interfaces") or []):
        if entry.get("name") == args.ifname and entry.get("sandbox") == args.netns:
            return i, entry
    return None, None


def check_interface(conf, args: CmdArgs, link_record: dict | None) -> list[str]:
    """CHECK: the link is in the netns with the right kind, mode, master, MAC and addresses
    of prevResult, its routes are there, and the IPAM plugin agrees."""
    import os

    from . import ipam, link

    problems: list[str] = []
    index, entry = prev_interface(args)
    expected_ips = []
    if args.prev_result is None:
        problems.append("CHECK needs the prevResult of ADD")
    elif entry is None:
        problems.append(f"prevResult lists no interface {args.ifname} in sandbox {args.netns}")
    else:
        expected_ips = [ip["address"] for ip in args.prev_result.get("ips") or []
                        if ip.get("interface") == index]
    try:
        netns_fd = link.open_netns(args.netns)
    except link.NetnsGone as exc:
        return problems + [str(exc)]
    try:
        with link.Rtnl(netns_fd) as pod:
            if conf.linkInContainer:
                problems += link_problems(conf, args, pod, pod, entry, expected_ips, link_record)
            else:
                with link.Rtnl() as host:
                    problems += link_problems(conf, args, pod, host, entry, expected_ips,
                                              link_record)
    except link.LinkError as exc:
        problems.append(f"cannot inspect {args.ifname}: {exc}")
    finally:
        os.close(netns_fd)
    if at_least(args.cni_version, "0.4.0"):
        try:
            ipam.check(args)
        except CniError as exc:
            problems.append(f"IPAM CHECK failed: {exc.msg}")
    return problems


def link_problems(conf, args, pod, host, entry, expected_ips, link_record) -> list[str]:
    import ipaddress

    found = pod.find(args.ifname)
    if found is None:
        return [f"link {args.ifname} is missing from {args.netns}"]
    problems = []
    if found.kind != conf.linkType:
        problems.append(f"{args.ifname} is a {found.kind or 'plain'} link, not {conf.linkType}")
    elif found.mode != conf.link_mode:
        problems.append(f"{args.ifname} is in {conf.linkType} mode {found.mode}, the "
                        f"configuration says {conf.link_mode}")
    master = host.find(conf.master)
    if master is None:
        problems.append(f"master {conf.master} no longer exists")
    elif found.parent_index != master.index:
        problems.append(f"{args.ifname} hangs off ifindex {found.parent_index}, not master "
                        f"{conf.master} (ifindex {master.index})")
    if entry and entry.get("mac") and entry["mac"].lower() != found.mac.lower():
        problems.append(f"{args.ifname} has MAC {found.mac}, prevResult says {entry['mac']}")
    if not found.up:
        problems.append(f"{args.ifname} is down")
    present = {ipaddress.ip_interface(f"{a}/{p}") for a, p, _ in pod.addresses(found.index)}
    for address in expected_ips:
        if ipaddress.ip_interface(address) not in present:
            problems.append(f"{args.ifname} lacks address {address}")
    have = pod.routes(found.index)
    for route in (link_record or {}).get("routes") or []:
        if ipaddress.ip_network(route["dst"], strict=False) not in have:
            problems.append(f"route {route['dst']} through {args.ifname} is missing")
    return problems


def status_interface(conf, args: CmdArgs) -> None:
    """STATUS: the master is present (unless it lives in pod namespaces) and the IPAM
    plugin answers STATUS, when its VERSION says it knows spec 1.1.0."""
    from . import ipam, link

    try:
        if not conf.linkInContainer:
            with link.Rtnl() as host:
                require_master(conf, host, args)
        if ipam.supports(args, "1.1.0"):
            ipam.status(args)
        else:
            log.info("IPAM plugin %s predates spec 1.1.0: STATUS not forwarded", conf.ipam["type"])
    except CniError as exc:
        raise CniError(NOT_AVAILABLE, exc.msg, exc.details) from None
    except link.LinkError as exc:
        raise CniError(NOT_AVAILABLE, str(exc), "check the node's links") from None


def gc_attachment(conf, args: CmdArgs, record: dict) -> None:
    """GC of one attachment the runtime no longer knows (its record): its link, if its
    namespace is still there, and its addresses by IPAM DEL, in a cniVersion the IPAM
    plugin speaks (GC itself needs 1.1.0, which older IPAM plugins refuse)."""
    import dataclasses

    from . import ipam

    env = {**(args.env or {}), "CNI_CONTAINERID": record["containerID"],
           "CNI_IFNAME": record["ifname"], "CNI_NETNS": record.get("netns") or ""}
    gone = dataclasses.replace(args, command="DEL", container_id=record["containerID"],
                               ifname=record["ifname"], netns=record.get("netns") or "", env=env)
    remove_link(conf, gone, record.get("netnsInode") or 0)
    if not gone.cni_path:
        log.warning("no CNI_PATH: addresses of %s/%s not released", gone.container_id, gone.ifname)
        return
    version = ipam_version(gone)
    ipam.delete(dataclasses.replace(gone, conf={**gone.conf, "cniVersion": version},
                                    cni_version=version))


def ipam_version(args: CmdArgs) -> str:
    """The configuration's cniVersion if the IPAM plugin speaks it, else the newest older
    one it does."""
    from . import ipam
    from .cni.version import SUPPORTED_VERSIONS, parse

    answer = ipam.run("VERSION", args, stdin={"cniVersion": args.cni_version})
    spoken = set((answer or {}).get("supportedVersions") or [])
    usable = [v for v in SUPPORTED_VERSIONS if v in spoken and parse(v) <= parse(args.cni_version)]
    return usable[-1] if usable else args.cni_version


def gc_interface(conf, args: CmdArgs) -> None:
    """GC: forward the valid attachments to the IPAM plugin when it knows spec 1.1.0."""
    from . import ipam

    if ipam.supports(args, "1.1.0"):
        ipam.gc(args)
    else:
        log.info("IPAM plugin %s predates spec 1.1.0: GC not forwarded", conf.ipam["type"])
