#!/usr/bin/env bash
# KvKernels front door. ./build.sh help lists the verbs; build.ps1 offers the same ones.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

readonly CONFIG=Release
readonly TFM=net10.0
readonly SOLUTION=Kernels.sln
readonly KVCHECK_DLL="tools/KvCheck/bin/$CONFIG/$TFM/KvCheck.dll"
readonly LIBRARY_PROJECT=src/KvKernels/KvKernels.csproj
readonly TEST_RESULTS=artifacts/test-results
readonly PACKAGES_DIR=artifacts/packages
readonly NVRTC_CACHE_LIB=.cache/nvrtc/lib/libnvrtc.so.12

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

usage() {
  cat <<'EOF'
Usage: ./build.sh <verb> [args...]

Verbs:
  run       the main job: KvCheck verify (every op, CPU and GPU, compared), KvCheck compile, KvCheck bench --quick
  test      the whole test suite, as CI runs it (NVRTC required); results in artifacts/test-results/
  bench     KvCheck bench
  compile   KvCheck compile: every shipped kernel through NVRTC, registers and spills
  pack      NuGet package of src/KvKernels into artifacts/packages/

Extra arguments pass through to KvCheck (./build.sh compile --json out.json --arch sm_90),
to each test assembly for test (xunit v3 runner options: -class NAME, -method NAME, ...),
and to dotnet pack for pack. run takes none.
NVRTC is fetched into .cache/nvrtc/ first when the machine has none (tools/fetch-nvrtc.sh).
EOF
}

die() { echo "build.sh: $*" >&2; exit 1; }

# tools/fetch-nvrtc.sh is silent when NVRTC is already there. A failed fetch is a warning, not an
# error: the CPU paths still work, and tests that need NVRTC report why it is missing.
ensure_nvrtc() {
  if ! bash tools/fetch-nvrtc.sh --quiet; then
    echo "build.sh: warning: NVRTC could not be fetched; work that needs it will report NVRTC unavailable." >&2
  fi
  if [[ -z "${KVKERNELS_NVRTC:-}" && -e "$NVRTC_CACHE_LIB" ]]; then
    export KVKERNELS_NVRTC="$PWD/$NVRTC_CACHE_LIB"
  fi
}

build_solution() {
  local log
  log="$(mktemp)"
  echo "build.sh: dotnet build $SOLUTION -c $CONFIG"
  if ! dotnet build "$SOLUTION" -c "$CONFIG" -nologo -v q >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "build FAILED (dotnet build $SOLUTION -c $CONFIG)"
  fi
  rm -f "$log"
}

kvcheck() {
  [[ -f "$KVCHECK_DLL" ]] || die "$KVCHECK_DLL not found after the build (is tools/KvCheck in $SOLUTION?)"
  dotnet "$KVCHECK_DLL" "$@"
}

# One line per test assembly from its xunit v3 XML: "total N, passed N, failed N, skipped N".
xml_counts() {
  local file="$1" element attr value out=""
  element="$(grep -o '<assembly [^>]*>' "$file" | head -n 1 || true)"
  [[ -n "$element" ]] || { echo "no <assembly> element in $file"; return; }
  for attr in total passed failed skipped errors; do
    value="$(sed -n "s/.* $attr=\"\([0-9]*\)\".*/\1/p" <<<"$element")"
    out+="${out:+, }$attr ${value:-?}"
  done
  echo "$out"
}

verb_run() {
  [[ $# -eq 0 ]] || die "run takes no arguments (got: $*); use ./build.sh bench ... or dotnet $KVCHECK_DLL ..."
  ensure_nvrtc
  build_solution
  local rc=0
  kvcheck verify || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "build.sh: KvCheck verify FAILED (exit $rc); compile and bench skipped." >&2
    return "$rc"
  fi
  # Every shipped kernel through NVRTC (registers, spills); exit 2 means no NVRTC here: say so and go on.
  kvcheck compile || rc=$?
  if [[ $rc -eq 2 ]]; then
    echo "build.sh: warning: NVRTC unavailable, kernels not compiled." >&2
    rc=0
  elif [[ $rc -ne 0 ]]; then
    echo "build.sh: KvCheck compile FAILED (exit $rc); bench skipped." >&2
    return "$rc"
  fi
  kvcheck bench --quick
}

verb_test() {
  export KVKERNELS_REQUIRE_NVRTC=1
  ensure_nvrtc
  build_solution
  mkdir -p "$TEST_RESULTS"
  rm -f "$TEST_RESULTS"/*.xml

  local project dir name dll xml rc failed=0 ran=0
  local -a summary=() runner_args=()
  # Colour codes only on a terminal, not in CI logs.
  [[ -t 1 ]] || runner_args+=(-noColor)
  for project in tests/*/*.csproj; do
    [[ -e "$project" ]] || continue
    dir="$(dirname "$project")"
    name="$(basename "$project" .csproj)"
    [[ "$name" == "$(basename "$dir")" ]] || continue
    dll="$dir/bin/$CONFIG/$TFM/$name.dll"
    xml="$TEST_RESULTS/$name.xml"
    ran=$((ran + 1))
    if [[ ! -f "$dll" ]]; then
      echo "build.sh: $dll not found after the build (is $project in $SOLUTION?)" >&2
      summary+=("$name: FAILED (no test assembly at $dll)")
      failed=1
      continue
    fi
    echo "build.sh: dotnet $dll -xml $xml ${runner_args[*]} $*"
    rc=0
    dotnet "$dll" -xml "$PWD/$xml" "${runner_args[@]}" "$@" </dev/null || rc=$?
    if [[ -f "$xml" ]]; then
      summary+=("$name: $([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)") — $(xml_counts "$xml")")
    else
      summary+=("$name: $([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)") — no results file")
    fi
    [[ $rc -eq 0 ]] || failed=1
  done
  [[ $ran -gt 0 ]] || die "no test projects under tests/"

  echo
  echo "Test summary:"
  printf '  %s\n' "${summary[@]}"
  return "$failed"
}

verb_bench() {
  ensure_nvrtc
  build_solution
  kvcheck bench "$@"
}

verb_compile() {
  ensure_nvrtc
  build_solution
  kvcheck compile "$@"
}

verb_pack() {
  echo "build.sh: dotnet pack $LIBRARY_PROJECT -c $CONFIG -o $PACKAGES_DIR"
  dotnet pack "$LIBRARY_PROJECT" -c "$CONFIG" -o "$PACKAGES_DIR" -nologo "$@"
}

verb="${1:-help}"
if [[ $# -gt 0 ]]; then shift; fi
case "$verb" in
  run) verb_run "$@" ;;
  test) verb_test "$@" ;;
  bench) verb_bench "$@" ;;
  compile) verb_compile "$@" ;;
  pack) verb_pack "$@" ;;
  -h|--help|help) usage ;;
  *) echo "build.sh: unknown verb '$verb'" >&2; usage >&2; exit 2 ;;
esac
