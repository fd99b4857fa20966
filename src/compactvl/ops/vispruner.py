"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs").

Keep T = ``count`` tokens per image: T_imp = ⌊T·r⌋ important ones (r = ``important_ratio``) and T_div = T − T_imp
diverse ones (paper Sec. 4; reference ``encode_images``):

1. Important: a = CLS→patch attention of the tokens' encoder layer, mean over heads; the T_imp tokens with the
   largest a. The other tokens form the residual list, ordered by descending a.
2. Diverse: repeat while the residual list R is longer than T_div: remove r = min(8, |R| − T_div) tokens by
   similarity matching — split R alternately into A = R[0::2] and B = R[1::2] (in list order), score each a ∈ A by
   max_{b∈B} cos(x_a, x_b) (the tokens' features, L2-normalised), drop the r highest-scoring a; the new list is the
   kept A in descending score order, then B in its order (the order matters for the next split).
3. Output: important ∪ residual tokens, in their original order (the reference masks the features).

Reference: github.com/Theia-4869/VisPruner, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``
(attention from ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.feature_select``: the
selected layer's ``attentions[:, :, 0, 1:]``; features from the same layer, before the projector — compactvl's
tokens). Defaults: ``important_ratio`` 0.5 (the reference's ``--important_ratio`` default), ``count`` 64 (the
paper's smallest LLaVA-1.5 setting; its README also runs 64 with r = 0.75). Documented differences:

- images of n < T tokens keep min(T, n): T_imp = min(⌊T·r⌋, n), T_div = min(T − ⌊T·r⌋, n − T_imp);
- the reference's shapes only line up when |R| is even and r ≤ |R|/2; compactvl takes A = the ⌈|R|/2⌉ even
  positions and r = min(8, |R| − T_div, |A|), which equals the reference wherever it runs;
- sorts are stable (ties toward the earlier token / list position); the reference's ``argsort`` is not.
Encoders without a CLS token: the mean attention each patch receives replaces CLS attention
(``EncoderOutput.attention_substitute``, via prumerge's ``attention_and_keys``); the output's ``notes`` say so.
After other ops, per-patch attention is summed into the current tokens.

Batched: the residual lists are one [B, N] index tensor with per-sample lengths; one loop over the removal rounds
(⌈(n − T)/8⌉ of them). Knobs: ``count`` (T, ≥ 1), ``important_ratio`` (r in [0, 1]), ``layer`` (encoder tap for the
attention; default the tokens' own layer), ``streams``. No parameters. Expected tokens: min(count, n).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schedules import Budget
from ..tokens import Grid, Tokens, rank_keep
from .base import OpContext, StreamOp, budget_count, check_int, check_ratio, register
from .prumerge import attention_and_keys

PER_ROUND = 8  # tokens removed per matching round (hard-coded in the reference)


def diverse_keep(x: Tensor, residual: Tensor, length: Tensor, target: Tensor) -> Tensor:
    """[B,N] bool: the diverse tokens. ``residual [B,N]`` token indices in list order (the first ``length [B]`` are
    real), ``target [B]`` = T_div; ``x [B,N,C]`` the tokens' features."""
    B, N, _ = x.shape
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xn = F.normalize(xf, dim=-1)
    sim = xn @ xn.transpose(1, 2)  # [B, N, N] cosine between tokens (by token index)
    flat = sim.flatten(1)  # [B, N*N]: entry i*N + j is cos(x_i, x_j)
    order, R = residual, length.clone()
    while True:
        r = torch.minimum((R - target).clamp(max=PER_ROUND), (R + 1) // 2).clamp_min(0)
        if not bool((r > 0).any()):
            break
        M = int(R.max())
        order = order[:, :M]
        pos = torch.arange(M, device=x.device).expand(B, M)
        live = pos < R[:, None]
        is_a, is_b = live & (pos % 2 == 0), live & (pos % 2 == 1)
        oa, ob = order[:, 0::2], order[:, 1::2]  # list positions of A (even) and B (odd)
        score = torch.full((B, M), float("-inf"), dtype=sim.dtype, device=x.device)
        if ob.shape[1]:  # cos(a, b) for a in A, b in B only: one gather of [B, |A|, |B|] from the flat [B, N*N]
            s = flat.gather(1, (oa[:, :, None] * N + ob[:, None, :]).flatten(1)).view(B, oa.shape[1], ob.shape[1])
            score[:, 0::2] = s.masked_fill(~is_b[:, None, 1::2], float("-inf")).amax(-1)  # max cos to any b
        score = score.masked_fill(~is_a, float("-inf"))
        rank = torch.empty_like(pos).scatter_(1, score.argsort(dim=1, descending=True, stable=True), pos)
        drop = is_a & (rank < r[:, None])
        # new list: kept a by descending score, then b in list order, then the rest
        key = torch.where(is_a & ~drop, rank, torch.where(is_b, M + pos, 2 * M + pos))
        order = order.gather(1, key.argsort(dim=1, stable=True))
        R = R - r
    live = torch.arange(order.shape[1], device=x.device) < R[:, None]
    keep = torch.zeros(B, N + 1, dtype=torch.bool, device=x.device)
    keep.scatter_(1, torch.where(live, order, N), True)
    return keep[:, :N]


@register("vispruner")
class VisPruner(StreamOp):
    def __init__(self, in_channels: list[int], *, count: int = 64, important_ratio: float = 0.5,
                 layer: int | None = None, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.count = check_int(count, "count", "vispruner")
        self.important_ratio = check_ratio(important_ratio, "important_ratio", "vispruner", low_open=False,
                                           high_open=False)
        self.layer = layer

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        """``tokens=k`` → ``count=k``; ``keep=f`` → ``count=kept(n, f)``; ``important_ratio`` keeps its default."""
        return {"count": budget_count("vispruner", budget, n)}

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return [self.layer] if self.layer is not None and stream in self.targets else []

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        a, _, t = attention_and_keys(t, ctx, self.layer, "vispruner", "mean")
        n = t.kept_counts()
        imp_total = int(self.count * self.important_ratio)
        imp = n.clamp(max=imp_total)
        div = torch.minimum(n - imp, torch.full_like(n, self.count - imp_total))
        important = rank_keep(a, t.mask, imp)
        # residual list: the other valid tokens by descending attention (stable: ties toward the lower index)
        s = a.masked_fill(~t.mask | important, float("-inf"))
        residual = s.argsort(dim=1, descending=True, stable=True)
        length = torch.where(div > 0, n - imp, 0)  # the reference keeps no residual token when T_div = 0
        keep = important | diverse_keep(t.x, residual, length, div)
        return t.keep(keep)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return min(self.count, n)
