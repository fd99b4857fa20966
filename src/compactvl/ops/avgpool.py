"""AvgPool baseline (LLaVA-STF, Table 5 "AvgPool"; also the LLaVA-1.5 (AvgPool) study of its Fig. 1).

Equation: y[i, j] = mean over the k×k window {x[k·i + a, k·j + b] : 0 <= a, b < k} (F.avg_pool2d, stride k).
Knobs: ``k`` (window side, default 2), ``pad`` (default False: a grid not divisible by k is an error; True: the
last row/column of windows is partial and averages only the real patches), ``streams``.
Expected tokens: ceil(h/k)·ceil(w/k). The output still forms a grid.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, check_grid, check_int, register, window_dest


@register("avgpool")
class AvgPool(StreamOp):
    def __init__(self, in_channels: list[int], *, k: int = 2, pad: bool = False, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.k, self.pad = check_int(k, "k", "avgpool"), bool(pad)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        grid, out = check_grid(t, self.k, self.pad, "avgpool")
        B, _, C = t.x.shape
        m = t.x.transpose(1, 2).reshape(B, C, *grid)
        y = F.avg_pool2d(m, self.k, self.k, ceil_mode=self.pad).flatten(2).transpose(1, 2)
        dest = window_dest(grid, self.k, device=t.x.device).expand(B, -1)
        return t.regroup(dest, out[0] * out[1], x=y, grid=out)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        g = self.grid_out(grid)
        return None if g is None else g[0] * g[1]

    def grid_out(self, grid: Grid | None) -> Grid | None:
        return None if grid is None else (-(-grid[0] // self.k), -(-grid[1] // self.k))
