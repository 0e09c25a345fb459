#!/usr/bin/python3
"""Exports an untrained VDM network as a TorchScript module that honours the vdm-serve contract.

  /usr/bin/python3 model/net/export.py --config=model/net/configs/fmnist_unet.json \
      --out=model.pt [--seed=0] [--schedule=fixed|learned] [--set key=value ...]

`--set` overrides a config key (the value is parsed as JSON when it can be, else taken as a
string: --set prediction=v --set channel_mult=[1,2] --set attention=false). After writing, the
file is loaded back with torch.jit.load and checked: forward at batch 2, gamma endpoints, d
gamma/dt by autograd, gradients reaching the parameters, and a settable metadata string.
Needs Debian's interpreter /usr/bin/python3 (the one with torch).
"""

import argparse
import datetime
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402

import vdm_net  # noqa: E402

DEFAULT_CONFIG_PATH = os.path.join(_HERE, "configs", "fmnist_unet.json")


def parse_override(text: str) -> Tuple[str, Any]:
    """'key=value' -> (key, value); value is JSON if it parses, else the raw string."""
    if "=" not in text:
        raise ValueError("--set expects key=value, got %r" % text)
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str], overrides: List[str] = ()) -> Dict[str, Any]:
    """Reads a JSON config file (or the defaults when path is None), applies key=value
    overrides, and validates. Raises ValueError with a readable message."""
    config: Dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                config = json.load(f)
        except OSError as e:
            raise ValueError("cannot read config %s: %s" % (path, e))
        except json.JSONDecodeError as e:
            raise ValueError("config %s is not valid JSON: %s" % (path, e))
        if not isinstance(config, dict):
            raise ValueError("config %s must hold a JSON object" % path)
    for text in overrides:
        key, value = parse_override(text)
        config[key] = value
    return vdm_net.validate_config(config)


def build_model(config: Dict[str, Any], seed: int = 0,
                net_class: type = vdm_net.VDMNet) -> vdm_net.VDMNet:
    """A freshly initialized network (eval mode) with export metadata filled in.
    `net_class` lets tests export subclasses of VDMNet."""
    torch.manual_seed(seed)
    model = net_class(config).eval()
    model.metadata = json.dumps({
        "dataset": config["dataset"],
        "config": config,
        "training_steps": 0,
        "created_by": "model/net/export.py",
        "created_at": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "seed": seed,
        "num_parameters": vdm_net.count_parameters(model),
        "torch_version": torch.__version__,
        "evaluation": {},
    }, sort_keys=True)
    return model


def save_scripted(module: torch.nn.Module, path: str) -> None:
    """torch.jit.script(module).save(path), written atomically."""
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, path)


def verify(path: str) -> Dict[str, Any]:
    """Loads `path` as C++ would and checks the contract. Raises AssertionError on a breach.
    Returns a small summary."""
    m = torch.jit.load(path)
    c, h, w = int(m.image_channels), int(m.image_height), int(m.image_width)
    n = int(m.num_classes)
    assert m.prediction in vdm_net.PREDICTIONS, "bad prediction %r" % m.prediction
    meta = json.loads(m.metadata)
    assert isinstance(meta, dict), "metadata is not a JSON object"

    # gamma(t): endpoints, increasing with a positive d gamma/dt by autograd on t on a grid of
    # 64 points (as the C++ contract check), the linear slope for the linear schedule.
    t = torch.linspace(0.0, 1.0, 64).requires_grad_(True)
    g = m.gamma(t)
    (dg,) = torch.autograd.grad(g.sum(), t)
    g = g.detach()
    gmin, gmax = float(g[0]), float(g[-1])
    assert g.shape == (64,) and g.dtype == torch.float32, "gamma(t) shape/dtype"
    assert bool((g[1:] > g[:-1]).all()), "gamma not increasing"
    assert bool((dg > 0).all()), "d gamma/dt not positive"
    schedule = json.loads(m.metadata).get("config", {}).get("schedule", "linear")
    if schedule == "linear":
        assert torch.allclose(dg, torch.full_like(dg, gmax - gmin), rtol=1e-5), "d gamma/dt"

    # forward at batch 2 (one labelled row, one "no label" row), in train mode for grads.
    m.train()
    z = torch.randn(2, c, h, w)
    label = torch.tensor([max(n - 1, 0), n], dtype=torch.long) if n > 0 else \
        torch.zeros(2, dtype=torch.long)
    out = m(z, m.gamma(torch.tensor([0.1, 0.9])), label)
    assert out.shape == z.shape and out.dtype == torch.float32, "forward shape %s" % (
        tuple(out.shape),)
    assert bool(torch.isfinite(out).all()), "forward is not finite"
    loss = (out - torch.randn_like(out)).square().mean()
    loss.backward()
    trainable = [(name, p) for name, p in m.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None]
    assert not missing, "no gradient reaches %s" % missing[:5]
    assert any(float(p.grad.abs().sum()) > 0 for _, p in trainable), "all gradients are zero"

    # metadata must be settable (the C++ trainer rewrites it).
    m.metadata = json.dumps({"check": 1})
    assert json.loads(m.metadata) == {"check": 1}
    return {"gamma_min": gmin, "gamma_max": gmax, "shape": (c, h, w), "num_classes": n,
            "schedule": schedule,
            "prediction": m.prediction,
            "parameters": sum(p.numel() for _, p in m.named_parameters()),
            "trainable": sum(p.numel() for _, p in trainable)}


def export(config: Dict[str, Any], out: str, seed: int = 0, check: bool = True) -> Dict[str, Any]:
    model = build_model(config, seed)
    save_scripted(model, out)
    summary = verify(out) if check else {}
    summary["parameters"] = vdm_net.count_parameters(model)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export an untrained VDM network as TorchScript (vdm-serve contract).")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help="JSON config file (default: %(default)s)")
    parser.add_argument("--out", required=True, help="where to write the .pt file")
    parser.add_argument("--seed", type=int, default=0, help="initialization seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--schedule", choices=("fixed", "learned"), default=None,
                        help="noise schedule: fixed (linear, the config's default) or learned "
                        "(a monotone network; sets config schedule=learned)")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip loading the file back and checking the contract")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.set)
        if args.schedule is not None:
            overrides.append("schedule=" + ("learned" if args.schedule == "learned"
                                            else "linear"))
        config = load_config(args.config, overrides)
    except ValueError as e:
        print("export.py: error: %s" % e, file=sys.stderr)
        return 2
    try:
        summary = export(config, args.out, args.seed, check=not args.no_verify)
    except AssertionError as e:
        print("export.py: error: the exported module breaks the contract: %s" % e,
              file=sys.stderr)
        return 1
    print("parameters=%d" % summary["parameters"])
    print("wrote %s (%s, %dx%dx%d, num_classes=%d, prediction=%s, %s gamma %.2f..%.2f)%s" % (
        args.out, config["dataset"], config["image_channels"], config["image_height"],
        config["image_width"], config["num_classes"], config["prediction"], config["schedule"],
        config["gamma_min"], config["gamma_max"], "" if args.no_verify else ", verified"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
