#!/usr/bin/env python3
"""Encode-then-decode reconstruction of Fashion-MNIST test images through a
running vdm-server (DDIM inversion with Encode, then Sample with latents):
mean absolute pixel error (0..255), mean per-image PSNR and the fraction of
exactly reconstructed pixels, per step count.

Usage: PYTHONPATH=build/python /usr/bin/python3 bench/encode_roundtrip.py \
         --target=127.0.0.1:50051 [--images=100] [--steps=50,200]
"""
import argparse
import gzip
import math
import time

import numpy as np

import vdm_client

parser = argparse.ArgumentParser()
parser.add_argument("--target", default="localhost:50051")
parser.add_argument("--images", type=int, default=100)
parser.add_argument("--steps", default="50,200")
parser.add_argument("--chunk", type=int, default=50)
parser.add_argument("--idx", default="/usr/share/datasets/fashion-mnist/"
                    "t10k-images-idx3-ubyte.gz")
args = parser.parse_args()
with gzip.open(args.idx) as f:
    x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
x = x[:args.images]
with vdm_client.Client(args.target, timeout=3600) as client:
    for steps in [int(s) for s in args.steps.split(",")]:
        start = time.monotonic()
        evaluations = 0
        y = []
        for begin in range(0, len(x), args.chunk):
            part = x[begin:begin + args.chunk]
            latents = client.encode(part, steps=steps)
            images = client.decode(latents, steps=steps)
            evaluations += latents.network_evaluations + images.network_evaluations
            y.extend(images)
        y = np.stack(y).astype(np.float64)
        err = np.abs(y - x.astype(np.float64))
        mse = (err ** 2).reshape(len(x), -1).mean(axis=1)
        psnr = [10 * math.log10(255.0 ** 2 / m) if m > 0 else float("inf")
                for m in mse]
        finite = [p for p in psnr if math.isfinite(p)]
        print(f"steps {steps}: {len(x)} images, mean |error| {err.mean():.2f} "
              f"(0..255), mean PSNR {np.mean(finite):.1f} dB "
              f"({len(psnr) - len(finite)} exact), exact pixels "
              f"{(err == 0).mean():.3f}, {evaluations} evaluations, "
              f"{time.monotonic() - start:.0f} s", flush=True)
