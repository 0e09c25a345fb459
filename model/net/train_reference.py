#!/usr/bin/python3
"""Reference VDM training loop in plain PyTorch: the speed (and sanity) baseline for the C++
trainer `vdm-train`. It trains an exported TorchScript model with the continuous-time VDM
loss of docs/design.md ("The maths"), in bits per dimension:

  /usr/bin/python3 model/net/train_reference.py --model=model.pt --steps=50 --batch=64 \
      --threads=2 [--out=trained.pt]

Loss per image (nats), summed over the D = C*H*W dimensions:
  prior      0.5 * sum[(1 - sigma_1^2) f^2 + sigma_1^2 - log sigma_1^2 - 1]
  recon      -sum log_softmax(l)[x], l_k = -0.5 ((z0~ - x_k) exp(-gamma_0/2))^2,
             z0~ = f + exp(gamma_0/2) eps0, x_k = 2(k+0.5)/256 - 1
  diffusion  0.5 * gamma'(t) * ||eps - eps_hat||^2, antithetic t_i = (u + i/B) mod 1
and BPD = nats / (D ln 2). AdamW, label dropout (label -> num_classes = "no label").
Prints `steps_per_second=<float>` at the end (timed after the warm-up steps).
"""

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> torch.Tensor:
    """Reads a (gzipped) IDX file of unsigned bytes into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError("%s: not an IDX file of unsigned bytes" % path)
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError("%s: expected %d bytes of data, found %d" % (path, math.prod(dims),
                                                                      len(body)))
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(data_dir: str, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Images [N,1,28,28] uint8 and labels [N] int64."""
    images = read_idx(os.path.join(data_dir, "%s-images-idx3-ubyte.gz" % split))
    labels = read_idx(os.path.join(data_dir, "%s-labels-idx1-ubyte.gz" % split))
    if images.shape[0] != labels.shape[0]:
        raise ValueError("image and label counts differ")
    return images.unsqueeze(1).contiguous(), labels.long()


def to_eps(prediction: str, out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
           sigma: torch.Tensor) -> torch.Tensor:
    """The network output as an eps prediction (docs/design.md, "The maths")."""
    if prediction == "eps":
        return out
    if prediction == "v":
        return sigma * z + alpha * out
    if prediction == "x":
        return (z - alpha * out) / sigma
    raise ValueError("unknown prediction %r" % prediction)


def vlb_nats(model, x: torch.Tensor, label: torch.Tensor, prediction: str, t: torch.Tensor,
             eps: torch.Tensor, eps0: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-image VLB terms in nats for uint8 images x [B,C,H,W] at times t [B] with the
    given standard normal draws eps (diffusion) and eps0 (reconstruction)."""
    f = 2.0 * (x.to(eps.dtype) + 0.5) / 256.0 - 1.0

    # Diffusion term, continuous time, gamma'(t) by autograd.
    t = t.detach().clone().requires_grad_(True)
    g_t = model.gamma(t)
    (dg,) = torch.autograd.grad(g_t.sum(), t, create_graph=True)
    alpha = torch.sqrt(torch.sigmoid(-g_t))[:, None, None, None]
    sigma = torch.sqrt(torch.sigmoid(g_t))[:, None, None, None]
    z = alpha * f + sigma * eps
    eps_hat = to_eps(prediction, model(z, g_t, label), z, alpha, sigma)
    diffusion = 0.5 * dg * (eps - eps_hat).square().flatten(1).sum(1)

    # Prior KL(q(z_1|x) || N(0, I)).
    g_1 = model.gamma(torch.ones(1, dtype=t.dtype))
    s1 = torch.sigmoid(g_1)
    prior = 0.5 * ((1.0 - s1) * f.square() + s1 - F.logsigmoid(g_1) - 1.0).flatten(1).sum(1)

    # Reconstruction -log p(x | z_0) with the discrete 256-bin decoder.
    g_0 = model.gamma(torch.zeros(1, dtype=t.dtype))
    z0 = f + torch.exp(0.5 * g_0) * eps0
    centres = 2.0 * (torch.arange(256, dtype=f.dtype) + 0.5) / 256.0 - 1.0
    logits = -0.5 * ((z0.unsqueeze(-1) - centres) * torch.exp(-0.5 * g_0)).square()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x.long().unsqueeze(-1)).squeeze(-1)
    recon = -logp.flatten(1).sum(1)
    return {"prior": prior, "recon": recon, "diffusion": diffusion}


def vdm_loss(model, x: torch.Tensor, label: torch.Tensor,
             prediction: str) -> Dict[str, torch.Tensor]:
    """Batch-mean VLB terms and their total in bits/dim, antithetic t_i = (u + i/B) mod 1."""
    b = x.shape[0]
    t = torch.remainder(torch.rand(()) + torch.arange(b, dtype=torch.float32) / b, 1.0)
    shape = (b,) + tuple(x.shape[1:])
    nats = vlb_nats(model, x, label, prediction, t, torch.randn(shape), torch.randn(shape))
    to_bpd = 1.0 / (x[0].numel() * math.log(2.0))
    out = {k: v.mean() * to_bpd for k, v in nats.items()}
    out["bpd"] = out["prior"] + out["recon"] + out["diffusion"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="Reference VDM training loop (PyTorch).")
    parser.add_argument("--model", required=True, help="exported TorchScript .pt")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--label_dropout", type=float, default=0.1)
    parser.add_argument("--warmup_steps", type=int, default=2,
                        help="steps not counted in steps_per_second (TorchScript profiling)")
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="optionally save the trained module here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torch.jit.load(args.model)
    model.train()
    n_classes = int(model.num_classes)
    prediction = str(model.prediction)
    shape = (int(model.image_channels), int(model.image_height), int(model.image_width))
    images, labels = load_fashion_mnist(args.data_dir)
    if tuple(images.shape[1:]) != shape:
        print("train_reference.py: error: model shape %s != data shape %s"
              % (shape, tuple(images.shape[1:])), file=sys.stderr)
        return 2
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    print("model=%s parameters=%d trainable=%d prediction=%s num_classes=%d threads=%d batch=%d"
          % (args.model, sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in params), prediction, n_classes, args.threads, args.batch),
          flush=True)

    perm, pos = torch.randperm(images.shape[0]), 0
    timed_start, timed_steps = None, 0
    start = time.time()
    if args.warmup_steps <= 0:
        timed_start = start
    for step in range(1, args.steps + 1):
        if pos + args.batch > perm.numel():
            perm, pos = torch.randperm(images.shape[0]), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x, y = images[idx], labels[idx]
        if n_classes > 0:
            y = torch.where(torch.rand(y.shape) < args.label_dropout,
                            torch.full_like(y, n_classes), y)
        else:
            y = torch.zeros_like(y)
        losses = vdm_loss(model, x, y, prediction)
        opt.zero_grad(set_to_none=True)
        losses["bpd"].backward()
        opt.step()
        if step == args.warmup_steps:
            timed_start = time.time()
        elif step > args.warmup_steps:
            timed_steps += 1
        if step % args.log_every == 0 or step == args.steps:
            print("step=%d bpd=%.4f prior=%.4f recon=%.4f diffusion=%.4f elapsed=%.1fs" % (
                step, *(float(losses[k]) for k in ("bpd", "prior", "recon", "diffusion")),
                time.time() - start), flush=True)

    if timed_steps > 0:
        sps = timed_steps / (time.time() - timed_start)
    else:  # too few steps to skip the warm-up: time them all
        sps = args.steps / (time.time() - start)
    if args.out:
        meta = json.loads(model.metadata)
        meta["training_steps"] = int(meta.get("training_steps", 0)) + args.steps
        meta["trained_by"] = "model/net/train_reference.py"
        model.metadata = json.dumps(meta, sort_keys=True)
        model.eval()
        model.save(args.out)
        print("wrote %s" % args.out)
    print("timed_steps=%d" % timed_steps)
    print("steps_per_second=%.4f" % sps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
