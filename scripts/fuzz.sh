#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, -DVDM_FUZZ=ON, ASan +
# UBSan) into build-fuzz/ and runs each for SECONDS_PER_TARGET seconds
# (default 30) on a copy of its seed corpus (tests/fuzz/corpus/<target>/), so
# the repository is not modified. Targets run side by side, one per core.
# Prints each target's executions; exits non-zero if any target crashed,
# with the reproducer's path (build-fuzz/artifacts/<target>/) in the output.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   e.g. scripts/fuzz.sh 3600
# VDM_FUZZ_TARGETS="png_fuzzer idx_fuzzer" runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi
start=$(date +%s)
jobs=$(nproc 2>/dev/null || echo 2)
dir=build-fuzz
read -r -a targets <<<"${VDM_FUZZ_TARGETS:-png_fuzzer idx_fuzzer validation_fuzzer metadata_fuzzer}"
export CCACHE_BASEDIR="$PWD"
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
if [ ! -f "$dir/CMakeCache.txt" ]; then
  echo "fuzz: configuring $dir/ (clang, VDM_FUZZ=ON)"
  CC=clang CXX=clang++ cmake -S . -B "$dir" -DVDM_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" >/dev/null
fi
echo "fuzz: compiling ${targets[*]} with $jobs jobs"
b0=$(date +%s)
cmake --build "$dir" -j"$jobs" --target "${targets[@]}"
echo "fuzz: build done in $(( $(date +%s) - b0 )) s"

export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:allocator_may_return_null=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
work=$(mktemp -d "${TMPDIR:-/tmp}/vdm-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# run_one TARGET: fuzzes into $work/TARGET.log; artifacts (crash-*, oom-*,
# timeout-*, leak-*) go to build-fuzz/artifacts/TARGET/.
run_one() {
  local t=$1 rc
  local corpus="$work/corpus-$t" art="$PWD/$dir/artifacts/$t"
  mkdir -p "$corpus" "$art"
  cp -R tests/fuzz/corpus/"$t"/. "$corpus"/
  # -timeout: one input running longer than this is a hang (reported as a
  # crash). The outer timeout only guards against libFuzzer itself hanging.
  timeout -k 10 $(( seconds + 120 )) "$dir/tests/fuzz/$t" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=25 \
    -print_final_stats=1 -artifact_prefix="$art/" "$corpus" \
    >"$work/$t.log" 2>&1 && rc=0 || rc=$?
  echo "$rc" >"$work/$t.rc"
}

echo "fuzz: running ${#targets[*]} targets for $seconds s each, $jobs at a time"
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$(( running - 1 )); fi
  run_one "$t" &
  running=$(( running + 1 ))
done
wait

failed=()
for t in "${targets[@]}"; do
  rc=$(cat "$work/$t.rc" 2>/dev/null || echo 255)
  log="$work/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  if [ -z "$execs" ]; then
    execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)
  fi
  corpus_size=$(find "$work/corpus-$t" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $t: ${execs:-?} executions, corpus $corpus_size inputs, no crash"
  else
    failed+=("$t")
    artifact=$(grep -o 'Test unit written to .*' "$log" | sed 's/Test unit written to //' | tail -1 || true)
    echo "fuzz: $t: FAILED (exit $rc) after ${execs:-?} executions; reproducer: ${artifact:-none written}"
    echo "fuzz: ---- $t: the end of libFuzzer's output ----"
    tail -n 60 "$log" | sed "s/^/  $t| /"
    if [ -n "$artifact" ]; then
      # The slow unwinder gives whole allocation stacks for leaks.
      echo "fuzz: reproduce with: ASAN_OPTIONS=fast_unwind_on_malloc=0 $dir/tests/fuzz/$t $artifact"
    fi
  fi
done
elapsed=$(( $(date +%s) - start ))
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (in $elapsed s)"
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran $seconds s each without a crash (in $elapsed s)"
