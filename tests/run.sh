#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests drive, build dist/cxi, lint, run pytest.
# Needs root (network namespaces, links, podman). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "tests/run.sh: run as root (the tests make netns and links)" >&2; exit 1; fi

# Debian packages: iproute2 (netns, veth, macvlan), the Go reference CNI plugins (host-local
# IPAM, macvlan for side-by-side runs), gcc for the libcxi stand-in, binutils for the
# portability checks, openssl for the test API server's certificates, qemu and busybox for
# the VM that runs real ipvlan, podman for the runtime tests (tests/podman/setup.sh
# configures it), buildah for the DaemonSet's image, containerd for the CRI tier, Go and
# Debian's libcni sources for the libcni tier's driver, strace to show the launcher's fast
# path runs nothing else. One apt-get update, then one install of whatever is missing.
packages=(iproute2 iputils-ping containernetworking-plugins gcc libc6-dev binutils openssl
  python3.11-venv patchelf qemu-system-x86 busybox-static cpio kmod
  podman runc catatonit iptables buildah containerd golang-go golang-github-appc-cni-dev strace)
missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
for setup in tests/*/setup.sh; do
  bash "$setup"  # not skipped when a checkout lost its execute bit
done

./build.sh
.venv/bin/ruff check .  # the team's lint: a red lint is a red run
exec .venv/bin/python -m pytest "$@"
