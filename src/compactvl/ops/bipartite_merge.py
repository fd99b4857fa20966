"""Bipartite soft matching merge (ToMe, Bolya et al. 2023, "Token Merging: Your ViT but Faster", Sec. 3;
the self-merge of VEN-VL MKE eqs. 2-3).

Equation (one pass): split the valid tokens alternately into A (even positions) and B (odd positions); edge
e_a = max_b cos(m_a, m_b) with target b*(a); the r A-tokens with the largest e_a merge into their targets by a
size-weighted average x_b ← (s_b x_b + Σ s_a x_a) / (s_b + Σ s_a), s_b ← s_b + Σ s_a; everything else is kept.
One pass removes at most half of the tokens, so a larger ``ratio`` runs repeated passes.
Knobs: ``ratio`` (fraction of each sample's tokens removed in total, in [0, 1); default 0.5) or ``r`` (tokens removed
per sample, overrides ratio); ``prop_attn`` (default False; True marks the tokens so attention consumers add
log(size) to the logits — ToMe's proportional attention, see ``Tokens.attn_bias``); ``order`` ("tome" default |
"original", see below); ``streams``.
Expected tokens: n - floor(ratio·n) (or n - r). The metric is the features themselves. Also registered as
``self_merge`` (VEN-VL's name for it).

Reference fidelity (checked in ``tests/test_fidelity_tome.py`` against a transcription of facebookresearch/ToMe
``tome/merge.py``, ``bipartite_soft_matching`` + ``merge_wavg``):

* similarity: cosine of ``metric / metric.norm(-1)`` between A = ``[..., ::2, :]`` and B = ``[..., 1::2, :]``,
  ``node_max, node_idx = scores.max(-1)``, the r largest edges (``argsort(descending=True)[:r]``) merge. Matched.
* merge weights: ``merge_wavg``: ``x ← merge(x·size, "sum") / merge(size, "sum")``, ``size ← merge(size, "sum")``
  with ``scatter_reduce`` into the target B token. Matched (sizes start at 1, or at the tokens' own sizes).
* token order: the code returns ``cat([unm, dst])``: the unmerged A tokens in DESCENDING edge-score order (the
  ``argsort`` order; sorted back only when a class token is protected), then every B token in order. Default
  ``order="tome"`` reproduces that; ``order="original"`` keeps the survivors in their input order instead (what
  an LLM's sequence order usually wants; used by VEN-VL's MKE through ``merge_passes``).
* count: ``r`` is the code's per-pass r (matched, as is its clamp ``r <= n // 2`` for one pass); ``ratio`` removes
  ``floor(ratio·n)``, and where that is more than one pass can remove, further passes run on the output (the
  code applies one pass per transformer block, so this has no single-call reference).
* protected tokens: the code can protect a class / distillation token (``class_token``, ``distill_token``);
  compactvl's tokens hold patches only (the encoder's CLS is not among them), so there is nothing to protect.
* metric: in a ViT the code's metric is the attention keys averaged over heads; here (a token op after the
  encoder) it is the token features. Ties: ``argsort`` is unstable; here ties go to the earlier A token.
* padding (batched samples with different counts) has no counterpart: padded slots never match or merge.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..schedules import Budget
from ..tokens import Grid, Tokens, floor_count
from .base import OpContext, StreamOp, budget_count, check_int, check_ratio, register


ORDERS = ("tome", "original")


def soft_matching(metric: Tensor, r: Tensor | int, mask: Tensor | None = None,
                  order: str = "original") -> tuple[Tensor, int]:
    """One ToMe pass, batched with per-sample ``r``: output slot of every token (``dest [B,N]``, -1 at padding;
    a merged token points at its target's slot) and the padded output length. ``order="original"``: survivors in
    input order; ``"tome"``: the reference's ``cat([unm, dst])`` (unmerged A by descending edge, then B)."""
    B, N, _ = metric.shape
    mask = torch.ones(B, N, dtype=torch.bool, device=metric.device) if mask is None else mask
    r = torch.minimum(torch.as_tensor(r, device=metric.device).expand(B), mask.sum(1) // 2)
    m = F.normalize(metric.float() if metric.dtype in (torch.float16, torch.bfloat16) else metric, dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    node_max, node_idx = scores.masked_fill(~mask[:, None, 1::2], float("-inf")).max(-1)
    node_max = node_max.masked_fill(~mask[:, ::2], float("-inf"))
    edge_order = node_max.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(edge_order).scatter_(1, edge_order, torch.arange(edge_order.shape[1],
                                                                             device=m.device).expand_as(edge_order))
    src = rank < r[:, None]  # merged A tokens
    survive = mask.clone()
    survive[:, ::2] &= ~src
    if order == "tome":
        n_unm = mask[:, ::2].sum(1, keepdim=True) - r[:, None]  # unmerged A tokens come first, by edge rank
        slot = torch.empty_like(survive, dtype=torch.long)
        slot[:, ::2] = rank - r[:, None]
        slot[:, 1::2] = n_unm + torch.arange(N // 2, device=m.device)
    else:
        slot = survive.long().cumsum(1) - 1
    dest = torch.where(survive, slot, -1)
    dest[:, ::2] = torch.where(src, slot[:, 1::2].gather(1, node_idx), dest[:, ::2])
    return dest, int(survive.sum(1).max())


def merge_passes(t: Tokens, remove: Tensor, order: str = "original") -> Tokens:
    """Remove ``remove [B]`` tokens per sample with as many bipartite passes as needed (``order``: see
    :func:`soft_matching`)."""
    left = remove.clone()
    while bool((left > 0).any()):
        n = t.kept_counts()
        r = torch.minimum(left, n // 2)
        if not bool((r > 0).any()):
            break
        dest, n_out = soft_matching(t.x, r, t.mask, order)
        t = t.regroup(dest, n_out)
        left = left - r
    return t


@register("bipartite_merge", "self_merge")
class BipartiteMerge(StreamOp):
    def __init__(self, in_channels: list[int], *, ratio: float = 0.5, r: int | None = None,
                 prop_attn: bool = False, order: str = "tome", streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        if order not in ORDERS:
            raise ConfigError(f"bipartite_merge: order={order!r}; use 'tome' (the reference's: unmerged tokens by "
                              f"descending edge score, then the B tokens) or 'original' (survivors in input order)")
        self.order = order
        self.ratio = check_ratio(ratio, "ratio", "bipartite_merge", low_open=False, high_open=True)
        self.r = None if r is None else check_int(r, "r", "bipartite_merge", low=0)
        self.prop_attn = bool(prop_attn)

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        """``keep=f`` → ``ratio = 1 - f`` (ToMe's floor rule); ``tokens=k`` → ``r = n - k`` (needs a fixed n)."""
        if budget.fraction is not None:
            return {"ratio": 1.0 - budget.fraction}
        return {"r": n - budget_count("bipartite_merge", budget, n, fixed=True)}

    def removed(self, n: Tensor) -> Tensor:
        if self.r is not None:
            if bool((n <= self.r).any()):
                raise ConfigError(f"bipartite_merge: r={self.r} would remove every token of a sample with "
                                  f"{int(n.min())} tokens; use r < {int(n.min())} or the ratio knob")
            return torch.full_like(n, self.r)
        return floor_count(self.ratio, n)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        remove = self.removed(t.kept_counts())
        if not bool((remove > 0).any()):
            return t
        t = merge_passes(t.replace(grid=None), remove, self.order)
        return t.replace(prop_attn=t.prop_attn or self.prop_attn)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return n - int(self.removed(torch.tensor([n]))[0])
