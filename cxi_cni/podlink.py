"""The pod's link as one object, as the reference ipvlan/macvlan plugins make it: created on
the master straight into the pod's namespace, addressed by the delegated IPAM plugin, and
later removed, checked and collected from what its record says was made."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack

from . import faults, ipam
from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, NOT_AVAILABLE, CniError
from .cni.version import SUPPORTED_VERSIONS, at_least, parse
from .digest import attachment_digest
from .errors import LINK_FAILURE
from .link import LinkError, LinkInfo, Rtnl, configure
from .logs import undo_step
from .netns import Netns
from .record import LinkRecord

log = logging.getLogger("cxi_cni.podlink")

MAX_NAMES_SHOWN = 12


def temp_link_name(container_id: str, ifname: str) -> str:
    """The pod's link's name between its creation and its rename to CNI_IFNAME: fixed per
    attachment, so DEL and GC find it after an ADD killed in between."""
    return "cxi" + attachment_digest(container_id, ifname)[:11]


def creation_error(exc: LinkError, conf) -> CniError:
    """The kernel refused to create the link: explain the refusals we know."""
    if exc.errno == errno.EOPNOTSUPP:  # the kernel has no such link kind
        other = "macvlan" if conf.linkType == "ipvlan" else "ipvlan"
        return CniError(LINK_FAILURE, f"this kernel has no {conf.linkType} module; load it with "
                        f"modprobe {conf.linkType} or use linkType {other}",
                        f"{conf.linkType} needs CONFIG_{conf.linkType.upper()}; check with "
                        f"modinfo {conf.linkType}")
    if exc.errno == errno.EBUSY and conf.linkType == "macvlan" and conf.link_mode == "passthru":
        return CniError(LINK_FAILURE, f"{exc}: master {conf.master} already has a passthru "
                        "macvlan", "passthru allows one link per master; use mode bridge")
    return link_error(exc, conf.master)


def link_error(exc: LinkError, master: str) -> CniError:
    return CniError(LINK_FAILURE, str(exc), f"check the master's state with ip -d link show {master}")


def require_master(conf, rtnl: Rtnl, where: str) -> LinkInfo:
    """The master link, present, up and with room for the requested MTU."""
    master = rtnl.find(conf.master)
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


def host_master(conf) -> LinkInfo | None:
    """The master on this node, held to what ADD requires of it (CniError, LinkError);
    None when linkInContainer puts it in each pod's namespace, where only ADD can look."""
    if conf.linkInContainer:
        return None
    with Rtnl() as host:
        return require_master(conf, host, "on this node")


def master_place(conf, netns: Netns) -> str:
    return (f"in the pod's network namespace {netns.path} (linkInContainer is true)"
            if conf.linkInContainer else "on this node")


class PodLink:
    """The link of one attachment and its lease, described by its LinkRecord."""

    def __init__(self, record: LinkRecord, container_id: str):
        self.record, self.container_id = record, container_id

    @classmethod
    def plan(cls, conf, args: CmdArgs, netns: Netns) -> PodLink:
        """The link ADD is about to make, to be recorded before anything is made."""
        return cls(LinkRecord(type=conf.linkType, mode=conf.link_mode, master=conf.master,
                              ifname=args.ifname, netns=netns.path,
                              link_in_container=conf.linkInContainer, ipam=dict(conf.ipam),
                              ipam_version=args.cni_version), args.container_id)

    def make(self, conf, args: CmdArgs, netns: Netns, undo: ExitStack) -> dict:
        """Create, address and bring up the pod's link; each step pushes its own undo onto
        `undo`, so a failure here or later in ADD removes what was made. Returns the link's
        part of the CNI result."""
        record = self.record
        temp = temp_link_name(args.container_id, args.ifname)
        try:
            with Rtnl(netns) as pod, ExitStack() as sockets:
                host = pod if conf.linkInContainer else sockets.enter_context(Rtnl())
                master = require_master(conf, host, master_place(conf, netns))
                if pod.find(args.ifname) is not None:
                    raise CniError(LINK_FAILURE, f"interface {args.ifname} already exists in "
                                   f"network namespace {netns.path}",
                                   "another plugin made it: give this attachment another interface "
                                   "name (Multus: the \"interface\" key of the network selection)")
                self.remove_own(pod, temp)  # left by an ADD killed before its rename
                try:
                    host.create(conf.linkType, conf.link_mode, master.index, conf.mtu,
                                None if conf.linkInContainer else netns, name=temp)
                except LinkError as exc:
                    raise creation_error(exc, conf) from None
                undo.callback(undo_step, "remove the pod's link", self.remove_link, netns)
                made = pod.find(temp)
                if made is None:
                    raise LinkError(f"the new {conf.linkType} link {temp} is not in {netns.path}")
                faults.point("after-link")
                pod.rename(made.index, args.ifname)
                leased = ipam.add(args)
                undo.callback(undo_step, "release the pod's addresses", self.release_lease, args)
                faults.point("after-ipam")
                ips = [{**ip, "interface": 0} for ip in leased["ips"]]
                routes = leased.get("routes") or []
                configure(pod, made.index, args.ifname, ips, routes)
                record.mac = made.mac  # renaming, addressing and bringing up keep it
        except LinkError as exc:
            raise link_error(exc, conf.master) from None
        record.ips, record.routes = [ip["address"] for ip in ips], routes
        result = {"interfaces": [{"name": args.ifname, "mac": record.mac, "sandbox": netns.path}],
                  "ips": ips, "routes": routes}
        dns = args.conf.get("dns") or leased.get("dns")
        if dns:
            result["dns"] = dns
        log.info("link %s (%s %s on %s) in %s with %s", args.ifname, conf.linkType,
                 conf.link_mode, conf.master, netns.path, ", ".join(record.ips))
        return result

    def names(self) -> tuple[str, str]:
        return self.record.ifname, temp_link_name(self.container_id, self.record.ifname)

    def remove_own(self, pod: Rtnl, name: str) -> None:
        """Delete `name` in the pod's namespace if it is a link of our kind."""
        found = pod.find(name)
        if found is None:
            return
        if found.kind != self.record.type:
            log.warning("%s is a %s link, not ours: left alone", name, found.kind or "plain")
            return
        try:
            pod.delete(found.index)
        except LinkError as exc:
            if exc.errno != errno.ENODEV:  # gone meanwhile
                raise

    def remove_link(self, netns: Netns | None) -> None:
        """Delete our link (named CNI_IFNAME, or still its temporary name) from the pod's
        namespace. Nothing to do without a namespace (it took its links with it)."""
        if netns is None:
            return
        try:
            with Rtnl(netns) as pod:
                for name in self.names():
                    self.remove_own(pod, name)
        except LinkError as exc:
            raise CniError(LINK_FAILURE, f"cannot delete {self.record.ifname} in {netns.path}: "
                           f"{exc}", "the runtime will retry DEL") from None

    def release_lease(self, args: CmdArgs) -> None:
        """IPAM DEL for this attachment with the IPAM configuration ADD used, in a cniVersion
        the IPAM plugin speaks."""
        if not args.cni_path:
            log.warning("no CNI_PATH: addresses of %s/%s not released", self.container_id,
                        self.record.ifname)
            return
        ipam_conf = self.record.ipam
        if set(ipam_conf) <= {"type"} and (args.conf.get("ipam") or {}).get("type") == ipam_conf.get("type"):
            ipam_conf = args.conf["ipam"]  # a record of an earlier version kept only the type
        env = {**(args.env or {}), "CNI_CONTAINERID": self.container_id,
               "CNI_IFNAME": self.record.ifname, "CNI_NETNS": args.netns}
        owner = dataclasses.replace(args, command="DEL", container_id=self.container_id,
                                    ifname=self.record.ifname, env=env,
                                    conf={**args.conf, "ipam": ipam_conf})
        version = self.record.ipam_version or ipam_version(owner)
        ipam.delete(dataclasses.replace(owner, conf={**owner.conf, "cniVersion": version},
                                        cni_version=version))

    def remove(self, args: CmdArgs, netns: Netns | None) -> None:
        """DEL and GC: the link if its namespace is still there, and the lease always. The
        lease is released while the link is deleted: deleting a link is mostly the kernel
        waiting out RCU grace periods (15 ms wall for 0.5 ms of CPU here), time the IPAM
        plugin can use. The reference plugins release the lease first, so neither step needs
        the other done; when both fail, the link's error is the one raised."""
        wait_for_link = in_background(self.remove_link, netns)
        try:
            self.release_lease(args)
        finally:
            wait_for_link()


def in_background(fn, *argv) -> Callable[[], None]:
    """Start fn(*argv) on its own thread; the function returned waits for it to end and
    raises what it raised."""
    failed: list[BaseException] = []

    def run():
        try:
            fn(*argv)
        except BaseException as exc:  # handed to the waiting thread
            failed.append(exc)

    thread = threading.Thread(target=run, name=fn.__name__, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


def ipam_version(args: CmdArgs) -> str:
    """The configuration's cniVersion if the IPAM plugin speaks it, else the newest older
    one it does."""
    answer = ipam.run("VERSION", args, stdin={"cniVersion": args.cni_version})
    spoken = set((answer or {}).get("supportedVersions") or [])
    usable = [v for v in SUPPORTED_VERSIONS if v in spoken and parse(v) <= parse(args.cni_version)]
    return usable[-1] if usable else args.cni_version


def status(conf, args: CmdArgs) -> None:
    """STATUS: the master is as ADD needs it (unless it lives in pod namespaces) and the
    IPAM plugin answers STATUS, when its VERSION says it knows spec 1.1.0."""
    try:
        host_master(conf)
        if ipam.supports(args, "1.1.0"):
            ipam.status(args)
        else:
            log.info("IPAM plugin %s predates spec 1.1.0: STATUS not forwarded", conf.ipam["type"])
    except CniError as exc:
        raise CniError(NOT_AVAILABLE, exc.msg, exc.details) from None
    except LinkError as exc:
        raise CniError(NOT_AVAILABLE, str(exc), "check the node's links") from None


def gc(conf, args: CmdArgs) -> None:
    """GC: forward the valid attachments to the IPAM plugin when it knows spec 1.1.0."""
    if ipam.supports(args, "1.1.0"):
        ipam.gc(args)
    else:
        log.info("IPAM plugin %s predates spec 1.1.0: GC not forwarded", conf.ipam["type"])


def prev_interface(args: CmdArgs, sandbox: str) -> tuple[int | None, dict | None]:
    """Index and entry of our interface in prevResult (name CNI_IFNAME, sandbox CNI_NETNS)."""
    for i, entry in enumerate((args.prev_result or {}).get("interfaces") or []):
        if entry.get("name") == args.ifname and entry.get("sandbox") == sandbox:
            return i, entry
    return None, None


def check(conf, args: CmdArgs, netns: Netns, record: LinkRecord | None) -> list[str]:
    """CHECK: the link is in the namespace with the kind, mode, master, MAC and addresses of
    the configuration and prevResult, its routes are there, and the IPAM plugin agrees (asked
    while the link is inspected: neither reads what the other does)."""
    ipam_problems: list[str] = []

    def check_ipam() -> None:
        try:
            ipam.check(args)
        except CniError as exc:
            ipam_problems.append(f"IPAM CHECK failed: {exc.msg}")

    wait_for_ipam = in_background(check_ipam) if at_least(args.cni_version, "0.4.0") else None
    try:
        problems = check_link(conf, args, netns, record)
    finally:
        if wait_for_ipam:
            wait_for_ipam()
    return problems + ipam_problems


def check_link(conf, args: CmdArgs, netns: Netns, record: LinkRecord | None) -> list[str]:
    problems: list[str] = []
    index, entry = prev_interface(args, netns.path)
    expected_ips = []
    if args.prev_result is None:
        problems.append("CHECK needs the prevResult of ADD")
    elif entry is None:
        problems.append(f"prevResult lists no interface {args.ifname} in sandbox {netns.path}")
    else:
        expected_ips = [ip["address"] for ip in args.prev_result.get("ips") or []
                        if ip.get("interface") == index and isinstance(ip.get("address"), str)]
    try:
        with Rtnl(netns) as pod, ExitStack() as sockets:
            host = pod if conf.linkInContainer else sockets.enter_context(Rtnl())
            problems += link_problems(conf, args.ifname, netns.path, pod, host, entry,
                                      expected_ips, record)
    except LinkError as exc:
        problems.append(f"cannot inspect {args.ifname}: {exc}")
    return problems


def link_problems(conf, ifname: str, where: str, pod: Rtnl, host: Rtnl, entry, expected_ips,
                  record: LinkRecord | None) -> list[str]:
    found = pod.find(ifname)
    if found is None:
        return [f"link {ifname} is missing from {where}"]
    problems = []
    if found.kind != conf.linkType:
        problems.append(f"{ifname} is a {found.kind or 'plain'} link, not {conf.linkType}")
    elif found.mode != conf.link_mode:
        problems.append(f"{ifname} is in {conf.linkType} mode {found.mode}, the "
                        f"configuration says {conf.link_mode}")
    master = host.find(conf.master)
    if master is None:
        problems.append(f"master {conf.master} no longer exists")
    elif found.parent_index != master.index:
        problems.append(f"{ifname} hangs off ifindex {found.parent_index}, not master "
                        f"{conf.master} (ifindex {master.index})")
    if entry and entry.get("mac") and entry["mac"].lower() != found.mac.lower():
        problems.append(f"{ifname} has MAC {found.mac}, prevResult says {entry['mac']}")
    if not found.up:
        problems.append(f"{ifname} is down")
    present = {ipaddress.ip_interface(f"{a}/{p}") for a, p, _ in pod.addresses(found.index)}
    for address in expected_ips:
        if ipaddress.ip_interface(address) not in present:
            problems.append(f"{ifname} lacks address {address}")
    have = pod.routes(found.index)
    for route in (record.routes if record else []):
        if ipaddress.ip_network(route["dst"], strict=False) not in have:
            problems.append(f"route {route['dst']} through {ifname} is missing")
    return problems
