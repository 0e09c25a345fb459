#!/usr/bin/env bash
# The test command: installs what is missing, builds everything, runs every
# test (GoogleTest suites through ctest, plus the deployment checks).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh
scripts/build.sh
echo "test: running ctest"
ctest --test-dir build --output-on-failure -j2 --timeout 900
echo "test: all passed in $(( $(date +%s) - start )) s (build included)"
