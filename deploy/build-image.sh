#!/usr/bin/env bash
# Build the installer DaemonSet's image (deploy/daemonset.yaml) offline, from no base image
# and no registry: busybox-static (/bin/busybox with its applets as links: sh, cp, mv, cmp,
# tr, base64, sleep, ...) and dist/cxi at /cxi, written as an OCI archive that podman,
# buildah and containerd load.
#
#   deploy/build-image.sh [IMAGE [ARCHIVE]]
#     IMAGE    default ghcr.io/example/cxi-cni:<version in pyproject.toml>
#     ARCHIVE  default dist/cxi-cni-image.tar
#     CXI_BINARY=FILE in the environment packs another build of the binary than dist/cxi
#
# Then, on a node:  ctr -n k8s.io images import ARCHIVE   (k3s: k3s ctr images import ARCHIVE)
# or with podman:   podman load -i ARCHIVE && podman push IMAGE
#
# Needs root, buildah and busybox-static (apt-get install buildah busybox-static), and
# dist/cxi (./build.sh). buildah works in a private store that is removed at the end: the
# host's image store is not touched. The timestamp is fixed, so the same inputs give the
# same image digest.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
image=${1:-ghcr.io/example/cxi-cni:$version}
archive=${2:-dist/cxi-cni-image.tar}
binary=${CXI_BINARY:-dist/cxi}
busybox=/bin/busybox

die() { echo "build-image.sh: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "buildah is missing: apt-get install buildah"
[ -x "$binary" ] || die "$binary is missing: run ./build.sh first"
[ -x "$busybox" ] || die "$busybox is missing: apt-get install busybox-static"
# The dynamic `busybox` package also installs /bin/busybox; the image has no libc for it.
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is linked dynamically: apt-get install busybox-static"; fi

work=$(mktemp -d)
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  [ ! -d "$work/storage" ] || buildah "${store[@]}" rm --all >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
install -m 0755 "$binary" "$rootfs/cxi"

container=$(buildah "${store[@]}" from scratch)
buildah "${store[@]}" copy "$container" "$rootfs" / >/dev/null
buildah "${store[@]}" config --env PATH=/bin --cmd '["/bin/sh"]' \
  --label "org.opencontainers.image.title=cxi-cni" --label "org.opencontainers.image.version=$version" \
  "$container"
mkdir -p "$(dirname "$archive")"
rm -f "$archive"
buildah "${store[@]}" commit --rm -q --disable-compression=false --timestamp 0 --identity-label=false "$container" \
  "oci-archive:$archive:$image" >/dev/null
echo "build-image.sh: $archive ($(du -h "$archive" | cut -f1)) holds $image"
