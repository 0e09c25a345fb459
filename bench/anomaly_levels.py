#!/usr/bin/python3
"""Served cost of the two anomaly levels: a benchmark that prints its numbers.

  PYTHONPATH=build/python /usr/bin/python3 bench/anomaly_levels.py \
      --server=build/vdm-server [--model=model/checkpoints/fmnist.pt] \
      [--images=256] [--rounds=2]

Starts vdm-server on the shipped model (its calibration and feature network
beside it), then scores the first --images Fashion-MNIST test images at
anomaly_level fast and thorough, alternating, --rounds times each (one
caller, the server's chunk size, K = 16). Prints the CPU, each run's
images/s and network evaluations per image, and the mean images/s per level
with their ratio (measured in the same run, as this machine is shared).
"""

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import vdm_client
from bench_util import cpu_model, free_port


def test_images(data: str, n: int) -> list:
    with gzip.open(os.path.join(data, "t10k-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return [pixels[i] for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", default="model/checkpoints/fmnist.pt")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    images = test_images(args.data, args.images)
    target = f"127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [args.server, f"--model={args.model}", f"--address={target}",
         "--metrics_address="], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with vdm_client.Client(target, timeout=5) as c:
                    if c.health(timeout=2) == "SERVING":
                        break
            except vdm_client.VdmError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                print(log.read().decode(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.2)  # waiting for the server to start (bounded)
        with vdm_client.Client(target, timeout=3600) as client:
            info = client.info()
            if not info["thorough_available"]:
                print("the model serves no thorough level", file=sys.stderr)
                return 1
            print(f"precision {info['precision']}, {info['replicas']} replicas x "
                  f"{info['threads_per_replica']} threads; thorough: "
                  f"{info['thorough_evaluations_per_image']} evaluations per image")
            rates = {"fast": [], "thorough": []}
            for r in range(args.rounds):
                for level in ("fast", "thorough"):
                    start = time.monotonic()
                    rows = client.score(images, seed=r + 1, anomaly_level=level)
                    seconds = time.monotonic() - start
                    rates[level].append(len(images) / seconds)
                    print(f"round {r + 1} {level}: {len(images)} images in "
                          f"{seconds:.1f} s = {rates[level][-1]:.2f} images/s, "
                          f"{rows.network_evaluations / len(images):.0f} "
                          f"evaluations per image")
            fast = sum(rates["fast"]) / len(rates["fast"])
            thorough = sum(rates["thorough"]) / len(rates["thorough"])
            print(f"mean: fast {fast:.2f} images/s, thorough {thorough:.2f} "
                  f"images/s, thorough / fast {thorough / fast:.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
