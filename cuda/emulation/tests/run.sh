#!/usr/bin/env bash
# Builds libkvk_emu.so, the test kernels and cuda/paging/paging.cu (two specialisations) against the
# emulator shim, and runs emu_test. Usage: cuda/emulation/tests/run.sh [--ucontext]
#   --ucontext   also build and run the portable ucontext fiber switch instead of the x86-64 one
# Build output goes to $KVK_EMU_BUILD_DIR (default: a fresh temporary directory).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda="$(cd "$here/../.." && pwd)"          # the cuda/ tree: kernels include "common/...", "paging/..."
out="${KVK_EMU_BUILD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kvk_emu_tests.XXXXXX")}"
mkdir -p "$out"
CXX="${CXX:-g++}"

run_variant() {
    local dir="$1"; shift
    mkdir -p "$dir"
    # the runtime: the lead's command + warnings, a soname and -z nodelete (its signal handler and worker
    # threads must outlive any dlclose), + variant flags
    $CXX -std=c++17 -O2 -g -fPIC -shared -pthread -Wall -Wextra -Wl,-soname,libkvk_emu.so -Wl,-z,nodelete "$@" \
        "$cuda/emulation/kvk_emu_runtime.cpp" -o "$dir/libkvk_emu.so"
    # kernel libraries: the wrapper .cpp includes the shim, then the .cu unchanged
    local kflags=(-std=c++17 -O1 -g -fPIC -shared -pthread -fstack-clash-protection -Wall -I"$cuda")
    local link=(-L"$dir" -lkvk_emu -Wl,-rpath,"$dir")
    $CXX "${kflags[@]}" "$here/emu_test_kernels_wrapper.cpp" "${link[@]}" -o "$dir/emu_test_kernels.so" &
    $CXX "${kflags[@]}" "$here/paging_wrapper.cpp" "${link[@]}" -o "$dir/paging_nhd16.so" &
    $CXX "${kflags[@]}" -DKV_LAYOUT_HND=1 -DVEC_BYTES=8 "$here/paging_wrapper.cpp" "${link[@]}" -o "$dir/paging_hnd8.so" &
    # the driver does not link the runtime: it dlopens it, as the .NET side does
    $CXX -std=c++17 -O1 -g -pthread -Wall "$here/emu_test.cpp" -ldl -o "$dir/emu_test" &
    wait
    "$dir/emu_test" "$dir/libkvk_emu.so" "$dir/emu_test_kernels.so" "$dir/paging_nhd16.so" "$dir/paging_hnd8.so"
}

echo "== x86-64 context switch (default) =="
run_variant "$out/default"
if [[ "${1:-}" == "--ucontext" ]]; then
    echo "== ucontext context switch =="
    run_variant "$out/ucontext" -DKVK_EMU_USE_UCONTEXT
fi
