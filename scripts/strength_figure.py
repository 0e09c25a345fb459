#!/usr/bin/env python3
"""The README's strength figure and table: image-to-image edits at strengths
0.1 .. 1.0 under the noise-variance definition (`strength`, sigma^2 of the
start) and the time definition (`strength_t`, the old meaning of strength).

Starts build/vdm-server with the shipped model on a free loopback port,
edits Fashion-MNIST test images 0 .. N-1 (unguided, no label, DDIM-50, eta
0, seed 3 + image index, one result each) at every strength under both
definitions (1.0 = from pure noise: `Sample` with the same seed, which is
what an edit at strength 1 is), and prints the mean absolute pixel difference (0..255) from
the reference, the mean over the N images with its standard error, as a
Markdown table. Writes docs/images/strength.png: row 1 test image 0 under
`strength`, row 2 under `strength_t`, the reference first.

Usage (after scripts/build.sh):
  PYTHONPATH=build/python /usr/bin/python3 scripts/strength_figure.py \
      [--images=20] [--out=docs/images/strength.png]
"""

import argparse
import concurrent.futures
import gzip
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

import vdm_client

STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]
TEST_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="model/checkpoints/fmnist.pt")
    parser.add_argument("--server", default="build/vdm-server")
    parser.add_argument("--out", default="docs/images/strength.png")
    args = parser.parse_args()
    with gzip.open(TEST_IMAGES) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    refs = data[:args.images]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [args.server, f"--model={args.model}", f"--address={target}",
         "--metrics_address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = vdm_client.Client(target, timeout=3600)
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.health(timeout=2) == "SERVING":
                    break
            except vdm_client.VdmError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("vdm-server did not start")
            time.sleep(0.2)  # waiting for the server to start (bounded)

        def edit(job):
            scale, s, i = job
            if s == 1.0:  # from pure noise: plain sampling, either scale
                return job, client.sample(steps=args.steps, seed=3 + i)[0]
            kwargs = {scale: s}
            return job, client.edit(refs[i], steps=args.steps, seed=3 + i,
                                    **kwargs)[0]

        jobs = [(scale, s, i) for scale in ("strength", "strength_t")
                for s in STRENGTHS for i in range(len(refs))]
        start = time.monotonic()
        results = {}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for job, image in pool.map(edit, jobs):
                results[job] = image
        seconds = time.monotonic() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print(f"{len(jobs)} edits of {len(refs)} test images, DDIM-{args.steps}, "
          f"in {seconds:.0f} s\n")
    print("| strength | " + " | ".join(f"{s:.1f}" for s in STRENGTHS) + " |")
    print("|---|" + "---|" * len(STRENGTHS))
    for scale, name in (("strength", "`strength` (sigma^2, new)"),
                        ("strength_t", "`strength_t` (t, old)")):
        cells = []
        for s in STRENGTHS:
            d = np.array([np.abs(results[(scale, s, i)].astype(float) -
                                 refs[i].astype(float)).mean()
                          for i in range(len(refs))])
            cells.append(f"{d.mean():.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    pad, cell = 2, 28
    columns = 1 + len(STRENGTHS)
    grid = np.full((2 * (cell + pad) + pad, columns * (cell + pad) + pad), 160,
                   np.uint8)  # gray frames between the cells
    for r, scale in enumerate(("strength", "strength_t")):
        row = [refs[0]] + [results[(scale, s, 0)] for s in STRENGTHS]
        for c, im in enumerate(row):
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            grid[y:y + cell, x:x + cell] = im
    h, w = grid.shape
    Image.fromarray(grid).resize((w * 3, h * 3), Image.NEAREST).save(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
