#!/usr/bin/env bash
# Build dist/cxi, the single-file plugin binary, from a clean machine of this kind.
# Installs what it needs (Debian's python3.11 with venv, the pinned packages) and fails loudly.
#
# dist/cxi is a small POSIX sh launcher (launcher.sh) with a tar.gz of a PyInstaller onedir
# build appended. The first run on a node unpacks it beside itself into .cxi-<content id>/
# (the CNI bin dir, where the runtime executes plugins, unlike /run, which Debian and Ubuntu
# mount noexec), once per node under a lock; every run then starts the unpacked program
# directly, so no run pays for unpacking. The build host's glibc (loader, libc and its
# companions) is bundled, so the binary starts on hosts whose own glibc is older (the floor is
# the kernel glibc supports, 3.2, not a glibc version).
#
# Where the bundle lands is only known at run time, so the program names its glibc relative
# to its own folder: RUNPATH $ORIGIN/_internal, and ELF interpreter _internal/ld-linux-...,
# which the kernel resolves against the working directory. The launcher therefore starts the
# program from inside its folder and hands over the caller's folder (CXI_CNI_CWD) and its own
# path (CXI_CNI_LAUNCHER), which cxi_cni/main.py restores first thing (the working directory,
# and sys.executable for `cxi demo`, which runs the binary again). PyInstaller's bootloader
# re-executes itself once before Python starts (to set its library path), still from that
# folder, so that works too. Starting the bundled loader explicitly (ld.so <program>) would
# avoid the folder change but makes every process show up as ld-linux-x86-64 (comm, pidof)
# and leaves the same problem for any later direct run of the program; an absolute
# interpreter written at unpack time breaks when another mount namespace (an installer pod
# with the bin dir at /host/opt/cni/bin) unpacks it for the host. The folder change costs
# nothing measurable: VERSION median 32.6 ms, against 32.2 ms with the absolute paths in
# /run (200 interleaved runs each).
#
#   ./build.sh              dist/cxi
#   ./build.sh --variants   also build/cxi-onefile (PyInstaller onefile, needs the build
#                           host's glibc) and build/cxi-staticx, for bench/ comparisons
set -euo pipefail
umask 022  # the modes tar records, so that the build does not depend on the caller's umask
cd "$(dirname "$0")"

PY=${PYTHON:-/usr/bin/python3.11}
VARIANTS=0
[ "${1:-}" = --variants ] && VARIANTS=1

need_apt=()
[ -x "$PY" ] || need_apt+=(python3.11)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3.11-venv)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v patchelf >/dev/null || need_apt+=(patchelf)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "build.sh: installing ${need_apt[*]} with apt-get" >&2
  if [ "$(id -u)" != 0 ]; then echo "build.sh: need root to install ${need_apt[*]}" >&2; exit 1; fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[build,test]'

# Modules the plugin never imports but that the venv (test tools) or the standard library
# would drag in. yaml stays (k8s.py reads YAML kubeconfigs), without its C accelerator.
EXCLUDES=(hypothesis yaml._yaml pytest _pytest tkinter _tkinter pydoc_data
  lib2to3 xmlrpc curses _curses readline bz2 _bz2 lzma _lzma
  _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr _codecs_tw
  distutils setuptools pkg_resources pip)

# PyInstaller's runtime hooks for inspect and multiprocessing import both modules on every
# start (about 20 ms of VERSION's 65) for features the plugin does not use: source lookups
# of frozen code, and multiprocessing's spawn/forkserver children (the plugin starts none;
# pyroute2's child processes use fork). pkgutil's hook stays: pyroute2 lists its modules.
DROPPED_RTHOOKS="'pyi_rth_inspect', 'pyi_rth_multiprocessing'"

# Python modules are kept as .pyc files in the unpacked tree (--debug noarchive), not in
# the PYZ archive inside the executable: PyInstaller's archive reader opens the executable
# again for every module it imports, and a chained ADD imports about 180. Measured side by
# side (40 runs each): ADD 136 -> 119 ms, DEL 123 -> 108 ms, VERSION 38.6 -> 35.3 ms.
NOARCHIVE=(--debug noarchive)
# cxi_cni/lazy.py loads some modules by name on first use; PyInstaller follows only static
# imports, so every module of the package is collected explicitly.
COLLECT=(--collect-submodules cxi_cni)

pyinstaller() {
  local mode=$1 dist=$2 specdir=build/pyinstaller$1
  rm -rf "$specdir"
  .venv/bin/pyi-makespec --log-level WARN "$mode" "${NOARCHIVE[@]}" "${COLLECT[@]}" --name cxi --paths "$PWD" --specpath "$specdir" \
    "${EXCLUDES[@]/#/--exclude-module=}" "$PWD/cxi_cni/__main__.py" >/dev/null
  sed -i "s/^pyz = PYZ(/a.scripts = [s for s in a.scripts if s[0] not in ($DROPPED_RTHOOKS)]\\npyz = PYZ(/" \
    "$specdir/cxi.spec"
  grep -q '^a.scripts = ' "$specdir/cxi.spec" || { echo "build.sh: cannot edit $specdir/cxi.spec" >&2; exit 1; }
  .venv/bin/pyinstaller --noconfirm --clean --log-level WARN --workpath "$specdir" \
    --distpath "$dist" "$specdir/cxi.spec"
}

rm -rf build/onedir build/payload
pyinstaller --onedir build/onedir
tree=build/onedir/cxi
lib=$tree/_internal

# The build host's glibc: the loader and every glibc library an ELF of the tree links to.
loader=$(readelf -l "$tree/cxi" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
cp -L "$loader" "$lib/"
for soname in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libresolv.so.2; do
  path=$(ldconfig -p | awk -v s="$soname" '$1 == s && /x86-64/ && !found {print $NF; found = 1}')
  [ -n "$path" ] || { echo "build.sh: cannot find $soname of the build host" >&2; exit 1; }
  cp -L "$path" "$lib/"
done

# shellcheck disable=SC2016  # $ORIGIN is for the loader to expand, not the shell
patchelf --set-interpreter "_internal/$(basename "$loader")" --set-rpath '$ORIGIN/_internal' "$tree/cxi"
id=$(cd "$tree" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
printf '%s\n' "$id" > "$tree/.cxi-id"  # the launcher checks it got the payload it expects
# Byte-identical from one commit to the next build: names sorted, one mtime (the commit's,
# as SOURCE_DATE_EPOCH says, else 0), no owner names, and gzip without its name and time.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
tar -C "$tree" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=gnu -cf - . |
  gzip -n -9 > build/payload.tar.gz

# The payload starts right after the launcher text, whose length includes the offset's digits.
OFFSET_MARK=@OFFSET@
megabytes=$(( ($(du -s -B1 "$tree" | cut -f1) + 999999) / 1000000 ))
text=$(sed -e "s/@ID@/$id/" -e "s/@MB@/$megabytes/" launcher.sh)
[ "$(grep -c -e @ID@ -e "$OFFSET_MARK" -e @MB@ launcher.sh)" = 3 ] || { echo "build.sh: launcher.sh must name each mark once" >&2; exit 1; }
base=$(( $(printf '%s\n' "$text" | wc -c) - ${#OFFSET_MARK} ))  # bytes besides the offset's digits
for digits in 1 2 3 4 5 6 7 8 9; do
  offset=$(( base + digits + 1 ))
  [ ${#offset} -eq "$digits" ] && break
done
text=${text/"$OFFSET_MARK"/$offset}
[ $(( $(printf '%s\n' "$text" | wc -c) + 1 )) -eq "$offset" ] || { echo "build.sh: launcher offset is wrong" >&2; exit 1; }
mkdir -p dist
{ printf '%s\n' "$text"; cat build/payload.tar.gz; } > dist/.cxi.new
chmod 755 dist/.cxi.new
mv -f dist/.cxi.new dist/cxi

if [ "$VARIANTS" = 1 ]; then
  rm -rf build/onefile
  pyinstaller --onefile build/onefile
  mv -f build/onefile/cxi build/cxi-onefile
  .venv/bin/python -m pip install -q --disable-pip-version-check staticx==0.14.2
  .venv/bin/staticx build/cxi-onefile build/cxi-staticx
fi

test -x dist/cxi || { echo "build.sh: dist/cxi was not produced" >&2; exit 1; }
echo '{"cniVersion":"1.1.0"}' | CNI_COMMAND=VERSION dist/cxi >/dev/null \
  || { echo "build.sh: dist/cxi does not answer VERSION" >&2; exit 1; }
echo "build.sh: built dist/cxi ($(du -h dist/cxi | cut -f1)), unpacks beside itself into .cxi-$id"
