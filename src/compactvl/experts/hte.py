"""Hierarchical Token Ensemble MoE FFN — VEN-VL ("A Visual Ensemble MoE Framework for Effective and Efficient
Multi-Modal Understanding"), Sec. 3.3, eqs. 5-6 (the saliency of eq. 7 and the pruning of eq. 8 are the ``hte``
layer policy, ``compactvl.policies.hte``).

    y = FFN_global(x) + m(x) · Σ_{i ∈ TopK(g)} g_i · E_i(x),     g = softmax(W_r x)        (5), (6)

FFN_global is the layer's pretrained gated MLP, kept for every token; E_i are lightweight SwiGLU experts
(intermediate = ``expert_ratio`` × the FFN's, half by default as in the paper) and m(x) = 1 for visual tokens only:
text rows never reach the router or the experts (their output is exactly FFN_global(x)). The visual rows of the
whole batch are routed together and dispatched grouped per expert (``experts.moe.dispatch``).

Which rows are visual comes from the Runner, which binds the layer's context to the module while it runs the layer
(``self.layer_context.state``: ``state.visual & state.mask``; see ``runner.LayerStateModule``). Called outside the
Runner (a plain ``lm(...)``) or on decode steps, no row is visual and the module is the dense FFN.

Signals written into ``state.signals`` (``runner.Signals``) for the layer policies and the loss:
* ``state.signals.router[layer] = RouterSignal(probs [B, L, E] float32 (0 on non-visual rows), top_k=k,
  orig_index [B, L], source="hte")`` — what the ``hte`` pruning policy scores (max or top-k sum of g);
* in training (module in train mode and grad enabled), ``balance_weight · L_bal`` (``experts.moe.balance_loss``
  over the batch's visual rows) is appended to ``state.signals.aux_losses``, which the VLM adds to its loss.

Initialisation: with ``zero_init`` (default) every expert's ``down_proj`` starts at zero, so the model starts as
exactly the dense LM (y = FFN_global(x)); the experts' down projections get gradients from the first step and
the rest follow. ``upcycle=True`` initialises expert i's gate/up rows (and, without ``zero_init``, its down columns)
from a slice of the FFN's intermediate channels starting at i·I/E (wrapping around), so the experts start as
overlapping pieces of the pretrained FFN. The router is a bias-free Linear (PyTorch's default init).

Knobs (recipe ``experts: [{expert: hte, ...}]``): ``layers`` ("second_half" (default) | "first_half" | "all" |
"dense" | "sparse" | [indices]), ``sparse_step`` (2), ``num_experts`` (4), ``top_k`` (1), ``expert_ratio`` (0.5) or
``expert_intermediate`` (absolute width), ``upcycle`` (False), ``zero_init`` (True), ``balance_weight`` (0.01).
The surgery is a pure function of these knobs and the LM config (shapes), so ``from_pretrained`` rebuilds the same
modules before loading weights.
MACs per visual token of an HTE layer, on top of the dense layer: D·E (router) + k·3·D·m (activated experts);
``experts.extra_macs(lm, schedule)`` sums them over a schedule.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import EXPERTS
from ..runner import RouterSignal
from .moe import (ExpertModule, balance_loss, check_routing, check_swiglu, decoder_layers, dispatch, resolve_layers,
                  route)


class SwiGLUExpert(nn.Module):
    """down_proj(act(gate_proj(x)) · up_proj(x)), bias-free, the layout of the LM's own MLP."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HTEMoE(ExpertModule):
    """Eq. 5: the pretrained FFN for every token plus top-k routed visual experts for visual tokens."""

    wrapped = ("global_ffn",)

    def __init__(self, global_ffn: nn.Module, num_experts: int = 4, top_k: int = 1, intermediate: int | None = None,
                 balance_weight: float = 0.01, upcycle: bool = False, zero_init: bool = True):
        super().__init__()
        self.num_experts, self.top_k = check_routing("hte", num_experts, top_k)
        D = global_ffn.gate_proj.in_features
        I = global_ffn.gate_proj.out_features
        m = intermediate or max(1, I // 2)
        self.global_ffn = global_ffn
        self.router = nn.Linear(D, self.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(D, m, global_ffn.act_fn) for _ in range(self.num_experts))
        self.balance_weight = float(balance_weight)
        self.intermediate = m
        ref = global_ffn.gate_proj.weight
        self.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for i, e in enumerate(self.experts):
                if upcycle:
                    idx = (i * I // self.num_experts + torch.arange(m, device=ref.device)) % I
                    e.gate_proj.weight.copy_(global_ffn.gate_proj.weight[idx])
                    e.up_proj.weight.copy_(global_ffn.up_proj.weight[idx])
                    e.down_proj.weight.copy_(global_ffn.down_proj.weight[:, idx])
                if zero_init:
                    e.down_proj.weight.zero_()

    @property
    def hidden_size(self) -> int:
        return self.router.in_features

    def macs_per_visual_token(self) -> int:
        """Router + the k activated experts, per visual token (MACs on top of the dense layer)."""
        D = self.hidden_size
        return D * self.num_experts + self.top_k * 3 * D * self.intermediate

    def extra_macs(self, tokens: int, visual: int) -> int:
        return visual * self.macs_per_visual_token()

    def forward(self, x: Tensor) -> Tensor:
        y = self.global_ffn(x)
        ctx = self.layer_context
        if ctx is None:
            return y
        layer_idx, state = ctx.layer_idx, ctx.state
        vis = state.visual & state.mask
        if vis.shape != x.shape[:2]:
            raise RuntimeError(f"hte at layer {layer_idx}: the Runner state has {tuple(vis.shape)} rows but the MLP "
                               f"got {tuple(x.shape[:2])}; the state and the layer input disagree")
        if not bool(vis.any()):
            return y
        xv = x[vis]
        probs, weight, index = route(self.router(xv), self.top_k)
        out = dispatch(xv, index, weight, self.experts)
        y = y.index_put((vis,), out.to(y.dtype), accumulate=True)
        full = probs.new_zeros(*vis.shape, self.num_experts).masked_scatter(vis[..., None], probs.detach())
        state.signals.router[layer_idx] = RouterSignal(full, self.top_k, state.orig_index, "hte")
        if self.training and torch.is_grad_enabled() and self.balance_weight > 0:
            state.signals.aux_losses.append(self.balance_weight * balance_loss(probs, index))
        return y

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, expert_intermediate={self.intermediate}, "
                f"balance_weight={self.balance_weight}")


def _positive(method: str, knob: str, x: Any, allow_zero: bool = False) -> float:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    ok = ok and (x >= 0 if allow_zero else x > 0)
    if not ok:
        raise ConfigError(f"{method}: {knob}={x!r} must be a number {'>= 0' if allow_zero else '> 0'}")
    return float(x)


@EXPERTS.register("hte")
def apply_hte(lm: nn.Module, layers: Any = "second_half", num_experts: int = 4, top_k: int = 1,
              expert_ratio: float = 0.5, expert_intermediate: int | None = None, upcycle: bool = False,
              zero_init: bool = True, balance_weight: float = 0.01, sparse_step: int = 2) -> list[int]:
    """Replace the MLP of the chosen decoder layers with :class:`HTEMoE` (in place). Returns the layer indices."""
    check_routing("hte", num_experts, top_k)
    _positive("hte", "expert_ratio", expert_ratio)
    _positive("hte", "balance_weight", balance_weight, allow_zero=True)
    if expert_intermediate is not None and (not isinstance(expert_intermediate, int) or expert_intermediate < 1):
        raise ConfigError(f"hte: expert_intermediate={expert_intermediate!r} must be a whole number >= 1 (or leave "
                          f"it out and set expert_ratio)")
    blocks = decoder_layers(lm, "hte")
    chosen = resolve_layers("hte", layers, len(blocks), sparse_step)
    for i in chosen:  # check every layer before changing any
        check_swiglu(blocks[i].mlp, i, "hte")
    for i in chosen:
        ffn = blocks[i].mlp
        m = expert_intermediate or max(1, round(ffn.gate_proj.out_features * expert_ratio))
        blocks[i].mlp = HTEMoE(ffn, num_experts, top_k, m, balance_weight, bool(upcycle), bool(zero_init)).train(
            ffn.training)
    return chosen


def hte_layers(lm: nn.Module) -> list[int]:
    """Indices of the decoder layers whose MLP is an :class:`HTEMoE`."""
    return [i for i, layer in enumerate(decoder_layers(lm, "hte")) if isinstance(layer.mlp, HTEMoE)]
