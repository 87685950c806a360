#!/usr/bin/env bash
# Build dist/cxi, the single-file plugin binary, from a clean machine of this kind.
# Installs what it needs (Debian's python3.11 with venv, the pinned packages) and fails loudly.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-/usr/bin/python3.11}
need_apt=()
[ -x "$PY" ] || need_apt+=(python3.11)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3.11-venv)
command -v gcc >/dev/null || need_apt+=(gcc)
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
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[build,test]'

rm -rf build/pyinstaller dist/cxi
.venv/bin/pyinstaller --noconfirm --clean --log-level WARN --onefile --name cxi \
  --paths . --workpath build/pyinstaller --specpath build/pyinstaller --distpath dist \
  cxi_cni/__main__.py

test -x dist/cxi || { echo "build.sh: dist/cxi was not produced" >&2; exit 1; }
echo '{"cniVersion":"1.1.0"}' | CNI_COMMAND=VERSION dist/cxi >/dev/null \
  || { echo "build.sh: dist/cxi does not answer VERSION" >&2; exit 1; }
echo "build.sh: built dist/cxi ($(du -h dist/cxi | cut -f1))"
