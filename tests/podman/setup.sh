#!/usr/bin/env bash
# Make this host ready for the podman tests: podman 4 with the CNI backend, the Go
# reference plugins, runc, and a local busybox image (no registry is needed). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf=/etc/containers/containers.conf
image=localhost/cxi-cni-busybox
marker="# cxi-cni test settings"

if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root" >&2; exit 1; fi

packages=(podman containernetworking-plugins busybox-static runc catatonit iptables iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# The system-wide settings; a file someone else wrote is left alone (the tests pass their
# own copy of these settings through CONTAINERS_CONF and do not depend on it).
if [ ! -e "$conf" ] || head -n1 "$conf" | grep -q "^$marker"; then
  if ! cmp -s "$here/containers.conf" "$conf"; then
    mkdir -p "$(dirname "$conf")"
    install -m 0644 "$here/containers.conf" "$conf"
    echo "setup.sh: wrote $conf" >&2
  fi
else
  echo "setup.sh: $conf was not written by this script; leaving it as it is" >&2
fi

# A busybox image from busybox-static, rebuilt when the busybox binary changes.
busybox=/bin/busybox
version="$(sha256sum "$busybox" | cut -c1-16)"
export CONTAINERS_CONF="$here/containers.conf"
if [ "$(podman image inspect --format '{{index .Labels "busybox"}}' "$image" 2>/dev/null)" != "$version" ]; then
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  tar -C "$root" -cf "$root.tar" .
  podman import -q --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' \
    --change "LABEL busybox=$version" "$root.tar" "$image" >/dev/null
  rm -f "$root.tar"
  echo "setup.sh: built $image" >&2
fi
echo "setup.sh: podman $(podman version --format '{{.Client.Version}}') ready, image $image"
