"""How the thorough level's local group was chosen (docs/anomaly.md, "The local group").

Every choice was made here, on sets built from TRAINING images only, before vdm-ood-eval
scored the test-image sets it reports:

- in-distribution: training images 59,500..59,749 (the VDM's held-out split, unseen by the
  feature network, which trained on 0..59,499);
- anomalies made from training images 59,750..59,999 as tools/ood_sets.cc makes them from test
  images (upside down, a quarter turn, joined halves, a pasted 9 x 9 patch, inverted), donors
  from training images 10,000..11,999;
- the reference: training images 0..4,999, as vdm-calibrate's.

For each configuration (neighbours, window in cells, layer) it prints the image AUROC of the
global kNN distance and of the local match's largest cells, and the pixel AUROC of the upsampled
map on the two sets with masks. The served choice: relu(bn2(conv2)) at 14 x 14, 50 neighbours,
window 1, the mean of the 20 largest cells.

  /usr/bin/python3 tools/anomaly/choose_local_match.py   # ~3 min on one core
      [--feature_net=model/checkpoints/fmnist.pt.features.pt] [--served_only]

--feature_net compares another feature network on the same sets (it must have been trained on
training images 0..59,499 only, as the shipped one was; one with a `defect` method, trained with
CutPaste, also gets that logit's AUROC per set); --served_only runs the served configuration
alone.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(_ROOT, "model", "net"))
from train_reference import DATA_DIR, load_fashion_mnist  # noqa: E402


def to_model_space(u):
    return 2.0 * (u.float() + 0.5) / 256.0 - 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature_net", default=os.path.join(
        _ROOT, "model", "checkpoints", "fmnist.pt.features.pt"))
    parser.add_argument("--served_only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    x, y = load_fashion_mnist(DATA_DIR, "train")
    net = torch.jit.load(args.feature_net).eval()
    print("feature network: %s" % args.feature_net)

    @torch.no_grad()
    def layers(u):
        f = to_model_space(u)
        a2 = net.local_features(f)                                   # [n, 64, 14, 14]
        a3 = F.relu(net.bn3(net.conv3(F.max_pool2d(a2, 2))))         # [n, 64, 7, 7]
        return net.features(f), a2, a3

    def batched(u):
        parts = [layers(u[i:i + 500]) for i in range(0, len(u), 500)]
        return [torch.cat([p[k] for p in parts]) for k in range(3)]

    ref = x[:5000]
    ref_g, ref_a2, ref_a3 = batched(ref)
    normal = x[59500:59750]
    base, base_y = x[59750:60000], y[59750:60000]
    pool, pool_y = x[10000:12000], y[10000:12000]

    def donor(label):
        others = (pool_y != label).nonzero().flatten()
        return others[torch.randint(len(others), (1,), generator=gen)].item()

    def halves(imgs, labels):
        out = imgs.clone()
        for i in range(len(imgs)):
            out[i, :, 14:] = pool[donor(labels[i].item())][:, 14:]
        return out, out.ne(imgs).any(1)

    def patch(imgs, labels, s=9):
        out = imgs.clone()
        for i in range(len(imgs)):
            d = pool[donor(labels[i].item())]
            sums = F.avg_pool2d(d.float().unsqueeze(0), s, 1)[0, 0]
            b = sums.flatten().argmax().item()
            dy, dx = b // sums.shape[1], b % sums.shape[1]
            turns = 1 + torch.randint(3, (1,), generator=gen).item()
            p = torch.rot90(d[:, dy:dy + s, dx:dx + s], turns, (1, 2))
            on = imgs[i].gt(0).any(0)
            rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
            y0, y1 = rows.min().item(), rows.max().item() + 1
            x0, x1 = cols.min().item(), cols.max().item() + 1
            if y1 - y0 < s:
                y0, y1 = 0, 28
            if x1 - x0 < s:
                x0, x1 = 0, 28
            yy = y0 + torch.randint(y1 - y0 - s + 1, (1,), generator=gen).item()
            xx = x0 + torch.randint(x1 - x0 - s + 1, (1,), generator=gen).item()
            out[i, :, yy:yy + s, xx:xx + s] = p
        return out, out.ne(imgs).any(1)

    sets = {"flipped": (torch.flip(base, (2,)), None),
            "rotated": (torch.rot90(base, 1, (2, 3)).contiguous(), None),
            "halves": halves(base, base_y), "patch": patch(base, base_y),
            "inverted": (255 - base, None)}

    def auroc(pos, neg):
        s = torch.cat([pos, neg]).double()
        r = torch.empty_like(s)
        r[s.argsort()] = torch.arange(1, len(s) + 1, dtype=s.dtype)
        n = len(pos)
        return ((r[:n].sum() - n * (n + 1) / 2) / (n * len(neg))).item()

    if hasattr(net, "defect"):
        # A CutPaste-trained network (model/net/classifier.py --cutpaste_weight): its own
        # "altered" logit, per set.
        with torch.no_grad():
            d_in = net.defect(to_model_space(normal))
            print("  " + "\n  ".join(
                "%-8s defect logit %.3f" % (name, auroc(net.defect(to_model_space(imgs)), d_in))
                for name, (imgs, _) in sets.items()), flush=True)

    def nearest_cells(q, r, window):
        k, c, h, w = r.shape
        padded = F.pad(r, (window,) * 4, value=1e6)
        best = torch.full((h, w), float("inf"))
        for dy in range(2 * window + 1):
            for dx in range(2 * window + 1):
                d = (padded[:, :, dy:dy + h, dx:dx + w] - q).pow(2).sum(1).amin(0)
                best = torch.minimum(best, d)
        return best.sqrt()

    def score(u, neighbours, window, layer):
        g, a2, a3 = batched(u)
        d = torch.cdist(g, ref_g)
        knn = d.topk(5, largest=False).values.mean(1)
        near = d.topk(neighbours, largest=False).indices
        if layer == "a2@14":
            q, r = a2, ref_a2
        else:  # a2 pooled to 7 x 7, with a3
            q = torch.cat([F.avg_pool2d(a2, 2), a3], 1)
            r = torch.cat([F.avg_pool2d(ref_a2, 2), ref_a3], 1)
        maps = torch.stack([nearest_cells(q[i], r[near[i]], window) for i in range(len(u))])
        return knn, maps

    configs = [(10, 1, "a2+a3@7"), (50, 1, "a2+a3@7"), (10, 0, "a2+a3@7"),
               (10, 1, "a2@14"), (50, 1, "a2@14"), (50, 0, "a2@14"), (50, 2, "a2@14")]
    if args.served_only:
        configs = [(50, 1, "a2@14")]
    for config in configs:
        start = time.time()
        knn_in, maps_in = score(normal, *config)
        top_in = maps_in.flatten(1).topk(20).values.mean(1)
        rows = []
        for name, (imgs, mask) in sets.items():
            knn, maps = score(imgs, *config)
            top = maps.flatten(1).topk(20).values.mean(1)
            row = "%-8s knn %.3f  local top-20 %.3f" % (name, auroc(knn, knn_in),
                                                         auroc(top, top_in))
            if mask is not None:
                up = F.interpolate(maps.unsqueeze(1), size=(28, 28), mode="bilinear",
                                   align_corners=False)[:, 0]
                row += "  pixel %.3f" % auroc(up[mask], up[~mask])
            rows.append(row)
        print("neighbours=%d window=%d layer=%s (%.0f s)" % (config + (time.time() - start,)))
        print("  " + "\n  ".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
