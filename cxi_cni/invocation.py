"""What one command works with: its CNI arguments, the parsed configuration, the attachment
records, the CXI backend (opened on first use) and the pod's network namespace (opened once)."""

from __future__ import annotations

from . import logs
from .cni.args import CmdArgs
from .cni.errors import INVALID_CONFIG, CniError
from .config import NetConf, parse_conf
from .cxi.backend import Backend, BackendUnavailable, Limit
from .cxi.services import ServiceSpec
from .errors import BACKEND_UNAVAILABLE
from .files import FileProblem
from .lazy import lazy
from .netns import Netns, NetnsInvalid, NetnsMissing
from .state import AttachmentStore
from .trust import UntrustedPath

# One of the two is loaded, when a command first uses the backend.
sim = lazy("cxi_cni.cxi.sim")
libcxi = lazy("cxi_cni.cxi.libcxi")


def open_backend(conf: NetConf) -> Backend:
    """The CXI backend the configuration names (nothing is loaded until it is used)."""
    if conf.cxi.backend == "sim":
        return sim.SimBackend(conf.cxi.simState, conf.cxi.stack)
    return libcxi.LibcxiBackend(conf.cxi.libcxi, stack=conf.cxi.stack)


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
        self.store = AttachmentStore(self.conf.stateDir)
        self._backend: Backend | None = None
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
                names = self.backend.device_names()
            elif choice == "master":
                names = [self.backend.device_for_netdev(self.conf.master)]
            else:
                present = set(self.backend.device_names())
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

    def spec(self, vnis) -> ServiceSpec:
        """What each service of this attachment grants: the VNIs, TCs and limits."""
        limits = tuple((name, Limit(lim.max, lim.res))
                       for name, lim in sorted(self.conf.cxi.limits.items()))
        return ServiceSpec(tuple(vnis), frozenset(self.conf.cxi.tcs), limits)
