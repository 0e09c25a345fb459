#!/usr/bin/env bash
# Scoring with uniform times against the calibration file's time proposal,
# in one alternated run, and both against a K = 256 reference of the same
# test images (docs/performance.md, "Importance-sampled times").
#
#   bench/score_proposal.sh [--images=500] [--rounds=2] [--reference_csv=FILE] [-- vdm-score-proposal flags]
#
# The reference (500 images x 256 rows, ~40 min on one busy core) is
# computed once and kept in --reference_csv (default
# build/score_proposal_ref256.csv); later runs reuse it. Prints the CPU
# (model name, AMX flags) first.
set -euo pipefail
cd "$(dirname "$0")/.."
images=500
rounds=2
reference=build/score_proposal_ref256.csv
extra=()
for arg in "$@"; do
  case "$arg" in
    --images=*) images="${arg#*=}" ;;
    --rounds=*) rounds="${arg#*=}" ;;
    --reference_csv=*) reference="${arg#*=}" ;;
    --) ;;
    *) extra+=("$arg") ;;
  esac
done
if [[ ! -x build/vdm-score-proposal ]]; then
  scripts/build.sh --target vdm-score-proposal
fi
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), AMX flags: $(grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
echo "command: build/vdm-score-proposal --images=$images --rounds=$rounds --reference_csv=$reference ${extra[*]:-}"
exec build/vdm-score-proposal --images="$images" --rounds="$rounds" \
  --reference_csv="$reference" --threads=1 "${extra[@]}"
