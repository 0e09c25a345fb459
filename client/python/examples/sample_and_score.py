#!/usr/bin/env python3
"""Sample a few guided images, score them beside some noise, look at both.

A notebook in script form (each `# %%` is a cell). Run it against a server:

    build/vdm-server --model=model/checkpoints/fmnist.pt --address=127.0.0.1:50051 &
    PYTHONPATH=build/python /usr/bin/python3 client/python/examples/sample_and_score.py \
        [HOST:PORT]

It plots with matplotlib when that is installed, and skips the plot otherwise.
"""

# %% Connect. The target is the first argument, else $VDM_TARGET.
import os
import sys
import time

import numpy as np

import vdm_client

target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
    "VDM_TARGET", "localhost:50051")
client = vdm_client.Client(target, timeout=600)
print("server:", target, client.health())
info = client.info()
print(f"model: {info['image_channels']}x{info['image_height']}x"
      f"{info['image_width']}, {info['num_classes']} classes, "
      f"prediction {info['prediction']}, calibrated {info['calibrated']}")

# %% Sample 4 images of class 7 (a sneaker in Fashion-MNIST) with
# classifier-free guidance at scale 3, through the streaming call so that we
# can show progress. The seed makes the run reproducible.
start = time.monotonic()
for event in client.sample_stream(num_images=4, steps=50, sampler="ddim",
                                  label=7 % max(info["num_classes"], 1),
                                  guidance=3.0, seed=1):
    if isinstance(event, vdm_client.Progress):
        print(f"\rsampling: step {event.step}/{event.total_steps}", end="",
              flush=True)
    else:
        samples = event  # the last event: a SampleResult (a list of arrays)
print(f"\n{len(samples)} samples of shape {samples[0].shape} in "
      f"{time.monotonic() - start:.1f} s ({samples.network_evaluations} "
      f"network evaluations, seed {samples.seed})")

# %% Some images the model should find unlikely: uniform noise of the same shape.
rng = np.random.default_rng(0)
noise = [rng.integers(0, 256, samples[0].shape, dtype=np.uint8)
         for _ in range(4)]

# %% Score all 8 in one call (split into requests of the server's limit).
# shared_noise=True uses the same times and noise for every image, which is
# the right choice for ranking images against each other.
rows = client.score(list(samples) + noise, timesteps=16, seed=1,
                    shared_noise=True, anomaly_map=True)

# %% The table: BPD and its parts, and the complexity-corrected anomaly score
# (calibrated p-values appear when the model is calibrated for this setup).
kinds = ["sample"] * len(samples) + ["noise"] * len(noise)
print(f"{'kind':>6} {'bpd':>8} {'prior':>8} {'recon':>8} {'diffusion':>9} "
      f"{'anomaly':>8} {'p_value':>8}")
for kind, row in zip(kinds, rows):
    p_value = "-" if row["p_value"] is None else f"{row['p_value']:.3f}"
    print(f"{kind:>6} {row['bpd']:8.3f} {row['prior_bpd']:8.3f} "
          f"{row['recon_bpd']:8.3f} {row['diffusion_bpd']:9.3f} "
          f"{row['anomaly_score']:8.3f} {p_value:>8}")
for kind in ("sample", "noise"):
    mean = np.mean([r["bpd"] for k, r in zip(kinds, rows) if k == kind])
    print(f"mean bpd, {kind}: {mean:.3f}")

# %% Plot the images with their BPD, and their anomaly maps (where in the
# image the diffusion term spends its bits), if matplotlib is there.
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: skipping the plot")
else:
    images = list(samples) + noise
    figure, axes = plt.subplots(2, len(images), figsize=(2 * len(images), 4.4))
    for i, (image, row) in enumerate(zip(images, rows)):
        axes[0, i].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[0, i].set_title(f"{kinds[i]}\n{row['bpd']:.2f} bpd", fontsize=9)
        axes[1, i].imshow(row["anomaly_map"], cmap="magma")
        for axis in axes[:, i]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig("sample_and_score.png", dpi=100)
    print("wrote sample_and_score.png")

# %% Editing: inpaint the right half of the first sample (RePaint, 2
# resampling rounds), and round-trip it through its DDIM latent.
mask = np.zeros(samples[0].shape, dtype=bool)
mask[:, : mask.shape[1] // 2] = True
inpainted = client.inpaint(samples[0], mask, num_images=2, steps=20,
                           resample_rounds=2)
print(f"inpainted: {len(inpainted)} images, "
      f"{inpainted.network_evaluations} network evaluations")
latents = client.encode(samples[:1], steps=50)
again = client.decode(latents, steps=50)
error = np.abs(again[0].astype(float) - samples[0]).mean()
print(f"encode/decode at 50 steps: latent {latents[0].shape}, "
      f"mean |error| {error:.2f} of 255")

client.close()
