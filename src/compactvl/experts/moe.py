"""Shared mixture-of-experts machinery: top-k routing, grouped dispatch, the load-balancing loss, layer placement and
the MLP-layout check every expert surgery (``hte``, ``mmoe``) uses.

Routing (VEN-VL eq. 6, LEO-MINI Sec. 3.3): g = softmax(logits) in float32; the k experts with the largest g.

Dispatch: y[n] = Σ_{j<k} w[n, j] · E_{idx[n, j]}(x[n]). The N·k (token, expert) assignments are sorted by expert
(one stable argsort), the tokens gathered into one contiguous block per expert, each expert runs once on its block,
and the weighted results are added back with one ``index_add_``. The only Python loop is over the experts (as in
transformers' own MoE blocks); nothing loops over tokens. Experts that receive no token still run on an empty block
(cheap, and it keeps every parameter in the autograd graph).

Load balancing (Switch Transformer, Fedus et al. 2022, eq. 4, generalised to top-k; the auxiliary loss of VEN-VL's
training objective and of LEO-MINI's MMoE, λ = 0.05 there):

    L_bal = E · Σ_i f_i · P_i,   f_i = (assignments to expert i) / (N·k),   P_i = (1/N) Σ_n g_{n,i}

over the N routed tokens. f is a count (no gradient); P carries the gradient to the router. A perfectly uniform
router gives L_bal = 1 for every k; routing everything to one expert gives E·P_i → E.

Placement (``resolve_layers``): ``"all"`` / ``"dense"`` every decoder layer, ``"first_half"`` layers 0..L//2-1,
``"second_half"`` L//2..L-1, ``"sparse"`` every ``sparse_step``-th layer (step-1, 2·step-1, ...), or an explicit
list of 0-based indices — the placements of VEN-VL Table 6 (First-Half / Dense / Sparse / Second-Half).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runner import LayerStateModule

PLACEMENTS = ("second_half", "first_half", "all", "dense", "sparse")
SWIGLU = ("gate_proj", "up_proj", "down_proj")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------- routing
def check_routing(method: str, num_experts: Any, top_k: Any) -> tuple[int, int]:
    if not _is_int(num_experts) or num_experts < 1:
        raise ConfigError(f"{method}: num_experts={num_experts!r} must be a whole number >= 1")
    if not _is_int(top_k) or top_k < 1:
        raise ConfigError(f"{method}: top_k={top_k!r} must be a whole number >= 1")
    if top_k > num_experts:
        raise ConfigError(f"{method}: top_k={top_k} is greater than the number of experts ({num_experts}); each "
                          f"token can select at most {num_experts} expert(s): lower top_k or raise num_experts")
    return int(num_experts), int(top_k)


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs [N, E] float32, top-k weights [N, k] float32, top-k indices [N, k])`` of router logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    weight, index = probs.topk(top_k, dim=-1)
    return probs, weight, index


# ----------------------------------------------------------------------------------------------- dispatch
@dataclass
class Groups:
    """Assignments of N tokens (k each) sorted by expert: reuse one grouping for several expert banks (MMoE runs the
    same routing through the LoRA experts of gate, up and down)."""

    token: Tensor  # [N·k] token of each assignment, grouped by expert
    weight: Tensor  # [N·k] its routing weight (float32)
    counts: list[int]  # assignments per expert
    num_tokens: int

    def combine(self, x: Tensor, experts: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
        """``y[n] = Σ_j w[n, j] · experts[idx[n, j]](x[n])`` for ``x [N, D_in]`` → ``[N, D_out]``."""
        blocks = x[self.token].split(self.counts)
        outs = torch.cat([expert(block) for expert, block in zip(experts, blocks)])
        outs = outs * self.weight[:, None].to(outs.dtype)
        return outs.new_zeros(self.num_tokens, outs.shape[-1]).index_add_(0, self.token, outs)


def group(index: Tensor, weight: Tensor, num_experts: int) -> Groups:
    """Sort the assignments ``index [N, k]`` (weights ``[N, k]``) by expert (stable: token order within an expert)."""
    N, k = index.shape
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync per layer
    return Groups(token=order // k, weight=weight.reshape(-1)[order], counts=counts, num_tokens=N)


def dispatch(x: Tensor, index: Tensor, weight: Tensor, experts: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
    """``y[n] = Σ_j weight[n, j] · experts[index[n, j]](x[n])``, tokens grouped per expert (see module docstring)."""
    return group(index, weight, len(experts)).combine(x, experts)


def balance_loss(probs: Tensor, index: Tensor) -> Tensor:
    """Switch-style load-balancing loss ``E · Σ_i f_i P_i`` over N routed tokens (``probs [N, E]``,
    ``index [N, k]``)."""
    E = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = torch.bincount(index.reshape(-1), minlength=E).to(probs.dtype) / index.numel()
    return E * (f * probs.mean(0)).sum()


# ----------------------------------------------------------------------------------------------- placement
def resolve_layers(method: str, layers: Any, num_layers: int, sparse_step: int = 2) -> list[int]:
    """0-based decoder layers for a placement name or an explicit list (see module docstring)."""
    L = num_layers
    if isinstance(layers, str):
        if layers not in PLACEMENTS:
            raise ConfigError(f"{method}: layers={layers!r} is not a placement; use one of {', '.join(PLACEMENTS)} "
                              f"or a list of layer indices")
        if layers == "sparse":
            if not _is_int(sparse_step) or sparse_step < 1:
                raise ConfigError(f"{method}: sparse_step={sparse_step!r} must be a whole number >= 1")
            return list(range(sparse_step - 1, L, sparse_step))
        return {"all": list(range(L)), "dense": list(range(L)), "first_half": list(range(L // 2)),
                "second_half": list(range(L // 2, L))}[layers]
    seq = [layers] if _is_int(layers) else layers
    if not isinstance(seq, (list, tuple)) or not seq or not all(_is_int(i) for i in seq):
        raise ConfigError(f"{method}: layers={layers!r} must be a placement ({', '.join(PLACEMENTS)}) or a list of "
                          f"0-based layer indices")
    bad = [i for i in seq if not 0 <= i < L]
    if bad:
        raise ConfigError(f"{method}: layers {bad} are outside this LM's decoder layers 0..{L - 1}")
    if len(set(seq)) != len(seq):
        raise ConfigError(f"{method}: layers={list(seq)} lists a layer twice")
    return sorted(seq)


def decoder_layers(lm: nn.Module, method: str) -> nn.ModuleList:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{method} needs a Llama-family causal LM with .model.layers; got {type(lm).__name__}")
    return layers


def check_swiglu(mlp: nn.Module, layer_idx: int, method: str) -> None:
    """The gated MLP layout ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` that ``hte`` and ``mmoe`` extend."""
    ok = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in SWIGLU) and callable(getattr(mlp, "act_fn", None))
    if not ok:
        hint = (" (it is already a compactvl expert module: apply one expert surgery per layer)"
                if isinstance(mlp, ExpertModule) else
                " (an MoE LM: use the training-free 'hte_native' policy on its own router instead)"
                if hasattr(mlp, "gate") and hasattr(mlp, "experts") else "")
        raise ConfigError(f"{method} extends a gated MLP with gate_proj/up_proj/down_proj Linear layers and act_fn "
                          f"(Llama, Qwen2/3, Mistral, SmolLM), but decoder layer {layer_idx}'s mlp is "
                          f"{type(mlp).__name__}{hint}; pick another LM or other layers")


class ExpertModule(LayerStateModule):
    """Base of the modules expert surgeries put in place of ``layer.mlp``. ``wrapped`` names the child holding the
    original pretrained weights; every other parameter was added by the surgery (``added_parameters``). While the
    Runner runs its layer, ``self.layer_context`` is that layer's ``(layer_idx, state)`` (``runner.LayerContext``);
    it is None outside the Runner."""

    wrapped: tuple[str, ...] = ()

    def extra_macs(self, tokens: int, visual: int) -> int:
        """MACs this module adds to the dense layer for ``tokens`` entering it, ``visual`` of them visual."""
        raise NotImplementedError

    def added_parameters(self) -> Iterator[nn.Parameter]:
        skip = {id(p) for name in self.wrapped for p in getattr(self, name).parameters()}
        for p in self.parameters():
            if id(p) not in skip:
                yield p


def expert_modules(lm: nn.Module) -> list[tuple[str, ExpertModule]]:
    """``(name, module)`` of every expert module in ``lm``."""
    return [(n, m) for n, m in lm.named_modules() if isinstance(m, ExpertModule)]


def extra_macs(lm: nn.Module, schedule) -> int:
    """MACs the expert modules of ``lm`` add to ``measure.llm_macs`` (which counts the dense layers) for a
    ``measure.Schedule``: HTE routers + activated experts on the visual tokens, MMoE routers + LoRA experts on all."""
    blocks = decoder_layers(lm, "extra_macs")
    if schedule.num_layers != len(blocks):
        raise ConfigError(f"the schedule covers {schedule.num_layers} layers but the LM has {len(blocks)}")
    return sum(layer.mlp.extra_macs(n, v) for layer, n, v in zip(blocks, schedule.tokens, schedule.visual)
               if isinstance(layer.mlp, ExpertModule))


def added_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters added by expert surgeries (experts, routers, LoRA banks), not the pretrained weights they wrap:
    what a recipe trains besides the projector when the LM itself stays frozen."""
    out, seen = [], set()
    for _, m in expert_modules(module):
        for p in m.added_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
