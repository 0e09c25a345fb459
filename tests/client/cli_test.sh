#!/usr/bin/env bash
# vdm-client as a user runs it, against vdm-server with the tiny model:
# sample streams progress (plain lines when stderr is not a terminal) and
# writes previews; edit and inpaint write their images; score writes every
# CSV column (is_anomaly as 0/1 with a calibration) and the heat maps, and
# llr / background_bpd with a background model.
# Usage: cli_test.sh VDM_SERVER VDM_CLIENT MODEL.pt
set -euo pipefail
server_bin=$1 client_bin=$2 model=$3
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fail() { echo "FAIL: $*"; cat "$work/server.log"; exit 1; }
# A calibration for the tiny model: fitted by the server's own code through
# vdm-calibrate would need its dataset; a synthetic one (5 features) is
# enough to see the columns filled.
python3 - "$work/cal.json" <<'PY'
import json, random, sys
random.seed(1)
scores = sorted(random.gauss(0, 1) for _ in range(200))
d = 5
chol = [0.0] * (d * d)
for i in range(d): chol[i * d + i] = 1.0
json.dump({"format": "vdm-calibration/1", "bands": 4, "timesteps": 8,
           "shared_noise": False, "seed": 1, "data": "synthetic",
           "mean": [0.0] * d, "cholesky": chol, "log_normalizer": 4.6,
           "sorted_scores": scores}, open(sys.argv[1], "w"))
PY
"$server_bin" --model="$model" --address="127.0.0.1:$port" --metrics_address= \
  --threads=1 --calibration="$work/cal.json" >"$work/server.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  "$client_bin" --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
  sleep 0.2  # waiting for the server process to start
done
c="$client_bin --target=127.0.0.1:$port"

$c sample --num=2 --steps=20 --seed=1 --out="$work/grid.png" \
  --preview_dir="$work/previews" --preview_every=5 2>"$work/progress.txt" >/dev/null
grep -q "sample: 20/20 steps" "$work/progress.txt" || fail "no progress lines"
[ "$(grep -c '^sample: ' "$work/progress.txt")" -ge 5 ] || fail "too few progress lines"
[ -f "$work/grid.png" ] || fail "no grid"
n=$(ls "$work/previews" | wc -l); [ "$n" -eq 6 ] || fail "expected 3 previews x 2 images, found $n: $(ls "$work/previews")"

$c sample --num=1 --steps=5 --seed=2 --out= --out_dir="$work/one" >/dev/null 2>&1
python3 - "$work" <<'PY'
import sys, struct, zlib
work = sys.argv[1]
def png(path, w, h, pixels):
    def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    raw = b"".join(b"\0" + bytes(pixels[y * w:(y + 1) * w]) for y in range(h))
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
png(f"{work}/ref.png", 28, 28, [(i * 7) % 256 for i in range(784)])
png(f"{work}/mask.png", 28, 28, [255 if i % 28 < 14 else 0 for i in range(784)])
png(f"{work}/bad_mask.png", 20, 20, [255] * 400)
PY
$c inpaint --image="$work/ref.png" --mask="$work/mask.png" --num=2 --steps=5 \
  --out= --out_dir="$work/inpaint" >/dev/null 2>&1 || fail "inpaint"
[ "$(ls "$work/inpaint" | wc -l)" -eq 2 ] || fail "inpaint wrote no images"
$c edit --image="$work/ref.png" --strength=0.3 --num=1 --steps=5 --out="$work/edit.png" \
  >/dev/null 2>&1 || fail "edit"
$c edit --image="$work/ref.png" --strength_t=0.3 --num=1 --steps=5 --out="$work/edit_t.png" \
  >/dev/null 2>&1 || fail "edit --strength_t"
if $c edit --image="$work/ref.png" --strength=0.3 --strength_t=0.3 --steps=5 --out= \
    >"$work/err.txt" 2>&1; then fail "--strength with --strength_t was accepted"; fi
grep -q "INVALID_ARGUMENT" "$work/err.txt" && grep -q "strength_t" "$work/err.txt" ||
  fail "the strength error does not name the field: $(cat "$work/err.txt")"
if $c inpaint --image="$work/ref.png" --mask="$work/bad_mask.png" --steps=5 --out= \
    >"$work/err.txt" 2>&1; then fail "a wrong-size mask was accepted"; fi
grep -q "INVALID_ARGUMENT" "$work/err.txt" && grep -q "mask" "$work/err.txt" ||
  fail "the mask error does not name the field: $(cat "$work/err.txt")"

$c inpaint --image="$work/ref.png" --mask="$work/mask.png" --num=1 --steps=3 \
  --resample_rounds=2 --out= --out_dir="$work/repaint" >"$work/repaint.txt" 2>&1 || fail "inpaint --resample_rounds"
grep -q "network evaluations: 9" "$work/repaint.txt" || fail "RePaint cost: $(cat "$work/repaint.txt")"
if $c inpaint --image="$work/ref.png" --mask="$work/mask.png" --steps=3 --resample_rounds=1 \
    --sampler=dpm_solver_2m --out= >"$work/err.txt" 2>&1; then fail "dpm_solver_2m resampled"; fi
grep -q "resample_rounds" "$work/err.txt" || fail "resample error: $(cat "$work/err.txt")"

# encode / decode / interpolate: .npy latents, decoding, a one-row grid.
$c encode --image="$work/ref.png" --steps=6 --out="$work/z.npy" >"$work/enc.txt" 2>&1 || fail "encode: $(cat "$work/enc.txt")"
grep -q "network_evaluations: 6" "$work/enc.txt" || fail "encode cost: $(cat "$work/enc.txt")"
python3 - "$work/z.npy" <<'PY' || fail "not a float32 (1, 1, 28, 28) .npy"
import ast, struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:6] == b"\x93NUMPY"
n = struct.unpack("<H", data[8:10])[0]
header = ast.literal_eval(data[10:10 + n].decode())
assert header["descr"] == "<f4" and header["shape"] == (1, 1, 28, 28), header
assert len(data) == 10 + n + 4 * 784 and (10 + n) % 64 == 0
PY
$c decode --latent="$work/z.npy" --steps=6 --out= --out_dir="$work/dec" >"$work/dec.txt" 2>&1 || fail "decode: $(cat "$work/dec.txt")"
[ -f "$work/dec/sample_000.png" ] || fail "decode wrote no image"
grep -q "network evaluations: 6" "$work/dec.txt" || fail "decode cost"
$c interpolate --image="$work/ref.png" --image2="$work/one/sample_000.png" --num=4 \
  --steps=3 --out="$work/interp.png" >"$work/interp.txt" 2>&1 || fail "interpolate: $(cat "$work/interp.txt")"
grep -q "encode network_evaluations: 6" "$work/interp.txt" && grep -q "network evaluations: 12" "$work/interp.txt" ||
  fail "interpolate cost: $(cat "$work/interp.txt")"
python3 - "$work/interp.png" <<'PY' || fail "the interpolation grid is not one row of 4"
import struct, sys
w, h = struct.unpack(">II", open(sys.argv[1], "rb").read()[16:24])
assert w > 3.5 * h, (w, h)
PY
if $c decode --latent="$work/ref.png" --out= >"$work/err.txt" 2>&1; then fail "a PNG decoded as latents"; fi
grep -q "npy" "$work/err.txt" || fail "bad latent file error: $(cat "$work/err.txt")"

$c score --timesteps=8 --seed=1 --csv="$work/scores.csv" --map_dir="$work/maps" \
  --false_positive_rate=0.5 "$work/ref.png" "$work/one/sample_000.png" >"$work/score.txt" 2>&1 || fail "score: $(cat "$work/score.txt")"
head -1 "$work/scores.csv" | grep -q \
  "^index,bpd,prior_bpd,recon_bpd,diffusion_bpd,stderr_bpd,complexity_bpd,band_bpd_0,band_bpd_1,band_bpd_2,band_bpd_3,anomaly_score,p_value,is_anomaly$" ||
  fail "CSV header: $(head -1 "$work/scores.csv")"
[ "$(tail -n +2 "$work/scores.csv" | wc -l)" -eq 2 ] || fail "CSV rows"
tail -n +2 "$work/scores.csv" | awk -F, '{ if (NF != 14 || ($14 != "0" && $14 != "1") || $13 == "") exit 1 }' ||
  fail "calibrated columns missing: $(cat "$work/scores.csv")"
$c score --method=ode --ode_steps=2 --trace_samples=2 --seed=1 --csv="$work/ode.csv" \
  "$work/ref.png" >"$work/ode.txt" 2>&1 || fail "score --method=ode: $(cat "$work/ode.txt")"
tail -n +2 "$work/ode.csv" | awk -F, '{ if (NF != 17 || $15 != "8" || $16 == "" || $17 != "") exit 1 }' ||
  fail "ODE columns: $(cat "$work/ode.csv")"
if $c score --method=ode --ode_steps=5000 "$work/ref.png" >"$work/err.txt" 2>&1; then
  fail "ode_steps=5000 was accepted"; fi
grep -q "ode_steps" "$work/err.txt" || fail "the ode_steps error: $(cat "$work/err.txt")"
[ "$(ls "$work/maps" | wc -l)" -eq 2 ] || fail "no heat maps"
kill -TERM "$pid"; wait "$pid" || true

# With a background model (the model itself: the likelihood ratio is 0),
# score adds the llr and background_bpd columns.
"$server_bin" --model="$model" --address="127.0.0.1:$port" --metrics_address= \
  --threads=1 --calibration=none --background_model="$model" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  "$client_bin" --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
  sleep 0.2  # waiting for the server process to start
done
$c score --timesteps=4 --seed=1 --csv="$work/llr.csv" "$work/ref.png" "$work/one/sample_000.png" \
  >"$work/score.txt" 2>&1 || fail "score with a background model: $(cat "$work/score.txt")"
head -1 "$work/llr.csv" | grep -q ",anomaly_score,p_value,is_anomaly,llr,background_bpd$" ||
  fail "CSV header with a background model: $(head -1 "$work/llr.csv")"
tail -n +2 "$work/llr.csv" | awk -F, '{ if (NF != 16 || $15 != "0.000000" || $16 != $2) exit 1 }' ||
  fail "llr columns: $(cat "$work/llr.csv")"
kill -TERM "$pid"; wait "$pid" || true
echo "PASS: vdm-client sample/edit/inpaint/encode/decode/interpolate/score write what they promise"
