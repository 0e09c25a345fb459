#!/usr/bin/env bash
# The main job: installs what is missing, builds, serves the shipped model,
# samples a 4x4 grid with DDIM-50, scores 100 Fashion-MNIST test images and
# stops the server cleanly. Outputs land in out/demo/.
#
# Environment (optional): VDM_DEMO_PORT (default 50051), VDM_DEMO_METRICS_PORT
# (default 9090), VDM_DEMO_TRAIN_STEPS (default 300: used only when no trained
# model is shipped in model/checkpoints/).
set -euo pipefail
cd "$(dirname "$0")/.."

port=${VDM_DEMO_PORT:-50051}
metrics_port=${VDM_DEMO_METRICS_PORT:-9090}
model=model/checkpoints/fmnist.pt
out=out/demo
data=/usr/share/datasets/fashion-mnist
mkdir -p "$out"

scripts/install-deps.sh
scripts/build.sh --target vdm-server vdm-client vdm-train

if [ ! -f "$model" ]; then
  steps=${VDM_DEMO_TRAIN_STEPS:-300}
  echo "demo: no trained model in $model: training a small one first"
  echo "demo: ($steps steps at batch 64; about 0.5 steps/s on 2 cores, so ~$((steps * 2 / 60)) minutes)"
  /usr/bin/python3 model/net/export.py --config=model/net/configs/fmnist_unet.json \
    --out="$out/untrained.pt"
  t0=$(date +%s)
  build/vdm-train --data="$data" --init="$out/untrained.pt" --steps="$steps" \
    --batch=64 --test_images=1000 --out="$model"
  echo "demo: training took $(( $(date +%s) - t0 )) s"
fi

echo "demo: starting vdm-server on 127.0.0.1:$port (metrics on :$metrics_port)"
build/vdm-server --model="$model" --address="127.0.0.1:$port" \
  --metrics_address="127.0.0.1:$metrics_port" \
  >"$out/server.log" 2>&1 &
server_pid=$!
cleanup() { kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

client() { build/vdm-client --target="127.0.0.1:$port" "$@"; }
for _ in $(seq 1 120); do
  if client health >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: the server exited; its log:"; cat "$out/server.log"; exit 1
  fi
  sleep 0.5
done
client health

echo "demo: sampling 16 images of class 7 (sneaker) with DDIM-50, guidance 3"
client sample --num=16 --sampler=ddim --steps=50 --eta=0 --label=7 --guidance=3 \
  --seed=1 --out="$out/samples.png" --out_dir="$out/samples"

echo "demo: scoring 100 Fashion-MNIST test images (K=16)"
client score --idx="$data/t10k-images-idx3-ubyte.gz" --limit=100 --timesteps=16 \
  --seed=1 --csv="$out/scores.csv"

echo "demo: stopping the server (SIGTERM, graceful drain)"
kill -TERM "$server_pid"
wait "$server_pid" && echo "demo: server exited cleanly"
trap - EXIT

echo
echo "demo: sample grid:       $out/samples.png (one PNG per image in $out/samples/)"
echo "demo: per-image scores:  $out/scores.csv"
echo "demo: server log:        $out/server.log"
