#!/usr/bin/env bash
# Fixed against learned noise schedule (docs/schedule.md): the same small
# network (one export seed, so the same initial weights), data, batch, steps
# and learning rate, trained by vdm-train with --schedule=fixed and
# --schedule=learned_endpoints (the linear export) and --schedule=learned (the
# export with the monotone gamma network, whose initial shape is close to
# linear), the three runs at once; then, on the same test images, the
# VLB estimator's variance and the served per-image standard error at K
# (vdm-schedule-variance, the library scorer that ScoreBPD runs). A
# benchmark, not a test: short runs on a shared CPU.
#
#   bench/schedule_variance.sh [--config=model/net/configs/tiny.json]
#       [--steps=100] [--batch=16] [--lr=2e-3] [--schedule_lr_scale=10]
#       [--threads=1] [--images=128] [--repeats=4] [--keep=DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

config=model/net/configs/tiny.json
steps=100
batch=16
lr=2e-3
scale=10
threads=1
images=128
repeats=4
keep=""
for arg in "$@"; do
  case "$arg" in
    --config=*) config="${arg#*=}" ;;
    --steps=*) steps="${arg#*=}" ;;
    --batch=*) batch="${arg#*=}" ;;
    --lr=*) lr="${arg#*=}" ;;
    --schedule_lr_scale=*) scale="${arg#*=}" ;;
    --threads=*) threads="${arg#*=}" ;;
    --images=*) images="${arg#*=}" ;;
    --repeats=*) repeats="${arg#*=}" ;;
    --keep=*) keep="${arg#*=}" ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
for bin in build/vdm-train build/vdm-schedule-variance; do
  [ -x "$bin" ] || { echo "$bin missing: scripts/build.sh" >&2; exit 1; }
done
dir="${keep:-$(mktemp -d)}"
mkdir -p "$dir"
[ -n "$keep" ] || trap 'rm -rf "$dir"' EXIT

py=/usr/bin/python3
$py model/net/export.py --config="$config" --out="$dir/fixed_init.pt" --seed=0 \
  --schedule=fixed >/dev/null
$py model/net/export.py --config="$config" --out="$dir/learned_init.pt" --seed=0 \
  --schedule=learned >/dev/null

train() {  # name init schedule
  local start=$(date +%s)
  build/vdm-train --init="$2" --out="$dir/$1.pt" --schedule="$3" \
    --schedule_lr_scale="$scale" --steps="$steps" --batch="$batch" --lr="$lr" \
    --warmup_steps=10 --eval_every="$steps" --eval_images="$images" --eval_times=4 \
    --test_images=0 --checkpoint_every=0 --log_every=0 --samples_per_class=0 \
    --threads="$threads" --seed=0 2>"$dir/$1.log"
  grep "validation at step" "$dir/$1.log" | tail -1 | sed "s/^/$1: /"
  echo "$1: $(( $(date +%s) - start )) s of training"
}
# Both runs at once (one thread each by default), so that they share the
# machine's load alike.
train fixed "$dir/fixed_init.pt" fixed &
train endpoints "$dir/fixed_init.pt" learned_endpoints &
train learned "$dir/learned_init.pt" learned &
wait

build/vdm-schedule-variance \
  --models="$dir/fixed.pt,$dir/endpoints.pt,$dir/learned.pt" \
  --images="$images" --repeats="$repeats" --threads="$threads"
echo "(files in $dir${keep:+, kept})"
