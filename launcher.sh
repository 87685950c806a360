#!/bin/sh
# cxi: CNI plugin giving each pod its own CXI service on HPE Slingshot NICs.
# A launcher with the program appended as tar.gz (build.sh fills in the content id and the
# payload's offset, and appends it). The first run on a node unpacks the program beside this
# file into .cxi-<content id>/, where the runtime executes plugins, or where that folder is
# read-only, noexec or full, into /var/lib/cxi-cni/.cxi-<content id>/: once, under a lock,
# via a temporary folder renamed when complete. Every later run finds it and starts it
# without running another process or taking a lock.
id=@ID@
fallback=/var/lib/cxi-cni
tools="flock tail tar gzip mkdir mktemp mv rm cat ls grep tr sed"

case $0 in /*) self=$0 ;; *) self=$PWD/$0 ;; esac
here=${self%/*}  # empty for a binary in /: paths below are "$here/..."
cwd=$PWD
nl='
'

json_text() {  # $1 as the inside of a JSON string: no control characters, \ and " escaped
  printf '%s' "$1" | tr '\001-\037' ' ' | sed 's/[\\"]/\\&/g'
}

fail() {  # code, message, fix: CNI error JSON for the runtime, plain text for a person
  if [ -n "${CNI_COMMAND:-}" ]; then
    printf '{"cniVersion":"1.1.0","code":%d,"msg":"%s","details":"%s"}\n' \
      "$1" "$(json_text "cxi: $2")" "$(json_text "$3")"
  else
    printf 'cxi: %s\ncxi: fix: %s\n' "$2" "$3" >&2
  fi
  exit 1
}

kill_at() {  # the tests' kill points, as in the plugin (CXI_CNI_DEBUG_KILL_AT=STEP)
  [ "${CXI_CNI_DEBUG_KILL_AT:-}" != "$1" ] || kill -9 $$
}

in_use() {  # does a live process map, hold open or stand in a folder named $1? Matched by
  # name, so a process in another mount namespace that sees the folder elsewhere counts too.
  [ -r /proc/self/maps ] || return 0  # no /proc to tell: keep everything
  # Only the host's PID namespace shows every process (its PID 2 is kthreadd); run from a
  # container without hostPID, the host's runs of an old version are invisible: keep it.
  k=
  read -r k 2>/dev/null < /proc/2/comm
  [ "$k" = kthreadd ] || return 0
  { cat /proc/[0-9]*/maps; ls -l /proc/[0-9]*/cwd /proc/[0-9]*/fd; } 2>/dev/null |
    grep -q -F "/$1"
}

tidy() {  # in $root, under its lock: no run unpacks now, so every temporary folder is left
  # from a killed run; a target without .complete is a partial copy; other versions go when
  # no process uses them.
  for old in "$root"/.cxi-*; do
    [ -d "$old" ] || continue
    case $old in *.tmp.*) rm -rf "$old"; continue ;; esac
    in_use "${old##*/}" || rm -rf "$old"
  done
}

extract() {  # into $root/.cxi-$id under $root/.cxi.lock (fd 9); non-zero: try the next root
  limit=${CXI_CNI_DEBUG_UNPACK_WAIT:-30}
  flock -w "$limit" 9 || fail 11 "another run has been unpacking the program into $root for $limit s" \
    "try again; if it persists, find the process holding $root/.cxi.lock (fuser -v $root/.cxi.lock)"
  kill_at unpack-locked
  [ ! -f "$d/.complete" ] || return 0  # a concurrent first run did it while this one waited
  tidy
  [ ! -e "$d" ] || fail 106 "$d is incomplete and in use by a running process" \
    "stop the process using $d (fuser -v -m $d), then remove $d"
  umask 022
  t=$(mktemp -d "$d.tmp.XXXXXX" 2>&1) || { tried="$tried; ${t%%"$nl"*}"; return 1; }
  if ! err=$(tail -c +@OFFSET@ "$self" | tar -xzf - -C "$t" 2>&1); then
    rm -rf "$t"
    case $err in
      *"No space left"*) err="no space left on its device (the program takes @MB@ MB)" ;;
    esac
    tried="$tried; unpacking into $root failed: ${err%%"$nl"*}"
    return 1
  fi
  kill_at unpack-extracted
  got=
  read -r got 2>/dev/null < "$t/.cxi-id"
  if [ "$got" != "$id" ]; then
    rm -rf "$t"
    fail 11 "$self was replaced while it ran" "try again: the new binary unpacks itself"
  fi
  if [ ! -x "$t/cxi" ]; then
    rm -rf "$t"
    tried="$tried; $root does not allow execution (mounted noexec)"
    return 1
  fi
  true 2>/dev/null > "$t/.complete" || { rm -rf "$t"; tried="$tried; $root is full"; return 1; }
  kill_at unpack-before-rename
  mv -T "$t" "$d" 2>/dev/null || { rm -rf "$t"; tried="$tried; cannot rename $t to $d"; return 1; }
}

unpack() {  # the first run of this version on this node: sets d to the unpacked program
  missing=
  for tool in $tools; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
  [ -z "$missing" ] || fail 106 "the first run unpacks the program and needs:$missing" \
    "install them (flock is in util-linux; the others in coreutils, tar, gzip, grep, sed)"
  tried=
  given=$(umask)  # the caller's, for the program: unpacking and the lock set their own
  for root in "$here" "$fallback"; do
    d=$root/.cxi-$id
    umask 022
    if ! mkdir -p "${root:-/}" 2>/dev/null || [ ! -w "${root:-/}" ]; then
      tried="$tried; ${root:-/} is not writable"
      continue
    fi
    umask 077  # the lock file: only root may open it, so no one else can hold the lock
    if ! true 2>/dev/null >> "$root/.cxi.lock"; then
      tried="$tried; cannot create $root/.cxi.lock"
      continue
    fi
    { extract && umask "$given" && return 0; } 9>> "$root/.cxi.lock"
  done
  fail 106 "cannot unpack the program: ${tried#; }" \
    "give it a folder that is writable by root and allows execution: $here or $fallback"
}

d=$here/.cxi-$id
[ -f "$d/.complete" ] || d=$fallback/.cxi-$id
[ -f "$d/.complete" ] || unpack
# The program's loader path is relative to its folder, so it starts from there; the caller's
# folder and this file's path go along for the program to restore (cxi_cni/main.py).
cd "$d" 2>/dev/null || { unpack; cd "$d" 2>/dev/null; } ||
  fail 11 "$d disappeared while starting" "try again"
export CXI_CNI_CWD="$cwd" CXI_CNI_LAUNCHER="$self"
exec ./cxi "$@"
