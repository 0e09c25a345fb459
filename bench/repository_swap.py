#!/usr/bin/python3
"""A version swap under load: a benchmark that prints its numbers.

  PYTHONPATH=build/python /usr/bin/python3 bench/repository_swap.py \
      --server=build/vdm-server [--model=model/checkpoints/fmnist.pt] \
      [--callers=4] [--seconds=40]

Builds a model repository in a temporary directory (NAME/1/model.pt and its
calibration), starts vdm-server on it with a 1 s poll, and runs `--callers`
closed-loop callers (Sample of 4 images x 10 DDIM steps and ScoreBPD of 4
images at K = 16, alternating) for `--seconds`. At a quarter of the run it
publishes version 2 (the same file, renamed into place as a deployment
should), at half of it a broken version 3 (a truncated model.pt). Prints the
requests by version and status, the failed requests (the goal: 0), the p50
and p99 latency before, around and after the swap, when version 2 first
answered, what ListModels says at the end, and the CPU. Exit status 0 only
when no request failed, version 2 served, and version 3 was refused.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import vdm_client
from bench_util import cpu_model, free_port


def publish(root, name, version, source, truncate=False):
    staging = os.path.join(root, name, f".{version}")
    os.makedirs(staging)
    target = os.path.join(staging, "model.pt")
    if truncate:
        with open(source, "rb") as f, open(target, "wb") as out:
            out.write(f.read(4096))
    else:
        shutil.copyfile(source, target)
        calibration = source + ".calibration.json"
        if os.path.exists(calibration):
            shutil.copyfile(calibration, target + ".calibration.json")
    os.rename(staging, os.path.join(root, name, str(version)))


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="build/vdm-server")
    parser.add_argument("--model", default="model/checkpoints/fmnist.pt")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="vdm_swap_")
    name = os.path.splitext(os.path.basename(args.model))[0]
    publish(root, name, 1, args.model)
    target = f"127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [args.server, f"--model_repository={root}", f"--address={target}",
         "--metrics_address=", "--repository_poll_seconds=1"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with vdm_client.Client(target, timeout=5) as c:
                    if c.health(timeout=2) == "SERVING":
                        break
            except vdm_client.VdmError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                sys.exit("vdm-server did not start:\n" + log.read().decode())
            time.sleep(0.2)  # the server loads the model (bounded)

        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)]
        answers = []  # (start, end, kind, version, code)
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + args.seconds

        def caller(index):
            with vdm_client.Client(target, timeout=120) as c:
                k = index
                while time.monotonic() < stop_at:
                    t0 = time.monotonic()
                    kind = "Sample" if k % 2 == 0 else "ScoreBPD"
                    k += 1
                    try:
                        if kind == "Sample":
                            r = c.sample(4, steps=10, seed=k)
                            version = r.model_version
                        else:
                            r = c.score(images, timesteps=16, seed=k)
                            version = r.model_versions[0][1]
                        result = (version, "OK")
                    except vdm_client.VdmError as error:
                        result = (0, error.code.name)
                    with lock:
                        answers.append((t0 - start, time.monotonic() - start,
                                        kind, *result))

        threads = [threading.Thread(target=caller, args=(i,))
                   for i in range(args.callers)]
        for t in threads:
            t.start()
        swap_at = args.seconds / 4
        time.sleep(swap_at)  # the load runs on version 1 (a benchmark's clock)
        publish(root, name, 2, args.model)
        time.sleep(args.seconds / 4)
        publish(root, name, 3, args.model, truncate=True)
        for t in threads:
            t.join()
        with vdm_client.Client(target, timeout=10) as c:
            listed = c.list_models()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    failed = [a for a in answers if a[4] != "OK"]
    first_v2 = min((a[1] for a in answers if a[3] == 2), default=float("nan"))
    print(f"cpu: {cpu_model()}")
    print(f"callers: {args.callers}, seconds: {args.seconds:.0f}, "
          f"version 2 published at {swap_at:.1f} s, broken version 3 at "
          f"{2 * swap_at:.1f} s")
    print(f"requests: {len(answers)}, failed: {len(failed)}")
    for version in sorted({a[3] for a in answers}):
        kinds = {}
        for a in answers:
            if a[3] == version:
                kinds[(a[2], a[4])] = kinds.get((a[2], a[4]), 0) + 1
        print(f"  version {version}: " + ", ".join(
            f"{k} {code} {n}" for (k, code), n in sorted(kinds.items())))
    print(f"first answer from version 2: {first_v2:.1f} s "
          f"({first_v2 - swap_at:.1f} s after it was published)")
    for label, lo, hi in (("before the swap", 0, swap_at),
                          ("swap window", swap_at, first_v2 + 2),
                          ("after", first_v2 + 2, args.seconds + 1e9)):
        for kind in ("Sample", "ScoreBPD"):
            lat = [a[1] - a[0] for a in answers
                   if a[2] == kind and lo <= a[0] < hi and a[4] == "OK"]
            print(f"  {label:>15} {kind:>8}: n = {len(lat):3d}, p50 "
                  f"{percentile(lat, 50):.2f} s, p99 {percentile(lat, 99):.2f} s")
    for m in listed:
        print(f"listed: {m['name']} {m['version']} {m['state']} "
              f"{m['memory_bytes'] / 2**20:.1f} MiB {m['error'][:80]}")
    refused = any(m["version"] == 3 and m["state"] == "FAILED" for m in listed)
    ok = not failed and first_v2 == first_v2 and refused
    print("result: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
