"""VisionZip (Yang et al. 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language Models").

1. Dominant tokens: the ``dominant`` tokens with the largest CLS→patch attention summed over heads at the chosen
   encoder layer (the authors use the selected layer, CLIP's penultimate).
2. Contextual tokens: of the remaining tokens (in order), every ⌊n_rest/contextual⌋-th is a target (the first
   ``contextual`` of them); every other remaining token goes to its most similar target by cosine of that layer's
   keys; contextual token = x_t + mean of the tokens assigned to t (the authors' update).
Output: dominant tokens (in grid order) then contextual tokens. The authors also keep the CLS token; compactvl's
tokens are patch tokens only, so it is not added. Encoders without a CLS token: the mean attention each patch
receives replaces CLS attention (``EncoderOutput.attention_substitute``); the output's ``notes`` say so.
Knobs: ``dominant`` (54), ``contextual`` (10) — the paper's 64-token setting — ``layer`` (default: the layer the
tokens came from), ``streams``. Expected tokens: min(dominant, n) + min(contextual, n - dominant).
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
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.dominant = check_int(dominant, "dominant", "visionzip", low=0)
        self.contextual = check_int(contextual, "contextual", "visionzip", low=0)
        if dominant + contextual == 0:
            raise ConfigError("visionzip: dominant=0 and contextual=0 keep no token; keep at least one")
        self.layer = layer

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
        a, keys, t = attention_and_keys(t, ctx, self.layer, "visionzip", "sum")
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
            kt = F.normalize(keys.gather(1, tidx.unsqueeze(-1).expand(-1, -1, keys.shape[-1])), dim=-1)
            # argmax_t cos(k_j, k_t) = argmax_t k_j·k̂_t: the norm of k_j does not change the winner
            to = (keys @ kt.transpose(1, 2)).masked_fill(~tvalid[:, None], float("-inf")).argmax(-1)
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
