"""Training-free HTE on an existing MoE LM — VEN-VL Sec. 4.3 / Table 7 (HTE applied to Kimi-VL without training):
the LM's own router probabilities serve as the token saliency of eq. 7, s(x) = max_i g_i (or the top-k sum).

Nothing is replaced or patched. :class:`RouterTap` registers a forward hook on the router module (``mlp.gate``) of
the chosen sparse MoE layers (Qwen2-MoE, Qwen3-MoE, Mixtral-style blocks: the gate returns the router logits, or a
tuple whose first element is them) and, while its Runner runs that layer (``runner.active``, the explicit
``LayerContext`` of the layer being run), writes

    state.signals.router[layer] = RouterSignal(probs=softmax(logits) [B, L, E] float32, top_k=k,
                                               orig_index=[B, L], source="native")

— the same record an ``hte`` expert module writes, so the ``hte`` pruning policy scores both alike. The hooks are
attached by the ``hte_native`` layer policy at the start of each prefill and removed after its last layer (and on
``reset``), so decode steps and plain ``lm(...)`` calls never see them. Outside its Runner a hook does nothing.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..runner import RouterSignal, Runner
from .moe import decoder_layers


def router_module(mlp: nn.Module) -> nn.Module | None:
    """The router of a sparse MoE block (``mlp.gate``), or None for a dense MLP."""
    gate = getattr(mlp, "gate", None)
    return gate if isinstance(gate, nn.Module) and hasattr(mlp, "experts") else None


def moe_layers(lm: nn.Module) -> list[int]:
    """Decoder layers of ``lm`` whose MLP is a sparse MoE block with a router."""
    return [i for i, layer in enumerate(decoder_layers(lm, "hte_native")) if router_module(layer.mlp) is not None]


def native_top_k(lm: nn.Module, layer: int) -> int:
    gate = router_module(decoder_layers(lm, "hte_native")[layer].mlp)
    k = getattr(gate, "top_k", None) or getattr(lm.config, "num_experts_per_tok", None)
    return int(k or 1)


class RouterTap:
    """Forward hooks on the routers of ``layers`` of ``runner.lm`` that record their probabilities in the state the
    Runner runs the layer on."""

    def __init__(self, runner: Runner, layers: list[int]):
        lm = runner.lm
        blocks = decoder_layers(lm, "hte_native")
        for i in layers:
            if router_module(blocks[i].mlp) is None:
                found = moe_layers(lm)
                raise ConfigError(
                    f"hte_native reads the LM's own MoE router, but decoder layer {i}'s mlp is "
                    f"{type(blocks[i].mlp).__name__} (no router 'gate' with 'experts'); "
                    + (f"score on the sparse MoE layers {found}" if found else
                       "this LM has no MoE layers: train visual experts with experts: [{expert: hte}] and use the "
                       "'hte' policy"))
        self.lm, self.layers = lm, list(layers)
        self._runner = weakref.ref(runner)  # weak: the runner holds the policy that holds this tap
        self.top_k = {i: native_top_k(lm, i) for i in self.layers}
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        self.detach()
        blocks = decoder_layers(self.lm, "hte_native")
        self._handles = [router_module(blocks[i].mlp).register_forward_hook(partial(self._hook, i))
                         for i in self.layers]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int, module: nn.Module, args: Any, output: Any) -> None:
        runner = self._runner()
        ctx = None if runner is None else runner.active
        if ctx is None or ctx.layer_idx != layer:
            return
        state = ctx.state
        logits = output[0] if isinstance(output, (tuple, list)) else output
        B, L = state.mask.shape
        if not isinstance(logits, torch.Tensor) or logits.numel() % (B * L):
            raise ConfigError(f"hte_native: the router of layer {layer} ({type(module).__name__}) does not return "
                              f"router logits [tokens, experts] (got {type(logits).__name__}); only routers whose "
                              f"output (or its first element) is the logits are supported")
        probs = torch.softmax(logits.detach().float().reshape(B, L, -1), dim=-1)
        state.signals.router[layer] = RouterSignal(probs, self.top_k[layer], state.orig_index, "native")
