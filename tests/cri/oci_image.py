"""Offline OCI image archives for containerd's `ctr images import`: a pause image made of
busybox-static's `sleep`, since no registry is reachable from the tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
# The sandbox's only process: it holds the pod's namespaces until containerd kills it.
PAUSE_COMMAND = ["/bin/sleep", "2147483647"]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def pause_layer() -> bytes:
    """A root filesystem with busybox, its `sleep` applet and the folders runc mounts over."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static (tests/run.sh does)")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("bin", "dev", "proc", "sys", "etc", "tmp"):
            _add_dir(tar, folder)
        _add_bytes(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        link = tarfile.TarInfo("bin/sleep")
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
        tar.addfile(link)
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_archive(path: Path, name: str, layer: bytes, command: list[str]) -> str:
    """An OCI image layout tar holding one image named `name` (a full reference like
    `localhost/x:1`, which `ctr images import` takes from the index annotation); returns
    the manifest's digest."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": command, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": _digest(layer), "size": len(layer)}],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST_TYPE, "digest": _digest(manifest), "size": len(manifest),
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }]}).encode()
    with tarfile.open(path, "w") as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add_bytes(tar, "index.json", index)
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for blob in (layer, config, manifest):
            _add_bytes(tar, "blobs/sha256/" + _digest(blob).split(":", 1)[1], blob)
    return _digest(manifest)


def pause_archive(path: Path, name: str) -> str:
    return write_archive(path, name, pause_layer(), PAUSE_COMMAND)
