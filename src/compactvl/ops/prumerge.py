"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient LMMs").

1. Adaptive selection (IQR outliers): a = CLS→patch attention (head mean) of the chosen encoder layer; keep the
   tokens with a > Q3 + 1.5·(Q3 - Q1) (quartiles per sample). At least one token is kept.
   PruMerge+ also keeps spatially uniform tokens: every ⌊⌊n/n_out⌋/3⌋-th token (n_out = outliers), as in the
   authors' code.
2. Merge: for each kept token i, its ``neighbors`` most key-similar other tokens N(i) (cosine of that layer's keys,
   over all valid tokens): y_i = x_i + Σ_{j∈N(i)} a_j x_j (the authors' update, unnormalised).
3. ``extra_token`` (default True, as in the authors' code): one more token Σ_{j pruned} a_j x_j is appended; it
   holds (``assign``) all pruned patches. With extra_token=False pruned patches are marked pruned (-1).
Encoders without a CLS token: the encoder supplies the mean attention each patch receives instead
(``EncoderOutput.attention_substitute``); the output's ``notes`` say so.
Knobs: ``layer`` (encoder tap for attention and keys; default: the layer the tokens came from), ``neighbors`` (32),
``extra_token`` (True), ``streams``. ``prumerge_plus`` has the same knobs. Expected tokens: data dependent
(~5.5% of 576 for PruMerge, ~25% for PruMerge+ on CLIP-L/336 per the paper). Works after other ops too: per-patch
attention and keys are pooled into the current tokens through ``assign``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..tokens import Grid, Tokens, pack_dest
from .base import OpContext, StreamOp, check_int, register


def attention_and_keys(t: Tokens, ctx: OpContext, layer: int | None, op: str,
                       head_reduce: str) -> tuple[Tensor, Tensor, Tokens]:
    """Per-token CLS attention [B,N] (head mean or sum; pooled over the patches a token holds) and keys [B,N,Ck]."""
    enc = ctx.encoder(t, op)
    layer = t.layer if layer is None else layer
    if layer is None:
        raise InputError(f"{op} needs the encoder layer for attention; set its layer knob or build the tokens "
                         "with Tokens.from_encoder(out, layer)")
    att = enc.attention(layer)
    att = att.mean(1) if head_reduce == "mean" else att.sum(1)
    if att.shape[-1] != t.assign.shape[1]:
        raise InputError(f"{op}: encoder attention covers {att.shape[-1]} patches but the tokens come from a "
                         f"{t.grid0[0]}x{t.grid0[1]} grid; use the same encoder output for tokens and context")
    if getattr(enc, "attention_substitute", False):
        t = t.with_note(f"{op}: the encoder has no CLS token; ranked by the mean attention each patch receives")
    up = lambda v: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return t.pool_patches(up(att), "sum"), t.pool_patches(up(enc.keys(layer)), "mean"), t


def iqr_outliers(a: Tensor, mask: Tensor) -> Tensor:
    q = torch.nanquantile(a.masked_fill(~mask, float("nan")), a.new_tensor([0.25, 0.75]), dim=1)
    keep = (a > (q[1] + 1.5 * (q[1] - q[0]))[:, None]) & mask
    top = a.masked_fill(~mask, float("-inf")).argmax(1, keepdim=True)
    return keep.scatter(1, top, True)


class _PruMerge(StreamOp):
    plus = False

    def __init__(self, in_channels: list[int], *, layer: int | None = None, neighbors: int = 32,
                 extra_token: bool = True, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.layer, self.extra_token = layer, bool(extra_token)
        self.neighbors = check_int(neighbors, "neighbors", self.name, low=0)

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return [self.layer] if self.layer is not None and stream in self.targets else []

    def choose(self, a: Tensor, mask: Tensor) -> Tensor:
        keep = iqr_outliers(a, mask)
        if self.plus:
            n, n_out = mask.sum(1, keepdim=True), keep.sum(1, keepdim=True)
            step = ((n // n_out) // 3).clamp_min(1)
            idx = torch.arange(mask.shape[1], device=a.device)
            keep |= (idx % step == 0) & (idx < n - 1) & mask
        return keep

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        a, keys, t = attention_and_keys(t, ctx, self.layer, self.name, "mean")
        a = a * t.mask
        keep = self.choose(a, t.mask)
        dest, K = pack_dest(keep)
        B, N, C = t.x.shape
        kidx = (~keep).long().argsort(dim=1, stable=True)[:, :K]  # kept positions, in order
        kvalid = torch.arange(K, device=a.device) < keep.sum(1, keepdim=True)
        kn = F.normalize(keys, dim=-1)
        sim = kn.gather(1, kidx.unsqueeze(-1).expand(-1, -1, kn.shape[-1])) @ kn.transpose(1, 2)  # [B, K, N]
        sim.masked_fill_(~t.mask[:, None], float("-inf")).scatter_(2, kidx.unsqueeze(-1), float("-inf"))
        k = min(self.neighbors, N - 1)
        x = t.x.gather(1, kidx.unsqueeze(-1).expand(-1, -1, C))
        if k > 0:
            val, nb = sim.topk(k, -1)
            w = a.gather(1, nb.flatten(1)).view_as(nb) * torch.isfinite(val)
            x = x + a.new_zeros(B, K, N).scatter_(2, nb, w).to(t.x.dtype) @ t.x
        x = x * kvalid.unsqueeze(-1).to(x.dtype)
        if not self.extra_token:
            return t.regroup(dest, K, x=x)
        pruned = t.mask & ~keep
        extra = (a * pruned).unsqueeze(1).to(t.x.dtype) @ t.x  # [B, 1, C]
        nk = keep.sum(1)
        x = torch.cat([x, x.new_zeros(B, 1, C)], 1).scatter(1, nk.view(B, 1, 1).expand(-1, 1, C), extra)
        return t.regroup(torch.where(pruned, nk[:, None], dest), K + 1, x=x)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return None


@register("prumerge")
class PruMerge(_PruMerge):
    plus = False


@register("prumerge_plus")
class PruMergePlus(_PruMerge):
    plus = True
