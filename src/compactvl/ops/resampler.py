"""Query resampler (Q-Former, Li et al. 2023 / Perceiver Resampler, Alayrac et al. 2022 "Flamingo").

Equation, per layer ℓ: q ← q + W_o·softmax((LN(q) W_q)(LN(x) W_k)ᵀ / √d_h)(LN(x) W_v) (multi-head cross-attention
from N^V learnable queries to the valid tokens), then q ← q + FFN(LN(q)); output LN(q). x is first mapped to
``dim`` by a linear layer when C ≠ dim. Knobs: ``num_queries`` (64), ``dim`` (default C), ``heads`` (8; must
divide dim), ``depth`` (1), ``mlp_ratio`` (4), ``streams``. Expected tokens: num_queries per stream.
Positions/sizes/provenance come from the last layer's head-averaged attention.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, check_int, register


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln_q, self.ln_x, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, q: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        B, N, D = x.shape
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # [B, h, *, d_h]
        xn = self.ln_x(x)
        qh, kh, vh = split(self.q(self.ln_q(q))), split(self.k(xn)), split(self.v(xn))
        logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(D // self.heads)
        a = logits.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1)  # [B, h, Q, N]
        q = q + self.o((a @ vh).transpose(1, 2).reshape(B, -1, D))
        return q + self.mlp(self.ln_f(q)), a.mean(1)


@register("resampler")
class Resampler(StreamOp):
    def __init__(self, in_channels: list[int], *, num_queries: int = 64, dim: int | None = None, heads: int = 8,
                 depth: int = 1, mlp_ratio: int = 4, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.num_queries = check_int(num_queries, "num_queries", "resampler")
        self.heads, self.depth = check_int(heads, "heads", "resampler"), check_int(depth, "depth", "resampler")
        self.dim, self.mlp_ratio = dim, check_int(mlp_ratio, "mlp_ratio", "resampler")
        nets = {}
        for i in self.targets:
            d = dim or in_channels[i]
            if d % heads:
                raise ConfigError(f"resampler: heads={heads} must divide dim={d}; pick heads from "
                                  f"{[h for h in range(1, 33) if d % h == 0]}")
            nets[str(i)] = nn.ModuleDict({
                "inp": nn.Identity() if d == in_channels[i] else nn.Linear(in_channels[i], d),
                "layers": nn.ModuleList([CrossAttention(d, heads, mlp_ratio) for _ in range(depth)]),
                "out": nn.LayerNorm(d)})
            self.register_parameter(f"queries_{i}", nn.Parameter(torch.randn(num_queries, d) * 0.02))
        self.nets = nn.ModuleDict(nets)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        net = self.nets[str(i)]
        x = net["inp"](t.x)
        q = getattr(self, f"queries_{i}").expand(x.shape[0], -1, -1)
        for layer in net["layers"]:
            q, a = layer(q, x, t.mask)
        return t.attend(a, net["out"](q))

    def channels(self, c: int, i: int) -> int:
        return self.dim or c

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return self.num_queries
