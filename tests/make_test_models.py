#!/usr/bin/python3
"""Exports the small TorchScript models the C++ tests load, into --out_dir.

  /usr/bin/python3 tests/make_test_models.py --out_dir=DIR

Good models (both pass the contract and are verified after writing; their zero-initialized
layers get small random weights so that the output is non-zero and depends on z, gamma and
the label, which an untrained export would not):
  tiny.pt                 tiny config, 1x28x28, num_classes=10, prediction "eps"
  tiny_uncond_v.pt        tiny config, num_classes=0, prediction "v"
  tiny_learned.pt         tiny config with the learned (monotone network) schedule
  tiny_smooth.pt          tiny.pt with 50x smaller random weights in those layers: a gentle
                          network (d eps_hat / d z of order 1, as a trained model's at high
                          noise, where tiny.pt's is ~150), so its ODE solves converge at a few
                          dozen steps and rounding is not amplified (tests/portability)
Deliberately broken models, each breaking exactly one part of the contract:
  broken_no_gamma.pt      no `gamma` method
  broken_bad_prediction.pt  prediction = "foo"
  broken_wrong_shape.pt   forward returns [B, C, H-1, W]
  broken_no_metadata.pt   no `metadata` attribute
  broken_no_num_classes.pt  no `num_classes` attribute
  broken_decreasing_gamma.pt  gamma(0) = 5 > gamma(1) = -13.3
  broken_bumpy_gamma.pt   gamma(0) < gamma(1), but gamma decreases around t = 0.5
  broken_gamma_no_grad.pt  gamma(t) is detached from t (autograd gives no derivative)
  broken_nan_output.pt    forward returns NaN
  broken_forward_raises.pt  forward raises (rejects every input)
A feature network for the thorough anomaly level (model/vdm/feature_model.h):
  tiny_features.pt        random weights, features(f) -> [B, 8] of 1x28x28 images,
                          local_features(f) -> [B, 4, 14, 14]
  tiny_features_no_local.pt  the same without local_features (an older export)
A probe for TorchScriptModel::Denoise's transfers (tests/model/vdm/torchscript_model_test.cc):
  probe.pt                a valid 1x4x4 model whose forward raises unless z, gamma are f32 and
                          label i64 on the device of its weights, records the device it saw
                          (seen_device) and whether its convolution ran in bf16 (seen_bf16),
                          and returns the convolution's output in whatever dtype it has
All are deterministic (fixed seeds) and the whole run takes a few seconds.
"""

import argparse
import json
import os
import sys
import time

sys.dont_write_bytecode = True  # run from the build; leave no __pycache__ in the sources
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "model", "net"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import export  # noqa: E402
import vdm_net  # noqa: E402

TINY_CONFIG = os.path.join(_REPO, "model", "net", "configs", "tiny.json")


class NoGamma(nn.Module):
    """Every contract member except the `gamma` method."""

    def __init__(self, net: vdm_net.VDMNet):
        super().__init__()
        self.net = net
        self.image_channels: int = net.image_channels
        self.image_height: int = net.image_height
        self.image_width: int = net.image_width
        self.num_classes: int = net.num_classes
        self.prediction: str = net.prediction
        self.metadata: str = net.metadata

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.net(z, gamma, label)


class WrongShape(vdm_net.VDMNet):
    """forward drops one row of pixels."""

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.predict(z, gamma, label)[:, :, 1:, :]


class NanOutput(vdm_net.VDMNet):
    """forward returns NaN everywhere."""

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.predict(z, gamma, label) * float("nan")


class ForwardRaises(vdm_net.VDMNet):
    """forward raises on every call."""

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if z.numel() >= 0:
            raise RuntimeError("broken_forward_raises: this model always fails")
        return z


class TinyFeaturesNoLocal(nn.Module):
    """TinyFeatures' weights and features(f) without local_features(f): a feature network
    exported before the thorough level's local group."""

    def __init__(self):
        super().__init__()
        base = TinyFeatures()
        self.conv, self.fc = base.conv, base.fc
        self.image_channels, self.image_height, self.image_width = 1, 28, 28

    @torch.jit.export
    def features(self, f: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.avg_pool2d(torch.relu(self.conv(f)), 2)
        return torch.tanh(self.fc(h.flatten(1)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.features(f)


class Probe(nn.Module):
    """A valid model that checks and records what Denoise hands it (see the docstring)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.image_channels: int = 1
        self.image_height: int = 4
        self.image_width: int = 4
        self.num_classes: int = 2
        self.prediction: str = "eps"
        self.metadata: str = "{}"
        self.seen_device: str = ""
        self.seen_bf16: bool = False

    @torch.jit.export
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return -13.3 + 18.3 * t

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if z.dtype != torch.float32 or gamma.dtype != torch.float32 or label.dtype != torch.int64:
            raise RuntimeError("probe: inputs must be z f32, gamma f32, label i64")
        device = self.conv.weight.device
        if z.device != device or gamma.device != device or label.device != device:
            raise RuntimeError("probe: inputs must be on the model's device")
        y = self.conv(z)
        self.seen_device = str(z.device)
        self.seen_bf16 = y.dtype == torch.bfloat16
        return y + gamma.view(-1, 1, 1, 1).to(y.dtype)


class BumpyGamma(vdm_net.VDMNet):
    """gamma(t) = linear + 4 sin(2 pi t): right endpoints, d gamma/dt < 0 around t = 0.5."""

    @torch.jit.export
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - t) * self.gamma_min + t * self.gamma_max + 4.0 * torch.sin(6.2831853 * t)


class GammaNoGrad(vdm_net.VDMNet):
    """gamma(t) is right but detached from t."""

    @torch.jit.export
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return ((1.0 - t) * self.gamma_min + t * self.gamma_max).detach()


class TinyFeatures(nn.Module):
    """A feature network for the thorough anomaly level (model/vdm/feature_model.h): random
    weights, 8 features of a 1x28x28 image, local features [B, 4, 14, 14], the attributes
    the loader checks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)  # 28 -> 14
        self.fc = nn.Linear(4 * 7 * 7, 8)
        self.image_channels = 1
        self.image_height = 28
        self.image_width = 28

    @torch.jit.export
    def features(self, f: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(f))
        h = torch.nn.functional.avg_pool2d(h, 2)  # 14 -> 7
        return torch.tanh(self.fc(h.flatten(1)))

    @torch.jit.export
    def local_features(self, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(f))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.features(f)


def enliven(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Gives the zero-initialized layers (res-block output convs, attention projection, final
    conv) small random weights, so the test model's output is non-zero and depends on z,
    gamma and the label (an untrained VDMNet predicts exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() > 0 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_config(**overrides):
    return export.load_config(TINY_CONFIG, ["%s=%s" % (k, json.dumps(v))
                                            for k, v in overrides.items()])


def tiny(cls=vdm_net.VDMNet, seed=0, **overrides) -> vdm_net.VDMNet:
    """A tiny model of class `cls` with export metadata, initialized from `seed`."""
    return export.build_model(tiny_config(**overrides), seed, net_class=cls)


def broken_models():
    """name -> module (nn.Module, scripted by the caller)."""
    no_metadata = tiny(seed=3)
    del no_metadata.metadata
    no_num_classes = tiny(seed=4)
    del no_num_classes.num_classes

    bad_prediction = tiny(seed=2)
    bad_prediction.prediction = "foo"

    decreasing = tiny(seed=5)
    with torch.no_grad():
        decreasing.gamma_min.fill_(5.0)
        decreasing.gamma_max.fill_(-13.3)
    return {
        "broken_no_gamma": NoGamma(tiny(seed=1)),
        "broken_bad_prediction": bad_prediction,
        "broken_wrong_shape": tiny(WrongShape, seed=6),
        "broken_no_metadata": no_metadata,
        "broken_no_num_classes": no_num_classes,
        "broken_decreasing_gamma": decreasing,
        "broken_bumpy_gamma": tiny(BumpyGamma, seed=9),
        "broken_gamma_no_grad": tiny(GammaNoGrad, seed=10),
        "broken_nan_output": tiny(NanOutput, seed=7),
        "broken_forward_raises": tiny(ForwardRaises, seed=8),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.time()

    good = {
        "tiny": tiny_config(),
        "tiny_uncond_v": tiny_config(num_classes=0, prediction="v"),
        "tiny_learned": tiny_config(schedule="learned"),
    }
    std = {"tiny_smooth": 0.001}
    good["tiny_smooth"] = tiny_config()
    for name, config in good.items():
        path = os.path.join(args.out_dir, name + ".pt")
        model = enliven(export.build_model(config, seed=0), seed=100,
                        std=std.get(name, 0.05))
        export.save_scripted(model, path)
        summary = export.verify(path)
        print("wrote %s (%d parameters, verified)" % (path, summary["parameters"]))

    features_path = os.path.join(args.out_dir, "tiny_features.pt")
    torch.jit.script(TinyFeatures().eval()).save(features_path)
    print("wrote %s" % features_path)
    old_path = os.path.join(args.out_dir, "tiny_features_no_local.pt")
    torch.jit.script(TinyFeaturesNoLocal().eval()).save(old_path)
    print("wrote %s" % old_path)

    probe_path = os.path.join(args.out_dir, "probe.pt")
    torch.jit.script(Probe()).save(probe_path)
    print("wrote %s" % probe_path)

    for name, module in broken_models().items():
        path = os.path.join(args.out_dir, name + ".pt")
        export.save_scripted(module, path)
        torch.jit.load(path)  # every broken model must still load
        print("wrote %s" % path)
    print("make_test_models: done in %.1f s" % (time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
