#!/usr/bin/env bash
# Makes docs/images/editing.png, the README's picture of the editing calls:
# one row each for inpainting (reference, mask, 6 results), image-to-image
# (reference, then 6 results at strength_t 0.9, the time t = 0.9, i.e.
# strength 0.96, towards class 1, trouser) and
# negative-label guidance (6 samples of class 9, ankle boot, pushed away
# from class 7, sneaker; then 6 without the negative label) and
# interpolation (test images 0 and 1 encoded by DDIM inversion, their
# latents slerped at 8 points and decoded), all with the shipped model
# through vdm-server and vdm-client.
# Usage: scripts/editing_figure.sh   (after scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
build/vdm-server --model=model/checkpoints/fmnist.pt --address=127.0.0.1:$port \
  --metrics_address= --threads=2 >"$work/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  build/vdm-client --target=127.0.0.1:$port health >/dev/null 2>&1 && break
  sleep 0.2  # waiting for the server process to start
done
# The reference: Fashion-MNIST test image 0 (an ankle boot); the mask keeps
# its left half.
/usr/bin/python3 - "$work" <<'PY'
import gzip, sys
import numpy as np
from PIL import Image
work = sys.argv[1]
with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
    data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
Image.fromarray(data[0]).save(f"{work}/reference.png")
Image.fromarray(data[1]).save(f"{work}/second.png")
mask = np.zeros((28, 28), np.uint8); mask[:, :14] = 255
Image.fromarray(mask).save(f"{work}/mask.png")
PY
c="build/vdm-client --target=127.0.0.1:$port"
$c inpaint --image="$work/reference.png" --mask="$work/mask.png" --num=6 \
  --steps=50 --seed=3 --out= --out_dir="$work/inpaint" >/dev/null
$c edit --image="$work/reference.png" --strength_t=0.9 --label=1 --guidance=3 \
  --num=6 --steps=50 --seed=3 --out= --out_dir="$work/edit" >/dev/null
$c sample --label=9 --guidance=3 --negative_label=7 --num=6 --steps=50 \
  --seed=3 --out= --out_dir="$work/negative" >/dev/null
$c sample --label=9 --guidance=3 --num=6 --steps=50 --seed=3 --out= \
  --out_dir="$work/positive" >/dev/null
$c interpolate --image="$work/reference.png" --image2="$work/second.png" \
  --num=8 --steps=50 --out= --out_dir="$work/interpolate" >/dev/null
/usr/bin/python3 - "$work" docs/images/editing.png <<'PY'
import sys, glob
import numpy as np
from PIL import Image
work, out = sys.argv[1], sys.argv[2]
def load(p): return np.array(Image.open(p).convert("L"))
blank = np.full((28, 28), 255, np.uint8)
ref, mask = load(f"{work}/reference.png"), load(f"{work}/mask.png")
rows = [
    [ref, mask] + [load(p) for p in sorted(glob.glob(f"{work}/inpaint/*.png"))],
    [ref, blank] + [load(p) for p in sorted(glob.glob(f"{work}/edit/*.png"))],
    [blank, blank] + [load(p) for p in sorted(glob.glob(f"{work}/negative/*.png"))],
    [blank, blank] + [load(p) for p in sorted(glob.glob(f"{work}/positive/*.png"))],
    [load(p) for p in sorted(glob.glob(f"{work}/interpolate/*.png"))],
]
pad = 2
h = len(rows) * (28 + pad) + pad; w = 8 * (28 + pad) + pad
grid = np.full((h, w), 160, np.uint8)  # gray frames between the cells
for r, row in enumerate(rows):
    for c, im in enumerate(row):
        y, x = pad + r * (28 + pad), pad + c * (28 + pad)
        grid[y:y + 28, x:x + 28] = im
Image.fromarray(grid).resize((w * 3, h * 3), Image.NEAREST).save(out)
print("wrote", out)
PY
