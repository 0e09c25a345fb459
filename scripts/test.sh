#!/usr/bin/env bash
# The test command: installs what is missing, builds everything, runs every
# test (GoogleTest suites through ctest, plus the deployment checks), then
# fuzzes (scripts/fuzz.sh, build-fuzz/) and runs the suites under ASan + UBSan
# (scripts/sanitize.sh, build-asan/).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh
scripts/build.sh
echo "test: running ctest"
ctest --test-dir build --output-on-failure -j2 --timeout 900
# Both run even when the first fails, so one CI run reports everything.
failed=()
echo "test: fuzzing (scripts/fuzz.sh 30: 4 libFuzzer targets, 30 s each, 2 at a time)"
scripts/fuzz.sh 30 || failed+=(fuzzing)
echo "test: sanitizers (scripts/sanitize.sh: the tests under ASan + UBSan)"
scripts/sanitize.sh || failed+=(sanitizers)
if [ ${#failed[@]} -gt 0 ]; then
  echo "test: FAILED: ${failed[*]} (after $(( $(date +%s) - start )) s)"
  exit 1
fi
echo "test: all passed in $(( $(date +%s) - start )) s (build included)"
