"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025 (arXiv:2410.17247).

Definition. The LLM is split into stages at layers K_1 < K_2 < ... ; at the start of each stage the visual tokens
still present are ranked by the attention the LAST instruction token (the last prompt token) pays them, averaged
over heads, and a ratio λ of them is kept:

    s_j = 1/H Σ_h softmax_j( q_last · k_j / √d )      (q, k: layer K_s's projections of the state entering K_s)
    n_s = int(n_0 · λ_1 ⋯ λ_s) (at least 1),  n_0 = the sample's visual tokens  → keep the top n_s by s

so stage s sees λ^s of the visual tokens (the pyramid). As in the reference code (Cooperx521/PyramidDrop,
``pdrop_rank_drop``), the score uses the q/k projections (and RoPE) of the first layer of the new stage applied to
its input, computed for the one query row only — no eager attention anywhere. As in the reference, every stage's
count is a fraction of the ORIGINAL visual count (the code's ``image_token_ratio_list`` 1, λ, λ², λ³, e.g. the
scripts' ``[0.5, 0.25, 0.125]``), rounded down by ``int(...)``.

Default layers: the reference uses 8, 16, 24 for 32-layer LLaVA-1.5 models, i.e. the quarters of the depth; for
other depths we use the quarters ``{L·q // 4 : q = 1, 2, 3}`` (28 layers → 7, 14, 21; 4 layers → 1, 2, 3), the
same default as ``measure.macs``. Positions follow the Runner's policy (the reference renumbers, i.e. ``compact``).

Knobs: ``layers`` (first layer of each stage; 1 <= K <= L-1), ``ratio`` λ in (0, 1] (default 0.5, one for all stages
or one per stage). MACs schedule (:meth:`PyramidDrop.macs_schedule`):
``schedule_for("pyramiddrop", L, visual, text, layers=..., ratio=λ)``. Budget: ``keep=f`` → ``ratio`` λ = f (the
fraction each stage keeps of the tokens the previous stage had); a ``tokens`` count has no PyramidDrop equivalent.
Reference position policy: ``compact`` (the reference renumbers the shorter sequence).

Reference fidelity (checked in ``tests/test_fidelity_inllm.py`` against a transcription of
``llava/model/modeling_llama_pdrop.py``, ``forward`` + ``pdrop_rank_drop``):

* layer convention: after decoder layer ``layer_idx`` the code sets ``rank_layer = layer_idx + 1`` and, if it is in
  ``layer_list``, scores with layer ``rank_layer``'s input_layernorm / q_proj / k_proj / RoPE on the output of
  ``layer_idx`` and drops before ``rank_layer`` runs: the same 0-based K here. Matched.
* score: full-width float32 softmax (causal row of the last instruction token ``prompt_total_len - 1``, every key),
  mean over heads (GQA keys ``repeat_interleave``-d), then the image columns. Matched.
* counts: ``keep_length = int(n_0 · ratio_list[s + 1])``: fraction of the ORIGINAL count, floored. Defaults
  ``relative_to="input"`` (stage s keeps λ_1⋯λ_s of n_0; a ratio list ``[0.5, 0.5, 0.5]`` = the code's
  ``[0.5, 0.25, 0.125]``) and ``rounding="floor"``: matched. Options: ``relative_to="remaining"`` (λ of the tokens
  the previous stage kept) and ``rounding="half_up"`` (⌊x + ½⌋). At least 1 visual token stays.
* token order: ``top_rank_index.sort()``: kept rows in original order. Matched. Positions: the code renumbers
  ``0..len-1`` after each stage: reference position policy ``compact``. Matched when the Runner uses it (default).
* layout: the code uses one contiguous image per sample (``image_token_posi``); here each sample's visual rows.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, made, no_budget, parse_fraction, parse_layers
from .base import ScorePolicy, check_fraction, check_rounding, kept_count
from .scores import attention_received, check_attention_layer, last_token_mask


def stage_fractions(ratios: list[float], relative_to: str) -> list[float]:
    """Per-stage fractions as ScorePolicy reads them: of the input count, λ_1⋯λ_s (the reference's ratio list,
    multiplied left to right); of the remaining count, λ_s itself."""
    if relative_to != "input":
        return list(ratios)
    out, f = [], 1.0
    for lam in ratios:
        f = f * lam
        out.append(f)
    return out


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
                  "ratio": "λ, fraction of the remaining visual tokens each stage keeps (default 0.5)",
                  "relative_to": "input (the reference: stage s keeps int(n_0·λ^s), default) or remaining",
                  "rounding": "fraction -> count: floor (the reference's int(), default) or half_up"}

    def __init__(self, layers: Any = None, ratio: Any = 0.5, relative_to: str = "input", rounding: str = "floor"):
        if isinstance(ratio, (list, tuple)):
            lam: Any = [check_fraction(self.method, "ratio", r) for r in ratio]
        else:
            lam = check_fraction(self.method, "ratio", ratio)
        self._auto_layers = layers is None
        if layers is None:  # stages depend on the depth: resolved in check(); validate the ratio(s) meanwhile
            super().__init__(layers=[1], keep=lam[0] if isinstance(lam, list) else lam, relative_to=relative_to)
        else:
            super().__init__(layers=layers, keep=lam, relative_to=relative_to)
        self.ratio = lam
        self.rounding = check_rounding(self.method, rounding)
        if not self._auto_layers:
            self.keep = stage_fractions(self.keep, self.relative_to)

    @property
    def ratios(self) -> list[float]:
        """λ per stage (after ``check`` resolved default layers)."""
        return list(self.ratio) if isinstance(self.ratio, list) else [self.ratio] * len(self.stages)

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
            self.keep = stage_fractions(list(self.ratio) if isinstance(self.ratio, list) else
                                        [self.ratio] * len(layers), self.relative_to)
        super().check(runner)
        for k in self.stages:
            check_attention_layer(runner, k, self.method)

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        return attention_received(runner, layer_idx, state, last_token_mask(state))

    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("pyramiddrop", ...)`` (after ``check`` resolved the layers)."""
        if len(set(self.ratios)) != 1:
            raise ConfigError("pyramiddrop: the MACs schedule takes one ratio for all stages")
        return {"layers": list(self.stages), "ratio": self.ratios[0], "relative_to": self.relative_to,
                "rounding": self.rounding}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        if budget.fraction is None:
            raise no_budget("pyramiddrop (a tokens count has no per-stage equivalent; give keep=<fraction>, which "
                            "becomes ratio)", ["layers", "ratio"])
        return {"ratio": budget.fraction}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layers: Any = None, ratio: Any = 0.5,
                      relative_to: str = "input", rounding: str = "floor") -> Schedule:
        starts = parse_layers("pyramiddrop", "layers", default_layers(num_layers) if layers is None else layers, 1,
                              num_layers - 1)
        lam = parse_fraction("pyramiddrop", "ratio", ratio)
        rounding = check_rounding("pyramiddrop", rounding)
        if relative_to not in ("input", "remaining"):
            raise ConfigError(f"pyramiddrop: relative_to={relative_to!r}; use 'input' or 'remaining'")
        fractions = stage_fractions([lam] * len(starts), relative_to)
        out, v, s = [], visual, 0
        for i in range(num_layers):
            if i in starts:
                v = min(v, kept_count(visual if relative_to == "input" else v, fractions[s], rounding))
                s += 1
            out.append(v)
        return made("pyramiddrop", out, visual, text, layers=starts, ratio=lam, relative_to=relative_to,
                    rounding=rounding)
