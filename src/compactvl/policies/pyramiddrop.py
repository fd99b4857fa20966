"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025 (arXiv:2410.17247).

Definition. The LLM is split into stages at layers K_1 < K_2 < ... ; at the start of each stage the visual tokens
still present are ranked by the attention the LAST instruction token (the last prompt token) pays them, averaged
over heads, and a ratio λ of them is kept:

    s_j = 1/H Σ_h softmax_j( q_last · k_j / √d )      (q, k: layer K_s's projections of the state entering K_s)
    n_s = ⌊λ · n_{s-1} + ½⌋ (at least 1),  n_0 = the sample's visual tokens  → keep the top n_s by s

so stage s sees λ^s of the visual tokens (the pyramid). As in the reference code (Cooperx521/PyramidDrop,
``pdrop_rank_drop``), the score uses the q/k projections (and RoPE) of the first layer of the new stage applied to
its input, computed for the one query row only — no eager attention anywhere. Ratios are relative to the
*remaining* tokens (the reference's list 1, λ, λ², λ³ of the original count is the same up to rounding).

Default layers: the reference uses 8, 16, 24 for 32-layer LLaVA-1.5 models, i.e. the quarters of the depth; for
other depths we use the quarters ``{L·q // 4 : q = 1, 2, 3}`` (28 layers → 7, 14, 21; 4 layers → 1, 2, 3), the
same default as ``measure.macs``. Positions follow the Runner's policy (the reference renumbers, i.e. ``compact``).

Knobs: ``layers`` (first layer of each stage; 1 <= K <= L-1), ``ratio`` λ in (0, 1] (default 0.5, one for all stages
or one per stage). MACs schedule (:meth:`PyramidDrop.macs_schedule`):
``schedule_for("pyramiddrop", L, visual, text, layers=..., ratio=λ)``. Budget: ``keep=f`` → ``ratio`` λ = f (the
fraction each stage keeps of the tokens the previous stage had); a ``tokens`` count has no PyramidDrop equivalent.
Reference position policy: ``compact`` (the reference renumbers the shorter sequence).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, kept, made, no_budget, parse_fraction, parse_layers
from .base import ScorePolicy, check_fraction
from .scores import attention_received, check_attention_layer, last_token_mask


def default_layers(num_layers: int) -> list[int]:
    """Quarters of the depth: 8, 16, 24 for 32 layers (the paper's setting), 7, 14, 21 for 28."""
    return sorted({num_layers * q // 4 for q in (1, 2, 3)} - {0})


@POLICIES.register("pyramiddrop")
class PyramidDrop(ScorePolicy):
    method = "pyramiddrop"
    keep_knob = "ratio"
    score_offset = 0  # layer K's own projections on the state entering K
    first_layer = 1
    reference_positions = "compact"
    macs_help = ("PyramidDrop (Xing et al. 2024): each listed layer starts a stage keeping ratio of the visual tokens "
                 "the previous stage had")
    macs_knobs = {"layers": "first layer of each stage (default: quarters of the depth, 8,16,24 for 32 layers)",
                  "ratio": "λ, fraction of the remaining visual tokens each stage keeps (default 0.5)"}

    def __init__(self, layers: Any = None, ratio: Any = 0.5):
        if isinstance(ratio, (list, tuple)):
            lam: Any = [check_fraction(self.method, "ratio", r) for r in ratio]
        else:
            lam = check_fraction(self.method, "ratio", ratio)
        self._auto_layers = layers is None
        if layers is None:  # stages depend on the depth: resolved in check(); validate the ratio(s) meanwhile
            super().__init__(layers=[1], keep=lam[0] if isinstance(lam, list) else lam, relative_to="remaining")
        else:
            super().__init__(layers=layers, keep=lam, relative_to="remaining")
        self.ratio = lam

    def check(self, runner) -> None:
        if self._auto_layers:
            layers = default_layers(runner.num_layers)
            if not layers:
                raise ConfigError(f"pyramiddrop: a {runner.num_layers}-layer model has no room for stages after "
                                  f"layer 0; give layers explicitly")
            if isinstance(self.ratio, list) and len(self.ratio) != len(layers):
                raise ConfigError(f"pyramiddrop: ratio={self.ratio!r} has {len(self.ratio)} entries but the default "
                                  f"schedule of a {runner.num_layers}-layer model has {len(layers)} stages {layers}; "
                                  f"give layers too, or one ratio")
            self.stages = tuple(layers)
            self.keep = list(self.ratio) if isinstance(self.ratio, list) else [self.ratio] * len(layers)
        super().check(runner)
        for k in self.stages:
            check_attention_layer(runner, k, self.method)

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        return attention_received(runner, layer_idx, state, last_token_mask(state))

    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("pyramiddrop", ...)`` (after ``check`` resolved the layers)."""
        if len(set(self.keep)) != 1:
            raise ConfigError("pyramiddrop: the MACs schedule takes one ratio for all stages")
        return {"layers": list(self.stages), "ratio": self.keep[0]}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        if budget.fraction is None:
            raise no_budget("pyramiddrop (a tokens count has no per-stage equivalent; give keep=<fraction>, which "
                            "becomes ratio)", ["layers", "ratio"])
        return {"ratio": budget.fraction}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layers: Any = None, ratio: Any = 0.5) -> Schedule:
        starts = parse_layers("pyramiddrop", "layers", default_layers(num_layers) if layers is None else layers, 1,
                              num_layers - 1)
        lam = parse_fraction("pyramiddrop", "ratio", ratio)
        out, v = [], visual
        for i in range(num_layers):
            if i in starts:
                v = kept(v, lam)
            out.append(v)
        return made("pyramiddrop", out, visual, text, layers=starts, ratio=lam)
