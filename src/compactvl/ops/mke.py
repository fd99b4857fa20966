"""Multi-Aspect Knowledge Ensemble, MKE (VEN-VL, Sec. 3.2, eqs. 2-4) and its cross-merge step.

Two encoder streams: A (semantic, e.g. CLIP) and B (fine-grained). With a ``pixel_shuffle`` (k = 2, eq. 1) before
it, MKE keeps A unchanged, self-merges a fraction ρs of B by bipartite soft matching (eqs. 2-3, repeated passes
when ρs > 0.5), then cross-merges a fraction ρc of the remaining B tokens into their most similar A tokens (eq. 4):
every B token b gets e_b = max_a cos(b, a); the floor(ρc·n_B') B tokens with the largest e_b are merged into their
best A token by size-weighted average, the others are appended after A's tokens.
Count: N_A/4 + (N_B/4)(1-ρs)(1-ρc) with the pixel shuffle (exact up to flooring ρs·n and ρc·n); this reproduces
VEN-VL Table 11 (e.g. ρs=0.5, ρc=0.4 → 32.5% of one encoder's N).
Grids: B's token positions are rescaled into A's grid coordinates (the common grid); provenance (``assign``)
follows A. Widths: when A and B widths differ (or ``dim`` is set) learnable linear maps bring B (and A, if
dim ≠ C_A) to ``dim`` (default C_A) before merging; with equal widths MKE has no parameters.
Knobs (mke): ``self_ratio`` ρs in [0,1) (0.5), ``cross_ratio`` ρc in [0,1] (0.4), ``dim``. ``cross_merge`` is the
eq. 4 step alone (knobs ``ratio`` (0.4), ``dim``), for recipes spelled pixel_shuffle → self_merge → cross_merge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..tokens import Grid, Tokens, cat, floor_count, rank_keep
from .base import OpContext, TokenOp, check_ratio, register
from .bipartite_merge import merge_passes


def _two(streams: list, op: str) -> None:
    if len(streams) != 2:
        raise ConfigError(f"{op} fuses exactly two encoder streams (A, B) but the recipe has {len(streams)} "
                          "here; configure two encoders, or use concat_tokens / cotr for another count")


@register("cross_merge")
class CrossMerge(TokenOp):
    fusion = True

    def __init__(self, in_channels: list[int], *, ratio: float = 0.4, dim: int | None = None):
        super().__init__()
        _two(in_channels, "cross_merge")
        self.ratio = check_ratio(ratio, "ratio", "cross_merge", low_open=False, high_open=False)
        self.dim = dim
        d = dim or in_channels[0]
        self.proj = nn.ModuleList([nn.Identity() if c == d else nn.Linear(c, d) for c in in_channels])

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        a, b = streams
        xa, xb = self.proj[0](a.x), self.proj[1](b.x)
        na, nb = a.kept_counts(), b.kept_counts()
        sim = F.normalize(xb, dim=-1) @ F.normalize(xa, dim=-1).transpose(1, 2)  # [B, Nb, Na]
        best, target = sim.masked_fill(~a.mask[:, None], float("-inf")).max(-1)
        merged = rank_keep(best, b.mask, floor_count(self.ratio, nb))
        joint = cat([a, b], [xa, xb])
        Na, Nb = a.mask.shape[1], b.mask.shape[1]
        kept_b = b.mask & ~merged
        dest_b = torch.where(merged, target, na[:, None] + kept_b.long().cumsum(1) - 1)
        Nj = joint.mask.shape[1]
        dest = torch.full((xa.shape[0], Nj + 1), -1, dtype=torch.long, device=xa.device)
        slots = torch.arange(Nb, device=xa.device) + na[:, None]  # where cat put B's tokens
        dest.scatter_(1, torch.where(b.mask, slots, Nj), torch.where(b.mask, dest_b, -1))
        dest = dest[:, :Nj]
        m = min(Na, Nj)
        dest[:, :m] = torch.where(a.mask[:, :m], torch.arange(m, device=xa.device), dest[:, :m])
        n_out = int((na + kept_b.sum(1)).max())
        return [joint.regroup(dest, n_out)]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return [self.dim or in_channels[0]]

    def expected_tokens(self, n_in: list[int | None], grids: list[Grid | None]) -> list[int | None]:
        if None in n_in:
            return [None]
        return [n_in[0] + n_in[1] - int(floor_count(self.ratio, torch.tensor(n_in[1])))]


@register("mke")
class MKE(TokenOp):
    fusion = True

    def __init__(self, in_channels: list[int], *, self_ratio: float = 0.5, cross_ratio: float = 0.4,
                 dim: int | None = None):
        super().__init__()
        _two(in_channels, "mke")
        self.self_ratio = check_ratio(self_ratio, "self_ratio", "mke", low_open=False, high_open=True)
        self.cross_ratio = check_ratio(cross_ratio, "cross_ratio", "mke", low_open=False, high_open=False)
        self.dim = dim
        self.cross = CrossMerge(in_channels, ratio=cross_ratio, dim=dim)

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        if len(streams) != 2:
            raise InputError(f"mke got {len(streams)} streams; pass the two encoders' tokens (A, B)")
        a, b = streams
        remove = floor_count(self.self_ratio, b.kept_counts())
        if bool((remove > 0).any()):
            b = merge_passes(b.replace(grid=None), remove)
        return self.cross([a, b], ctx)

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return self.cross.out_channels(in_channels)

    def expected_tokens(self, n_in: list[int | None], grids: list[Grid | None]) -> list[int | None]:
        if None in n_in:
            return [None]
        nb = n_in[1] - int(floor_count(self.self_ratio, torch.tensor(n_in[1])))
        return self.cross.expected_tokens([n_in[0], nb], grids)
