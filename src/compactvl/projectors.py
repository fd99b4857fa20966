"""Projectors: visual features [.., C] → LM embedding space [.., D]. Registered by name in ``PROJECTORS``.

- ``mlp`` (LLaVA-1.5, Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): Linear(C, D) →
  (GELU → Linear(D, D)) × (depth - 1). Knob: ``depth`` (default 2; 1 = the linear projector of LLaVA-1.0).
- ``linear``: a single Linear(C, D).
An optional LayerNorm on the input (``norm: true``) helps when features of several encoders are concatenated.
``standardize: true`` puts a per-channel standardization (x - mean) / std in front, with statistics fitted on the
training features before training (``compactvl.train`` does it; identity until fitted; saved with the weights).
ViT features have a few channels of very large magnitude and a large component shared by every token (DINOv2's
reaches |x| ≈ 20 where most channels stay below 1); standardizing makes the small channels that carry color and
position learnable at the rates that train the rest (docs/training.md, "Projector input standardization").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .registry import PROJECTORS


class Standardize(nn.Module):
    """Per-channel (x - mean) / std; ``fit(features)`` sets the statistics (identity until then)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """``features [n, C]``: rows of projector inputs (real tokens only)."""
        x = features.reshape(-1, self.mean.numel()).float()
        if x.shape[0] < 2:
            raise ConfigError("standardize needs the features of at least two tokens to fit; give more training data")
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3 * float(x.std(0).max())))
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@PROJECTORS.register("mlp")
class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, norm: bool = False, standardize: bool = False):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [Standardize(in_dim)] if standardize else []
        layers += [nn.LayerNorm(in_dim)] if norm else []
        layers.append(nn.Linear(in_dim, out_dim))
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@PROJECTORS.register("linear")
class LinearProjector(MLPProjector):
    def __init__(self, in_dim: int, out_dim: int, norm: bool = False, standardize: bool = False):
        super().__init__(in_dim, out_dim, depth=1, norm=norm, standardize=standardize)


def build_projector(spec: dict, in_dim: int, out_dim: int) -> nn.Module:
    spec = dict(spec or {"type": "mlp"})
    cls = PROJECTORS.get(spec.pop("type", "mlp"))
    try:
        return cls(in_dim, out_dim, **spec)
    except TypeError as e:
        raise ConfigError(f"bad projector knobs {spec}: {e}") from e
