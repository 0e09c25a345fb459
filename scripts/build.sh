#!/usr/bin/env bash
# Configures and builds vdm-serve into build/ (ccache is used when installed).
# Usage: scripts/build.sh [cmake --build args, e.g. --target vdm-server]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
# ccache keys on paths below the checkout relative to it, so every clone
# (CI builds a fresh one) shares the cache.
export CCACHE_BASEDIR="$PWD"
if [ ! -f build/CMakeCache.txt ]; then
  echo "build: configuring build/ (RelWithDebInfo)"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
echo "build: compiling with $jobs jobs $*"
start=$(date +%s)
cmake --build build -j"$jobs" "$@"
echo "build: done in $(( $(date +%s) - start )) s"
