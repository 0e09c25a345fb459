#!/usr/bin/env bash
# Served speed of the worker layouts (issue 25; docs/performance.md,
# "Lone requests"): in one alternated run, round by round, each layout's
# server is started alone and gets two loads: concurrent (4 callers x 8
# images, DDIM 25 steps, fp32) and lone (one caller, one 32-image DDIM-25
# request at a time). Prints the CPU, the raw forward rows/s of one thread,
# what --precision=auto picked, every run, then the mean network
# evaluations/s per layout and load and the ratios to the first layout. A
# benchmark, not a test; it needs scripts/build.sh to have built vdm-server,
# vdm-bench and vdm-client.
#
#   bench/speed.sh [--rounds=3] [--port=50197] [--model=model/checkpoints/fmnist.pt]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
port=50197
model=model/checkpoints/fmnist.pt
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds=*) rounds="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --model=*) model="${1#*=}" ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for bin in build/vdm-server build/vdm-bench build/vdm-client; do
  [ -x "$bin" ] || { echo "$bin missing: scripts/build.sh" >&2; exit 1; }
done

# name|vdm-server flags (fp32: the goal is about the fp32 forward).
layouts=(
  "2x1|--devices=cpu,cpu --threads=1 --lone_threads=0"
  "2x1+lone|--devices=cpu,cpu --threads=1 --lone_threads=2"
  "1x2|--devices=cpu --threads=2"
)
declare -A loads=(
  [concurrent]="--score_fraction=0 --concurrency=4 --requests=8 --sample_images=8 --sample_steps=25 --guidance_every=0"
  [lone]="--score_fraction=0 --concurrency=1 --requests=2 --sample_images=32 --sample_steps=25 --guidance_every=0"
)
order=(concurrent lone)
results=$(mktemp)
log=$(mktemp)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null || true
  rm -f "$results" "$log"
}
trap cleanup EXIT

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs," \
  "AMX: $(grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
echo "speed: $rounds rounds, model $model, fp32"
raw=$(build/vdm-bench --model="$model" --requests=0 --threads=1 --batch=32 \
  --raw_seconds=10 --target=127.0.0.1:1 2>&1 | sed -n 's/^raw forward.*: //p' | head -1 || true)
echo "raw forward, batch 32, 1 thread: ${raw:-(see vdm-bench)}"

start_server() {  # flags...
  build/vdm-server --model="$model" --address="127.0.0.1:$port" --metrics_address= \
    --precision=fp32 "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 120); do
    build/vdm-client --target="127.0.0.1:$port" health >/dev/null 2>&1 && return
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 1  # start-up (bounded)
  done
  echo "vdm-server did not start" >&2; exit 1
}
stop_server() {
  kill -TERM "$server_pid"
  wait "$server_pid" || true
  server_pid=""
}

# What --precision=auto picks on this CPU (its own start-up measurement).
build/vdm-server --model="$model" --address="127.0.0.1:$port" --metrics_address= \
  >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  build/vdm-client --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
  sleep 1  # start-up (bounded)
done
build/vdm-client --target="127.0.0.1:$port" info |
  grep -E '^(precision|precision_choice|fp32_rows_per_second|bf16_rows_per_second):' |
  sed 's/^/auto: /'
stop_server

for round in $(seq "$rounds"); do
  for entry in "${layouts[@]}"; do
    name=${entry%%|*}
    # shellcheck disable=SC2086
    start_server ${entry#*|}
    for load in "${order[@]}"; do
      # shellcheck disable=SC2086
      out=$(build/vdm-bench --target="127.0.0.1:$port" --model= --raw_seconds=0 \
        ${loads[$load]} 2>&1)
      rate=$(sed -n 's/^network evaluations\/s (served): //p' <<<"$out")
      [ -n "$rate" ] || { echo "$out" >&2; echo "vdm-bench gave no rate" >&2; exit 1; }
      echo "round $round $name $load: $rate network evaluations/s"
      echo "$name $load $rate" >>"$results"
    done
    stop_server
  done
done

echo
printf '%-10s %12s %12s %12s %14s\n' layout concurrent lone lone/conc "vs ${layouts[0]%%|*}"
first=${layouts[0]%%|*}
for entry in "${layouts[@]}"; do
  name=${entry%%|*}
  awk -v name="$name" -v first="$first" '
    { sum[$1 " " $2] += $3; n[$1 " " $2]++ }
    END {
      c = sum[name " concurrent"] / n[name " concurrent"]
      l = sum[name " lone"] / n[name " lone"]
      c0 = sum[first " concurrent"] / n[first " concurrent"]
      l0 = sum[first " lone"] / n[first " lone"]
      printf "%-10s %12.1f %12.1f %11.2fx %6.2fx / %.2fx\n", name, c, l, l / c, c / c0, l / l0
    }' "$results"
done
