"""Query Guided Mixture-of-Projector, QMoP (Li et al., "QMoP: Query Guided Mixture-of-Projector for Efficient Visual
Token Compression", arXiv:2603.21232, 2026).

Three compression branches turn the N tokens x [N, C] of an image into N^V tokens each, and a Query Guided Router
(QGR), reading the image and the prompt, weighs them (a mixture-of-experts fusion):

    Y_pool  = P x                                   (pooling branch: average pooling to N^V tokens)
    Y_res   = Resampler(q, x)                       (resampler branch: N^V learnable queries, Perceiver-style)
    Y_prune = x[TopK_{N^V}(s)],  s = w_s·x          (pruning branch: the N^V tokens of highest learned score s,
                                                     kept in their original order)
    g = softmax(W_2 GELU(W_v x̄ + W_t t̄)) ∈ R³      (QGR: x̄ mean visual token, t̄ mean prompt embedding)
    Y = Σ_b g_b Y_b                                 (fusion, slot by slot)

The paper's text available to us gives the branches and the router's inputs (visual input + textual query), not
the exact layers; where it is open we took the simplest faithful reading and say so:
- pooling: P [N^V, N] averages the windows of ``F.adaptive_avg_pool2d`` to a √N^V × √N^V grid (a full grid and a
  square N^V), else a 1-D adaptive pooling of the valid tokens in order (``cotr.pool_matrix``);
- resampler: the Perceiver Resampler of ``ops.resampler`` (``depth`` layers, ``heads`` × ``dim_head``), output width
  C so the three branches mix in one space (the projector follows, as for every token op);
- pruning: a linear scorer per token; the kept features are multiplied by 1 + σ(s) − sg(σ(s)) (value 1, a
  straight-through gradient to the scorer). A sample with n < N^V valid tokens keeps all n; its remaining slots take
  the pooling branch's tokens;
- router: x̄ / t̄ are masked means; ``top_k`` < 3 keeps the top_k branch weights and renormalises them (the "selects
  and weights" of the paper); without prompt text t̄ is left out and the output notes it;
- fusion slot by slot (slot j of each branch is mixed; the branches' slots all follow raster order).
Initialisation and step-0 equivalence (issue 19): ``init="pool"`` (default) mixes with a learnable gate γ [N^V],
zero at initialisation: Y = Y_pool + tanh(γ) ⊙ (Σ_b g_b Y_b − Y_pool), so at step 0 QMoP outputs exactly its pooling
baseline (``avgpool`` with k = √(N/N^V) on a grid); the gate learns from the first step, the rest as soon as it
moves. ``init="random"``: the plain mixture Y = Σ_b g_b Y_b.
Provenance: the same mixture of the branches' attention over the tokens (P, the resampler's head-averaged attention,
the one-hot selection) feeds ``Tokens.attend`` (positions, sizes).
Knobs: ``num_queries`` N^V (64), ``heads`` (8), ``dim_head`` (64), ``depth`` (1), ``mlp_ratio`` (4),
``router_hidden`` (default C), ``top_k`` (3), ``init`` ("pool" | "random"), ``streams``. Expected tokens: N^V per
stream. Budget: ``tokens=k`` → num_queries=k; ``keep=f`` → num_queries=kept(n, f).
MACs (:meth:`QMoP.macs`, per image of n tokens): the matrix products the forward runs — pooling Q·n·C; per
resampler layer Q·C·I (q) + 2·(n+Q)·C·I (k, v) + 2·Q·(n+Q)·I (scores, AV) + Q·I·C (out) + 2·r·Q·C² (FFN) with
I = heads·dim_head; scorer n·C; router C·H (+ T_d·H with text) + 3·H; provenance 2·Q·n. Norms, softmax and the
mixing itself (elementwise) are not counted. The LLM then sees N^V tokens per image (``keep`` schedule).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..schedules import Budget
from ..tokens import Grid, Tokens
from .base import OpContext, StreamOp, budget_count, check_int, register
from .cotr import masked_pool, pool_matrix
from .resampler import CrossAttention

BRANCHES = ("pool", "resampler", "prune")


def straight_through(scores: Tensor) -> Tensor:
    """1 + σ(s) − sg(σ(s)): exactly 1 in the forward pass, the gradient of σ(s) in the backward pass."""
    g = torch.sigmoid(scores.float())
    return (g - g.detach()) + 1.0


@register("qmop")
class QMoP(StreamOp):
    def __init__(self, in_channels: list[int], *, num_queries: int = 64, heads: int = 8, dim_head: int = 64,
                 depth: int = 1, mlp_ratio: int = 4, router_hidden: int | None = None, top_k: int = 3,
                 init: str = "pool", text_dim: int | None = None, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.num_queries = check_int(num_queries, "num_queries", "qmop")
        self.heads, self.dim_head = check_int(heads, "heads", "qmop"), check_int(dim_head, "dim_head", "qmop")
        self.depth, self.mlp_ratio = check_int(depth, "depth", "qmop"), check_int(mlp_ratio, "mlp_ratio", "qmop")
        self.router_hidden = None if router_hidden is None else check_int(router_hidden, "router_hidden", "qmop")
        self.top_k = check_int(top_k, "top_k", "qmop")
        if self.top_k > len(BRANCHES):
            raise ConfigError(f"qmop: top_k={top_k} but there are only {len(BRANCHES)} branches "
                              f"({', '.join(BRANCHES)}); use 1, 2 or 3")
        if init not in ("pool", "random"):
            raise ConfigError(f"qmop: init={init!r}; use 'pool' (starts as its average-pooling baseline) or 'random' "
                              "(the plain mixture)")
        self.init, self.text_dim = init, text_dim
        nets = {}
        for i in self.targets:
            c = in_channels[i]
            h = self.router_hidden or c
            net = {"layers": nn.ModuleList([CrossAttention(c, heads, mlp_ratio, dim_head, False, True)
                                            for _ in range(depth)]),
                   "out": nn.LayerNorm(c), "scorer": nn.Linear(c, 1), "v_proj": nn.Linear(c, h),
                   "head": nn.Linear(h, len(BRANCHES))}
            if text_dim:
                net["t_proj"] = nn.Linear(text_dim, h)
            nets[str(i)] = nn.ModuleDict(net)
            self.register_parameter(f"queries_{i}", nn.Parameter(torch.randn(self.num_queries, c)))
            if init == "pool":
                self.register_parameter(f"gate_{i}", nn.Parameter(torch.zeros(self.num_queries)))
        self.nets = nn.ModuleDict(nets)

    # ---- router
    def text_mean(self, ctx: OpContext, net: nn.ModuleDict, batch: int) -> Tensor | None:
        if ctx.text is None:
            return None
        if "t_proj" not in net:
            raise InputError("qmop got prompt text but was built without text_dim; pass text_dim (the LLM embedding "
                             "width) to build_ops, or leave OpContext.text empty")
        if ctx.text.dim() != 3 or ctx.text.shape[0] != batch or ctx.text.shape[-1] != self.text_dim:
            raise InputError(f"qmop: text embeddings have shape {tuple(ctx.text.shape)}, expected [{batch}, T, "
                             f"{self.text_dim}]; pass the prompt embeddings of the same batch")
        tm = ctx.text_mask
        tm = torch.ones(ctx.text.shape[:2], dtype=torch.bool, device=ctx.text.device) if tm is None else tm.bool()
        return masked_pool(ctx.text, tm.to(ctx.text.device), mean=True)

    def route(self, t: Tokens, ctx: OpContext, net: nn.ModuleDict) -> tuple[Tensor, bool]:
        """Branch weights g [B, 3] (float32) and whether the prompt took part."""
        x = net["v_proj"](masked_pool(t.x, t.mask, mean=True))
        text = self.text_mean(ctx, net, t.x.shape[0])
        if text is not None:
            x = x + net["t_proj"](text.to(x.dtype))
        g = net["head"](F.gelu(x)).float().softmax(-1)
        if self.top_k < len(BRANCHES):
            top = g.topk(self.top_k, dim=-1)
            g = torch.zeros_like(g).scatter(-1, top.indices, top.values)
            g = g / g.sum(-1, keepdim=True)
        return g, text is not None

    # ---- branches
    def prune(self, t: Tokens, net: nn.ModuleDict, P: Tensor, y_pool: Tensor) -> tuple[Tensor, Tensor]:
        """Pruning branch: (features [B, Q, C], selection weights [B, Q, N])."""
        x, mask = t.x, t.mask
        B, N, C = x.shape
        Q = self.num_queries
        s = net["scorer"](x).squeeze(-1)  # [B, N]
        k = mask.sum(1).clamp(max=Q)
        order = torch.argsort(s.float().masked_fill(~mask, float("-inf")), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=x.device).expand(B, N))
        keep = (rank < k[:, None]) & mask
        idx = torch.argsort((~keep).long(), dim=1, stable=True)[:, :min(Q, N)]  # kept tokens first, in their order
        if idx.shape[1] < Q:
            idx = torch.cat([idx, idx.new_zeros(B, Q - idx.shape[1])], 1)
        ok = torch.arange(Q, device=x.device) < k[:, None]  # [B, Q] slots holding a selected token
        st = straight_through(s).gather(1, idx).to(x.dtype)
        xs = x.gather(1, idx[..., None].expand(B, Q, C)) * st[..., None]
        sel = F.one_hot(idx, N).to(P.dtype)
        return torch.where(ok[..., None], xs, y_pool), torch.where(ok[..., None], sel, P)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        net = self.nets[str(i)]
        x = t.x
        P = pool_matrix(t, self.num_queries).to(x.dtype)  # [B, Q, N]
        y_pool = P @ x
        q = getattr(self, f"queries_{i}").to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in net["layers"]:
            q, a_res = layer(q, x, t.mask)
        y_res = net["out"](q)
        y_prune, sel = self.prune(t, net, P, y_pool)
        g, with_text = self.route(t, ctx, net)
        w = [g[:, b, None, None].to(x.dtype) for b in range(len(BRANCHES))]
        y = w[0] * y_pool + w[1] * y_res + w[2] * y_prune
        a = w[0] * P + w[1] * a_res.to(x.dtype) + w[2] * sel
        if self.init == "pool":  # Y_pool + tanh(γ)(Y − Y_pool): exactly the pooling branch at step 0
            gate = torch.tanh(getattr(self, f"gate_{i}")).to(x.dtype)[None, :, None]
            y = y_pool + gate * (y - y_pool)
            a = P + gate * (a - P)
        out = t.attend(a.clamp_min(0), y)
        return out if with_text else out.with_note("qmop: no prompt text; the router read the image only")

    # ---- what the tools read
    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        return {"num_queries": budget_count(cls.name, budget, n)}

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return self.num_queries

    def macs(self, n: int, text: bool = False, stream: int | None = None) -> int:
        """Multiply-accumulates of one image of ``n`` tokens through stream ``stream`` (default: the first target);
        ``text``: the router read a prompt (see the module docstring for the terms)."""
        i = self.targets[0] if stream is None else stream
        net = self.nets[str(i)]
        C, Q, I, r = net["out"].normalized_shape[0], self.num_queries, self.heads * self.dim_head, self.mlp_ratio
        H = net["v_proj"].out_features
        res = Q * C * I + 2 * (n + Q) * C * I + 2 * Q * (n + Q) * I + Q * I * C + 2 * r * Q * C * C
        router = C * H + (self.text_dim * H if text and self.text_dim else 0) + len(BRANCHES) * H
        return Q * n * C + self.depth * res + n * C + router + 2 * Q * n
