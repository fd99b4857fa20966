"""Projectors: visual features [.., C] → LM embedding space [.., D]. Registered by name in ``PROJECTORS``.

- ``mlp`` (LLaVA-1.5, Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): Linear(C, D) →
  (GELU → Linear(D, D)) × (depth - 1). Knob: ``depth`` (default 2; 1 = the linear projector of LLaVA-1.0).
- ``linear``: a single Linear(C, D).
An optional LayerNorm on the input (``norm: true``) helps when features of several encoders are concatenated.
"""
from __future__ import annotations

from torch import Tensor, nn

from .errors import ConfigError
from .registry import PROJECTORS


@PROJECTORS.register("mlp")
class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, norm: bool = False):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if norm else []
        layers.append(nn.Linear(in_dim, out_dim))
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@PROJECTORS.register("linear")
class LinearProjector(MLPProjector):
    def __init__(self, in_dim: int, out_dim: int, norm: bool = False):
        super().__init__(in_dim, out_dim, depth=1, norm=norm)


def build_projector(spec: dict, in_dim: int, out_dim: int) -> nn.Module:
    spec = dict(spec or {"type": "mlp"})
    cls = PROJECTORS.get(spec.pop("type", "mlp"))
    try:
        return cls(in_dim, out_dim, **spec)
    except TypeError as e:
        raise ConfigError(f"bad projector knobs {spec}: {e}") from e
