"""VisionZip (Yang et al. 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language Models").

Reference: github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``)
with the patched ``visionzip/utils.py`` (``CLIPAttention_forward`` returns the metric ``raw_key_states.mean(1)``;
``CLIP_EncoderLayer_forward`` / ``apply_info`` keep it for block ``layers[-2]``, the block whose output is LLaVA's
feature tap ``hidden_states[-2]``, and the same block's ``attentions[-2]``).

1. Dominant tokens (paper §3.2): the ``dominant`` tokens with the largest CLS→patch attention summed over heads at
   the chosen encoder layer (default: the layer the tokens came from, which for LLaVA's tap is the reference's).
2. Contextual tokens (paper §3.2, contextual merging): of the remaining tokens (in order), every
   ⌊n_rest/contextual⌋-th is a target (the first ``contextual`` of them); every other remaining token goes to its
   most similar target; contextual token = x_t + mean of the tokens assigned to t (the authors' update).
   Similarity, ``similarity="key_head_mean"`` (default, the reference): cosine of that layer's keys *averaged over
   the heads* ([N, C/H]: the reference's metric is ``raw_key_states.mean(1)`` with keys shaped
   [B, heads, N, head_dim]); ``similarity="keys"``: cosine of the keys with the heads concatenated ([N, C],
   compactvl's earlier rule).
Output: dominant tokens (in grid order) then contextual tokens (in target order), as the reference (which emits
``torch.cat([dominant_tokens, contextual_tokens])``, ``masked_select`` keeping grid order). Token counts: the
reference's ``dominant`` knob includes the CLS token it also emits (``visionzip(model, dominant, contextual)`` passes
``dominant - 1`` patch tokens); compactvl's tokens are patch tokens only, so the CLS token is not emitted and our
``dominant`` counts patch tokens: reference ``dominant=d`` == ours ``dominant=d-1`` plus the CLS token.
Encoders without a CLS token: the mean attention each patch receives replaces CLS attention
(``EncoderOutput.attention_substitute``); the output's ``notes`` say so.
Knobs: ``dominant`` (54), ``contextual`` (10) — the paper's 64-token setting — ``layer`` (default: the layer the
tokens came from), ``similarity`` ("key_head_mean" | "keys"), ``streams``. Expected tokens:
min(dominant, n) + min(contextual, n - dominant).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..schedules import Budget
from ..tokens import Grid, Tokens, rank_keep
from .base import OpContext, StreamOp, budget_count, check_int, register
from .prumerge import attention_and_keys


@register("visionzip")
class VisionZip(StreamOp):
    def __init__(self, in_channels: list[int], *, dominant: int = 54, contextual: int = 10, layer: int | None = None,
                 similarity: str = "key_head_mean", streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.dominant = check_int(dominant, "dominant", "visionzip", low=0)
        self.contextual = check_int(contextual, "contextual", "visionzip", low=0)
        if dominant + contextual == 0:
            raise ConfigError("visionzip: dominant=0 and contextual=0 keep no token; keep at least one")
        if similarity not in ("key_head_mean", "keys"):
            raise ConfigError(f"visionzip: similarity={similarity!r} must be 'key_head_mean' (the reference) or 'keys'")
        self.layer, self.similarity = layer, similarity

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        """k tokens per image (``tokens=k``, or ``kept(n, f)`` for ``keep=f``) in the paper's 54:10 ratio:
        ``dominant = max(1, round(54·k/64))``, the rest contextual."""
        k = budget_count("visionzip", budget, n)
        dominant = max(1, round(54 * k / 64))
        return {"dominant": dominant, "contextual": k - dominant}

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return [self.layer] if self.layer is not None and stream in self.targets else []

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        a, keys, t = attention_and_keys(t, ctx, self.layer, "visionzip", "sum",
                                        key_head_mean=self.similarity == "key_head_mean")
        B, N, C = t.x.shape
        dom = rank_keep(a, t.mask, self.dominant)
        rest = t.mask & ~dom
        r = rest.long().cumsum(1) - 1
        step = (rest.sum(1, keepdim=True) // max(self.contextual, 1)).clamp_min(1)
        target = rest & (r % step == 0) & (r // step < self.contextual)
        nd, nt = dom.sum(1, keepdim=True), target.sum(1, keepdim=True)
        dest = torch.where(dom, dom.long().cumsum(1) - 1, -1)
        dest = torch.where(target, nd + target.long().cumsum(1) - 1, dest)
        D = int((nd + nt).max())
        # output slot -> source token: dominant then target tokens, each in grid order
        src_of = torch.zeros(B, D + 1, dtype=torch.long, device=a.device).scatter_(
            1, torch.where(dom | target, dest, D), torch.arange(N, device=a.device).expand(B, N))[:, :D]
        x = t.x.gather(1, src_of.unsqueeze(-1).expand(-1, -1, C))
        T = int(nt.max())
        if T:
            tidx = (~target).long().argsort(dim=1, stable=True)[:, :T]  # target positions, in order
            tvalid = torch.arange(T, device=a.device) < nt
            kn = F.normalize(keys, dim=-1)  # cosine, both sides normalised as the reference does
            kt = kn.gather(1, tidx.unsqueeze(-1).expand(-1, -1, kn.shape[-1]))
            to = (kn @ kt.transpose(1, 2)).masked_fill(~tvalid[:, None], float("-inf")).argmax(-1)
            src = rest & ~target
            dest = torch.where(src, nd + to, dest)
            onehot = t.x.new_zeros(B, T, N).scatter_(1, to.unsqueeze(1), 1.0) * src.unsqueeze(1).to(t.x.dtype)
            mean = (onehot @ t.x) / onehot.sum(-1, keepdim=True).clamp_min(1)  # [B, T, C], as the authors do
            slot = torch.where(tvalid, nd + torch.arange(T, device=a.device), D)
            x = torch.cat([x, x.new_zeros(B, 1, C)], 1)
            x = x.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, C), mean)[:, :D]
        return t.regroup(dest, D, x=x)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        d = min(self.dominant, n)
        return d + min(self.contextual, n - d)
