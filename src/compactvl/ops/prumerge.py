"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient LMMs").

Reference: github.com/42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus`` (PruMerge+).

1. CLS attention (paper §3.2, eq. 1–2). ``attention="single_head"`` (default, the reference): the authors hook the
   ``q_proj`` / ``k_proj`` outputs of ``layers[23]`` (the *last* block of CLIP-L) and compute ONE attention over the
   full width, heads concatenated: a = softmax(q_cls·Kᵀ / sqrt(C))[1:] (C = the features' width, equal to the
   q/k width H·d for CLIP, which we use; the softmax runs over the CLS and all patch columns). Since
   q·k_j/sqrt(H·d) = Σ_h s_hj/sqrt(H) (s_hj = the per-head logit q_h·k_hj/sqrt(d)), we get it exactly from the
   encoder's per-head CLS attention A_hj = softmax_j(s_hj):
       a_j = softmax_j( Σ_h log A_hj / sqrt(H) )  over the patch columns and the prefix column
   whose per-head probability is 1 − Σ_j A_hj (exact for CLIP's single CLS prefix; with register tokens the
   prefix columns are lumped into one). ``attention="head_mean"``: mean over heads of A (compactvl's earlier rule).
   Encoders without a CLS token: the encoder supplies the mean attention each patch receives instead
   (``EncoderOutput.attention_substitute``), it is averaged over heads, and the output's ``notes`` say so.
2. Adaptive selection (IQR outliers): keep the tokens with a > Q3 + 1.5·(Q3 - Q1) (linear quartiles, as
   ``np.percentile``). Per sample: the reference (``outlier_dectection``) pools the quartiles over the whole batch,
   so a sample's result depends on its batchmates; it runs at batch 1 in LLaVA's evaluation (PruMerge+'s code only
   runs at batch 1), where both agree. The reference then keeps topk(a, int(N·ratio)), ratio = outliers/N, which is
   the outlier set (equal counts for every outlier count at N = 576; we use the integer count). If there is no
   outlier we keep the top token (the reference keeps none for PruMerge and divides by zero for PruMerge+).
   PruMerge+ also keeps spatially uniform tokens: every ⌊⌊n/n_out⌋/3⌋-th index below n − 1 that is not an outlier
   (reference: ``torch.arange(0, 575, int(int(1/ratio)/3))``; equal to the reference's float expression at N = 576).
3. Merge: for each kept token i, its ``neighbors`` (32) most key-similar other tokens N(i) (cosine of that layer's
   keys, heads concatenated, over all valid tokens): y_i = x_i + Σ_{j∈N(i)} a_j x_j (the authors' update,
   unnormalised).
4. ``extra_token`` (default True, as in the authors' code): one more token Σ_{j pruned} a_j x_j is appended; it
   holds (``assign``) all pruned patches. With extra_token=False pruned patches are marked pruned (-1).
5. Order of the emitted tokens. ``order="score"`` (default, the reference): the outliers by decreasing a (the
   reference's ``torch.topk`` is sorted), then PruMerge+'s spatial tokens by index, then the extra token.
   ``order="grid"``: kept tokens in grid order (compactvl's earlier rule), then the extra token.
Knobs: ``layer`` (encoder block for attention and keys; default -1, the last block — the reference's
``layers[23]`` of 24-block CLIP-L, one block after LLaVA's feature tap -2; ``None``: the layer the tokens came
from), ``attention`` ("single_head" | "head_mean"), ``order`` ("score" | "grid"), ``neighbors`` (32),
``extra_token`` (True), ``streams``. ``prumerge_plus`` has the same knobs. Expected tokens: data dependent (~5.5% of
576 for PruMerge, ~25% for PruMerge+ on CLIP-L/336 per the paper). Works after other ops too: per-patch attention
and keys are pooled into the current tokens through ``assign``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputError
from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, check_int, register

HEAD_REDUCE = ("mean", "sum", "single_head")


def single_head_attention(att: Tensor) -> Tensor:
    """[B,H,N] per-head CLS→patch softmax rows -> [B,N] the CLS row of ONE attention over the concatenated heads,
    softmax(q·Kᵀ/sqrt(H·d)) restricted to the patch columns (PruMerge's reference formula, see the module doc).
    The prefix columns (CLS, registers) keep their per-head mass 1 − Σ_j A_hj in the normaliser."""
    dt = torch.float32 if att.device.type == "mps" else torch.float64
    A = att.to(dt)
    tiny = torch.finfo(dt).tiny
    H = A.shape[1]
    logits = A.clamp_min(tiny).log().sum(1) / math.sqrt(H)  # [B, N], up to a per-sample constant
    prefix = (1 - A.sum(-1)).clamp_min(tiny).log().sum(1, keepdim=True) / math.sqrt(H)  # [B, 1]
    z = torch.logsumexp(torch.cat([logits, prefix], 1), 1, keepdim=True)
    return (logits - z).exp().to(att.dtype)


def attention_and_keys(t: Tokens, ctx: OpContext, layer: int | None, op: str, head_reduce: str,
                       key_head_mean: bool = False) -> tuple[Tensor, Tensor, Tokens]:
    """Per-token CLS attention [B,N] (``head_reduce``: "mean" / "sum" over heads, or "single_head", see
    ``single_head_attention``; pooled by sum over the patches a token holds) and keys [B,N,Ck] (pooled by mean;
    ``key_head_mean``: averaged over heads first, [B,N,Ck/H], as VisionZip's reference metric)."""
    if head_reduce not in HEAD_REDUCE:
        raise ConfigError(f"{op}: head_reduce={head_reduce!r} must be one of {HEAD_REDUCE}")
    enc = ctx.encoder(t, op)
    layer = t.layer if layer is None else layer
    if layer is None:
        raise InputError(f"{op} needs the encoder layer for attention; set its layer knob or build the tokens "
                         "with Tokens.from_encoder(out, layer)")
    heads = enc.attention(layer)
    substitute = bool(getattr(enc, "attention_substitute", False))
    if head_reduce == "single_head" and not substitute:
        att = single_head_attention(heads)
    else:  # the no-CLS substitute is no softmax row: "single_head" averages it over heads
        att = heads.sum(1) if head_reduce == "sum" else heads.mean(1)
    if att.shape[-1] != t.assign.shape[1]:
        raise InputError(f"{op}: encoder attention covers {att.shape[-1]} patches but the tokens come from a "
                         f"{t.grid0[0]}x{t.grid0[1]} grid; use the same encoder output for tokens and context")
    if substitute:
        t = t.with_note(f"{op}: the encoder has no CLS token; ranked by the mean attention each patch receives")
    keys = enc.keys(layer)
    if key_head_mean:
        H = heads.shape[1]
        if keys.shape[-1] % H:
            raise InputError(f"{op}: keys of width {keys.shape[-1]} do not split into the attention's {H} heads")
        keys = keys.view(*keys.shape[:-1], H, keys.shape[-1] // H).mean(-2)
    up = lambda v: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # noqa: E731
    return t.pool_patches(up(att), "sum"), t.pool_patches(up(keys), "mean"), t


def iqr_outliers(a: Tensor, mask: Tensor) -> Tensor:
    q = torch.nanquantile(a.masked_fill(~mask, float("nan")), a.new_tensor([0.25, 0.75]), dim=1)
    keep = (a > (q[1] + 1.5 * (q[1] - q[0]))[:, None]) & mask
    top = a.masked_fill(~mask, float("-inf")).argmax(1, keepdim=True)
    return keep.scatter(1, top, True)


class _PruMerge(StreamOp):
    plus = False

    def __init__(self, in_channels: list[int], *, layer: int | None = -1, neighbors: int = 32,
                 extra_token: bool = True, attention: str = "single_head", order: str = "score",
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.layer, self.extra_token = layer, bool(extra_token)
        self.neighbors = check_int(neighbors, "neighbors", self.name, low=0)
        if attention not in ("single_head", "head_mean"):
            raise ConfigError(f"{self.name}: attention={attention!r} must be 'single_head' (the reference) or "
                              "'head_mean'")
        if order not in ("score", "grid"):
            raise ConfigError(f"{self.name}: order={order!r} must be 'score' (the reference) or 'grid'")
        self.attention, self.order = attention, order

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return [self.layer] if self.layer is not None and stream in self.targets else []

    def choose(self, a: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(kept, outliers) [B,N] bool; PruMerge+ adds its spatial tokens to ``kept``."""
        out = iqr_outliers(a, mask)
        keep = out
        if self.plus:
            n, n_out = mask.sum(1, keepdim=True), out.sum(1, keepdim=True)
            step = ((n // n_out) // 3).clamp_min(1)
            idx = torch.arange(mask.shape[1], device=a.device)
            keep = out | ((idx % step == 0) & (idx < n - 1) & mask)
        return keep, out

    def emit_order(self, a: Tensor, keep: Tensor, out: Tensor) -> Tensor:
        """[B,N] token positions in output order: kept tokens first (see ``order``), then the rest."""
        idx = torch.arange(keep.shape[1], device=a.device).expand_as(keep)
        if self.order == "grid":
            return (~keep).long().argsort(dim=1, stable=True)
        sec = torch.where(out, -a, idx.to(a.dtype))  # outliers by decreasing a, the others by index
        first = sec.argsort(dim=1, stable=True)
        group = torch.where(out, 0, torch.where(keep, 1, 2)).gather(1, first)
        return first.gather(1, group.argsort(dim=1, stable=True))

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        reduce = "single_head" if self.attention == "single_head" else "mean"
        a, keys, t = attention_and_keys(t, ctx, self.layer, self.name, reduce)
        a = a * t.mask
        keep, out = self.choose(a, t.mask)
        B, N, C = t.x.shape
        nk = keep.sum(1)
        K = int(nk.max())
        kidx = self.emit_order(a, keep, out)[:, :K]  # kept positions, in output order
        kvalid = torch.arange(K, device=a.device) < nk[:, None]
        slots = torch.where(kvalid, torch.arange(K, device=a.device), -1)
        dest = torch.full((B, N + 1), -1, dtype=torch.long, device=a.device)
        dest = dest.scatter_(1, torch.where(kvalid, kidx, N), slots)[:, :N]
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
