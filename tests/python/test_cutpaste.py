#!/usr/bin/python3
"""The CutPaste recipe of model/net/classifier.py (--cutpaste_weight; docs/anomaly.md, "A CutPaste
feature network"): what cutpaste() changes, that it is seeded, and that the two-headed network
scripts with its defect() method and learns the task on a small synthetic set.

Usage (ctest: cutpaste_test): /usr/bin/python3 tests/python/test_cutpaste.py
"""

import os
import sys
import unittest

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                                "model", "net"))
import classifier  # noqa: E402


def garments(n: int, seed: int) -> torch.Tensor:
    """uint8 [n, 1, 28, 28]: a textured blob on a black background, garment-like enough that
    every rectangle of content differs from the background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    out = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i in range(n):
        cy, cx = 14 + torch.randint(-3, 4, (2,), generator=g).float()
        ry, rx = 7 + torch.randint(0, 5, (2,), generator=g).float()
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        texture = 120 + 100 * torch.rand(28, 28, generator=g)
        out[i, 0] = torch.where(inside, texture, torch.zeros(())).to(torch.uint8)
    return out


class CutPasteTest(unittest.TestCase):
    def test_changes_one_rectangle_of_each_image(self):
        images = garments(64, 0)
        out = classifier.cutpaste(images, torch.Generator().manual_seed(1))
        self.assertEqual(out.shape, images.shape)
        self.assertEqual(out.dtype, torch.uint8)
        changed = out.ne(images)[:, 0]
        for i in range(len(images)):
            rows = changed[i].any(1).nonzero().flatten()
            cols = changed[i].any(0).nonzero().flatten()
            self.assertGreater(len(rows), 0, "image %d unchanged" % i)
            # Every changed pixel lies in one rectangle of at most 15% of the area (a draw of
            # 2-15%, rounded to whole pixels).
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            self.assertLessEqual(int(box), int(0.15 * 784) + 28, "image %d" % i)
        # The source is not modified, and the draw is the generator's.
        self.assertTrue(torch.equal(images, garments(64, 0)))
        again = classifier.cutpaste(images, torch.Generator().manual_seed(1))
        self.assertTrue(torch.equal(out, again))
        other = classifier.cutpaste(images, torch.Generator().manual_seed(2))
        self.assertFalse(torch.equal(out, other))

    def test_background_only_images_stay_as_they_are_when_nothing_can_change(self):
        # Ten redraws of background on background change nothing: the image is left as it was
        # rather than labelled altered with a no-op.
        blank = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
        self.assertTrue(torch.equal(classifier.cutpaste(blank, torch.Generator()), blank))

    def test_the_two_headed_network_scripts_and_learns_the_task(self):
        torch.manual_seed(0)
        model = classifier.FashionCnnCutPaste()
        scripted = torch.jit.script(model)
        f = classifier.to_model_space(garments(3, 3))
        self.assertEqual(tuple(scripted.defect(f).shape), (3,))
        self.assertEqual(tuple(scripted.features(f).shape), (3, 128))
        self.assertEqual(tuple(scripted(f).shape), (3, 10))

        images = garments(256, 4)
        labels = torch.zeros(256, dtype=torch.long)

        def defect_loss() -> float:
            model.eval()
            with torch.no_grad():
                u = images[:128]
                both = torch.cat([u, classifier.cutpaste(u, torch.Generator().manual_seed(6))])
                target = torch.cat([torch.zeros(128), torch.ones(128)])
                return float(F.binary_cross_entropy_with_logits(
                    model.defect(classifier.to_model_space(both)), target))

        before = defect_loss()
        classifier.train(model, images, labels, epochs=16, batch=64, lr=3e-3,
                         cutpaste_weight=1.0, seed=5)
        after = defect_loss()
        print("defect loss %.3f -> %.3f" % (before, after))
        # Chance is ln 2 = 0.69; a head that learned nothing stays there.
        self.assertLess(after, 0.45, "defect loss %.3f -> %.3f" % (before, after))


if __name__ == "__main__":
    torch.set_num_threads(1)
    unittest.main()
