"""Conditional Token Reduction, CoTR (LEO-MINI, Sec. 3.2, eqs. 2-7).

For each encoder i with tokens I_i [N_i, d_i] and learnable queries Q_i [N^V, d_i]:
  s_i^QUERY = Q̂_i Î_iᵀ (2),  s_i^SELF = 1 Î_i Î_iᵀ (3),  s_i^CROSS = Σ_{j≠i} 1 Î_j Î_iᵀ (4),  s_i^TEXT = 1 T̂ Î_iᵀ (5),
  α_i = softmax(s^QUERY + s^SELF + s^CROSS + s^TEXT) (6),  Ī_i = α_i Î_i (7),  output = concat_channels_i(Ī_i).
Q̂_i = Q_i W^Q_i, Î_i = I_i W^I_i, T̂ = T W^T are learnable linear maps; 1 is a row of ones (a sum over tokens).
Choices where the text is open (documented, tested as such):
- all projections map into one width ``dim`` (default d of the first encoder), since eq. 4 multiplies tokens of
  different encoders; so each Ī_i has ``dim`` channels and the output m·dim;
- eq. 6 divides the softmax by √d_i; as a constant factor after a softmax only rescales Ī, we apply it to the
  logits inside the softmax (scaled dot-product attention), which also keeps the softmax out of saturation;
- the 1-vector sums of (3)-(5) run over valid tokens only (masks); ``pool="mean"`` divides them by the count
  instead (our option, not the paper's), which keeps the self/cross/text priors independent of N and prompt length;
- without prompt text (or when built with text_dim=None) s^TEXT is 0 and the output notes say so.
Initialisation and step-0 equivalence (issue 19): the baseline CoTR extends is average pooling of each encoder's
(projected) tokens to N^V tokens, concatenated along channels (``avgpool`` + ``concat_channels`` when widths match).
``init="pool"`` mixes the eq. 7 output with that pooling through a learnable gate g_i [N^V] per encoder, zero at
initialisation: Ī_i = P_i Î_i + tanh(g_i) ⊙ (α_i Î_i − P_i Î_i), where P_i [N^V, N_i] averages the windows of
``F.adaptive_avg_pool2d`` to a √N^V × √N^V grid (when the stream is a full grid and N^V a square), else of a 1-D
adaptive pooling of each sample's valid tokens in order; and W^I_i starts as the identity where d_i = ``dim``. So at
step 0 CoTR outputs exactly the pooled tokens; the gate gets a gradient from the first step, the queries and score
projections as soon as it moves. ``init="random"`` is the paper's plain eqs. 2-7 (no gate, default init).
Knobs: ``num_queries`` N^V (64; the paper sweeps 1/16/64/256), ``dim``, ``pool`` ("sum" | "mean"), ``init``
("pool", the default, or "random").
Expected tokens: N^V. Positions/sizes/provenance follow the first encoder's attention weights.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..tokens import Grid, Tokens
from .base import OpContext, TokenOp, check_int, register


def masked_pool(x: Tensor, mask: Tensor, mean: bool) -> Tensor:
    s = (x * mask.unsqueeze(-1).to(x.dtype)).sum(1)
    return s / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype) if mean else s


def _bins(n: Tensor, Q: int) -> tuple[Tensor, Tensor]:
    """Adaptive-pooling bins of n items into Q (F.adaptive_avg_pool*): bin q covers [⌊qn/Q⌋, ⌈(q+1)n/Q⌉)."""
    q = torch.arange(Q, device=n.device)
    n = n[..., None]
    return torch.div(q * n, Q, rounding_mode="floor"), -torch.div(-(q + 1) * n, Q, rounding_mode="floor")


def pool_matrix(t: Tokens, Q: int) -> Tensor:
    """[B, Q, N] row-stochastic average-pooling weights: the windows of ``F.adaptive_avg_pool2d`` to a √Q × √Q grid
    for a full grid stream and a square Q, else a 1-D adaptive pooling of each sample's valid tokens in order."""
    B, N = t.mask.shape
    side = math.isqrt(Q)
    dev = t.mask.device
    if t.grid is not None and side * side == Q and N == t.grid[0] * t.grid[1] and bool(t.mask.all()):
        (h, w), r = t.grid, torch.arange(max(t.grid), device=dev)

        def axis(n: int) -> Tensor:  # [side, n]: which cells of an axis each output row/column averages
            lo, hi = _bins(torch.tensor(n, device=dev), side)
            return (r[:n] >= lo[:, None]) & (r[:n] < hi[:, None])

        m = (axis(h)[:, None, :, None] & axis(w)[None, :, None, :]).reshape(Q, N).expand(B, Q, N)
    else:
        rank = t.mask.long().cumsum(1) - 1  # order of each valid token in its sample
        lo, hi = _bins(t.mask.sum(1), Q)  # [B, Q]
        m = (rank[:, None] >= lo[..., None]) & (rank[:, None] < hi[..., None]) & t.mask[:, None]
    m = m.float()
    return m / m.sum(-1, keepdim=True).clamp_min(1)


@register("cotr")
class CoTR(TokenOp):
    fusion = True

    def __init__(self, in_channels: list[int], *, num_queries: int = 64, dim: int | None = None,
                 pool: str = "sum", init: str = "pool", text_dim: int | None = None):
        super().__init__()
        self.num_queries = check_int(num_queries, "num_queries", "cotr")
        if pool not in ("sum", "mean"):
            raise ConfigError(f"cotr: pool={pool!r}; use 'sum' (the paper's 1-vector) or 'mean'")
        if init not in ("pool", "random"):
            raise ConfigError(f"cotr: init={init!r}; use 'pool' (starts as average pooling) or 'random' (the "
                              "paper's init)")
        self.dim, self.pool, self.text_dim, self.init = dim, pool, text_dim, init
        d = dim or in_channels[0]
        self.queries = nn.ParameterList([nn.Parameter(torch.randn(self.num_queries, c) / math.sqrt(c))
                                         for c in in_channels])
        self.q_proj = nn.ModuleList([nn.Linear(c, d) for c in in_channels])
        self.i_proj = nn.ModuleList([nn.Linear(c, d) for c in in_channels])
        self.t_proj = nn.Linear(text_dim, d) if text_dim else None
        self.gate = nn.Parameter(torch.zeros(len(in_channels), self.num_queries)) if init == "pool" else None
        if init == "pool":
            with torch.no_grad():
                for c, lin in zip(in_channels, self.i_proj):
                    if c == d:
                        lin.weight.copy_(torch.eye(d)), lin.bias.zero_()

    def text_prior(self, streams: list[Tokens], ctx: OpContext) -> Tensor | None:
        if ctx.text is None:
            return None
        if self.t_proj is None:
            raise InputError("cotr got prompt text but was built without text_dim; pass text_dim (the LLM "
                             "embedding width) to build_ops, or leave OpContext.text empty")
        B = streams[0].x.shape[0]
        if ctx.text.shape[0] != B or ctx.text.shape[-1] != self.text_dim:
            raise InputError(f"cotr: text embeddings have shape {tuple(ctx.text.shape)}, expected [{B}, T, "
                             f"{self.text_dim}]; pass the prompt embeddings of the same batch")
        tm = ctx.text_mask if ctx.text_mask is not None else torch.ones(ctx.text.shape[:2], dtype=torch.bool,
                                                                         device=ctx.text.device)
        return masked_pool(self.t_proj(ctx.text), tm.bool(), self.pool == "mean")

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        if len(streams) != len(self.i_proj):
            raise InputError(f"cotr was built for {len(self.i_proj)} encoders but got {len(streams)} streams")
        I = [p(s.x) for p, s in zip(self.i_proj, streams)]  # Î_i [B, N_i, d]
        pooled = [masked_pool(x, s.mask, self.pool == "mean") for x, s in zip(I, streams)]  # 1 Î_i  [B, d]
        prior = sum(pooled)  # SELF + CROSS share Î_iᵀ: (1Î_i + Σ_{j≠i} 1Î_j) Î_iᵀ
        text = self.text_prior(streams, ctx)
        prior = prior if text is None else prior + text
        outs, alphas = [], []
        for i, (x, s) in enumerate(zip(I, streams)):
            q = self.q_proj[i](self.queries[i])  # Q̂_i [N^V, d]
            scores = torch.einsum("qd,bnd->bqn", q, x) + prior.unsqueeze(1) @ x.transpose(1, 2)  # (2)+(3)+(4)+(5)
            logits = scores / math.sqrt(x.shape[-1])
            a = logits.masked_fill(~s.mask[:, None], float("-inf")).softmax(-1)  # α_i [B, N^V, N_i]
            if self.gate is not None:  # init="pool": P_i + tanh(g_i)(α_i - P_i), exactly P_i at step 0
                P = pool_matrix(s, self.num_queries).to(a.dtype)
                a = P + torch.tanh(self.gate[i]).to(a.dtype)[None, :, None] * (a - P)
            outs.append(a @ x)  # Ī_i
            alphas.append(a)
        out = streams[0].attend(alphas[0].clamp_min(0), torch.cat(outs, -1))
        aux = [s.aux_loss for s in streams if s.aux_loss is not None]
        out = out.replace(aux_loss=sum(aux) if aux else None)
        return [out.with_note("cotr: no prompt text; the text score (eq. 5) was omitted") if text is None else out]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return [len(in_channels) * (self.dim or in_channels[0])]

    def expected_tokens(self, n_in: list[int | None], grids: list[Grid | None]) -> list[int | None]:
        return [self.num_queries]
