#!/usr/bin/env bash
# Puts NVRTC (CUDA 12.4, from Debian trixie's non-free libnvrtc12 and libnvrtc-builtins12.4)
# into <repo>/.cache/nvrtc/lib, unless the machine already has a libnvrtc.
#
#   tools/fetch-nvrtc.sh           no-op when a libnvrtc is found; otherwise download
#   tools/fetch-nvrtc.sh --force   download into the cache even when one is found
#   tools/fetch-nvrtc.sh --quiet   print nothing when a libnvrtc is already found (build.sh uses it)
#
# apt runs with a private state (its own sources.list, lists, cache and an empty dpkg status), so
# the system's apt configuration and package database are neither read for sources nor changed.
# Nothing is installed: the .debs are unpacked with dpkg -x and only the shared objects are kept.
# The cache is assembled in a temporary folder and moved into place at the end, so an interrupted
# run never leaves a half-filled cache.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="$REPO_ROOT/.cache/nvrtc"
CACHE_LIB="$CACHE_DIR/lib/libnvrtc.so.12"
PACKAGES=(libnvrtc12 libnvrtc-builtins12.4)
SUITE_LINE='deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie non-free'

force=0
quiet=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -q|--quiet) quiet=1 ;;
    -h|--help)
      sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "fetch-nvrtc: unknown argument '$arg' (use --force, --quiet or --help)" >&2; exit 2 ;;
  esac
done

if [[ "$(uname -s)" != Linux || "$(uname -m)" != x86_64 ]]; then
  echo "fetch-nvrtc: only Linux x86_64 is supported ($(uname -s) $(uname -m)); install NVRTC from the CUDA toolkit and set KVKERNELS_NVRTC, otherwise KvKernels reports NVRTC unavailable."
  exit 0
fi

# ---- an NVRTC that is already there ------------------------------------------------------------
find_existing() {
  if [[ -n "${KVKERNELS_NVRTC:-}" && -f "$KVKERNELS_NVRTC" ]]; then
    echo "KVKERNELS_NVRTC=$KVKERNELS_NVRTC"; return 0
  fi
  if [[ -e "$CACHE_LIB" ]]; then
    echo "$CACHE_LIB"; return 0
  fi
  local ldconfig_bin line
  ldconfig_bin="$(command -v ldconfig || true)"
  [[ -z "$ldconfig_bin" && -x /sbin/ldconfig ]] && ldconfig_bin=/sbin/ldconfig
  if [[ -n "$ldconfig_bin" ]]; then
    line="$("$ldconfig_bin" -p 2>/dev/null | grep -E 'libnvrtc\.so\.1[23] ' | head -n 1 || true)"
    if [[ -n "$line" ]]; then
      echo "${line##*=> }"; return 0
    fi
  fi
  local f
  for f in /usr/local/cuda/lib64/libnvrtc.so.*; do
    if [[ -e "$f" ]]; then echo "$f"; return 0; fi
  done
  return 1
}

if [[ $force -eq 0 ]] && found="$(find_existing)"; then
  [[ $quiet -eq 1 ]] || echo "fetch-nvrtc: NVRTC already present: $found"
  exit 0
fi

# ---- download ----------------------------------------------------------------------------------
for tool in apt-get dpkg dpkg-deb; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fetch-nvrtc: '$tool' is required to download NVRTC but was not found; install libnvrtc 12 or 13 (CUDA toolkit) and set KVKERNELS_NVRTC." >&2
    exit 1
  fi
done

mkdir -p "$REPO_ROOT/.cache"
# Same file system as the cache, so the final mv is a rename.
WORK="$(mktemp -d "$REPO_ROOT/.cache/nvrtc.tmp.XXXXXX")"
LOG="$WORK/fetch.log"
OLD=""
cleanup() {
  # Interrupted between the two renames: put the previous cache back.
  if [[ -n "$OLD" && -e "$OLD" && ! -e "$CACHE_DIR" ]]; then mv "$OLD" "$CACHE_DIR"; fi
  rm -rf "$WORK"
  if [[ -n "$OLD" ]]; then rm -rf "$OLD"; fi
}
fail() {
  echo "fetch-nvrtc: $1 (log follows)" >&2
  cat "$LOG" >&2 || true
  exit 1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/debs" "$WORK/root" \
         "$WORK/nvrtc/lib"
echo "$SUITE_LINE" > "$WORK/apt/sources.list"
: > "$LOG"

APT_OPTS=(
  -q
  -o "Dir::Etc::SourceList=$WORK/apt/sources.list"
  -o Dir::Etc::SourceParts=/dev/null
  -o Dir::Etc::Preferences=/dev/null
  -o Dir::Etc::PreferencesParts=/dev/null
  -o "Dir::State::Lists=$WORK/apt/lists"
  -o "Dir::Cache=$WORK/apt/cache"
  -o Dir::State::Status=/dev/null
  -o APT::Architecture=amd64
  -o APT::Sandbox::User=root
)

echo "fetch-nvrtc: downloading ${PACKAGES[*]} (Debian trixie non-free) ..."
apt-get "${APT_OPTS[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
( cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "${PACKAGES[@]}" ) >>"$LOG" 2>&1 \
  || fail "apt-get download failed"

versions=()
for pkg in "${PACKAGES[@]}"; do
  deb="$(ls "$WORK/debs/${pkg}_"*.deb 2>/dev/null | head -n 1 || true)"
  [[ -n "$deb" ]] || fail "package $pkg was not downloaded"
  dpkg -x "$deb" "$WORK/root" >>"$LOG" 2>&1 || fail "dpkg -x $deb failed"
  versions+=("$pkg $(dpkg-deb -f "$deb" Version)")
done

# Shared objects (regular files and their soname symlinks) from usr/lib/<triplet>/, flattened.
shopt -s nullglob
libs=("$WORK"/root/usr/lib/*/libnvrtc.so.* "$WORK"/root/usr/lib/*/libnvrtc-builtins.so.*)
shopt -u nullglob
[[ ${#libs[@]} -gt 0 ]] || fail "no libnvrtc shared objects in the packages"
cp -P "${libs[@]}" "$WORK/nvrtc/lib/" >>"$LOG" 2>&1 || fail "copying the shared objects failed"
[[ -e "$WORK/nvrtc/lib/libnvrtc.so.12" ]] || fail "libnvrtc.so.12 missing after extraction"
real="$(readlink -f "$WORK/nvrtc/lib/libnvrtc.so.12")"
lib_version="${real##*/libnvrtc.so.}"
{
  echo "$lib_version"
  printf '%s\n' "${versions[@]}"
  echo "source: $SUITE_LINE"
  echo "fetched: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$WORK/nvrtc/VERSION"

# Swap into place: move any old cache aside first, then rename the new one in.
if [[ -e "$CACHE_DIR" ]]; then
  OLD="$WORK.old"
  mv "$CACHE_DIR" "$OLD"
fi
mv "$WORK/nvrtc" "$CACHE_DIR"
echo "fetch-nvrtc: NVRTC $lib_version installed: $CACHE_LIB"
