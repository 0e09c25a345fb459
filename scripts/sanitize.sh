#!/usr/bin/env bash
# Builds vdm-serve with AddressSanitizer + UBSan (g++ -O1, the option
# VDM_WITH_SANITIZERS, UBSan errors fatal) into build-asan/ and runs its
# tests under ctest: the GoogleTest suites and the scripted server tests.
# Usage: scripts/sanitize.sh [extra ctest args, e.g. -R ImageIo]
#
# Not run here: the deployment checks (label "deploy": they lint manifests
# and Dockerfiles, start three servers or read a dashboard; none exercises
# code the suites do not, and deploy_replicas is timing-sensitive).
# server_soak_test runs: its RSS criterion (the last quarter's median within 20% of the second's)
# held under ASan (+2%: the quarantine of freed memory fills up early).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
jobs=$(nproc 2>/dev/null || echo 2)
dir=build-asan
# ccache keys on paths below the checkout relative to it (see build.sh).
export CCACHE_BASEDIR="$PWD"
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

# The sanitizers' run-time options, also needed while building: the test
# binaries run at build time to list their tests (gtest_discover_tests).
supp="$PWD/tests/sanitizers"
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=0:allocator_may_return_null=0${VDM_ASAN_EXTRA:+:$VDM_ASAN_EXTRA}"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$supp/ubsan.supp"

if [ ! -f "$dir/CMakeCache.txt" ]; then
  echo "sanitize: configuring $dir/ (g++, -O1, ASan + UBSan)"
  # A build type of its own: CMakeLists.txt fixes RelWithDebInfo's flags.
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Sanitize \
    -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1 -DNDEBUG -fno-sanitize-recover=undefined" \
    -DVDM_WITH_SANITIZERS=ON "${launcher[@]}" >/dev/null
fi
# Everything (the test binaries and the programs the script tests start),
# so that a new test finds what it runs.
echo "sanitize: compiling with $jobs jobs"
b0=$(date +%s)
cmake --build "$dir" -j"$jobs"
echo "sanitize: build done in $(( $(date +%s) - b0 )) s"

echo "sanitize: running ctest (ASan + UBSan; the deploy checks excluded)"
r0=$(date +%s)
if ! ctest --test-dir "$dir" --output-on-failure -j2 --timeout 900 \
    -LE deploy "$@"; then
  # Leak reports above come from the fast unwinder, which stops at the first
  # frame without a frame pointer (libstdc++): run the failures once more
  # with the slow one, for whole allocation stacks.
  echo "sanitize: FAILED; the failed tests again with full allocation stacks:"
  ASAN_OPTIONS="$ASAN_OPTIONS:fast_unwind_on_malloc=0" \
    ctest --test-dir "$dir" --output-on-failure --rerun-failed --timeout 900 || true
  echo "sanitize: FAILED after $(( $(date +%s) - start )) s"
  exit 1
fi
echo "sanitize: tests done in $(( $(date +%s) - r0 )) s; all in $(( $(date +%s) - start )) s"
