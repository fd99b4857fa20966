"""Pixel shuffle / TokenConcat: space-to-channel k×k (LLaVA-STF Table 5 "TokenConcat"; VEN-VL MKE eq. 1).

Equation: y[i, j] = concat(x[k·i + a, k·j + b] for a in 0..k-1 for b in 0..k-1) ∈ R^{k²·C}, i.e. neighbour-major:
channels [q·C, (q+1)·C) of the output hold the q-th cell (row-major) of the window. Lossless: N → N/k², C → k²·C.
Knobs: ``k`` (default 2), ``pad`` (default False: a grid not divisible by k is an error; True: zero-pads the grid
bottom/right, so missing neighbours contribute zero channels), ``streams``.
Expected tokens: ceil(h/k)·ceil(w/k). The output still forms a grid. Also registered as ``token_concat``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, check_grid, check_int, register, window_dest


def space_to_channel(x: Tensor, grid: Grid, k: int) -> Tensor:
    """[B, h·w, C] row-major grid -> [B, (h/k)·(w/k), k²·C] neighbour-major windows (zero-padded)."""
    B, _, C = x.shape
    h, w = grid
    m = x.view(B, h, w, C)
    m = F.pad(m, (0, 0, 0, -w % k, 0, -h % k)) if h % k or w % k else m
    H, W = m.shape[1] // k, m.shape[2] // k
    return m.view(B, H, k, W, k, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H * W, k * k * C)


@register("pixel_shuffle", "token_concat")
class PixelShuffle(StreamOp):
    def __init__(self, in_channels: list[int], *, k: int = 2, pad: bool = False, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.k, self.pad = check_int(k, "k", "pixel_shuffle"), bool(pad)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        grid, out = check_grid(t, self.k, self.pad, "pixel_shuffle")
        y = space_to_channel(t.x, grid, self.k)
        dest = window_dest(grid, self.k, device=t.x.device).expand(t.x.shape[0], -1)
        return t.regroup(dest, out[0] * out[1], x=y, grid=out)

    def channels(self, c: int, i: int) -> int:
        return c * self.k * self.k

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        g = self.grid_out(grid)
        return None if g is None else g[0] * g[1]

    def grid_out(self, grid: Grid | None) -> Grid | None:
        return None if grid is None else (-(-grid[0] // self.k), -(-grid[1] // self.k))
