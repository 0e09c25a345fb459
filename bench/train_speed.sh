#!/usr/bin/env bash
# Training speed: the C++ trainer `vdm-train` against the plain PyTorch loop
# model/net/train_reference.py, on the same exported network, the same data
# (Fashion-MNIST), batch, steps and intra-op threads, in one run. A benchmark,
# not a test. Prints both steps/s and the ratio C++/Python (> 1: C++ faster).
#
#   bench/train_speed.sh [--config=model/net/configs/fmnist_unet.json]
#       [--steps=20] [--batch=64] [--threads=1] [--rounds=1]
#       [--vdm_train=build/vdm-train] [--py_malloc_tuned] [--keep=DIR]
#
# Each round runs both trainers back to back, alternating which goes first
# (round 1: C++ first), from the same untrained export (export.py --seed=0);
# with several rounds the reported steps/s are the means over rounds. Both
# print `steps_per_second=`, timed over the steps after the first two (the
# TorchScript profiling runs) and excluding data loading, evaluation and
# checkpoints.
#
# Work per step (same: antithetic times, the continuous-time VLB in bits/dim
# with gamma'(t) by autograd, the 256-way discrete decoder, label dropout 0.1,
# AdamW lr 1e-3, weight decay 0.01). Different -- all of it extra work for
# the C++ trainer, so the comparison favours Python:
#   - vdm-train clips the gradient norm (--grad_clip=1; the norm is computed
#     even with clipping off) and updates an EMA of the weights every step;
#   - vdm-train applies weight decay to weight matrices only (no measurable
#     cost); its learning-rate warm-up is turned off here (--warmup_steps=0)
#     so that both losses follow the same course (printed as a sanity check);
#   - vdm-train sets glibc malloc to keep freed memory (mallopt in main.cc);
#     the Python loop runs with the allocator as Debian ships it, as a user
#     would. --py_malloc_tuned gives Python the same tuning through
#     GLIBC_TUNABLES for a like-for-like allocator.
#
# Installs nothing: it needs a built vdm-train (scripts/build.sh, or
# `cmake --build build --target vdm-train`) and an interpreter with torch
# (Debian's /usr/bin/python3 with python3-torch: scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

config=model/net/configs/fmnist_unet.json
steps=20
batch=64
threads=1
rounds=1
vdm_train=""
keep=""
py_malloc_tuned=0

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
  case "$arg" in
    --config=*) config="${arg#*=}" ;;
    --steps=*) steps="${arg#*=}" ;;
    --batch=*) batch="${arg#*=}" ;;
    --threads=*) threads="${arg#*=}" ;;
    --rounds=*) rounds="${arg#*=}" ;;
    --vdm_train=*) vdm_train="${arg#*=}" ;;
    --keep=*) keep="${arg#*=}" ;;
    --py_malloc_tuned) py_malloc_tuned=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "train_speed: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
for v in steps batch threads rounds; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
    echo "train_speed: --$v must be a positive integer, got '${!v}'" >&2
    exit 2
  fi
done
if (( steps < 3 )); then
  echo "train_speed: --steps must be >= 3 (the first two steps are not timed)" >&2
  exit 2
fi
[ -f "$config" ] || { echo "train_speed: no config file $config" >&2; exit 2; }

# The C++ trainer: --vdm_train, else build/vdm-train, else the newest
# build/*/vdm-train.
if [ -z "$vdm_train" ]; then
  if [ -x build/vdm-train ]; then
    vdm_train=build/vdm-train
  else
    vdm_train=$(ls -t build/*/vdm-train 2>/dev/null | head -n 1 || true)
  fi
fi
if [ -z "$vdm_train" ] || [ ! -x "$vdm_train" ]; then
  echo "train_speed: vdm-train not found${vdm_train:+ at $vdm_train}; build it" \
       "with scripts/build.sh (or cmake --build build --target vdm-train)," \
       "or pass --vdm_train=PATH" >&2
  exit 1
fi

# An interpreter that can import torch (Debian's python3-torch works only
# under /usr/bin/python3).
python=""
for p in /usr/bin/python3 python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import torch' 2>/dev/null; then
    python=$(command -v "$p"); break
  fi
done
if [ -z "$python" ]; then
  echo "train_speed: no python3 that can 'import torch'; install Debian's" \
       "python3-torch (scripts/install-deps.sh) and use /usr/bin/python3" >&2
  exit 1
fi

if [ -n "$keep" ]; then
  work="$keep"; mkdir -p "$work"
else
  work=$(mktemp -d /tmp/train_speed.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi

echo "train_speed: config=$config steps=$steps batch=$batch threads=$threads" \
     "rounds=$rounds py_malloc_tuned=$py_malloc_tuned"
echo "train_speed: vdm-train=$vdm_train python=$python" \
     "torch=$("$python" -c 'import torch; print(torch.__version__)')" \
     "cores=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
"$python" model/net/export.py --config="$config" --seed=0 --no_verify \
  --out="$work/untrained.pt" >"$work/export.log" 2>&1 || {
  cat "$work/export.log" >&2; echo "train_speed: export failed" >&2; exit 1; }

# Runs one trainer; prints its steps_per_second (its log goes to $work).
run_cpp() {
  local log="$work/cpp.$1.log"
  "$vdm_train" --init="$work/untrained.pt" --out="$work/cpp.pt" \
    --steps="$steps" --batch="$batch" --threads="$threads" \
    --eval_every=0 --eval_images=0 --test_images=0 --pictures=false \
    --checkpoint_every=0 --warmup_steps=0 --log_every=1 --seed=0 \
    >"$log" 2>&1 || {
    cat "$log" >&2; echo "train_speed: vdm-train failed" >&2; return 1; }
  sed -n 's/^steps_per_second=//p' "$log" | tail -n 1
}
run_py() {
  local log="$work/py.$1.log"
  local env=()
  if (( py_malloc_tuned )); then
    # The same as vdm-train's mallopt: no mmap below 1 GiB, no trimming.
    env=(env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=268435456)
  fi
  "${env[@]}" "$python" model/net/train_reference.py --model="$work/untrained.pt" \
    --steps="$steps" --batch="$batch" --threads="$threads" --warmup_steps=2 \
    --log_every="$steps" --seed=0 >"$log" 2>&1 || {
    cat "$log" >&2; echo "train_speed: train_reference.py failed" >&2; return 1; }
  sed -n 's/^steps_per_second=//p' "$log" | tail -n 1
}

cpp_all=()
py_all=()
for ((r = 1; r <= rounds; r++)); do
  if (( r % 2 == 1 )); then
    c=$(run_cpp "$r"); p=$(run_py "$r")
  else
    p=$(run_py "$r"); c=$(run_cpp "$r")
  fi
  if [ -z "$c" ] || [ -z "$p" ]; then
    echo "train_speed: a trainer printed no steps_per_second (logs in $work)" >&2
    exit 1
  fi
  echo "round $r: cpp_steps_per_second=$c python_steps_per_second=$p" \
       "(last-step loss: cpp $(sed -n 's/.*loss \([0-9.]*\) .*/\1/p' "$work/cpp.$r.log" | tail -n 1)" \
       "python $(sed -n 's/.* bpd=\([0-9.]*\) .*/\1/p' "$work/py.$r.log" | tail -n 1) bpd)"
  cpp_all+=("$c"); py_all+=("$p")
done

awk -v c="${cpp_all[*]}" -v p="${py_all[*]}" -v s="$steps" -v b="$batch" \
    -v t="$threads" 'BEGIN {
  n = split(c, cs, " "); split(p, ps, " ");
  for (i = 1; i <= n; i++) { cm += cs[i] / n; pm += ps[i] / n }
  printf "cpp_steps_per_second=%.4f\n", cm;
  printf "python_steps_per_second=%.4f\n", pm;
  printf "ratio_cpp_over_python=%.3f\n", cm / pm;
  printf "train_speed: %d steps, batch %d, %d threads: vdm-train %s the PyTorch loop\n",
         s, b, t, (cm >= pm ? "is at least as fast as" : "is SLOWER than");
}'
