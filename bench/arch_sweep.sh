#!/usr/bin/env bash
# Architecture sweep: validation BPD against CPU time on this machine. A
# benchmark, not a test. Each variant of model/net/configs/fmnist_unet.json
# (export.py --set KEY=VALUE overrides) is exported untrained (seed 0),
# trained by vdm-train for the same wall-clock budget on the same threads,
# stopped with SIGTERM (the checkpoint is written on the signal), and
# evaluated on the same 500 held-out training images with 4 stratified times
# per image (common random numbers: the same seed for every variant).
#
#   bench/arch_sweep.sh [--minutes=12] [--threads=1] [--vdm_train=build/vdm-train]
#       [--keep=DIR] [VARIANT ...]
#
# A VARIANT is a comma-separated list of config overrides, e.g.
# "channels=32" or "channels=48,num_res_blocks=2"; "base" is the config as
# it is. Default variants: channels=32, base (48), channels=64.
#
# Prints one line per variant (parameters, steps done, steps/s, training
# seconds, validation BPD with its standard error) and a table at the end.
# The EMA decay is 0.99 (not 0.999) so that a few hundred steps are not
# dominated by the initial weights. Short budgets favour small networks; the
# table says which network learns fastest per CPU second at this budget, not
# which one ends lowest after hours.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=12
threads=1
vdm_train=build/vdm-train
keep=""
variants=()
for arg in "$@"; do
  case "$arg" in
    --minutes=*) minutes=${arg#*=} ;;
    --threads=*) threads=${arg#*=} ;;
    --vdm_train=*) vdm_train=${arg#*=} ;;
    --keep=*) keep=${arg#*=} ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    --*) echo "arch_sweep.sh: unknown option $arg" >&2; exit 2 ;;
    *) variants+=("$arg") ;;
  esac
done
[ ${#variants[@]} -gt 0 ] || variants=(channels=32 base channels=64)
[ -x "$vdm_train" ] || { echo "arch_sweep.sh: no $vdm_train (run scripts/build.sh)" >&2; exit 1; }
python=/usr/bin/python3
"$python" -c 'import torch' 2>/dev/null ||
  { echo "arch_sweep.sh: $python has no torch (apt-get install python3-torch)" >&2; exit 1; }
data=/usr/share/datasets/fashion-mnist
[ -d "$data" ] || { echo "arch_sweep.sh: no $data (apt-get install dataset-fashion-mnist)" >&2; exit 1; }

if [ -n "$keep" ]; then work=$keep; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
echo "arch_sweep: ${#variants[@]} variants x ${minutes} min on $threads thread(s); files in $work"

results=()
for variant in "${variants[@]}"; do
  name=${variant//[^A-Za-z0-9=_]/_}
  sets=()
  if [ "$variant" != base ]; then
    IFS=, read -ra kvs <<<"$variant"
    for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
  fi
  params=$("$python" model/net/export.py --config=model/net/configs/fmnist_unet.json \
             "${sets[@]}" --out="$work/$name.init.pt" | sed -n 's/^parameters=//p')
  echo "--- $variant: $params parameters; training for $minutes min"
  set +e
  timeout -s TERM "${minutes}m" "$vdm_train" --init="$work/$name.init.pt" --out="$work/$name.pt" \
    --data="$data" --steps=1000000 --batch=64 --threads="$threads" --eval_every=0 \
    --eval_images=500 --test_images=0 --checkpoint_every=0 --pictures=false \
    --ema_decay=0.99 --log_every=100 --seed=0 >"$work/$name.train.log" 2>&1
  set -e
  steps=$(sed -n 's/^interrupted after \([0-9]*\) steps.* in \([0-9]*\) s.*/\1/p' "$work/$name.train.log")
  seconds=$(sed -n 's/^interrupted after \([0-9]*\) steps.* in \([0-9]*\) s.*/\2/p' "$work/$name.train.log")
  rate=$(sed -n 's/^steps_per_second=//p' "$work/$name.train.log")
  [ -n "$steps" ] || { tail -5 "$work/$name.train.log" >&2; echo "arch_sweep.sh: $variant did not stop cleanly" >&2; exit 1; }
  "$vdm_train" --init="$work/$name.pt" --out="$work/$name.eval.pt" --data="$data" --steps=0 \
    --threads="$threads" --eval_images=500 --eval_times=4 --test_images=0 --pictures=false \
    --seed=0 >"$work/$name.eval.log" 2>&1
  bpd=$(sed -n 's/^validation BPD *\([0-9.]*\) bpd +- \([0-9.]*\).*/\1 +- \2/p' "$work/$name.eval.log")
  [ -n "$bpd" ] || { cat "$work/$name.eval.log" >&2; echo "arch_sweep.sh: no validation BPD for $variant" >&2; exit 1; }
  line=$(printf '%-28s %9s %7s %8s %8s   %s' "$variant" "$params" "$steps" "$rate" "$seconds" "$bpd")
  echo "$line"
  results+=("$line")
done

echo
echo "arch_sweep: validation BPD (500 held-out images, K=4) after ${minutes} min on $threads thread(s)"
printf '%-28s %9s %7s %8s %8s   %s\n' variant params steps steps/s train_s "val BPD +- stderr"
printf '%s\n' "${results[@]}"
