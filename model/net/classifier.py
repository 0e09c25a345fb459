#!/usr/bin/python3
"""A small CNN classifier of Fashion-MNIST, the judge of guided samples (issue 4: at guidance 3,
nine in ten samples should be classified as the class asked for). Trains on the 60,000 training
images, prints the accuracy on the 10,000 test images, and exports TorchScript:

  /usr/bin/python3 model/net/classifier.py --out=model/checkpoints/classifier.pt \
      [--epochs=3 --threads=1 --seed=0]

The exported module's `forward(f)` takes images in the VDM's model space
(f = 2*(x+0.5)/256 - 1 for pixels x in 0..255; float32 [B,1,28,28]) and returns logits [B,10].
Attributes: `num_classes` (10), `image_channels/height/width` (1, 28, 28), `test_accuracy`
(float) and `metadata` (JSON: data, epochs, seed, accuracy, torch version). The C++ tool
`vdm-classify` (tools/classify_samples.cc) loads it. ~130k parameters (~0.5 MB file).
Needs Debian's interpreter /usr/bin/python3 (the one with torch).

--cutpaste_weight=W (> 0) also trains a CutPaste head (Li et al. 2021: normal images against
images with a rectangle of themselves pasted elsewhere) on the same features, and the export gains
`defect(f)` -> [B] logits: a feature network for local defects (docs/anomaly.md, "A CutPaste
feature network").
"""

import argparse
import datetime
import json
import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train_reference import DATA_DIR, load_fashion_mnist  # noqa: E402

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the VDM's model space f = 2*(x+0.5)/256 - 1 (docs/design.md, "The maths")."""
    return 2.0 * (x.float() + 0.5) / 256.0 - 1.0


class FashionCnn(nn.Module):
    """conv-BN-ReLU blocks at 28, 14 and 7 pixels (32, 64, 64 channels), each followed by a
    2x2 max-pool (28 -> 14 -> 7 -> 3), then 576 -> 128 -> 10 with dropout."""

    def __init__(self, test_accuracy: float = 0.0, metadata: str = "{}"):
        super().__init__()
        self.num_classes = 10
        self.image_channels = 1
        self.image_height = 28
        self.image_width = 28
        self.test_accuracy = float(test_accuracy)
        self.metadata = metadata
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 3 * 3, 128)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(128, 10)

    @torch.jit.export
    def features(self, f: torch.Tensor) -> torch.Tensor:
        """The penultimate activations relu(fc1) [B, 128]: a feature space
        learned on the training split, for distances between images
        (vdm-ood-eval's feature-kNN baseline)."""
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(f))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        h = F.max_pool2d(F.relu(self.bn3(self.conv3(h))), 2)
        return F.relu(self.fc1(h.flatten(1)))

    @torch.jit.export
    def local_features(self, f: torch.Tensor) -> torch.Tensor:
        """The second block's activations relu(bn2(conv2)) [B, 64, 14, 14]: a feature per
        2 x 2 pixel cell, each seeing a 10 x 10 window (the thorough anomaly level's local
        group and map, docs/anomaly.md)."""
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(f))), 2)
        return F.relu(self.bn2(self.conv2(h)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(f)))


class FashionCnnCutPaste(FashionCnn):
    """FashionCnn with a second head on the same features, `defect(f)`: the logit that an image
    was altered by CutPaste (Li et al. 2021, "CutPaste: self-supervised learning for anomaly
    detection and localization"). Trained on both tasks (--cutpaste_weight), its features and
    local features learn to see local discontinuities as well as the classes (the thorough
    anomaly level's feature network, docs/anomaly.md)."""

    def __init__(self, test_accuracy: float = 0.0, metadata: str = "{}"):
        super().__init__(test_accuracy, metadata)
        self.defect_head = nn.Linear(128, 1)

    @torch.jit.export
    def defect(self, f: torch.Tensor) -> torch.Tensor:
        """The CutPaste logit [B]: > 0 reads as altered."""
        return self.defect_head(self.features(f))[:, 0]


def cutpaste(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """CutPaste as Li et al. 2021 define it, scaled to these images: from each uint8 image
    [1, H, W] cut a rectangle of 2-15% of its area (aspect ratio log-uniform in 0.3-3.3) at a
    random place, scale its brightness by a factor in [0.9, 1.1] (the paper's colour jitter, for
    grey images) and paste it back at another random place. A draw that changes fewer than a
    quarter of the rectangle's pixels by more than 16 levels (background pasted on background)
    is drawn again, up to 10 times, so the label "altered" is true."""
    out = images.clone()
    n, _, h, w = images.shape
    for i in range(n):
        for _ in range(10):
            area = h * w * (0.02 + 0.13 * torch.rand(1, generator=gen).item())
            # Height / width, log-uniform in 0.3 .. 3.3 (ln 3.3 = 1.19).
            ratio = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * 1.19)
            ph = max(2, min(h - 1, int(round((area * ratio) ** 0.5))))
            pw = max(2, min(w - 1, int(round((area / ratio) ** 0.5))))
            sy = torch.randint(h - ph + 1, (1,), generator=gen).item()
            sx = torch.randint(w - pw + 1, (1,), generator=gen).item()
            ty = torch.randint(h - ph + 1, (1,), generator=gen).item()
            tx = torch.randint(w - pw + 1, (1,), generator=gen).item()
            scale = 0.9 + 0.2 * torch.rand(1, generator=gen).item()
            patch = (images[i, :, sy:sy + ph, sx:sx + pw].float() * scale).clamp(0, 255)
            before = images[i, :, ty:ty + ph, tx:tx + pw].float()
            if ((patch - before).abs() > 16).float().mean() >= 0.25:
                out[i, :, ty:ty + ph, tx:tx + pw] = patch.round().to(images.dtype)
                break
    return out


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch):
        logits = model(to_model_space(images[i:i + batch]))
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / images.shape[0]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
          batch: int, lr: float, cutpaste_weight: float = 0.0, seed: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (images.shape[0] // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    step, start = 0, time.time()
    gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(images.shape[0])
        for i in range(0, images.shape[0] - batch + 1, batch):
            idx = perm[i:i + batch]
            u = images[idx]
            # Random horizontal flips: the classes are mirror-symmetric.
            flip = torch.rand(u.shape[0]) < 0.5
            u = torch.where(flip[:, None, None, None], u.flip(3), u)
            x = to_model_space(u)
            loss = F.cross_entropy(model(x), labels[idx])
            if cutpaste_weight > 0:
                # Normal against altered, the same images (CutPaste's binary task).
                both = torch.cat([x, to_model_space(cutpaste(u, gen))])
                target = torch.cat([torch.zeros(u.shape[0]), torch.ones(u.shape[0])])
                loss = loss + cutpaste_weight * F.binary_cross_entropy_with_logits(
                    model.defect(both), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 200 == 0:
                print("epoch %d step %d/%d loss %.4f elapsed %.0fs"
                      % (epoch + 1, step, steps, float(loss), time.time() - start), flush=True)


def save_checked(model: nn.Module, out: str) -> torch.jit.ScriptModule:
    """Scripts `model` to `out` (atomically) and loads it back."""
    model.eval()
    scripted = torch.jit.script(model)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, out)
    return torch.jit.load(out)


@torch.no_grad()
def reexport(source: str, out: str) -> int:
    """Writes `source`'s weights with this file's methods: forward and features must agree
    with the old export on 64 random inputs."""
    old = torch.jit.load(source).eval()
    model = FashionCnn(float(old.test_accuracy), str(old.metadata))
    model.load_state_dict(old.state_dict())
    loaded = save_checked(model, out)
    f = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if not (torch.equal(loaded(f), old(f)) and torch.equal(loaded.features(f), old.features(f))):
        print("classifier.py: error: the re-export disagrees with %s" % source, file=sys.stderr)
        return 1
    print("re-exported %s to %s (%d bytes): forward and features unchanged"
          % (source, out, os.path.getsize(out)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Trains and exports the Fashion-MNIST CNN.")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--out", default=os.path.join(_HERE, "..", "checkpoints",
                                                      "classifier.pt"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=0,
                        help="train on the first N training images only (0 = all 60,000); "
                             "59500 keeps the VDM trainer's held-out split (59,500..59,999) "
                             "unseen, as a feature model for anomaly calibration needs")
    parser.add_argument("--cutpaste_weight", type=float, default=0.0,
                        help="> 0: also train a CutPaste head (normal against self-pasted "
                             "images, Li et al. 2021) with this weight on its loss; the export "
                             "gains defect(f) (a feature network for the thorough anomaly level)")
    parser.add_argument("--reexport", default="",
                        help="no training: load the weights, accuracy and metadata of this "
                             "export and write them to --out with this file's methods "
                             "(checked: forward and features unchanged)")
    args = parser.parse_args()
    if args.reexport:
        return reexport(args.reexport, args.out)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist(args.data_dir, "train")
    if args.train_images > 0:
        if args.train_images > train_x.shape[0]:
            print("classifier.py: error: --train_images=%d but the training split has %d images"
                  % (args.train_images, train_x.shape[0]), file=sys.stderr)
            return 2
        train_x, train_y = train_x[:args.train_images], train_y[:args.train_images]
    test_x, test_y = load_fashion_mnist(args.data_dir, "t10k")
    model = FashionCnnCutPaste() if args.cutpaste_weight > 0 else FashionCnn()
    n_params = sum(p.numel() for p in model.parameters())
    print("parameters=%d epochs=%d batch=%d threads=%d" % (n_params, args.epochs, args.batch,
                                                          args.threads), flush=True)
    start = time.time()
    train(model, train_x, train_y, args.epochs, args.batch, args.lr, args.cutpaste_weight,
          args.seed)
    seconds = time.time() - start
    acc = accuracy(model, test_x, test_y)
    print("trained in %.0fs; test_accuracy=%.4f (%d test images)" % (seconds, acc,
                                                                     test_x.shape[0]))

    model.test_accuracy = acc
    model.metadata = json.dumps({
        "what": "Fashion-MNIST CNN classifier for checking guided VDM samples",
        "input": "float32 [B,1,28,28] in model space f = 2*(x+0.5)/256-1; output logits [B,10]",
        "classes": CLASS_NAMES,
        "data": args.data_dir, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "train_seconds": round(seconds),
        "train_images": int(train_x.shape[0]), "cutpaste_weight": args.cutpaste_weight,
        "test_accuracy": acc, "num_parameters": n_params,
        "created_by": "model/net/classifier.py", "torch_version": torch.__version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, sort_keys=True)
    # Save, load it back and check it agrees with the eager model.
    loaded = save_checked(model, args.out)
    check = accuracy(loaded, test_x[:1000], test_y[:1000])
    if abs(check - accuracy(model, test_x[:1000], test_y[:1000])) > 1e-9:
        print("classifier.py: error: the exported module disagrees with the trained one",
              file=sys.stderr)
        return 1
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
