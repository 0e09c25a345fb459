#!/usr/bin/env python3
"""The Python package installs and runs: `pip install ./client/python`.

Makes a fresh venv under the build directory with
`/usr/bin/python3 -m venv --system-site-packages` (Debian's python3-grpcio,
python3-protobuf, python3-numpy), installs client/python into it with
`pip install --no-build-isolation --no-index` (offline: no index, no find
links, no cache; the build hook generates the stubs with protoc and
grpc_python_plugin from PATH), checks that the checkout is left as it was,
then, with PYTHONPATH unset and from outside the checkout, runs the
installed `vdm-client-py` command (health, info, sample, score, edit) and
client/python/examples/sample_and_score.py against a live vdm-server on the
tiny test model. Any failure exits non-zero with the command's output.

Usage (ctest: python_package_test):
  /usr/bin/python3 tests/python/test_package.py --server=build/vdm-server \
    --model=build/tests/models/tiny.pt --work=build/python-package-test
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

SOURCE = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                      os.pardir))


def fail(message: str) -> None:
    print(f"python_package_test: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run(command, env, cwd, timeout=300) -> str:
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        fail(f"{' '.join(command)} exited {done.returncode}:\n"
             f"{done.stdout}\n{done.stderr}")
    return done.stdout


def git_status() -> str:
    try:
        return subprocess.run(
            ["git", "-C", SOURCE, "status", "--porcelain", "--ignored",
             "client/python"], capture_output=True, text=True,
            timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""  # not a git checkout: nothing to compare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True,
                        help="scratch directory (removed and remade)")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    venv = os.path.join(work, "venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
           and not k.startswith("PIP_")}
    env.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")

    before = git_status()
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv],
        env, work)
    run([os.path.join(venv, "bin", "pip"), "install", "--no-build-isolation",
         "--no-index", os.path.join(SOURCE, "client", "python")], env, work)
    after = git_status()
    if before != after:
        fail(f"pip install changed the checkout:\nbefore:\n{before}\n"
             f"after:\n{after}")
    command = os.path.join(venv, "bin", "vdm-client-py")
    python = os.path.join(venv, "bin", "python")
    if not os.access(command, os.X_OK):
        fail(f"no {command} after the install")
    where = run([python, "-c", "import vdm_client, vdm.v1.vdm_pb2 as p; "
                 "print(vdm_client.__file__); print(p.__file__)"],
                env, work).split()
    for path in where:
        if not path.startswith(venv + os.sep):
            fail(f"imported {path}, not from the venv {venv}")

    target = f"127.0.0.1:{free_port()}"
    log = open(os.path.join(work, "server.log"), "wb")
    server = subprocess.Popen(
        [args.server, f"--model={args.model}", f"--address={target}",
         "--metrics_address=", "--calibration=none", "--threads=1",
         "--precision=fp32", "--drain_seconds=5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # tens of s under the sanitizers
        while True:
            if server.poll() is not None:
                fail(f"vdm-server exited with {server.returncode}")
            done = subprocess.run([command, f"--target={target}",
                                   "--timeout_s=2", "health"], env=env,
                                  cwd=work, capture_output=True, text=True)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                fail(f"vdm-server not SERVING within 180 s:\n{done.stderr}")
            time.sleep(0.2)  # waiting for the server to start (bounded)
        c = [command, f"--target={target}"]
        run(c + ["info"], env, work)
        help_text = run(c + ["--help"], env, work)
        if not help_text.startswith("usage: vdm-client-py"):
            fail(f"--help names another program:\n{help_text}")
        out = run(c + ["sample", "--num=2", "--steps=4", "--seed=1",
                       "--out=grid.png"], env, work)
        if "images: 2" not in out or not os.path.getsize(
                os.path.join(work, "grid.png")):
            fail(f"sample wrote no grid:\n{out}")
        run([python, "-c", "import numpy as np; np.save('img.npy', "
             "np.random.default_rng(0).integers(0, 256, (28, 28), "
             "dtype=np.uint8))"], env, work)
        run(c + ["score", "img.npy", "--timesteps=4", "--seed=1",
                 "--csv=scores.csv"], env, work)
        with open(os.path.join(work, "scores.csv")) as f:
            if len(f.read().splitlines()) != 2:
                fail("score wrote no row")
        run([python, os.path.join(SOURCE, "client", "python", "examples",
                                  "sample_and_score.py"), target], env, work)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    print("python_package_test: installed and ran vdm-client-py and the "
          "example")
    return 0


if __name__ == "__main__":
    sys.exit(main())
