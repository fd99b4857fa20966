"""MMoE-LLM: mixture of multi-modal LoRA experts — LEO-MINI ("LEO-MINI: An Efficient Multimodal Large Language
Model using Conditional Token Reduction and Mixture of Multi-Modal Experts"), Sec. 3.3, eqs. 8-9.

Every chosen decoder layer's gated MLP gets, on each of its linears f ∈ {gate_proj, up_proj, down_proj} (LEO-MINI
applies MMoE to the MLP only):

    f(z) = f^ORI(z) + f^E_GEN(z) + Σ_{i ∈ E'} f^E_i(z) / k,       E' = Top_k(R),   R = softmax(f^ROUTING(Ĩ, T, x))   (8, 9)

f^E are LoRA blocks (Hu et al. 2022): Δ(z) = (α/r) · z A B with A [d_in, r], B [r, d_out]; B starts at zero, so
with zero-initialised B the layer is exactly the base LM. f^E_GEN is the always-on general expert. One router per
layer: a 2-layer MLP with GELU on concat(x_t, Ĩ_t, T_t) (3·D → ``router_hidden`` → E), applied per token; the
selected experts are used in all three linears of that token's MLP.

What Ĩ and T are here (our reading, documented because the paper leaves it open):
* Ĩ_t and T_t are the **means of the visual rows and of the text rows of the same sample, at this layer's MLP
  input, over positions <= t** (causal cumulative means; 0 where none yet). "Pooled visual and text tokens of the
  sample", computed causally so that no token routes on answer tokens that follow it — otherwise training (whole
  answers in the sequence) would leak the future into the router and differ from generation. Pruned rows are simply
  absent. Which rows are visual comes from the Runner (``self.layer_context``, bound by the Runner while it runs
  the layer); outside the Runner every row is text.
* Decoding: a decode step (``Runner.extend``: its rows carry ``orig_index == -1``) continues the cumulative sums
  from the totals this module kept at the end of the latest prefill / step (``_carry``, per sample), so cached
  generation routes every token exactly as an uncached recomputation of the whole sequence. The carry belongs to
  the batch of the latest prefill: reordering the KV cache's batch is not supported by this module.

Selection weights: eq. 8 averages the selected experts (weight 1/k), which gives the router no gradient from the
task loss. ``weighting="mean"`` (default) keeps eq. 8 in the forward pass and passes the gradient straight through
the routing probabilities (weight = (p / sg(p)) / k = 1/k in value); ``"prob"`` weights experts by p instead.
A load-balancing loss (``experts.moe.balance_loss`` over the batch's real tokens, λ = ``balance_weight``, 0.05 as in
LEO-MINI's appendix) is appended to ``state.signals.aux_losses`` in training. Routing probabilities go to
``state.signals.router[layer]`` (a ``RouterSignal`` with ``source="mmoe"``) for inspection.

Knobs (recipe ``experts: [{expert: mmoe, ...}]``): ``layers`` ("all" default, or a placement / list as for hte),
``num_experts`` (3), ``top_k`` (1), ``rank`` r (16), ``alpha`` (2·r), ``general`` (True), ``router_hidden`` (D),
``targets`` (the three MLP linears), ``weighting`` ("mean" | "prob"), ``balance_weight`` (0.05), ``multimodal``
(True; False routes on the hidden state alone — the vanilla LoRA-MoE of LEO-MINI Table 5's ablation).
MACs per token on top of the dense layer: router 3D·H + H·E, plus (k + 1)·r·(d_in + d_out) per target linear.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import EXPERTS
from ..runner import RouterSignal
from .moe import ExpertModule, SWIGLU, balance_loss, check_routing, check_swiglu, decoder_layers, group, \
    resolve_layers, route

WEIGHTINGS = ("mean", "prob")


class LoRABank(nn.Module):
    """``n`` LoRA adapters of one Linear(d_in → d_out): Δ_e(z) = scale · (z A_e) B_e; A ~ U(±1/√d_in), B = 0."""

    def __init__(self, n: int, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.A = nn.Parameter(torch.empty(n, d_in, rank).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(n, rank, d_out))
        self.scale = scale

    def delta(self, z: Tensor, e: int = 0) -> Tensor:
        return (z @ self.A[e]) @ self.B[e] * self.scale

    def experts(self) -> list:
        return [lambda z, e=e: self.delta(z, e) for e in range(self.A.shape[0])]


class MMoEMLP(ExpertModule):
    """Eq. 9 on each linear of a gated MLP, with the multi-modal router; see the module docstring."""

    wrapped = ("base",)

    def __init__(self, base: nn.Module, num_experts: int = 3, top_k: int = 1, rank: int = 16,
                 alpha: float | None = None, general: bool = True, router_hidden: int | None = None,
                 targets: Sequence[str] = SWIGLU, weighting: str = "mean", balance_weight: float = 0.05,
                 multimodal: bool = True):
        super().__init__()
        self.num_experts, self.top_k = check_routing("mmoe", num_experts, top_k)
        D, I = base.gate_proj.in_features, base.gate_proj.out_features
        dims = {"gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
        scale = (2.0 * rank if alpha is None else float(alpha)) / rank
        self.base = base
        self.targets = tuple(targets)
        self.experts = nn.ModuleDict({t: LoRABank(self.num_experts, *dims[t], rank, scale) for t in self.targets})
        self.general = nn.ModuleDict({t: LoRABank(1, *dims[t], rank, scale) for t in self.targets}) if general else None
        H = router_hidden or D
        self.multimodal = bool(multimodal)
        self.router = nn.Sequential(nn.Linear(3 * D if multimodal else D, H), nn.GELU(), nn.Linear(H, self.num_experts))
        self.weighting = weighting
        self.balance_weight = float(balance_weight)
        self.rank = rank
        ref = base.gate_proj.weight
        self.to(device=ref.device, dtype=ref.dtype)
        self._carry: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    # ---- router inputs
    def summaries(self, x: Tensor, real: Tensor, vis: Tensor, extend: bool) -> tuple[Tensor, Tensor]:
        """Causal per-sample means of the visual rows and of the text rows of ``x`` (``[B, L, D]`` each)."""
        xf = x.float()
        text = real & ~vis
        vsum = (xf * vis[..., None]).cumsum(1)
        tsum = (xf * text[..., None]).cumsum(1)
        vcnt, tcnt = vis.long().cumsum(1), text.long().cumsum(1)
        if extend:
            if self._carry is None or self._carry[0].shape[0] != x.shape[0]:
                raise RuntimeError("mmoe: a decode step (Runner.extend) without a prefill of the same batch before "
                                   "it; run Runner.prefill (or generate) first")
            cv, cn, ct, cm = self._carry
            vsum, vcnt = vsum + cv[:, None], vcnt + cn[:, None]
            tsum, tcnt = tsum + ct[:, None], tcnt + cm[:, None]
        self._carry = (vsum[:, -1].detach(), vcnt[:, -1], tsum[:, -1].detach(), tcnt[:, -1])
        v = vsum / vcnt.clamp_min(1)[..., None]
        t = tsum / tcnt.clamp_min(1)[..., None]
        return v.to(x.dtype), t.to(x.dtype)

    def router_logits(self, x: Tensor, visual_summary: Tensor, text_summary: Tensor) -> Tensor:
        if not self.multimodal:
            return self.router(x)
        return self.router(torch.cat([x, visual_summary, text_summary], dim=-1))

    def _lora(self, name: str, z: Tensor, out: Tensor, real: Tensor, groups) -> Tensor:
        if name not in self.targets:
            return out
        if self.general is not None:
            out = out + self.general[name].delta(z)
        return out.index_put((real,), groups.combine(z[real], self.experts[name].experts()).to(out.dtype),
                             accumulate=True)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        ctx = self.layer_context
        if ctx is None:
            layer_idx, state = None, None
            real = torch.ones(B, L, dtype=torch.bool, device=x.device)
            vis, extend = torch.zeros_like(real), False
        else:
            layer_idx, state = ctx.layer_idx, ctx.state
            real, vis = state.mask, state.visual & state.mask
            if real.shape != (B, L):
                raise RuntimeError(f"mmoe at layer {layer_idx}: the Runner state has {tuple(real.shape)} rows but "
                                   f"the MLP got {(B, L)}")
            extend = not bool((state.orig_index >= 0).any())
        v, t = self.summaries(x, real, vis, extend) if self.multimodal else (x, x)
        logits = self.router_logits(x[real], v[real], t[real])
        probs, weight, index = route(logits, self.top_k)
        if self.weighting == "mean":
            weight = weight / weight.detach() / self.top_k
        groups = group(index, weight, self.num_experts)
        base = self.base
        g = self._lora("gate_proj", x, base.gate_proj(x), real, groups)
        u = self._lora("up_proj", x, base.up_proj(x), real, groups)
        h = base.act_fn(g) * u
        y = self._lora("down_proj", h, base.down_proj(h), real, groups)
        if state is not None:
            full = probs.new_zeros(B, L, self.num_experts).masked_scatter(real[..., None], probs.detach())
            state.signals.router[layer_idx] = RouterSignal(full, self.top_k, state.orig_index, "mmoe")
            if self.training and torch.is_grad_enabled() and self.balance_weight > 0:
                state.signals.aux_losses.append(self.balance_weight * balance_loss(probs, index))
        return y

    def macs_per_token(self) -> int:
        H = self.router[0].out_features
        lora = sum(b.A.shape[1] + b.B.shape[2] for b in self.experts.values()) * self.rank
        return self.router[0].in_features * H + H * self.num_experts + (self.top_k + (self.general is not None)) * lora

    def extra_macs(self, tokens: int, visual: int) -> int:
        return tokens * self.macs_per_token()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, targets={self.targets}, "
                f"general={self.general is not None}, weighting={self.weighting}, multimodal={self.multimodal}")


@EXPERTS.register("mmoe")
def apply_mmoe(lm: nn.Module, layers: Any = "all", num_experts: int = 3, top_k: int = 1, rank: int = 16,
               alpha: float | None = None, general: bool = True, router_hidden: int | None = None,
               targets: Sequence[str] = SWIGLU, weighting: str = "mean", balance_weight: float = 0.05,
               sparse_step: int = 2, multimodal: bool = True) -> list[int]:
    """Replace the MLP of the chosen decoder layers with :class:`MMoEMLP` (in place). Returns the layer indices."""
    check_routing("mmoe", num_experts, top_k)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"mmoe: rank={rank!r} must be a whole number >= 1 (LEO-MINI uses 16)")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ConfigError(f"mmoe: alpha={alpha!r} must be a number > 0 (the LoRA scale is alpha / rank)")
    if router_hidden is not None and (not isinstance(router_hidden, int) or router_hidden < 1):
        raise ConfigError(f"mmoe: router_hidden={router_hidden!r} must be a whole number >= 1")
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t not in SWIGLU]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ConfigError(f"mmoe: targets={targets!r}; choose distinct linears among {', '.join(SWIGLU)}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"mmoe: weighting={weighting!r}; use 'mean' (LEO-MINI eq. 8) or 'prob'")
    if isinstance(balance_weight, bool) or not isinstance(balance_weight, (int, float)) or balance_weight < 0:
        raise ConfigError(f"mmoe: balance_weight={balance_weight!r} must be a number >= 0")
    blocks = decoder_layers(lm, "mmoe")
    chosen = resolve_layers("mmoe", layers, len(blocks), sparse_step)
    for i in chosen:
        check_swiglu(blocks[i].mlp, i, "mmoe")
    for i in chosen:
        mlp = blocks[i].mlp
        blocks[i].mlp = MMoEMLP(mlp, num_experts, top_k, rank, alpha, bool(general), router_hidden, targets,
                                weighting, balance_weight, bool(multimodal)).train(mlp.training)
    return chosen
