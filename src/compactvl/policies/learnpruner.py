"""LearnPruner, stage 2: text-to-vision attention pruning in a middle LLM layer (Takezoe et al., "LearnPruner:
Rethinking Attention-based Token Pruning in Vision Language Models", arXiv:2604.23950). Stage 1, the learnable
module after the encoder, is the ``learnpruner`` token op (``compactvl.ops.learnpruner``).

The paper's observation: the attention visual tokens receive inside the LLM is biased toward positions when all
queries are pooled, but the attention *from the text tokens to the visual tokens* resists that bias and is a good
pruning signal in the middle layers. So, at layer K (default the middle, ⌊L/2⌋):

    s_j = 1/(H·|T|) Σ_h Σ_{t∈T} A^{(K-1)}_h[t, j]     (j visual; T = the text rows after the sample's first visual row,
                                                       i.e. the text that can see the image; A = layer K-1's softmax
                                                       attention on its input)
    keep_j ⇔ j ∈ top-kept(n, keep) of s               (per sample; text is always kept)

and layers K..L-1 run on the kept visual tokens plus all text. The score rows come from layer K-1's own q/k
(``policies.scores.attention_received``), so every layer keeps SDPA. Text rows before the image see no visual key
(causal mask); leaving them out only rescales s per sample, which does not change the ranking.
Where the paper's text is open (the code is not public), this is the simplest faithful reading: the FastV layer
convention (score on K-1, drop before K), the project's rounding (``rounding="half_up"``: ⌊n·keep + ½⌋, at least 1;
"floor" is offered), kept tokens keep their position ids (reference position policy ``keep``).
Knobs: ``layer`` K ("middle" (default) = ⌊L/2⌋, or a 0-based index 1 <= K <= L-1), ``keep`` (fraction of the visual
tokens entering the LLM kept from K on, default 0.5) or ``count``, ``rounding``.
MACs schedule (:meth:`LearnPrunerT2V.macs_schedule`): layers before K see every token, K.. see kept(n, keep) visual
tokens — ``schedule_for("learnpruner_t2v", L, visual, text, layer=K, keep=f)``. Budget: ``keep=f`` → ``keep``,
``tokens=k`` → ``count``. Unsupported LMs: the attention score needs a Llama-family layer (q_proj/k_proj, one
position axis); others get the ConfigError of ``policies.scores`` naming what is supported.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, made, parse_fraction
from .base import ScorePolicy, _is_int, check_rounding, kept_count
from .scores import attention_received, check_attention_layer

MIDDLE = "middle"


def middle_layer(num_layers: int) -> int:
    return num_layers // 2


def text_after_image(state: RunState) -> Tensor:
    """``[B, L]`` bool: the prompt's text rows after each sample's first visual row (the queries of the score; an
    answer in the same forward is not a query, ``RunState.prompt``)."""
    vis = state.visual & state.mask
    L = vis.shape[1]
    slots = torch.arange(L, device=vis.device)
    first = torch.where(vis, slots, L).amin(-1)
    return state.prompt() & ~state.visual & (slots[None] > first[:, None])


def resolve_layer(layer: Any, num_layers: int) -> int:
    if layer == MIDDLE:
        k = middle_layer(num_layers)
    elif _is_int(layer):
        k = layer
    else:
        raise ConfigError(f"learnpruner_t2v: layer={layer!r}; give 'middle' (⌊L/2⌋) or one 0-based layer index K")
    if not 1 <= k <= num_layers - 1:
        raise ConfigError(f"learnpruner_t2v: layer {k} is outside 1..{num_layers - 1} for this {num_layers}-layer "
                          f"LM (K is the first layer on the reduced set; the score reads layer K-1)")
    return k


@POLICIES.register("learnpruner_t2v")
class LearnPrunerT2V(ScorePolicy):
    method = "learnpruner_t2v"
    layers_knob = "layer"
    score_offset = 1  # attention of layer K-1 on the state entering it
    reference_positions = "keep"
    macs_help = ("LearnPruner stage 2: layers before K (default the middle) see every token; layers K.. see the "
                 "kept fraction of visual tokens (ranked by text-to-vision attention)")
    macs_knobs = {"layer": "K, the first pruned layer ('middle' = L//2, default)",
                  "keep": "fraction of visual tokens kept from layer K on (default 0.5)",
                  "rounding": "fraction -> count: half_up (default) or floor"}

    def __init__(self, layer: Any = MIDDLE, keep: Any = None, count: Any = None, rounding: str = "half_up"):
        if layer != MIDDLE and not _is_int(layer):
            raise ConfigError(f"learnpruner_t2v: layer={layer!r}; give 'middle' (⌊L/2⌋) or one 0-based layer index K")
        if keep is None and count is None:
            keep = 0.5
        super().__init__(layers=1 if layer == MIDDLE else layer, keep=keep, count=count, relative_to="input")
        self.layer = layer
        self.rounding = check_rounding(self.method, rounding)

    def check(self, runner) -> None:
        self.stages = (resolve_layer(self.layer, runner.num_layers),)
        super().check(runner)
        check_attention_layer(runner, self.stages[0] - 1, self.method)

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        return attention_received(runner, layer_idx, state, text_after_image(state))

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        return {"count": budget.tokens} if budget.tokens is not None else {"keep": budget.fraction}

    def schedule_knobs(self) -> dict[str, Any]:
        if self.keep is None:
            raise ConfigError("learnpruner_t2v: count mode has no fraction schedule; build it from keep=<fraction>")
        return {"layer": self.layer, "keep": self.keep[0], "rounding": self.rounding}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layer: Any = MIDDLE, keep: Any = 0.5,
                      rounding: str = "half_up") -> Schedule:
        if isinstance(layer, str) and layer != MIDDLE:
            try:
                layer = int(layer)
            except ValueError:
                pass
        k = resolve_layer(layer, num_layers)
        f = parse_fraction("learnpruner_t2v", "keep", keep)
        rounding = check_rounding("learnpruner_t2v", rounding)
        return made("learnpruner_t2v", [visual] * k + [kept_count(visual, f, rounding)] * (num_layers - k), visual,
                    text, layer=k, keep=f, rounding=rounding)
