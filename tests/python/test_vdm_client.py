#!/usr/bin/env python3
"""The Python client (client/python/vdm_client) against a live vdm-server.

Starts vdm-server with the tiny test model (1 x 28 x 28, 10 classes) on a
free loopback port, waits (at most 60 s) until it is SERVING, runs the tests
and stops it with SIGTERM. The server allows 4 images per request, so that
score() has to split 6 images into chunks as `vdm-client score` does.

Usage (ctest: python_client_test):
  PYTHONPATH=build/python /usr/bin/python3 tests/python/test_vdm_client.py \
    --server=build/vdm-server --client=build/vdm-client \
    --model=build/tests/models/tiny.pt [unittest arguments, e.g. -k stream]
The paths can also come from VDM_SERVER, VDM_CLIENT and VDM_MODEL. Standard
library unittest only: the exit status is non-zero on any failure.
"""

import argparse
import base64
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import grpc
import numpy as np

import vdm_client

try:
    from PIL import Image as PILImage
except ImportError:
    PILImage = None

ARGS = None          # the parsed paths
SERVER = None        # the main vdm-server, a Server
TARGET = None        # its address, 127.0.0.1:PORT
MAX_IMAGES = 4       # its --max_images_per_request
# How long a server may take to load a model and answer SERVING: about 1 s
# in a release build, tens of seconds under the sanitizers on a busy machine
# (a bound, not a sleep: the wait ends as soon as it serves).
STARTUP_SECONDS = 180
SHAPE = (28, 28)
TLS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                       "testdata", "tls")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vdm-server with the tiny model on a free loopback port, SERVING once
    the constructor returns (client_args: how vdm_client.Client reaches it);
    stop() sends SIGTERM and checks that it exits 0."""

    def __init__(self, client_args=None, *flags):
        self.target = f"127.0.0.1:{free_port()}"
        self.log = tempfile.TemporaryFile()
        # A repository replaces the one model and its (absent) calibration.
        model = ([] if any(f.startswith("--model_repository=") for f in flags)
                 else [f"--model={ARGS.model}", "--calibration=none"])
        self.process = subprocess.Popen(
            [ARGS.server, *model, f"--address={self.target}",
             "--metrics_address=", "--threads=1",
             f"--max_images_per_request={MAX_IMAGES}", "--drain_seconds=5",
             # fp32: no start-up timing (seconds under the sanitizers), and
             # the same precision on every machine; a flag below may differ.
             "--precision=fp32",
             *flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vdm-server exited with {self.process.returncode}:\n"
                    f"{self.output()}")
            # A fresh channel each time: a channel whose first connection
            # failed waits out gRPC's reconnect backoff (1 s, 1.6 s, ...).
            try:
                with vdm_client.Client(self.target, timeout=5,
                                       **(client_args or {})) as client:
                    if client.health(timeout=2) == "SERVING":
                        return
            except vdm_client.VdmError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"vdm-server not SERVING within {STARTUP_SECONDS} s:\n"
                                   f"{self.output()}")
            time.sleep(0.1)  # waiting for the process to start (bounded)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"vdm-server ignored SIGTERM:\n{self.output()}")
        finally:
            output = self.output()
            self.log.close()
        if code != 0:
            raise RuntimeError(f"vdm-server exited with {code} on SIGTERM:\n"
                               f"{output}")


def setUpModule():
    global SERVER, TARGET
    SERVER = Server()
    TARGET = SERVER.target


def tearDownModule():
    if SERVER is not None:
        SERVER.stop()


def noise_images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(n)]


def write_idx(path: str, images) -> None:
    """An uncompressed IDX3 file (what `vdm-client score --idx` reads)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 0x08, 3, len(images), *SHAPE))
        for image in images:
            f.write(image.tobytes())


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm_client",
                           f"--target={TARGET}", *args],
                          capture_output=True, text=True, timeout=120, **kwargs)


class ClientTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.client = vdm_client.Client(TARGET, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    # ---- info, health

    def test_info(self):
        info = self.client.info()
        self.assertEqual(info["image_channels"], 1)
        self.assertEqual((info["image_height"], info["image_width"]), SHAPE)
        self.assertEqual(info["num_classes"], 10)
        self.assertEqual(info["max_images_per_request"], MAX_IMAGES)
        self.assertIn(info["prediction"], ("eps", "v", "x"))
        self.assertFalse(info["calibrated"])

    def test_health(self):
        self.assertEqual(self.client.health(), "SERVING")

    def test_unreachable_server_raises_unavailable(self):
        with vdm_client.Client(f"127.0.0.1:{free_port()}", timeout=10) as c:
            with self.assertRaises(vdm_client.VdmError) as caught:
                c.health()
        self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)

    # ---- sample

    def test_sample_shape_and_seed_reproduces(self):
        images = vdm_client.Client(TARGET).sample(num_images=4, steps=10, seed=1)
        self.assertIsInstance(images, vdm_client.SampleResult)
        self.assertEqual(len(images), 4)
        for image in images:
            self.assertEqual(image.shape, SHAPE)
            self.assertEqual(image.dtype, np.uint8)
        self.assertEqual(images.seed, 1)
        self.assertEqual(images.network_evaluations, 4 * 10)
        again = self.client.sample(num_images=4, steps=10, seed=1)
        for a, b in zip(images, again):
            np.testing.assert_array_equal(a, b)
        other = self.client.sample(num_images=4, steps=10, seed=2)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(images, other)))

    def test_server_chosen_seed_is_returned(self):
        first = self.client.sample(num_images=2, steps=5)
        again = self.client.sample(num_images=2, steps=5, seed=first.seed)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)

    def test_guided_sample(self):
        guided = self.client.sample(num_images=2, steps=8, label=3, guidance=3.0,
                                    seed=4)
        self.assertEqual(len(guided), 2)
        self.assertEqual(guided[0].shape, SHAPE)
        # Guidance evaluates a conditional and an unconditional row per image.
        self.assertEqual(guided.network_evaluations, 2 * 2 * 8)

    def test_sampler_names_follow_the_library_table(self):
        usage = subprocess.run([ARGS.client], capture_output=True, text=True,
                               timeout=30).stderr
        listed = re.search(r"--sampler=([a-z0-9_|]+)", usage)
        self.assertIsNotNone(listed, usage)
        self.assertEqual(sorted(vdm_client.SAMPLERS),
                         sorted(listed.group(1).split("|")))
        for name in vdm_client.SAMPLERS:
            with self.subTest(sampler=name):
                images = self.client.sample(num_images=1, steps=2, sampler=name,
                                            seed=5)
                self.assertEqual(images[0].shape, SHAPE)
        for grid in vdm_client.TIME_GRIDS:
            with self.subTest(time_grid=grid):
                self.assertEqual(len(self.client.sample(steps=2, time_grid=grid)),
                                 1)
        with self.assertRaisesRegex(ValueError, "dpm_solver_2m"):
            self.client.sample(sampler="no_such_sampler")

    def test_sample_invalid_argument(self):
        with self.assertRaises(vdm_client.VdmError) as caught:
            self.client.sample(num_images=MAX_IMAGES + 1, steps=2)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("num_images", caught.exception.message)

    # ---- editing: negative label, edit, inpaint (RePaint), encode/decode

    def assertInvalid(self, field, call, *args, **kwargs):
        with self.assertRaises(vdm_client.VdmError) as caught:
            call(*args, **kwargs)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(field, caught.exception.message)

    def test_negative_label_and_edit(self):
        away = self.client.sample(num_images=2, steps=4, label=1,
                                  negative_label=2, guidance=2.0, seed=3)
        self.assertEqual(away.network_evaluations, 2 * 2 * 4)
        plain = self.client.sample(num_images=2, steps=4, label=1,
                                   guidance=2.0, seed=3)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(away, plain)))
        image = noise_images(1, seed=8)[0]
        edited = self.client.edit(image, strength=0.5, num_images=2, steps=6,
                                  seed=1)
        self.assertEqual(len(edited), 2)
        self.assertEqual(edited.network_evaluations, 2 * 6)
        self.assertInvalid("strength", self.client.edit, image, strength=1.5)
        self.assertInvalid("strength_t", self.client.edit, image,
                           strength_t=1.5)
        for both in ({}, {"strength": 0.5, "strength_t": 0.5}):
            with self.assertRaises(ValueError):
                self.client.edit(image, **both)
        # strength is the noise variance fraction sigma^2(t): on this
        # model's linear log-SNR schedule the edit at strength s is the edit
        # at strength_t = (logit(s) - gamma(0)) / (gamma(1) - gamma(0)).
        info = self.client.info()
        g0, g1 = info["gamma_min"], info["gamma_max"]
        for s in (0.1, 0.5, 0.9):
            t = (math.log(s / (1 - s)) - g0) / (g1 - g0)
            by_noise = self.client.edit(image, strength=s, steps=6, seed=2)
            by_time = self.client.edit(image, strength_t=t, steps=6, seed=2)
            diff = np.abs(by_noise[0].astype(int) - by_time[0].astype(int))
            self.assertLessEqual(diff.mean(), 0.5, f"strength {s}, t {t}")
        self.assertInvalid("negative_label", self.client.sample, steps=2,
                           label=1, negative_label=1, guidance=2.0)

    def test_inpaint_with_resampling_keeps_the_known_pixels(self):
        image = noise_images(1, seed=9)[0]
        mask = np.zeros(SHAPE, dtype=bool)
        mask[:, :14] = True
        for rounds in (0, 2):
            with self.subTest(resample_rounds=rounds):
                result = self.client.inpaint(image, mask, num_images=2, steps=5,
                                             seed=2, resample_rounds=rounds)
                self.assertEqual(result.network_evaluations,
                                 2 * 5 * (1 + rounds))
                for x in result:
                    np.testing.assert_array_equal(x[mask], image[mask])
        # The uint8 form of the mask (>= 128 = known) is the same request.
        a = self.client.inpaint(image, mask.astype(np.uint8) * 255, steps=3,
                                seed=4, resample_rounds=1)
        b = self.client.inpaint(image, mask, steps=3, seed=4, resample_rounds=1)
        np.testing.assert_array_equal(a[0], b[0])
        self.assertInvalid("resample_rounds", self.client.inpaint, image, mask,
                           steps=3, resample_rounds=11)
        self.assertInvalid("resample_rounds", self.client.inpaint, image, mask,
                           steps=3, resample_rounds=1, sampler="dpm_solver_2m")

    def test_encode_decode_round_trip(self):
        images = noise_images(2, seed=10)
        errors = {}
        for steps in (2, 40):
            latents = self.client.encode(images, steps=steps)
            self.assertIsInstance(latents, vdm_client.EncodeResult)
            self.assertEqual(len(latents), 2)
            self.assertEqual(latents[0].shape, (1,) + SHAPE)
            self.assertEqual(latents[0].dtype, np.float32)
            self.assertEqual(latents.network_evaluations, 2 * steps)
            decoded = self.client.decode(latents, steps=steps)
            self.assertEqual(decoded.network_evaluations, 2 * steps)
            again = self.client.decode(np.stack(latents), steps=steps)
            for a, b in zip(decoded, again):  # deterministic
                np.testing.assert_array_equal(a, b)
            errors[steps] = np.mean([np.abs(a.astype(float) - b).mean()
                                     for a, b in zip(decoded, images)])
        self.assertLess(errors[40], errors[2], errors)

    def test_interpolate_and_slerp(self):
        a, b = noise_images(2, seed=11)
        path = self.client.interpolate(a, b, num=4, steps=5)
        self.assertEqual(len(path), 4)
        self.assertEqual(path.network_evaluations, (2 + 4) * 5)
        # The ends are the decoded latents of a and b themselves (up to the
        # float rounding of a forward pass at another batch size).
        ends = self.client.decode(self.client.encode([a, b], steps=5), steps=5)
        for x, y in ((path[0], ends[0]), (path[-1], ends[1])):
            self.assertLess(np.abs(x.astype(float) - y).mean(), 0.5)
        self.assertGreater(np.abs(path[0].astype(float) - path[-1]).mean(), 10)
        u = np.zeros((1, 2, 2), np.float32)
        v = np.zeros((1, 2, 2), np.float32)
        u.flat[0], v.flat[1] = 1, 1
        mid = vdm_client.slerp(u, v, 3)[1]
        np.testing.assert_allclose(np.linalg.norm(mid), 1.0, rtol=1e-6)
        with self.assertRaises(ValueError):
            vdm_client.slerp(u, v, 1)

    def test_encode_decode_invalid_arguments(self):
        image = noise_images(1)[0]
        self.assertInvalid("steps", self.client.encode, [image], steps=-1)
        self.assertInvalid("label", self.client.encode, [image], label=10)
        self.assertInvalid("images", self.client.encode,
                           noise_images(MAX_IMAGES + 1))
        self.assertInvalid("latents[0]", self.client.decode,
                           [np.zeros((1, 27, 28), np.float32)])
        self.assertInvalid("latents[0]", self.client.decode,
                           [np.full((1,) + SHAPE, np.nan, np.float32)])
        with self.assertRaises(vdm_client.VdmError) as caught:
            self.client._call(self.client._stub.Sample, vdm_client.client.vdm_pb2.SampleRequest(
                sampler=vdm_client.client.vdm_pb2.SAMPLER_HEUN,
                latents=[vdm_client.client._latent_to_proto(
                    np.zeros((1,) + SHAPE), 0)]))
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("latents", caught.exception.message)

    # ---- sample_stream

    def test_sample_stream_progress_then_result(self):
        steps, every = 9, 3
        events = list(self.client.sample_stream(num_images=2, steps=steps,
                                                seed=6, preview_every=every))
        progress, result = events[:-1], events[-1]
        self.assertIsInstance(result, vdm_client.SampleResult)
        self.assertTrue(progress)
        self.assertTrue(all(isinstance(e, vdm_client.Progress) for e in progress))
        stepped = [e.step for e in progress]
        self.assertEqual(stepped, sorted(set(stepped)))  # strictly increasing
        self.assertEqual(stepped[-1], steps)
        self.assertTrue(all(e.total_steps == steps for e in progress))
        previews = [e for e in progress if e.previews]
        self.assertTrue(previews)
        for event in previews:
            self.assertEqual(event.step % every, 0)
            self.assertEqual(len(event.previews), 2)
            self.assertEqual(event.previews[0].shape, SHAPE)
            self.assertEqual(event.previews[0].dtype, np.uint8)
        self.assertEqual(len(result), 2)
        self.assertEqual(result.seed, 6)
        plain = self.client.sample(num_images=2, steps=steps, seed=6)
        for a, b in zip(result, plain):
            np.testing.assert_array_equal(a, b)

    def test_sample_stream_error_surfaces_while_iterating(self):
        events = self.client.sample_stream(num_images=0, steps=2)
        with self.assertRaises(vdm_client.VdmError) as caught:
            list(events)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("num_images", caught.exception.message)

    def test_sample_stream_stops_early(self):
        events = self.client.sample_stream(num_images=1, steps=200)
        first = next(events)
        self.assertIsInstance(first, vdm_client.Progress)
        events.close()  # cancels the call
        self.assertEqual(self.client.health(), "SERVING")

    # ---- score

    def test_score_records(self):
        images = list(self.client.sample(num_images=3, steps=5, seed=7))
        images += noise_images(3)
        rows = self.client.score(images, seed=11)
        self.assertIsInstance(rows, vdm_client.ScoreResult)
        self.assertEqual(len(rows), 6)
        self.assertEqual(rows.chunks, 2)  # the server takes 4 per request
        self.assertEqual(rows.seed, 11)
        self.assertEqual([r["index"] for r in rows], list(range(6)))
        for row in rows:
            self.assertEqual(tuple(row), vdm_client.CSV_FIELDS)
            self.assertAlmostEqual(
                row["bpd"],
                row["prior_bpd"] + row["recon_bpd"] + row["diffusion_bpd"],
                delta=1e-6)
            self.assertAlmostEqual(
                sum(row[f"band_bpd_{b}"] for b in range(4)),
                row["diffusion_bpd"], delta=1e-6)
            self.assertGreater(row["stderr_bpd"], 0)
            self.assertIsNone(row["p_value"])      # --calibration=none
            self.assertIsNone(row["is_anomaly"])

    def test_score_time_sampling(self):
        # The tiny test model has no calibration file, so no proposal:
        # uniform is what it scores with anyway, proposal is refused.
        images = noise_images(2, seed=5)
        default = self.client.score(images, timesteps=4, seed=3)
        uniform = self.client.score(images, timesteps=4, seed=3,
                                    time_sampling="uniform")
        self.assertEqual([r["bpd"] for r in default],
                         [r["bpd"] for r in uniform])
        with self.assertRaises(vdm_client.VdmError) as caught:
            self.client.score(images, timesteps=4, time_sampling="proposal")
        self.assertEqual(caught.exception.code,
                         grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("time_sampling", str(caught.exception))
        with self.assertRaisesRegex(ValueError, "time_sampling"):
            self.client.score(images, time_sampling="sideways")

    def test_score_anomaly_level(self):
        # The main server's model has no feature network: thorough is
        # refused, naming what is missing; an unknown level never leaves.
        images = noise_images(2, seed=5)
        with self.assertRaises(vdm_client.VdmError) as caught:
            self.client.score(images, timesteps=4, anomaly_level="thorough")
        self.assertEqual(caught.exception.code,
                         grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("anomaly.thorough", str(caught.exception))
        fast = self.client.score(images, timesteps=4, seed=3,
                                 anomaly_level="fast")
        self.assertNotIn("feature_distance", fast[0])
        with self.assertRaisesRegex(ValueError, "anomaly_level"):
            self.client.score(images, anomaly_level="deep")

    def test_score_bad_timesteps(self):
        with self.assertRaises(vdm_client.VdmError) as caught:
            self.client.score(noise_images(1), timesteps=1)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("timesteps", caught.exception.message)

    def test_score_input_forms(self):
        image = noise_images(1, seed=3)[0]
        base = self.client.score([image], seed=2)[0]["bpd"]
        self.assertEqual(self.client.score([image[:, :, None]], seed=2)[0]["bpd"],
                         base)
        if PILImage is not None:
            pil = PILImage.fromarray(image)
            self.assertEqual(self.client.score([pil], seed=2)[0]["bpd"], base)
        with self.assertRaisesRegex(ValueError, "uint8"):
            self.client.score([image.astype(np.float32)])
        with self.assertRaises(ValueError):
            self.client.score([])
        with self.assertRaises(vdm_client.VdmError) as caught:  # wrong shape
            self.client.score([np.zeros((27, 28), np.uint8)])
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)

    def test_score_anomaly_map(self):
        rows = self.client.score(noise_images(2), seed=1, anomaly_map=True)
        for row in rows:
            self.assertEqual(row["anomaly_map"].shape, SHAPE)
            self.assertEqual(row["anomaly_map"].dtype, np.float32)
            self.assertTrue(np.isfinite(row["anomaly_map"]).all())

    def test_score_matches_cpp_client(self):
        """The same images and seed through `vdm-client score --csv`: the same
        columns and the same numbers, so the chunk seeds agree."""
        images = list(self.client.sample(num_images=2, steps=5, seed=8))
        images += noise_images(4, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            idx = os.path.join(tmp, "images.idx")
            write_idx(idx, images)
            for chunk in (None, 2):  # the server's limit (4), and 3 chunks
                with self.subTest(chunk=chunk):
                    out = os.path.join(tmp, f"cpp_{chunk}.csv")
                    command = [ARGS.client, f"--target={TARGET}", "score",
                               f"--idx={idx}", "--seed=12345", f"--csv={out}"]
                    if chunk:
                        command.append(f"--chunk={chunk}")
                    done = subprocess.run(command, capture_output=True,
                                          text=True, timeout=120)
                    self.assertEqual(done.returncode, 0, done.stderr)
                    with open(out, newline="") as f:
                        reader = csv.DictReader(f)
                        self.assertEqual(tuple(reader.fieldnames),
                                         vdm_client.CSV_FIELDS)
                        cpp = list(reader)
                    rows = self.client.score(images, seed=12345, chunk=chunk)
                    self.assertEqual(rows.chunks, 2 if chunk is None else 3)
                    self.assertEqual(len(cpp), len(rows))
                    for ours, theirs in zip(rows, cpp):
                        self.assertEqual(ours["index"], int(theirs["index"]))
                        for key in ("bpd", "prior_bpd", "recon_bpd",
                                    "diffusion_bpd", "stderr_bpd"):
                            self.assertAlmostEqual(ours[key], float(theirs[key]),
                                                   delta=1e-6, msg=key)
            # And the seeds matter: another seed changes the numbers.
            other = self.client.score(images, seed=12346, chunk=2)
            self.assertNotAlmostEqual(other[5]["bpd"], rows[5]["bpd"], delta=1e-6)

    def test_scores_to_csv(self):
        rows = self.client.score(noise_images(2), seed=3)
        lines = vdm_client.scores_to_csv(rows).splitlines()
        self.assertEqual(lines[0], ",".join(vdm_client.CSV_FIELDS))
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[1].startswith("0,"))
        self.assertTrue(lines[1].endswith(",,"))  # no p_value, no is_anomaly
        # Records of a server with a background model get the llr columns.
        with_llr = [dict(r, llr=0.5, background_bpd=r["bpd"] - 0.5) for r in rows]
        lines = vdm_client.scores_to_csv(with_llr).splitlines()
        self.assertEqual(lines[0], ",".join(vdm_client.CSV_FIELDS +
                                            vdm_client.LLR_FIELDS))
        self.assertTrue(lines[1].split(",")[-2] == "0.500000")

    # ---- score by the probability-flow ODE (docs/likelihood.md)

    def test_score_ode(self):
        # tiny.pt's random weights make d eps_hat / d z about 150, so a
        # 2-step solve is unstable: its value follows the CPU's rounding
        # (even its sign), and only what the method guarantees is asserted
        # here: the shape, the cost, a finite value, a standard error. How
        # accurate a converged solve is: OdeScoreOnAGentleModelTest.
        images = noise_images(2, seed=13)
        rows = self.client.score(images, seed=5, method="ode", ode_steps=2,
                                 trace_samples=2)
        self.assertEqual(len(rows), 2)
        self.assertEqual(rows.seed, 5)
        # images x trace_samples x 4 x ode_steps rows.
        self.assertEqual(rows.network_evaluations, 2 * 2 * 4 * 2)
        for row in rows:
            self.assertEqual(tuple(row),
                             vdm_client.CSV_FIELDS + vdm_client.ODE_FIELDS)
            self.assertEqual(row["ode_function_evaluations"], 4 * 2)
            self.assertIsNotNone(row["ode_stderr_bpd"])
            self.assertGreater(row["ode_stderr_bpd"], 0)
            self.assertIsNone(row["ode_error_bpd"])  # RK4 has no estimate
            self.assertTrue(math.isfinite(row["bpd"]))
            # The ELBO-only parts are 0 or absent.
            self.assertEqual(row["diffusion_bpd"], 0)
            self.assertIsNone(row["band_bpd_0"])
            self.assertIsNone(row["p_value"])
        self.assertNotEqual(rows[0]["bpd"], rows[1]["bpd"])
        # The enum value works as the name; one probe has no standard error.
        one = self.client.score(images[:1], seed=5,
                                method=vdm_client.client.vdm_pb2.SCORE_METHOD_ODE,
                                ode_steps=3)
        self.assertEqual(one.network_evaluations, 1 * 1 * 4 * 3)
        self.assertEqual(one[0]["ode_function_evaluations"], 4 * 3)
        self.assertIsNone(one[0]["ode_stderr_bpd"])
        # The default solver is adaptive: each image's evaluations (1 + 6
        # per attempted step, up to the cap), an error estimate, and the
        # request costs what the solves used. Uniform dequantization is
        # reachable by name; it changes the value.
        adaptive = self.client.score(images, seed=5, method="ode",
                                     ode_max_evaluations=37)
        for row in adaptive:
            self.assertLessEqual(row["ode_function_evaluations"], 37)
            self.assertEqual(row["ode_function_evaluations"] % 6, 1)
            self.assertGreaterEqual(row["ode_error_bpd"], 0)
            self.assertTrue(math.isfinite(row["bpd"]))
        self.assertEqual(adaptive.network_evaluations,
                         sum(r["ode_function_evaluations"] for r in adaptive))
        uniform = self.client.score(images[:1], seed=5, method="ode",
                                    ode_steps=3, dequantization="uniform")
        self.assertNotEqual(uniform[0]["bpd"], one[0]["bpd"])
        # ELBO records have no ODE keys, and the CSV no ODE columns.
        elbo = self.client.score(images, seed=5, method="elbo")
        self.assertEqual(tuple(elbo[0]), vdm_client.CSV_FIELDS)
        self.assertEqual(vdm_client.scores_to_csv(elbo).splitlines()[0],
                         ",".join(vdm_client.CSV_FIELDS))
        self.assertNotEqual(elbo[0]["bpd"], rows[0]["bpd"])
        self.assertEqual(vdm_client.SCORE_METHODS, ("elbo", "ode"))

    def test_score_ode_bad_arguments(self):
        images = noise_images(1)
        with self.assertRaisesRegex(ValueError, "method.*elbo, ode"):
            self.client.score(images, method="exact")
        with self.assertRaisesRegex(ValueError, "method"):
            self.client.score(images, method=7)
        for name in ("ode_steps", "trace_samples", "ode_max_evaluations"):
            with self.subTest(name=name):
                # Refused client-side without method="ode", as vdm-client does.
                with self.assertRaisesRegex(ValueError, f"{name} needs method"):
                    self.client.score(images, **{name: 2})
                with self.assertRaisesRegex(ValueError, name):
                    self.client.score(images, method="ode", **{name: 2.5})
                with self.assertRaisesRegex(ValueError, name):
                    self.client.score(images, method="ode", **{name: 1 << 40})
        # Out of range: the server's INVALID_ARGUMENT, naming the field.
        self.assertInvalid("ode_steps", self.client.score, images,
                           method="ode", ode_steps=1001)
        self.assertInvalid("ode_steps", self.client.score, images,
                           method="ode", ode_steps=-1)
        self.assertInvalid("trace_samples", self.client.score, images,
                           method="ode", trace_samples=65)
        self.assertInvalid("ode_rtol", self.client.score, images,
                           method="ode", ode_rtol=0.5)
        self.assertInvalid("ode_atol", self.client.score, images,
                           method="ode", ode_atol=-1.0)
        self.assertInvalid("ode_max_evaluations", self.client.score, images,
                           method="ode", ode_max_evaluations=5)
        self.assertInvalid("ode_rtol", self.client.score, images,
                           method="ode", ode_steps=4, ode_rtol=1e-4)
        with self.assertRaisesRegex(ValueError, "ode_rtol needs method"):
            self.client.score(images, ode_rtol=1e-4)
        with self.assertRaisesRegex(ValueError, "dequantization"):
            self.client.score(images, method="ode", dequantization="triangular")
        with self.assertRaisesRegex(ValueError, "dequantization needs method"):
            self.client.score(images, dequantization="uniform")

    def test_score_ode_csv_matches_cpp_client_byte_for_byte(self):
        """5 images (two chunks of the server's 4) through `vdm-client score
        --method=ode --csv` and scores_to_csv: the same bytes."""
        images = list(self.client.sample(num_images=2, steps=3, seed=8))
        images += noise_images(3, seed=2)
        with tempfile.TemporaryDirectory() as tmp:
            idx = os.path.join(tmp, "images.idx")
            write_idx(idx, images)
            for trace_samples in (1, 2):
                with self.subTest(trace_samples=trace_samples):
                    out = os.path.join(tmp, f"cpp_{trace_samples}.csv")
                    done = subprocess.run(
                        [ARGS.client, f"--target={TARGET}", "score",
                         f"--idx={idx}", "--seed=777", "--method=ode",
                         "--ode_steps=2", f"--trace_samples={trace_samples}",
                         f"--csv={out}"],
                        capture_output=True, text=True, timeout=120)
                    self.assertEqual(done.returncode, 0, done.stderr)
                    with open(out, encoding="utf-8", newline="") as f:
                        cpp = f.read()
                    rows = self.client.score(images, seed=777, method="ode",
                                             ode_steps=2,
                                             trace_samples=trace_samples)
                    self.assertEqual(rows.chunks, 2)
                    ours = vdm_client.scores_to_csv(rows)
                    self.assertEqual(ours, cpp)
                    header = ours.splitlines()[0].split(",")
                    self.assertEqual(header[-3:], list(vdm_client.ODE_FIELDS))
                    first = ours.splitlines()[1].split(",")
                    self.assertEqual(first[-3], "8")
                    self.assertEqual(first[-2] == "", trace_samples == 1)
                    self.assertEqual(first[-1], "")  # RK4: no error estimate
        # ODE columns before the llr columns, as FormatScoresCsv writes them.
        both = [dict(r, llr=0.25, background_bpd=1.0) for r in rows]
        header = vdm_client.scores_to_csv(both).splitlines()[0]
        self.assertEqual(header, ",".join(vdm_client.CSV_FIELDS +
                                          vdm_client.ODE_FIELDS +
                                          vdm_client.LLR_FIELDS))

    # ---- the command line

    def test_cli_info_and_health(self):
        done = cli("info")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("image_height: 28", done.stdout)
        done = cli("health")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "SERVING")

    def test_cli_sample_and_score(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "samples.npy")
            done = cli("sample", "--num=3", "--steps=4", "--seed=1", f"--out={out}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(np.load(out).shape, (3,) + SHAPE)
            scores = os.path.join(tmp, "scores.csv")
            done = cli("score", out, "--seed=9", f"--csv={scores}")
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(scores, newline="") as f:
                self.assertEqual(len(list(csv.DictReader(f))), 3)
            if PILImage is not None:
                grid = os.path.join(tmp, "grid.png")
                done = cli("sample", "--num=4", "--steps=2", f"--out={grid}")
                self.assertEqual(done.returncode, 0, done.stderr)
                with PILImage.open(grid) as image:  # 2 x 2, 2-pixel borders
                    self.assertEqual(image.size, (2 * 28 + 6, 2 * 28 + 6))
            done = cli("score", "--timesteps=1", out)
            self.assertEqual(done.returncode, 1)
            self.assertIn("INVALID_ARGUMENT", done.stderr)
            self.assertIn("timesteps", done.stderr)

    def test_cli_score_ode(self):
        with tempfile.TemporaryDirectory() as tmp:
            images = os.path.join(tmp, "images.npy")
            np.save(images, np.stack(noise_images(2, seed=4)))
            scores = os.path.join(tmp, "scores.csv")
            done = cli("score", images, "--seed=3", "--method=ode",
                       "--ode_steps=2", "--trace_samples=2", f"--csv={scores}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("network evaluations: 32", done.stdout)
            with open(scores, encoding="utf-8", newline="") as f:
                written = f.read()
            rows = self.client.score(noise_images(2, seed=4), seed=3,
                                     method="ode", ode_steps=2,
                                     trace_samples=2)
            self.assertEqual(written, vdm_client.scores_to_csv(rows))
            done = cli("score", images, "--method=ode", "--ode_steps=2")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("mean ode function evaluations per solve: 8.0",
                          done.stdout)
            # The ODE flags need --method=ode; bad values are the server's.
            for flag in ("--ode_steps=2", "--ode_rtol=1e-4",
                         "--dequantization=uniform"):
                done = cli("score", images, flag)
                self.assertEqual(done.returncode, 2, flag)
                self.assertIn("need --method=ode", done.stderr)
            done = cli("score", images, "--method=ode",
                       "--ode_max_evaluations=25", "--dequantization=uniform")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("ode_error", done.stdout)
            done = cli("score", images, "--method=exact")
            self.assertEqual(done.returncode, 2)
            self.assertIn("--method", done.stderr)
            done = cli("score", images, "--method=ode", "--trace_samples=65")
            self.assertEqual(done.returncode, 1)
            self.assertIn("INVALID_ARGUMENT", done.stderr)
            self.assertIn("trace_samples", done.stderr)

    def test_cli_encode_decode_interpolate(self):
        a, b = noise_images(2, seed=12)
        with tempfile.TemporaryDirectory() as tmp:
            both = os.path.join(tmp, "both.npy")
            np.save(both, np.stack([a, b]))
            latent = os.path.join(tmp, "latent")  # written as named, no .npy
            done = cli("encode", f"--image={both}", "--steps=4",
                       f"--out={latent}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("network evaluations: 8", done.stdout)
            z = np.load(latent)
            self.assertEqual(z.shape, (2, 1) + SHAPE)
            self.assertEqual(z.dtype, np.float32)
            # The same latents as the library's encode.
            np.testing.assert_allclose(
                z, np.stack(self.client.encode([a, b], steps=4)), atol=1e-5)
            decoded = os.path.join(tmp, "decoded.npy")
            done = cli("decode", f"--latent={latent}", "--steps=4",
                       f"--out={decoded}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("network evaluations: 8", done.stdout)
            x = np.load(decoded)
            self.assertEqual((x.shape, x.dtype), ((2,) + SHAPE, np.uint8))
            library = self.client.decode(z, steps=4)
            for ours, theirs in zip(x, library):
                np.testing.assert_array_equal(ours, theirs)
            # One latent of shape (C, H, W) is a stack of one.
            one = os.path.join(tmp, "one.npy")
            np.save(one, z[0])
            done = cli("decode", f"--latent={one}", "--steps=4",
                       f"--out={decoded}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(np.load(decoded).shape, (1,) + SHAPE)
            # Interpolate: 2 x 3 + 4 x 3 evaluations, one row of 4 images.
            a_npy, b_npy = (os.path.join(tmp, n) for n in ("a.npy", "b.npy"))
            np.save(a_npy, a)
            np.save(b_npy, b)
            row = os.path.join(tmp, "row.npy")
            done = cli("interpolate", f"--image={a_npy}", f"--image2={b_npy}",
                       "--num=4", "--steps=3", f"--out={row}")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("encode network evaluations: 6", done.stdout)
            self.assertIn("network evaluations: 12", done.stdout)
            self.assertEqual(np.load(row).shape, (4,) + SHAPE)
            if PILImage is not None:
                a_png, grid = (os.path.join(tmp, n) for n in ("a.png", "g.png"))
                PILImage.fromarray(a).save(a_png)
                done = cli("interpolate", f"--image={a_png}",
                           f"--image2={b_npy}", "--num=3", "--steps=2",
                           f"--out={grid}", f"--out_dir={tmp}/each")
                self.assertEqual(done.returncode, 0, done.stderr)
                with PILImage.open(grid) as image:  # one row, 2-pixel borders
                    self.assertEqual(image.size, (3 * 28 + 8, 28 + 4))
                for i in range(3):
                    with PILImage.open(f"{tmp}/each/sample_{i:03d}.png") as image:
                        self.assertEqual(image.size, (28, 28))
                done = cli("encode", f"--image={a_png}", "--steps=2",
                           f"--out={latent}")
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertEqual(np.load(latent).shape, (1, 1) + SHAPE)
                done = cli("decode", f"--latent={latent}", "--steps=2",
                           f"--out={grid}")
                self.assertEqual(done.returncode, 0, done.stderr)
                with PILImage.open(grid) as image:
                    self.assertEqual(image.size, (28 + 4, 28 + 4))

    def test_cli_file_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            missing = os.path.join(tmp, "missing.npy")
            wrong = os.path.join(tmp, "wrong.npy")
            np.save(wrong, np.zeros((1, 27, 28), np.float32))
            stack = os.path.join(tmp, "stack.npy")
            np.save(stack, np.stack(noise_images(2)))
            text = os.path.join(tmp, "text.npy")
            with open(text, "w") as f:
                f.write("not numpy\n")
            cases = [
                (("decode", f"--latent={missing}"), "missing.npy"),
                (("encode", f"--image={missing}"), "missing.npy"),
                (("interpolate", f"--image={stack}", f"--image2={missing}"),
                 "missing.npy"),
                (("score", missing), "missing.npy"),
                (("decode", f"--latent={wrong}"), "shape (1, 27, 28)"),
                (("encode", f"--image={wrong}"), "dtype float32"),
                (("decode", f"--latent={stack}"), "want float latents"),
                (("decode", f"--latent={text}"), "not a .npy file"),
                (("interpolate", f"--image={stack}", f"--image2={stack}"),
                 "2 images, want one"),
            ]
            for args, message in cases:
                with self.subTest(args=args):
                    done = cli(*args)
                    self.assertEqual(done.returncode, 1, done.stderr)
                    self.assertIn(message, done.stderr)
                    self.assertNotIn("Traceback", done.stderr)
            done = cli("interpolate", f"--image={stack}", f"--image2={stack}",
                       "--num=1")
            self.assertEqual(done.returncode, 2)
            self.assertIn("--num must be at least 2", done.stderr)
            done = cli("decode")  # --latent is required
            self.assertEqual(done.returncode, 2)
            self.assertIn("--latent", done.stderr)


class OdeScoreOnAGentleModelTest(unittest.TestCase):
    """The ODE score at settings where it is accurate, on tiny_smooth.pt
    (tests/make_test_models.py: tiny.pt with 50x smaller random weights, so
    the flow is smooth and RK4 converges at a few dozen steps): a 16-step
    solve agrees with a 128-step one (8x the evaluations, the same seed, so
    the same dequantization; fresh probes) within 4 of their combined
    reported standard errors."""

    @classmethod
    def setUpClass(cls):
        smooth = os.path.join(os.path.dirname(ARGS.model), "tiny_smooth.pt")
        cls.server = Server(None, f"--model={smooth}")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_few_steps_agree_with_many_within_the_standard_error(self):
        images = noise_images(2, seed=13)
        with vdm_client.Client(self.server.target, timeout=120) as client:
            few = client.score(images, seed=5, method="ode", ode_steps=16,
                               trace_samples=4)
            many = client.score(images, seed=5, method="ode", ode_steps=128,
                                trace_samples=4)
        self.assertEqual(many.network_evaluations, 2 * 4 * 4 * 128)
        for a, b in zip(few, many):
            se = math.hypot(a["ode_stderr_bpd"], b["ode_stderr_bpd"])
            self.assertGreater(se, 0)
            self.assertLess(abs(a["bpd"] - b["bpd"]), 4 * se, (a, b))


class ScoreFieldsTest(unittest.TestCase):
    """score()'s records and scores_to_csv come from the ImageScore
    descriptor by the rules above ImageScore in vdm.proto: a variant of it
    with extra fields gets them with no client change. The variant is built
    from ImageScore's own descriptor, as tests/client/client_test.cc builds
    it for vdm-client, and the lines expected are that test's."""

    @classmethod
    def setUpClass(cls):
        from google.protobuf import (descriptor_pb2, descriptor_pool,
                                     message_factory)
        vdm_pb2 = vdm_client.client.vdm_pb2
        pool = descriptor_pool.DescriptorPool()
        for dependency in (descriptor_pb2.DESCRIPTOR, vdm_pb2.DESCRIPTOR):
            copy = descriptor_pb2.FileDescriptorProto()
            dependency.CopyToProto(copy)
            pool.Add(copy)
        file = descriptor_pb2.FileDescriptorProto(
            name="score_extra.proto", package="vdm.test", syntax="proto3",
            dependency=[vdm_pb2.DESCRIPTOR.name])
        message = file.message_type.add()
        vdm_pb2.ImageScore.DESCRIPTOR.CopyToProto(message)
        message.name = "ImageScoreExtra"
        kind = descriptor_pb2.FieldDescriptorProto
        original = list(message.field)
        del message.field[:]
        for field in original:
            message.field.add().CopyFrom(field)
            if field.name == "complexity_bpd":  # optional double extra_bpd
                message.field.add(name="extra_bpd", number=100,
                                  type=kind.TYPE_DOUBLE,
                                  label=kind.LABEL_OPTIONAL,
                                  proto3_optional=True,
                                  oneof_index=len(message.oneof_decl))
                message.oneof_decl.add(name="_extra_bpd")
        bins = message.field.add(name="extra_bins", number=101,
                                 type=kind.TYPE_INT64,
                                 label=kind.LABEL_REPEATED)
        bins.options.Extensions[vdm_pb2.csv_columns] = 2
        message.field.add(name="extra_note", number=102,  # not a column
                          type=kind.TYPE_STRING, label=kind.LABEL_OPTIONAL)
        flag = message.field.add(name="extra_flag", number=103,
                                 type=kind.TYPE_BOOL,
                                 label=kind.LABEL_OPTIONAL)
        flag.options.Extensions[vdm_pb2.csv_group] = "extra"
        pool.Add(file)
        cls.extra = message_factory.MessageFactory(pool).GetPrototype(
            pool.FindMessageTypeByName("vdm.test.ImageScoreExtra"))

    def score(self, bpd: float):
        """An ImageScoreExtra with client_test.cc's Row(_, bpd) fields."""
        score = vdm_client.client.vdm_pb2.ImageScore(
            bpd=bpd, prior_bpd=0.25, recon_bpd=0.5, diffusion_bpd=bpd - 0.75,
            stderr_bpd=0.125, complexity_bpd=3, band_bpd=[1, 2, 3, 4],
            anomaly_score=bpd - 3)
        return self.extra.FromString(score.SerializeToString())

    def test_extra_fields_reach_the_records_and_the_csv(self):
        record = vdm_client.client._record
        plain, full = self.score(10), self.score(10)
        full.extra_bpd = 0.5
        full.extra_bins.append(-3)
        full.extra_note = "a,b"
        rows = [record(plain, 0), record(full, 1)]
        fields = list(vdm_client.CSV_FIELDS)
        fields[fields.index("complexity_bpd") + 1:1] = ["extra_bpd"]
        fields += ["extra_bins_0", "extra_bins_1"]
        self.assertEqual(list(rows[0]), fields)
        self.assertIsNone(rows[0]["extra_bpd"])
        self.assertEqual((rows[1]["extra_bins_0"], rows[1]["extra_bins_1"]),
                         (-3, None))
        csv_text = vdm_client.scores_to_csv(rows, self.extra.DESCRIPTOR)
        self.assertEqual(csv_text.splitlines(), [
            "index,bpd,prior_bpd,recon_bpd,diffusion_bpd,stderr_bpd,"
            "complexity_bpd,extra_bpd,band_bpd_0,band_bpd_1,band_bpd_2,"
            "band_bpd_3,anomaly_score,p_value,is_anomaly,extra_bins_0,"
            "extra_bins_1",
            "0,10.000000,0.250000,0.500000,9.250000,0.125000,3.000000,,"
            "1.000000,2.000000,3.000000,4.000000,7.000000,,,,",
            "1,10.000000,0.250000,0.500000,9.250000,0.125000,3.000000,"
            "0.500000,1.000000,2.000000,3.000000,4.000000,7.000000,,,-3,"])
        # The group's key and column once a message has its field set.
        full.extra_flag = True
        rows = [record(plain, 0), record(full, 1)]
        self.assertNotIn("extra_flag", rows[0])
        self.assertIs(rows[1]["extra_flag"], True)
        lines = vdm_client.scores_to_csv(rows, self.extra.DESCRIPTOR).splitlines()
        self.assertTrue(lines[0].endswith(",extra_bins_1,extra_flag"))
        self.assertTrue(lines[1].endswith(",,,,"))
        self.assertTrue(lines[2].endswith(",-3,,1"))


class SecureServerTest(unittest.TestCase):
    """A server with mTLS and a bearer token (tests/testdata/tls)."""

    TOKEN = "s3cret-token"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        token_file = os.path.join(cls.tmp.name, "token")
        with open(token_file, "w") as f:
            f.write(cls.TOKEN + "\n")
        cls.tls = {"ca": os.path.join(TLS_DIR, "ca.pem"),
                   "cert": os.path.join(TLS_DIR, "client.pem"),
                   "key": os.path.join(TLS_DIR, "client.key")}
        cls.server = Server(
            {"tls": cls.tls},
            f"--tls_cert={os.path.join(TLS_DIR, 'server.pem')}",
            f"--tls_key={os.path.join(TLS_DIR, 'server.key')}",
            f"--tls_client_ca={os.path.join(TLS_DIR, 'ca.pem')}",
            f"--auth_token_file={token_file}")

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
        finally:
            cls.tmp.cleanup()

    def test_mtls_and_token(self):
        with vdm_client.Client(self.server.target, token=self.TOKEN,
                               tls=self.tls, timeout=60) as client:
            self.assertEqual(client.info()["image_height"], 28)
            self.assertEqual(len(client.sample(num_images=1, steps=2)), 1)

    def test_missing_or_wrong_token_is_unauthenticated(self):
        for token in (None, "s3cret-tokem"):
            with self.subTest(token=token), vdm_client.Client(
                    self.server.target, token=token, tls=self.tls,
                    timeout=60) as client:
                self.assertEqual(client.health(), "SERVING")  # probes stay open
                with self.assertRaises(vdm_client.VdmError) as caught:
                    client.info()
                self.assertEqual(caught.exception.code,
                                 grpc.StatusCode.UNAUTHENTICATED)

    def test_tls_needs_a_client_certificate(self):
        with vdm_client.Client(self.server.target, token=self.TOKEN,
                               tls={"ca": self.tls["ca"]}, timeout=10) as client:
            with self.assertRaises(vdm_client.VdmError) as caught:
                client.info()
        self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)

    def test_cert_without_key_is_refused_locally(self):
        with self.assertRaisesRegex(ValueError, "cert and key"):
            vdm_client.Client(self.server.target,
                              tls={"ca": self.tls["ca"], "cert": self.tls["cert"]})


def publish(root: str, name: str, version: int, model: str) -> None:
    """Copies `model` to ROOT/NAME/VERSION/model.pt through a hidden folder
    renamed into place, as a deployment should (a scan never sees half a
    file)."""
    staging = os.path.join(root, name, f".{version}")
    os.makedirs(staging)
    shutil.copyfile(model, os.path.join(staging, "model.pt"))
    os.rename(staging, os.path.join(root, name, str(version)))


def write_thorough_calibration(path: str, timesteps: int) -> None:
    """A valid anomaly.thorough section for the tiny model and tiny_features.pt
    (8 features, 4 probe times), with unit Gaussians: enough for the server to
    serve the level, not a fit to anything (the C++ thorough_server_test fits
    a real one)."""
    def gaussian(d):
        eye = [1.0 if i == j else 0.0 for i in range(d) for j in range(d)]
        return {"timesteps": timesteps, "shared_noise": False, "seed": 1,
                "mean": [0.0] * d, "cholesky": eye, "bands": 4,
                "log_normalizer": 0.5 * d * math.log(2 * math.pi),
                "sorted_scores": [1.0, 2.0, 3.0]}
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 8)).astype("<f4")
    images = rng.integers(0, 256, size=(20, 1, 28, 28), dtype=np.uint8)
    thorough = {
        "probe_times": [0.6, 0.7, 0.8, 0.9], "probe_draws": 2,
        "probe_seed": 23, "knn_k": 5, "local_neighbours": 3, "local_window": 1,
        "local_top": 4, "combined_groups": ["fast", "knn", "local"], "timesteps": timesteps,
        "shared_noise": False, "time_proposal": False, "seed": 1,
        "reference": {"rows": 20, "dimension": 8, "float32_le_base64":
                      base64.b64encode(reference.tobytes()).decode(),
                      "images": {"channels": 1, "height": 28, "width": 28,
                                 "uint8_base64": base64.b64encode(images.tobytes()).decode()}},
        "groups": {"fast": gaussian(5), "knn": gaussian(1),
                   "recon_error": gaussian(4), "recon_distance": gaussian(4),
                   "local": gaussian(1)},
        "sorted_scores": [float(v) for v in range(1, 100)]}
    with open(path, "w") as f:
        json.dump({"format": "vdm-calibration", "version": 2,
                   "anomaly": {"thorough": thorough}}, f)


class ThoroughLevelTest(unittest.TestCase):
    """A server with a feature network and a thorough calibration: the level's
    cost, records, CSV columns and map reach the Python client."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        calibration = os.path.join(cls.dir.name, "thorough.json")
        write_thorough_calibration(calibration, timesteps=4)
        features = os.path.join(os.path.dirname(ARGS.model), "tiny_features.pt")
        cls.server = Server(None, f"--calibration={calibration}",
                            f"--feature_model={features}")
        cls.client = vdm_client.Client(cls.server.target)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()
        cls.dir.cleanup()

    def test_records_csv_and_cost(self):
        info = self.client.info()
        self.assertTrue(info["thorough_available"])
        self.assertEqual(info["thorough_evaluations_per_image"], 4 + 8)
        images = noise_images(3, seed=8)
        rows = self.client.score(images, timesteps=4, seed=2,
                                 anomaly_level="thorough", anomaly_map=True,
                                 false_positive_rate=0.05)
        self.assertEqual(rows.network_evaluations, 3 * (4 + 8))
        for row in rows:
            for field in vdm_client.THOROUGH_FIELDS:
                self.assertIsNotNone(row[field], field)
            self.assertGreater(row["reconstruction_error"], 0)
            self.assertEqual(row["is_anomaly"], row["p_value"] <= 0.05)
            self.assertEqual(row["anomaly_map"].shape, SHAPE)
        header = vdm_client.scores_to_csv(rows).splitlines()[0]
        self.assertTrue(
            header.endswith(",feature_distance,reconstruction_error,local_distance"), header)
        for row in rows:
            self.assertGreaterEqual(row["local_distance"], 0)
        # The probes' noise is shared and fixed: another seed, the same
        # reconstruction error.
        again = self.client.score(images, timesteps=4, seed=3,
                                  anomaly_level="thorough")
        self.assertEqual([r["reconstruction_error"] for r in again],
                         [r["reconstruction_error"] for r in rows])


class RepositoryTest(unittest.TestCase):
    """A server on a model repository of two tiny models: routing by name,
    list_models, the CLI's --model and `models`, and a new version picked up
    on SIGHUP."""

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="vdm_repository_")
        models = os.path.dirname(ARGS.model)
        publish(cls.root, "tiny", 1, ARGS.model)
        publish(cls.root, "uncond", 1, os.path.join(models, "tiny_uncond_v.pt"))
        cls.learned = os.path.join(models, "tiny_learned.pt")
        cls.server = Server(None, f"--model_repository={cls.root}",
                            "--repository_poll_seconds=0")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.root, ignore_errors=True)

    def test_requests_are_routed_by_model_name(self):
        with vdm_client.Client(self.server.target, model="uncond") as client:
            info = client.info()
            self.assertEqual(info["model_name"], "uncond")
            self.assertEqual(info["num_classes"], 0)
            self.assertFalse(info["is_default"])
            self.assertEqual(len(client.sample(2, steps=3, seed=1)), 2)
        with vdm_client.Client(self.server.target) as client:
            self.assertEqual(client.info()["model_name"], "tiny")
        with vdm_client.Client(self.server.target, model="nope") as client:
            with self.assertRaises(vdm_client.VdmError) as caught:
                client.sample(1, steps=2)
            self.assertEqual(caught.exception.code, grpc.StatusCode.NOT_FOUND)
            self.assertIn("serving: tiny, uncond", str(caught.exception))
        with self.assertRaisesRegex(ValueError, "version needs model"):
            vdm_client.Client(self.server.target, version=2)

    def test_cli_model_flag_and_models_command(self):
        base = [sys.executable, "-m", "vdm_client",
                f"--target={self.server.target}"]
        done = subprocess.run(base + ["--model=uncond", "info"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("model_name: uncond", done.stdout)
        done = subprocess.run(base + ["models"], capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"tiny\t\d+\tready\t[0-9.]+ MiB\tdefault")
        self.assertRegex(done.stdout, r"uncond\t1\tready")
        done = subprocess.run([ARGS.client, f"--target={self.server.target}",
                               "models"], capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("uncond\t1\tready", done.stdout)

    def test_sighup_swaps_in_a_new_version(self):
        with vdm_client.Client(self.server.target, model="tiny") as client:
            first = client.sample(1, steps=3, seed=4)
            self.assertEqual(first.model_version, 1)
            before = first[0]
            publish(self.root, "tiny", 2, self.learned)
            self.server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                versions = {(m["name"], m["version"]): m["state"]
                            for m in client.list_models()}
                if versions.get(("tiny", 2)) == "READY":
                    break
                self.assertLess(time.monotonic(), deadline,
                                f"version 2 not ready: {versions}\n"
                                f"{self.server.output()}")
                time.sleep(0.1)  # the server loads it (bounded)
            self.assertEqual(client.info()["model_version"], 2)
            result = client.sample(1, steps=3, seed=4)
            self.assertEqual((result.model, result.model_version), ("tiny", 2))
            scored = client.score([result[0]], timesteps=2)
            self.assertEqual(scored.model_versions, [("tiny", 2)])
            after = result[0]
            # Seeded sampling is deterministic per version: any change is
            # the new network.
            self.assertFalse(np.array_equal(after, before),
                             "the new version is another network")


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("VDM_SERVER"))
    parser.add_argument("--client", default=os.environ.get("VDM_CLIENT"))
    parser.add_argument("--model", default=os.environ.get("VDM_MODEL"))
    ARGS, rest = parser.parse_known_args()
    for name in ("server", "client", "model"):
        path = getattr(ARGS, name)
        if not path or not os.path.exists(path):
            parser.error(f"--{name} (or VDM_{name.upper()}): no such file: {path}")
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
