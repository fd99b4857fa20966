"""Random token keeping — the control every selection method must beat (as in FastV / VisionZip ablations).

Equation: keep the floor(ratio·n) tokens (at least 1) with the highest uniform random score u ~ U(0,1); kept tokens
stay in their order. With ``seed`` set (default 0) the scores are drawn once per original patch from that seed and
pooled (mean) into the current tokens, so every sample — alone or batched — keeps the same patches and runs are
reproducible; ``seed: null`` draws fresh scores per sample and call (not batch-invariant, by design).
Knobs: ``ratio`` (fraction kept, in (0, 1]; default 0.25), ``seed``, ``streams``. Registered as ``random``.
Expected tokens: max(1, floor(ratio·n)).
"""
from __future__ import annotations

from typing import Any

import torch

from ..schedules import Budget
from ..tokens import Grid, Tokens, floor_count, rank_keep
from .base import OpContext, StreamOp, budget_count, check_ratio, register


@register("random")
class RandomKeep(StreamOp):
    def __init__(self, in_channels: list[int], *, ratio: float = 0.25, seed: int | None = 0,
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.ratio = check_ratio(ratio, "ratio", "random", low_open=True, high_open=False)
        self.seed = seed

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        """``keep=f`` → ``ratio=f``; ``tokens=k`` → ``ratio=k/n`` (needs a fixed n)."""
        if budget.fraction is not None:
            return {"ratio": budget.fraction}
        return {"ratio": budget_count("random", budget, n, fixed=True) / n}

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        if self.seed is None:
            u = torch.rand(t.mask.shape, device=t.x.device)
        else:
            g = torch.Generator().manual_seed(int(self.seed))
            u = t.pool_patches(torch.rand(t.assign.shape[1], generator=g).to(t.x.device).expand(t.assign.shape), "mean")
        keep = rank_keep(u, t.mask, floor_count(self.ratio, t.kept_counts()).clamp_min(1))
        return t.keep(keep)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return max(1, int(floor_count(self.ratio, torch.tensor(n))))
