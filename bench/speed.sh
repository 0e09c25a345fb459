#!/usr/bin/env bash
# The serving-speed benchmark (issue 25; docs/performance.md, "Serving
# speed"): everything in one alternated run, so the ratios are measured on
# the same machine in the same minutes.
#
#   1. the CPU (model name, AMX flags) and the raw forward rows/s of the
#      model, fp32 and bf16, on 1 and 2 threads (vdm-precision --mode=speed);
#   2. what --precision=auto picks at start-up, and the rates it measured;
#   3. round by round, each server layout started alone and given three
#      loads: concurrent (4 callers x 8 images, DDIM 25 steps), lone (one
#      32-image DDIM-25 request at a time) and small (one 1-image guided
#      DDIM-20 request at a time): network evaluations/s and p50 latency;
#   4. scoring: --images test images at K = 16, uniform times against the
#      calibration file's time proposal, alternated: images/s and the mean
#      per-image standard error.
#
# The first layout is the server as issue 25 measured it (two single-threaded
# replicas, no lone-request help, glibc's default mmap of large tensors,
# OpenBLAS's own pool of one thread per CPU, the network's own group norm and
# SiLU); the ratios are to it. 2x1+split-unfused is today's default layout
# without the fused group norm + SiLU, so the two beside it show what the
# fusion gains served. A benchmark, not a test; it needs scripts/build.sh to
# have built vdm-server, vdm-bench, vdm-client and vdm-precision.
#
#   bench/speed.sh [--rounds=3] [--port=50197] [--images=200]
#       [--model=model/checkpoints/fmnist.pt] [--skip_scoring]
#       [--layouts=2x1-old,2x1+split,...]   (default: all; the first is
#       always the old one, which the ratios need)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
port=50197
images=200
model=model/checkpoints/fmnist.pt
scoring=1
only=""
data=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds=*) rounds="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --images=*) images="${1#*=}" ;;
    --model=*) model="${1#*=}" ;;
    --skip_scoring) scoring=0 ;;
    --layouts=*) only=",${1#*=}," ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for bin in build/vdm-server build/vdm-bench build/vdm-client build/vdm-precision; do
  [ -x "$bin" ] || { echo "$bin missing: scripts/build.sh" >&2; exit 1; }
done
if [ "$scoring" = 1 ] && [ ! -r "$data" ]; then
  echo "$data missing (scripts/install-deps.sh installs dataset-fashion-mnist)" >&2
  exit 1
fi

# name|environment|vdm-server flags. fp32 but the last: the goal is about
# fp32.
all_layouts=(
  "2x1-old|OPENBLAS_NUM_THREADS=$(nproc)|--devices=cpu,cpu --threads=1 --lone_split=false --lone_threads=0 --heap_allocations=false --fuse_norm_silu=false --precision=fp32"
  "2x1+lone||--devices=cpu,cpu --threads=1 --lone_split=false --lone_threads=2 --precision=fp32"
  "2x1+split-unfused||--devices=cpu,cpu --threads=1 --lone_threads=0 --lone_split --fuse_norm_silu=false --precision=fp32"
  "2x1+split||--devices=cpu,cpu --threads=1 --lone_threads=0 --lone_split --precision=fp32"
  "1x2||--devices=cpu --threads=2 --precision=fp32"
  "2x1+split-bf16||--devices=cpu,cpu --threads=1 --lone_threads=0 --lone_split --precision=bf16"
)
layouts=()
for entry in "${all_layouts[@]}"; do
  name=${entry%%|*}
  if [ -z "$only" ] || [ "$name" = 2x1-old ] || [[ "$only" == *",$name,"* ]]; then
    layouts+=("$entry")
  fi
done
declare -A loads=(
  [concurrent]="--score_fraction=0 --concurrency=4 --requests=8 --sample_images=8 --sample_steps=25 --guidance_every=0"
  [lone]="--score_fraction=0 --concurrency=1 --requests=2 --sample_images=32 --sample_steps=25 --guidance_every=0"
  [small]="--score_fraction=0 --concurrency=1 --requests=6 --sample_images=1 --sample_steps=20 --guidance_every=1"
)
order=(concurrent lone small)
results=$(mktemp)
log=$(mktemp)
csv=$(mktemp)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null || true
  rm -f "$results" "$log" "$csv"
}
trap cleanup EXIT

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs," \
  "AMX: $(grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
echo "speed: $rounds rounds, model $model"
echo "raw forward (vdm-precision --mode=speed --batch=32 --threads_list=1,2 --rounds=3):"
build/vdm-precision --mode=speed --model="$model" --batch=32 --threads_list=1,2 \
  --rounds=3 2>&1 | grep -E 'threads=' | sed 's/^/  raw /'

start_server() {  # [NAME=VALUE ...] [flags...]
  local vars=() flags=() arg
  for arg in "$@"; do
    if [[ "$arg" == --* ]]; then flags+=("$arg"); else vars+=("$arg"); fi
  done
  env "${vars[@]}" build/vdm-server --model="$model" --address="127.0.0.1:$port" \
    --metrics_address= "${flags[@]}" >"$log" 2>&1 &
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
start_server
build/vdm-client --target="127.0.0.1:$port" info |
  grep -E '^(precision|precision_choice|fp32_rows_per_second|bf16_rows_per_second):' |
  sed 's/^/auto: /'
stop_server

score_once() {  # round, sampling
  local t0 t1
  t0=$(date +%s.%N)
  build/vdm-client --target="127.0.0.1:$port" score --idx="$data" --limit="$images" \
    --timesteps=16 --time_sampling="$2" --csv="$csv" >/dev/null
  t1=$(date +%s.%N)
  awk -F, -v t0="$t0" -v t1="$t1" -v n="$images" -v r="$1" -v s="$2" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    { se += $col["stderr_bpd"]; bpd += $col["bpd"]; m++ }
    END {
      printf "round %s scoring %s: %.2f images/s, mean bpd %.4f, mean stderr %.4f\n",
        r, s, n / (t1 - t0), bpd / m, se / m
      printf "scoring %s %.4f %.5f %.5f\n", s, n / (t1 - t0), se / m, bpd / m > "/dev/stderr"
    }' "$csv" 2>>"$results"
}

for round in $(seq "$rounds"); do
  for entry in "${layouts[@]}"; do
    name=${entry%%|*}
    rest=${entry#*|}
    # shellcheck disable=SC2086
    start_server ${rest%%|*} ${rest#*|}
    for load in "${order[@]}"; do
      # shellcheck disable=SC2086
      out=$(build/vdm-bench --target="127.0.0.1:$port" --model= --raw_seconds=0 \
        ${loads[$load]} 2>&1)
      rate=$(sed -n 's/^network evaluations\/s (served): //p' <<<"$out")
      p50=$(awk '/^kind/ { getline; print $3 }' <<<"$out")
      [ -n "$rate" ] || { echo "$out" >&2; echo "vdm-bench gave no rate" >&2; exit 1; }
      echo "round $round $name $load: $rate network evaluations/s, p50 ${p50} s"
      echo "$name $load $rate $p50" >>"$results"
    done
    stop_server
  done
  if [ "$scoring" = 1 ]; then
    start_server
    for sampling in uniform proposal; do score_once "$round" "$sampling"; done
    stop_server
  fi
done

echo
echo "mean over $rounds rounds: network evaluations/s (p50 latency, s); ratios to ${layouts[0]%%|*}"
printf '%-18s %18s %18s %18s %10s %10s %10s\n' layout concurrent lone small \
  lone/conc conc/old lone/old
first=${layouts[0]%%|*}
for entry in "${layouts[@]}"; do
  name=${entry%%|*}
  awk -v name="$name" -v first="$first" '
    $1 != "scoring" { sum[$1 " " $2] += $3; lat[$1 " " $2] += $4; n[$1 " " $2]++ }
    function mean(k) { return sum[k] / n[k] }
    function p50(k) { return lat[k] / n[k] }
    END {
      c = name " concurrent"; l = name " lone"; s = name " small"
      printf "%-18s %9.1f (%6.2f) %9.1f (%6.2f) %9.1f (%6.3f) %9.2fx %9.2fx %9.2fx\n",
        name, mean(c), p50(c), mean(l), p50(l), mean(s), p50(s),
        mean(l) / mean(c), mean(c) / mean(first " concurrent"),
        mean(l) / mean(first " concurrent")
    }' "$results"
done
if [ "$scoring" = 1 ]; then
  echo
  echo "scoring, $images test images, K = 16, server defaults (mean over rounds):"
  awk '$1 == "scoring" { r[$2] += $3; se[$2] += $4; b[$2] += $5; n[$2]++ }
    END {
      for (s in r) printf "  %-9s %6.2f images/s  mean stderr %.4f  mean bpd %.4f\n",
        s, r[s] / n[s], se[s] / n[s], b[s] / n[s]
      if (n["uniform"] && n["proposal"])
        printf "  stderr proposal/uniform: %.3f\n", (se["proposal"] / n["proposal"]) / (se["uniform"] / n["uniform"])
    }' "$results"
fi
