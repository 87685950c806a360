"""What one command works with: its CNI arguments, the parsed configuration, the attachment
records, the CXI backend (opened on first use) and the pod's network namespace (opened once),
and what the configuration makes of a pod's services (their spec, the destroy retries)."""

from __future__ import annotations

import logging
import math

from . import logs
from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, CniError
from .config import NetConf, parse_conf
from .cxi.backend import RESOURCES, Backend, BackendUnavailable, Limit
from .cxi.services import Retry, ServiceSpec
from .cxi.shape import SLURM_MAX, SLURM_PER_CPU, LimitRule, Shape
from .errors import BACKEND_UNAVAILABLE
from .files import FileProblem
from .netns import Netns, NetnsInvalid, NetnsMissing
from .state import AttachmentStore
from .trust import UntrustedPath


def open_backend(conf: NetConf) -> Backend:
    """The CXI backend the configuration names; its module alone is loaded, here, when a
    command first uses the backend."""
    if conf.cxi.backend == "sim":
        from .cxi.sim import SimBackend

        return SimBackend(conf.cxi.simState, conf.cxi.stack)
    from .cxi.libcxi import LibcxiBackend

    return LibcxiBackend(conf.cxi.libcxi, stack=conf.cxi.stack)


def shape_of(conf: NetConf, cpus: int | None = None) -> Shape:
    """The configured limits of every resource (Slurm's per-CPU reservations with
    cxi.defaults "slurm") for a pod of `cpus` CPUs (None: cxi.cpus), within the node
    policy's ceilings."""
    cxi = conf.cxi
    per_cpu = SLURM_PER_CPU if cxi.defaults == "slurm" else {}
    rules = []
    for name in RESOURCES:
        lim = cxi.limits.get(name)
        given = lim.per_cpu if lim is not None else None
        rules.append((name, LimitRule(lim.max if lim else None, lim.res if lim else None,
                                      per_cpu.get(name, 0) if given is None else given)))
    policy = conf.node_policy
    ceilings = (policy.limits if policy else None) or {}
    caps = tuple((name, Limit(*(SLURM_MAX[name] if cap.get(key) is None else cap[key]
                                for key in ("max", "res"))))
                 for name, cap in sorted(ceilings.items()))
    lpr = None if cxi.lnisPerRgid == "auto" else cxi.lnisPerRgid
    return Shape(tuple(rules), cpus or cxi.cpus, cxi.adjustLimits, caps, lpr)


class Invocation:
    """One command's context; close it (or use it as a context) to release the namespace."""

    def __init__(self, args: CmdArgs):
        self.args = args
        self.conf = parse_conf(args.conf, teardown=args.command in ("DEL", "GC"))
        try:
            logs.configure(self.conf.logFile, self.conf.logLevel,
                           {"command": args.command, "containerID": args.container_id,
                            "ifname": args.ifname, **logs.pod_fields(args.args)})
        except (FileProblem, UntrustedPath) as exc:
            raise CniError(INVALID_CONFIG, f"logFile: {exc}", "point logFile at a regular file in "
                           "a folder only root can write (default /var/log/cxi-cni.log), or at "
                           "/dev/null for no log") from None
        if self.conf.ignored:
            logging.getLogger("cxi_cni.invocation").warning(
                "%s goes on with these wrong configuration fields at their defaults: %s",
                args.command, "; ".join(self.conf.ignored))
        self.store = AttachmentStore(self.conf.stateDir)
        self._backend: Backend | None = None
        self._device_names: list[str] | None = None
        self._netns: Netns | None = None

    def __enter__(self) -> Invocation:
        return self

    def __exit__(self, *exc) -> None:
        if self._netns is not None:
            self._netns.close()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.conf)
        return self._backend

    def device_names(self) -> list[str]:
        """The CXI devices present, as the backend lists them, listed once per command (a
        process of well under a second, in which NICs do not come and go)."""
        if self._device_names is None:
            self._device_names = self.backend.device_names()
        return list(self._device_names)

    def netns(self) -> Netns:
        """CNI_NETNS, opened once and never the host's: every use of the pod's namespace in
        this command goes through this one handle. NetnsMissing or NetnsInvalid."""
        if self._netns is None:
            self._netns = Netns.open(self.args.netns).require_pod()
        return self._netns

    def netns_if_present(self) -> Netns | None:
        """The pod's namespace for DEL, which must succeed without it: None when CNI_NETNS
        is unset, gone, not a namespace, or the host's."""
        if not self.args.netns:
            return None
        try:
            return self.netns()
        except (NetnsMissing, NetnsInvalid):
            return None

    def devices(self) -> list[str]:
        """The CXI devices this attachment gets services on; a CniError naming what is off."""
        choice = self.conf.cxi.devices
        try:
            self.backend.check()
            if choice == "all":
                names = self.device_names()
            elif choice == "master":
                names = [self.backend.device_for_netdev(self.conf.master)]
            else:
                present = set(self.device_names())
                missing = [d for d in choice if d not in present]
                if missing:
                    raise CniError(INVALID_CONFIG, f"cxi.devices names {', '.join(missing)}, "
                                   "which this node does not have",
                                   f"present devices: {', '.join(sorted(present)) or 'none'}")
                names = list(choice)
        except BackendUnavailable as exc:
            raise CniError(BACKEND_UNAVAILABLE, str(exc), "run `cxi doctor` on the node") from None
        if not names:
            raise CniError(BACKEND_UNAVAILABLE, f"no CXI devices found by the {self.conf.cxi.backend} "
                           "backend", "run `cxi doctor` on the node")
        return names

    def spec(self, vnis, cpus: int | None = None) -> ServiceSpec:
        """What each service of this attachment grants: the VNIs, the TCs, and limits shaped
        for a pod of `cpus` CPUs (None: cxi.cpus)."""
        return ServiceSpec(tuple(vnis), frozenset(self.conf.cxi.tcs), shape_of(self.conf, cpus))

    def pod_cpus(self, api_cpus: float | None) -> int:
        """The pod's CPUs: what the API says (its containers' limits, else requests, rounded
        up), else cxi.cpus."""
        return math.ceil(api_cpus) if api_cpus else self.conf.cxi.cpus

    @property
    def retry(self) -> Retry:
        """How a destroy the driver answers -EBUSY is tried again."""
        return Retry(self.conf.cxi.destroyRetries, self.conf.cxi.destroyRetryDelay)
