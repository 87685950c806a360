"""The attachment record: what one ADD made (its services, its link and lease) and how far it
got, as kept on disk between ADD and DEL. Records written by earlier versions still load."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .cxi.services import Binding


class RecordDamaged(ValueError):
    """A record file parses but is not an attachment record; the message says what is wrong."""


@dataclass
class LinkRecord:
    """The pod's link as ADD made it, and the IPAM configuration that leased its addresses:
    DEL and GC undo exactly this, whatever the configuration says by then."""

    type: str
    mode: str
    master: str
    ifname: str
    netns: str
    mac: str = ""
    link_in_container: bool = False
    ipam: dict = field(default_factory=dict)
    ipam_version: str = ""
    ips: list[str] = field(default_factory=list)
    routes: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"type": self.type, "mode": self.mode, "master": self.master,
                "linkInContainer": self.link_in_container,
                "ifname": self.ifname, "netns": self.netns, "mac": self.mac, "ipam": self.ipam,
                "ipamVersion": self.ipam_version, "ips": self.ips, "routes": self.routes}

    @classmethod
    def from_json(cls, data) -> LinkRecord:
        if not isinstance(data, dict):
            raise RecordDamaged("its link is not an object")
        ipam = data.get("ipam")
        if isinstance(ipam, str):  # records before 0.2 kept only the IPAM type
            ipam = {"type": ipam}
        try:
            return cls(type=str(data["type"]), mode=str(data["mode"]), master=str(data["master"]),
                       ifname=str(data["ifname"]), netns=str(data.get("netns") or ""),
                       mac=str(data.get("mac") or ""),
                       link_in_container=bool(data.get("linkInContainer")),
                       ipam=ipam if isinstance(ipam, dict) else {},
                       ipam_version=str(data.get("ipamVersion") or ""),
                       ips=[str(ip) for ip in data.get("ips") or []],
                       routes=[r for r in data.get("routes") or [] if isinstance(r, dict)])
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordDamaged(f"its link lacks or garbles {exc}") from None


@dataclass
class AttachmentRecord:
    """One attachment (containerID, ifname): the intent first, then each service as it is
    made. `allocating` names the device of an alloc in flight (a crash there leaves an
    orphan service); `complete` is set when ADD succeeded. `cpus` is the pod's CPU count its
    services' reservations were made for (0: made by a version that did not say)."""

    container_id: str
    ifname: str
    netns: str = ""
    netns_inode: int = 0
    vnis: tuple[int, ...] = ()
    tcs: tuple[str, ...] = ()
    devices: list[str] = field(default_factory=list)
    services: list[Binding] = field(default_factory=list)
    link: LinkRecord | None = None
    allocating: str | None = None
    complete: bool = False
    created: float = field(default_factory=time.time)
    pod: dict[str, str] = field(default_factory=dict)
    cpus: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.container_id, self.ifname

    def to_json(self) -> dict:
        out = {"containerID": self.container_id, "ifname": self.ifname, "netns": self.netns,
               "netnsInode": self.netns_inode, "vnis": list(self.vnis), "tcs": list(self.tcs),
               "devices": list(self.devices),
               "services": [{"device": b.device, "svcId": b.svc_id} for b in self.services],
               "link": self.link.to_json() if self.link else None,
               "created": self.created, "complete": self.complete}
        if self.allocating:
            out["allocating"] = self.allocating
        if self.pod:
            out["pod"] = self.pod
        if self.cpus:
            out["cpus"] = self.cpus
        return out

    @classmethod
    def from_json(cls, data) -> AttachmentRecord:
        """RecordDamaged unless `data` is a record this or an earlier version wrote."""
        if not isinstance(data, dict):
            raise RecordDamaged("not an attachment record")
        services = data.get("services")
        if not isinstance(services, list):
            raise RecordDamaged("not an attachment record")
        for svc in services:
            if not (isinstance(svc, dict) and isinstance(svc.get("device"), str)
                    and isinstance(svc.get("svcId"), int) and not isinstance(svc["svcId"], bool)):
                raise RecordDamaged("a service entry lacks device or svcId")
        container_id, ifname = data.get("containerID"), data.get("ifname")
        if not (isinstance(container_id, str) and container_id and isinstance(ifname, str) and ifname):
            raise RecordDamaged("it lacks containerID or ifname")
        inode = data.get("netnsInode")
        if not isinstance(inode, int) or isinstance(inode, bool):
            raise RecordDamaged("it lacks netnsInode")
        allocating = data.get("allocating")
        pod = data.get("pod")
        try:
            return cls(
                container_id=container_id, ifname=ifname, netns=str(data.get("netns") or ""),
                netns_inode=inode,
                vnis=tuple(v for v in data.get("vnis") or () if isinstance(v, int)),
                tcs=tuple(str(t) for t in data.get("tcs") or ()),
                devices=[str(d) for d in data.get("devices") or ()],
                services=[Binding(s["device"], s["svcId"]) for s in services],
                link=LinkRecord.from_json(data["link"]) if data.get("link") else None,
                allocating=allocating if isinstance(allocating, str) else None,
                complete=data.get("complete") is True,
                created=float(data.get("created") or 0) if isinstance(data.get("created"), int | float) else 0.0,
                pod={k: str(v) for k, v in pod.items()} if isinstance(pod, dict) else {},
                cpus=cpus if isinstance(cpus := data.get("cpus"), int) and not isinstance(cpus, bool) else 0,
            )
        except (TypeError, ValueError, AttributeError) as exc:  # "vnis": 5 and the like
            raise RecordDamaged(f"it garbles a field ({exc})") from None
