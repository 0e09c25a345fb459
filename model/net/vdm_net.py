"""A small class-conditional U-Net for Variational Diffusion Models (VDM).

The module honours the vdm-serve model contract (docs/design.md, "Model contract") once it
is compiled with torch.jit.script:

  forward(z [B,C,H,W] f32, gamma [B] f32, label [B] i64) -> [B,C,H,W]
  gamma(t [B] f32) -> [B] f32          (exported method: the noise schedule)
  image_channels, image_height, image_width, num_classes   (int attributes)
  prediction                            (str attribute: "eps", "v" or "x")
  metadata                              (str attribute: JSON, mutable)

Everything is configured by a flat dict (see DEFAULT_CONFIG and README.md).
"""

import json
import math
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

# The sinusoidal gamma embedding normalizes gamma with these fixed constants
# (not the learnable endpoints), so the embedding of a given log-SNR never moves.
EMBED_GAMMA_MIN = -13.3
EMBED_GAMMA_MAX = 5.0

DEFAULT_CONFIG: Dict[str, Any] = {
    "dataset": "fashion-mnist",   # free text, recorded in metadata
    "image_channels": 1,
    "image_height": 28,
    "image_width": 28,
    "num_classes": 10,            # 0 = unconditional; label n = "no label"
    "prediction": "eps",          # "eps", "v" or "x"
    "channels": 48,               # base width (also the sinusoidal embedding size)
    "channel_mult": [1, 2, 2],    # width per resolution level; a downsample between levels
    "num_res_blocks": 1,          # res blocks per level on the way down (+1 on the way up)
    "attention": True,            # self-attention in the middle block (lowest resolution)
    "dropout": 0.0,
    "groups": 8,                  # GroupNorm groups; must divide every width
    "gamma_min": -13.3,           # gamma(0)
    "gamma_max": 5.0,             # gamma(1)
    "learn_schedule_endpoints": False,
    "schedule": "linear",         # "linear" or "learned" (monotone network, VDM section 5)
    "schedule_features": 1024,    # hidden width of the learned schedule's network
    "fourier_features": True,     # sin/cos(2^n * 2pi * z) as extra input channels
    "fourier_start": 6,           # n from fourier_start ...
    "fourier_stop": 8,            # ... to fourier_stop - 1
}

PREDICTIONS = ("eps", "v", "x")
SCHEDULES = ("linear", "learned")


def validate_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Returns DEFAULT_CONFIG updated with `config`; raises ValueError on a bad key or value."""
    out = dict(DEFAULT_CONFIG)
    for key, value in config.items():
        if key not in DEFAULT_CONFIG:
            raise ValueError("unknown config key '%s' (known keys: %s)"
                             % (key, ", ".join(sorted(DEFAULT_CONFIG))))
        default = DEFAULT_CONFIG[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, list):
            ok = (isinstance(value, list) and len(value) > 0 and
                  all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError("config key '%s' has a bad value %r (expected %s like %r)"
                             % (key, value, type(default).__name__, default))
        out[key] = value

    def require(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError("bad config: " + msg)

    for key in ("image_channels", "image_height", "image_width", "channels", "num_res_blocks"):
        require(out[key] > 0, "%s must be positive, got %r" % (key, out[key]))
    require(out["num_classes"] >= 0, "num_classes must be >= 0")
    require(out["prediction"] in PREDICTIONS,
            "prediction must be one of %s, got %r" % (PREDICTIONS, out["prediction"]))
    require(out["channels"] % 2 == 0, "channels must be even (sinusoidal embedding)")
    require(out["groups"] > 0, "groups must be positive")
    for m in out["channel_mult"]:
        require((out["channels"] * m) % out["groups"] == 0,
                "groups=%d must divide every width channels*mult (%d)"
                % (out["groups"], out["channels"] * m))
    require(0.0 <= out["dropout"] < 1.0, "dropout must be in [0, 1)")
    require(out["gamma_min"] < out["gamma_max"],
            "gamma_min must be < gamma_max (gamma must increase)")
    require(out["schedule"] in SCHEDULES,
            "schedule must be one of %s, got %r" % (SCHEDULES, out["schedule"]))
    require(out["schedule_features"] > 0, "schedule_features must be positive")
    require(out["fourier_start"] < out["fourier_stop"] or not out["fourier_features"],
            "fourier_start must be < fourier_stop")
    return out


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LinearShape(nn.Module):
    """The linear schedule's shape s(t) = t (no parameters)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t


class MonotoneShape(nn.Module):
    """The learned schedule's shape (Kingma et al. 2021, section 5): the monotone network
    g(t) = l1(t) + l3(sigmoid(l2(l1(t)))), 1 -> 1 -> F -> 1, whose weights are softplus of
    raw parameters (so every weight is > 0 and g is strictly increasing for ANY raw values:
    monotone by construction), normalized to s(t) = (g(t) - g(0)) / (g(1) - g(0)), so
    s(0) = 0 and s(1) = 1 exactly. The endpoints are not here (VDMNet.gamma_min/max).

    Initialized close to linear (s(t) ~ t): l1 has unit slope and the l3 branch is small."""

    def __init__(self, features: int):
        super().__init__()
        inv_softplus_1 = math.log(math.expm1(1.0))
        self.l1_weight = nn.Parameter(torch.full((1, 1), inv_softplus_1))
        self.l1_bias = nn.Parameter(torch.zeros(1))
        # Sigmoid features spread over l1(t) in [0, 1]: slopes |N(0, 1)| * 4, centres uniform.
        slope = torch.randn(features, 1).abs() * 4.0 + 0.1
        centre = torch.rand(features)
        self.l2_weight = nn.Parameter(torch.log(torch.expm1(slope)))
        self.l2_bias = nn.Parameter(-slope[:, 0] * centre)
        # l3 weights softplus(raw) / F with raw ~ N(-2, 1): the branch adds a small bend.
        self.l3_weight = nn.Parameter(torch.randn(1, features) - 2.0)
        self.inv_features: float = 1.0 / features

    def raw(self, t: torch.Tensor) -> torch.Tensor:
        x = t[:, None]
        h1 = F.linear(x, F.softplus(self.l1_weight), self.l1_bias)
        h2 = torch.sigmoid(F.linear(h1, F.softplus(self.l2_weight), self.l2_bias))
        h3 = F.linear(h2, F.softplus(self.l3_weight)) * self.inv_features
        return (h1 + h3)[:, 0]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t32 = t.float()
        ends = self.raw(torch.tensor([0.0, 1.0], dtype=torch.float32, device=t.device))
        return ((self.raw(t32) - ends[0]) / (ends[1] - ends[0])).to(t.dtype)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, residual, zero-init output."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))
        self.scale = 1.0 / math.sqrt(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # [B,HW,HW]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-dropout-conv (zero-init), skip.

    Optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int,
                 dropout: float, attention: bool):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class DownLevel(nn.Module):
    """Res blocks at one resolution, then (except at the last level) a stride-2 conv.

    Pushes every output onto `skips` for the up path."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, emb_dim: int, groups: int,
                 dropout: float, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            ResBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim, groups, dropout, False)
            for i in range(n_blocks)])
        self.has_down = downsample
        self.down = (nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1)
                     if downsample else nn.Identity())

    def forward(self, h: torch.Tensor, emb: torch.Tensor,
                skips: List[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, emb)
            skips.append(h)
        if self.has_down:
            h = self.down(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """Res blocks that each consume one skip, then (except at level 0) a nearest upsample
    to the size of the next skip (so odd sizes such as 7 -> 14 -> 28 work). There is no conv
    after the upsample: the next res block's first conv sees it together with the skip."""

    def __init__(self, in_chs: List[int], skip_chs: List[int], out_ch: int, emb_dim: int,
                 groups: int, dropout: float, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            ResBlock(i + s, out_ch, emb_dim, groups, dropout, False)
            for i, s in zip(in_chs, skip_chs)])
        self.has_up = upsample

    def forward(self, h: torch.Tensor, emb: torch.Tensor,
                skips: List[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if self.has_up:
            nxt = skips[-1]
            h = F.interpolate(h, size=[nxt.shape[2], nxt.shape[3]], mode="nearest")
        return h


class VDMNet(nn.Module):
    """The contract-honouring VDM network. Script it with torch.jit.script(VDMNet(config))."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg = validate_config(config)
        # Contract attributes (plain, so C++ module.attr(...) and setattr work).
        self.image_channels: int = cfg["image_channels"]
        self.image_height: int = cfg["image_height"]
        self.image_width: int = cfg["image_width"]
        self.num_classes: int = cfg["num_classes"]
        self.prediction: str = cfg["prediction"]
        self.metadata: str = json.dumps({
            "dataset": cfg["dataset"], "config": cfg, "training_steps": 0,
            "created_by": "model/net/vdm_net.py"}, sort_keys=True)

        # Noise schedule gamma(t) = gamma_min + (gamma_max - gamma_min) * s(t) with the shape s
        # linear (s(t) = t) or a learned monotone network (s(0) = 0, s(1) = 1); the endpoints
        # are learnable with learn_schedule_endpoints or the learned schedule. vdm-train finds
        # the schedule's parameters by name: gamma_min, gamma_max and gamma_net.*.
        learned = cfg["schedule"] == "learned"
        learn = bool(cfg["learn_schedule_endpoints"]) or learned
        self.gamma_min = nn.Parameter(torch.tensor(float(cfg["gamma_min"])), requires_grad=learn)
        self.gamma_max = nn.Parameter(torch.tensor(float(cfg["gamma_max"])), requires_grad=learn)
        self.learned_schedule: bool = learned

        ch, groups, dropout = cfg["channels"], cfg["groups"], cfg["dropout"]
        emb_dim = 4 * ch
        # Frequencies and Fourier exponents are computed in float32 inside forward (not stored
        # as float buffers) so that module.to(bfloat16) cannot round them.
        self.half_dim: int = ch // 2
        self.emb_in = nn.Linear(ch, emb_dim)
        # Labels 0..n-1 and n = "no label"; unconditional (n = 0) ignores the label input.
        self.conditional: bool = cfg["num_classes"] > 0
        self.label_emb = nn.Embedding(cfg["num_classes"] + 1, emb_dim)
        self.emb_out = nn.Linear(emb_dim, emb_dim)

        # Fourier features of z (VDM paper, appendix): sin/cos(2^n * 2 pi * z).
        self.use_fourier: bool = bool(cfg["fourier_features"])
        n_freq = cfg["fourier_stop"] - cfg["fourier_start"] if self.use_fourier else 0
        self.fourier_start: int = cfg["fourier_start"]
        self.fourier_count: int = n_freq
        in_ch = cfg["image_channels"] * (1 + 2 * n_freq)

        mults = cfg["channel_mult"]
        n_blocks = cfg["num_res_blocks"]
        n_levels = len(mults)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        skip_chs = [ch]
        cur = ch
        downs = []
        for level, m in enumerate(mults):
            last = level == n_levels - 1
            downs.append(DownLevel(cur, ch * m, n_blocks, emb_dim, groups, dropout,
                                   downsample=not last))
            cur = ch * m
            skip_chs += [cur] * n_blocks + ([] if last else [cur])
        self.downs = nn.ModuleList(downs)
        # The middle: one res block at the lowest resolution, with self-attention if asked.
        self.mid = ResBlock(cur, cur, emb_dim, groups, dropout, bool(cfg["attention"]))
        ups = []
        for level in reversed(range(n_levels)):
            out_ch = ch * mults[level]
            in_chs, skips = [], []
            for _ in range(n_blocks + 1):
                in_chs.append(cur)
                skips.append(skip_chs.pop())
                cur = out_ch
            ups.append(UpLevel(in_chs, skips, out_ch, emb_dim, groups, dropout,
                               upsample=level != 0))
        self.ups = nn.ModuleList(ups)
        assert not skip_chs
        self.norm_out = _norm(cur, groups)
        self.conv_out = _zero(nn.Conv2d(cur, cfg["image_channels"], 3, padding=1))
        # Last, so that the learned schedule's random initialization leaves the rest of the
        # network's initialization (same seed) as with the linear schedule.
        self.gamma_net = MonotoneShape(cfg["schedule_features"]) if learned else LinearShape()

    @torch.jit.export
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise schedule gamma(t) = gamma_min + (gamma_max - gamma_min) * s(t), written as
        (1 - s) * gamma_min + s * gamma_max so that t = 0 and t = 1 give the endpoints exactly
        in float32 (s(0) = 0, s(1) = 1). Linear: s(t) = t and d gamma/dt = gamma_max -
        gamma_min. Learned: s is the monotone network gamma_net. Autograd on t works."""
        s = self.gamma_net(t)
        return (1.0 - s) * self.gamma_min + s * self.gamma_max

    def embed(self, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # (gamma - EMBED_GAMMA_MIN) / (EMBED_GAMMA_MAX - EMBED_GAMMA_MIN) * 1000, as literals
        # because TorchScript cannot read module-level globals.
        g = (gamma.float() + 13.3) * (1000.0 / 18.3)
        k = torch.arange(self.half_dim, dtype=torch.float32, device=gamma.device)
        freqs = torch.exp(k * (-math.log(10000.0) / max(self.half_dim - 1, 1)))
        args = g[:, None] * freqs[None, :]
        sin_emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(self.emb_in.weight.dtype)
        if not self.conditional:
            label = torch.zeros_like(label)  # the single "no label" entry
        h = self.emb_in(sin_emb) + self.label_emb(label)
        return self.emb_out(F.silu(h))

    def predict(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The network proper. The input features are computed from z in float32 and then cast
        to the parameters' dtype, and the output is returned in z's dtype: a module converted
        to bfloat16 still takes and returns float32 (and keeps the Fourier features exact)."""
        emb = self.embed(gamma, label)
        x = z.float()
        if self.use_fourier:
            n = torch.arange(self.fourier_start, self.fourier_start + self.fourier_count,
                             dtype=torch.float32, device=z.device)
            freqs = torch.pow(2.0, n) * (2.0 * math.pi)
            zf = (x.unsqueeze(2) * freqs[None, None, :, None, None]).flatten(1, 2)
            x = torch.cat([x, torch.sin(zf), torch.cos(zf)], dim=1)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips: List[torch.Tensor] = [h]
        for down in self.downs:
            h = down(h, emb, skips)
        h = self.mid(h, emb)
        for up in self.ups:
            h = up(h, emb, skips)
        return self.conv_out(F.silu(self.norm_out(h))).to(z.dtype)

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The prediction (eps, v or x per `prediction`) for noisy z at log-noise gamma."""
        return self.predict(z, gamma, label)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
