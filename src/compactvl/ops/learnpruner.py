"""LearnPruner, stage 1: the learnable pruning module after the vision encoder (Takezoe et al., "LearnPruner:
Rethinking Attention-based Token Pruning in Vision Language Models", arXiv:2604.23950, ICLR 2026 submission).

The paper finds that the encoder's [CLS] attention suffers from attention sinks (it favours low-information
background), so instead of CLS attention a small learned module scores the tokens and the top ones are kept; the
second stage prunes again by text-to-vision attention in a middle LLM layer (the ``learnpruner_t2v`` layer policy,
``compactvl.policies.learnpruner``; recipe ``learnpruner.yaml`` composes both).

    u_i = LN(x_i),  ū = mean_{j valid} u_j
    s_i = w_2 · GELU(W_1 [u_i ; ū] + b_1) + b_2                  (token score; the image mean ū gives it context)
    keep = TopK_k(s) over the valid tokens (kept in their original order),  y_i = x_i · (1 + σ(s_i) − sg(σ(s_i)))

The exact layers of the module are not public (the code was announced, not released); the above is the simplest
faithful reading: a per-token MLP that also sees the image's mean token (so it can judge a token against its image
rather than by an attention pattern). The kept features are unchanged in value (the factor is exactly 1); its
straight-through gradient lets the scorer learn from the task loss. Knobs: ``ratio`` (fraction kept per image,
default 0.111: 64 of LLaVA-1.5's 576 tokens, which with the second stage's 0.5 leaves 32/576 = 5.6 %, the paper's
"5.5 % of vision tokens") or ``count`` (tokens kept per image) — give one; ``hidden`` (the MLP width, default C);
``streams``. Expected tokens: ``min(count, n)`` or ``kept(n, ratio)``. Budget: the count-or-ratio mapping
(``tokens=k`` → count=k, ``keep=f`` → count=kept(n, f)).
MACs (:meth:`LearnPruner.macs`, per image of n tokens): n·(2C·H + H) for the two linears (the norm, the mean, the
top-k and the gather are not matrix products). The LLM sees the kept tokens (the ``keep`` schedule, then the second
stage's ``learnpruner_t2v`` schedule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokens import Tokens, rank_keep
from .base import CountOrRatioOp, OpContext, check_int, register
from .cotr import masked_pool
from .qmop import straight_through

DEFAULT_RATIO = 0.111  # 64 of 576 (LLaVA-1.5); with learnpruner_t2v's keep=0.5: 32/576 = 5.6 %


class Scorer(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(2 * c, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        u = self.norm(x)
        ctx = masked_pool(u, mask, mean=True)[:, None].expand_as(u)
        return self.fc2(F.gelu(self.fc1(torch.cat([u, ctx], -1)))).squeeze(-1)


@register("learnpruner")
class LearnPruner(CountOrRatioOp):
    def __init__(self, in_channels: list[int], *, ratio: float | None = None, count: int | None = None,
                 hidden: int | None = None, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.set_budget(count, ratio, default_ratio=DEFAULT_RATIO)
        self.hidden = None if hidden is None else check_int(hidden, "hidden", "learnpruner")
        self.nets = nn.ModuleDict({str(i): Scorer(in_channels[i], self.hidden or in_channels[i])
                                   for i in self.targets})

    def scores(self, t: Tokens, i: int) -> Tensor:
        """[B, N] the learned token scores s of stream ``i`` (higher = keep)."""
        return self.nets[str(i)](t.x, t.mask)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        s = self.scores(t, i)
        keep = rank_keep(s.float(), t.mask, self.counts(t.kept_counts()))
        K = int(keep.sum(1).max())
        index = (~keep).long().argsort(dim=1, stable=True)[:, :K]
        out = t.select(index, torch.arange(K, device=keep.device) < keep.sum(1, keepdim=True))
        st = straight_through(s).gather(1, index).to(out.x.dtype)
        return out.replace(x=out.x * st[..., None])

    def macs(self, n: int, stream: int | None = None) -> int:
        """Multiply-accumulates of the scorer on one image of ``n`` tokens (stream ``stream``, default the first)."""
        net = self.nets[str(self.targets[0] if stream is None else stream)]
        return n * (net.fc1.in_features * net.fc1.out_features + net.fc2.in_features)
