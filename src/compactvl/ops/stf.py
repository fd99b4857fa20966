"""Spatial Token Fusion, STF (LLaVA-STF, "Learning Compact Vision Tokens for Efficient LMMs", Sec. 3.4, eq. 2).

Equation: Z = GeLU(Conv_{k×k, stride k}(X)) ∈ R^{h/k × w/k × n·C'}; each window's n·C' channels are reshaped into
n tokens of C' channels; then two 1×1 alignment layers: Y = GeLU(W₂ · GeLU(W₁ · z)). With n = 1 and C' = k²·C the
conv is a *learnable concatenation* (the paper's default: k = 2, n = 1, LLaVA 1024 → 4096 channels).
Knobs: ``k`` (window, default 2), ``n`` (tokens per window, default 1; must divide k²), ``fused`` (C', default
k²·C/n), ``dim`` (width of the 1×1 layers, default C'), ``act`` ("gelu" as in the paper, or "identity"),
``init`` (see below), ``pad`` (zero-pad a grid not divisible by k; default False = error), ``streams``.
Initialisation and step-0 equivalence (issue 19): the baseline STF extends is ``pixel_shuffle`` / TokenConcat (the
same windows concatenated along channels, followed by the same projector). ``init="concat"`` adds that
concatenation as a skip connection, Y = TokenConcat(X) + GeLU(W₂ · GeLU(W₁ · z)), with W₂ and its bias zero at
initialisation (GeLU(0) = 0), so at step 0 STF gives exactly ``pixel_shuffle``'s tokens and the model exactly
the TokenConcat model's logits; the conv and W₁ keep PyTorch's default init and learn once W₂ moves (W₂ gets a
gradient from the first step). It needs fused = k²C/n and dim = fused. ``init="random"`` is the paper's plain
eq. 2 (no skip, PyTorch default init everywhere). Default (``init=None``): "concat" whenever the widths allow it
(the default fused/dim), else "random".
Expected tokens: n·ceil(h/k)·ceil(w/k); a grid only when n = 1. Sub-tokens of a window hold the window's cells in
row-major order (cell q goes to sub-token q·n // k²).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, check_grid, check_int, register, to_map, window_dest
from .pixel_shuffle import space_to_channel

ACTS = {"gelu": nn.GELU, "identity": nn.Identity}


@register("stf")
class STF(StreamOp):
    def __init__(self, in_channels: list[int], *, k: int = 2, n: int = 1, fused: int | None = None,
                 dim: int | None = None, act: str = "gelu", init: str | None = None, pad: bool = False,
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.k, self.n = check_int(k, "k", "stf"), check_int(n, "n", "stf")
        if (k * k) % n:
            raise ConfigError(f"stf: n={n} tokens per window must divide k²={k * k}; pick n in "
                              f"{[d for d in range(1, k * k + 1) if (k * k) % d == 0]}")
        if act not in ACTS or init not in (None, "random", "concat"):
            raise ConfigError(f"stf: act={act!r}, init={init!r}; act is one of {sorted(ACTS)}, init is "
                              "'concat' (starts as token concatenation), 'random' (the paper's init) or unset")
        self.fused, self.dim, self.act, self.init, self.pad = fused, dim, act, init, bool(pad)
        self.nets = nn.ModuleDict({str(i): self._build(in_channels[i]) for i in self.targets})

    def _widths(self, c: int) -> tuple[int, int]:
        f = self.fused or (self.k * self.k * c) // self.n
        return f, self.dim or f

    def _concat_ok(self, c: int) -> bool:
        f, d = self._widths(c)
        return self.n * f == self.k * self.k * c and d == f

    def _build(self, c: int) -> nn.Module:
        f, d = self._widths(c)
        conv = nn.Conv2d(c, self.n * f, self.k, stride=self.k)
        align = nn.Sequential(nn.Linear(f, d), ACTS[self.act](), nn.Linear(d, d), ACTS[self.act]())
        skip = self.init == "concat" or (self.init is None and self._concat_ok(c))
        if self.init == "concat" and not self._concat_ok(c):
            raise ConfigError(f"stf: init='concat' needs fused = k²·C/n = {self.k * self.k * c // self.n} and "
                              f"dim = fused (got fused={f}, dim={d}); drop those knobs or use init='random'")
        if skip:  # step 0 == token concatenation: the branch's last layer starts at zero
            with torch.no_grad():
                align[2].weight.zero_(), align[2].bias.zero_()
        net = nn.ModuleDict({"conv": conv, "act": ACTS[self.act](), "align": align})
        net.skip = skip
        if skip:  # saved with the weights: a checkpoint of the plain eq. 2 (no skip) then fails to load, loudly
            net.register_buffer("concat_skip", torch.ones((), dtype=torch.bool))
        return net

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        grid, out = check_grid(t, self.k, self.pad, "stf")
        net = self.nets[str(i)]
        B, M = t.x.shape[0], out[0] * out[1]
        z = net["act"](net["conv"](to_map(t, grid, self.k)))  # [B, n·C', h', w']
        z = z.flatten(2).transpose(1, 2).reshape(B, M * self.n, -1)
        dest = window_dest(grid, self.k, self.n, device=t.x.device).expand(B, -1)
        y = net["align"](z)
        if net.skip:  # TokenConcat of the window, split into n sub-tokens as window_dest orders them
            y = y + space_to_channel(t.x, grid, self.k).reshape(B, M * self.n, -1)
        return t.regroup(dest, M * self.n, x=y, grid=out if self.n == 1 else None)

    def channels(self, c: int, i: int) -> int:
        return self._widths(c)[1]

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return None if grid is None else self.n * (-(-grid[0] // self.k)) * (-(-grid[1] // self.k))

    def grid_out(self, grid: Grid | None) -> Grid | None:
        return None if grid is None or self.n != 1 else (-(-grid[0] // self.k), -(-grid[1] // self.k))
