#!/usr/bin/env bash
# Served throughput of vdm-server --precision=bf16 against --precision=fp32
# (docs/performance.md, "The precision table"): each server is started alone
# with the same flags (by default the server's own defaults, i.e.
# --devices=auto), the two alternate round by round, and three loads run
# against each: Sample-only with full batches, Sample-only with small guided
# calls, and a mixed load (half ScoreBPD, scored in fp32 unless
# --score_precision=same is passed). Prints every run, then the mean network
# evaluations/s per load and precision and the bf16/fp32 ratio. A benchmark,
# not a test; it needs scripts/build.sh to have built vdm-server, vdm-bench
# and vdm-client.
#
#   bench/precision_served.sh [--rounds=3] [--port=50196]
#       [--model=model/checkpoints/fmnist.pt] [-- extra vdm-server flags]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
port=50196
model=model/checkpoints/fmnist.pt
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds=*) rounds="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --model=*) model="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1 (server flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
for bin in build/vdm-server build/vdm-bench build/vdm-client; do
  [ -x "$bin" ] || { echo "$bin missing: scripts/build.sh" >&2; exit 1; }
done

declare -A loads=(
  [sample_full]="--score_fraction=0 --concurrency=8 --requests=16 --sample_images=8 --guidance_every=0"
  [sample_small]="--score_fraction=0 --concurrency=4 --requests=8 --sample_images=4 --guidance_every=2"
  [mixed]="--score_fraction=0.5 --concurrency=4 --requests=8 --sample_images=4 --score_images=4 --timesteps=16 --guidance_every=2"
)
order=(sample_full sample_small mixed)
results=$(mktemp)
log=$(mktemp)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null || true
  rm -f "$results" "$log"
}
trap cleanup EXIT

echo "precision_served: $rounds rounds, model $model, server flags: ${extra[*]:-(defaults)}"
for round in $(seq "$rounds"); do
  for precision in fp32 bf16; do
    build/vdm-server --model="$model" --address="127.0.0.1:$port" --metrics_address= \
      --precision="$precision" "${extra[@]}" >"$log" 2>&1 &
    server_pid=$!
    for _ in $(seq 120); do
      build/vdm-client --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
      kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
      sleep 1
    done
    [ "$round" = 1 ] && [ "$precision" = fp32 ] && grep -o "vdm-server: [0-9]* replica.*" "$log" || true
    for load in "${order[@]}"; do
      # shellcheck disable=SC2086
      rate=$(build/vdm-bench --target="127.0.0.1:$port" --model= --raw_seconds=0 \
        --sample_steps=10 ${loads[$load]} 2>&1 |
        sed -n 's/^network evaluations\/s (served): //p')
      [ -n "$rate" ] || { echo "vdm-bench gave no rate for $load" >&2; exit 1; }
      echo "round $round $precision $load: $rate network evaluations/s"
      echo "$load $precision $rate" >>"$results"
    done
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=""
  done
done

echo
printf '%-14s %10s %10s %8s\n' load fp32 bf16 bf16/fp32
for load in "${order[@]}"; do
  awk -v load="$load" '
    $1 == load { sum[$2] += $3; n[$2]++ }
    END {
      f = sum["fp32"] / n["fp32"]; b = sum["bf16"] / n["bf16"]
      printf "%-14s %10.1f %10.1f %7.2fx\n", load, f, b, b / f
    }' "$results"
done
