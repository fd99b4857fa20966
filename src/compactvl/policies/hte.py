"""HTE token pruning by router saliency — VEN-VL ("A Visual Ensemble MoE Framework for Effective and Efficient
Multi-Modal Understanding"), Sec. 3.3, eqs. 7-8, and its training-free use on an existing MoE LM (Table 7).

    s(x) = max_i g_i(x)                                                   (7)   (score="max", default)
    s(x) = Σ_{i ∈ TopK(g)} g_i(x)                                               (score="sum", Table 8's "Sum";
                                                                                 equal to max when top_k = 1)
    V_{K} = { v ∈ V_{K-1} : s^{(K-1)}(v) >= τ }                           (8)

g is the routing distribution of the MoE router in layer K-1 — an ``hte`` expert module (policy ``hte``) or the
LM's own router (policy ``hte_native``, via ``experts.native_moe.RouterTap``: forward hooks attached for the
prefill only). Visual tokens whose saliency is under the threshold τ are dropped before layer K and stay dropped
for all later layers and for decoding; text tokens are always kept. As the paper's DropRate → kept-fraction map is
not in its text, a per-stage keep ratio (or count) is offered besides the threshold, and the kept fraction each
stage produced is reported (``policy.kept_fractions``, ``state.signals.kept_fraction``).

Schedule (``ScorePolicy`` conventions: K = first layer on the reduced set, scored on layer K-1's router after it
ran):
* ``layers=None`` (default): a stage after every router layer — every ``hte`` layer (the experts' placement, the
  second half by default), or for ``hte_native`` the MoE layers of the second half;
* ``layers="second_half" | "first_half" | "all" | "dense" | "sparse"``: stages after the router layers in that
  placement (VEN-VL Table 6's ablation; ``sparse_step`` as for the experts);
* ``layers=[K, ...]``: explicit stage layers (layer K-1 must hold a router).
Exactly one of ``threshold`` (τ in [0, 1], one or one per stage), ``keep`` (fraction in (0, 1]; of each sample's
input visual tokens, or of the remaining ones with ``relative_to="remaining"``), ``count``, or ``drop_rate`` r: each
stage drops the fraction r of the visual tokens still present with the lowest saliency (keep = 1 − r of the
remaining). ``drop_rate`` is our reading of the paper's DropRate: with MKE at 32 % and HTE on the 14 second-half
layers of Qwen3-0.6B, 0.32·(1 − r)^14 = 16 %, 7.3 %, 3.3 %, 1.4 % for r = 0.05, 0.1, 0.15, 0.2 — Table 10 reports
16 %, 7.5 %, 3.3 %, 1.4 % final tokens. (Here a stage prunes before a layer, so the last layer's router, which has
no later layer to spare, does not prune: 13 stages on 28 layers.) ``min_keep`` (1) visual tokens always stay.

MACs (``macs_schedule``): ``schedule_for("hte", L, visual, text, layers=[K...], keep=[f...], relative_to=...)`` for the keep
mode (a threshold's token counts depend on the data: measure them with ``measure.counted``). The experts' own
MACs on the visual tokens are ``experts.hte.extra_macs``.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..experts.hte import HTEMoE
from ..experts.moe import resolve_layers
from ..experts.native_moe import RouterTap, moe_layers
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, kept, made, parse_fractions, parse_layers
from .base import ScorePolicy, check_layers, remap_rows

SCORES = ("max", "sum")


def _auto(layers: Any) -> bool:
    return layers is None or isinstance(layers, str)


HTE_KNOBS = dict(layers="K of each stage, the first layer on the reduced set, required, e.g. 13,16,20",
                 keep="fraction kept at each stage (one, or one per stage), required",
                 relative_to="input (default) or remaining")


def _hte_schedule(method: str, num_layers: int, visual: int, text: int, layers: Any, keep: Any,
                  relative_to: str) -> Schedule:
    stages = parse_layers(method, "layers", layers, 1, num_layers - 1)
    fr = parse_fractions(method, "keep", keep)
    if len(fr) == 1:
        fr = fr * len(stages)
    if len(fr) != len(stages):
        raise ConfigError(f"{method}: --layers has {len(stages)} stages but --keep has {len(fr)} fractions; give one "
                          f"fraction, or one per stage")
    if relative_to not in ("input", "remaining"):
        raise ConfigError(f"{method}: --relative_to {relative_to!r}; use input or remaining")
    out, v = [], visual
    for i in range(num_layers):
        if i in stages:
            f = fr[stages.index(i)]
            v = min(v, kept(visual if relative_to == "input" else v, f))
        out.append(v)
    return made(method, out, visual, text, layers=stages, keep=fr, relative_to=relative_to)


@POLICIES.register("hte")
class HTEPruning(ScorePolicy):
    method = "hte"
    score_offset = 1  # the router of layer K-1 ...
    score_after = True  # ... after it ran
    default_layers: Any = None
    macs_help = ("VEN-VL HTE (router saliency), keep mode: each stage K keeps the given fraction of the input (or "
                 "remaining) visual tokens from layer K on")
    macs_knobs = HTE_KNOBS

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        return {"count": budget.tokens} if budget.tokens is not None else {"keep": budget.fraction}

    @classmethod
    def macs_schedule(cls, num_layers: int, visual: int, text: int, layers: Any, keep: Any,
                      relative_to: str = "input") -> Schedule:
        return _hte_schedule(cls.method, num_layers, visual, text, layers, keep, relative_to)

    def __init__(self, layers: Any = None, threshold: Any = None, keep: Any = None, count: Any = None,
                 drop_rate: Any = None, score: str = "max", relative_to: str = "input", min_keep: int = 1,
                 sparse_step: int = 2):
        if drop_rate is not None:
            rates = drop_rate if isinstance(drop_rate, (list, tuple)) else [drop_rate]
            if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0
                                for r in rates):
                raise ConfigError(f"{self.method}: drop_rate={drop_rate!r} must be in [0, 1): the fraction of the "
                                  f"remaining visual tokens each stage drops (the paper's DropRate, 0.1 by default)")
            if keep is not None or count is not None or threshold is not None:
                raise ConfigError(f"{self.method}: give drop_rate or one of keep / count / threshold, not both")
            keep = [1.0 - r for r in drop_rate] if isinstance(drop_rate, (list, tuple)) else 1.0 - drop_rate
            if relative_to != "input":
                raise ConfigError(f"{self.method}: drop_rate is relative to the remaining tokens by definition; "
                                  f"leave relative_to out")
            relative_to = "remaining"
        if score not in SCORES:
            raise ConfigError(f"{self.method}: score={score!r}; use 'max' (eq. 7, the paper's default) or 'sum' "
                              f"(sum of the top-k routing probabilities, Table 8)")
        if threshold is not None:
            for t in threshold if isinstance(threshold, (list, tuple)) else [threshold]:
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
                    raise ConfigError(f"{self.method}: threshold={threshold!r} is outside [0, 1]; the saliency is a "
                                      f"routing probability (max over experts is at least 1/num_experts), so give "
                                      f"τ in [0, 1], e.g. threshold=0.3")
        if layers is None:
            layers = self.default_layers
        if _auto(layers):
            knobs = (("drop_rate", drop_rate), ("threshold", threshold), ("keep", keep), ("count", count))
            lists = [n for n, v in knobs if isinstance(v, (list, tuple))]
            if lists:
                raise ConfigError(f"{self.method}: {lists[0]} is a per-stage list but layers={layers!r} leaves the "
                                  f"stages to the model; list the stage layers (layers=[K, ...]) or give one value")
        self.auto_layers = layers if _auto(layers) else False
        self.saliency, self.sparse_step = score, sparse_step
        super().__init__(layers=[1] if _auto(layers) else layers, keep=keep, count=count, threshold=threshold,
                         relative_to=relative_to, min_keep=min_keep)

    # ---- where the routers are
    def router_layers(self, runner) -> list[int]:
        return [i for i, layer in enumerate(runner.layers) if isinstance(layer.mlp, HTEMoE)]

    def _missing_router(self, runner, layer: int) -> str:
        return (f"{self.method}: layer {layer} has no HTE router (its mlp is {type(runner.layers[layer].mlp).__name__})"
                f"; add experts: [{{expert: hte, layers: ...}}] covering layer {layer}, or use stage layers K with "
                f"K-1 in {self.router_layers(runner)}")

    def resolve(self, runner) -> None:
        """Turn an automatic placement into stage layers for this model (knob values are repeated per stage)."""
        if self.auto_layers is False:
            return
        routers = self.router_layers(runner)
        if self.auto_layers is not None:
            allowed = set(resolve_layers(self.method, self.auto_layers, runner.num_layers, self.sparse_step))
            routers = [i for i in routers if i in allowed]
        stages = [i + 1 for i in routers if i + 1 < runner.num_layers]
        if not stages:
            raise ConfigError(f"{self.method}: no router layer to prune after (placement {self.auto_layers!r}, router "
                              f"layers {self.router_layers(runner)} of {runner.num_layers}); add HTE experts to the LM "
                              f"or list the stage layers")
        one = lambda v: None if v is None else [v[0]] * len(stages)  # noqa: E731
        self.stages = check_layers(self.method, "layers", stages, self.lowest_layer)
        self.keep, self.count, self.threshold = one(self.keep), one(self.count), one(self.threshold)

    def check(self, runner) -> None:
        self.resolve(runner)
        super().check(runner)
        have = set(self.router_layers(runner))
        for k in self.stages:
            if k - 1 not in have:
                raise ConfigError(self._missing_router(runner, k - 1))

    # ---- scoring and reporting
    def reset(self) -> None:
        self.kept_fractions: dict[int, Tensor] = {}
        super().reset()

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        sig = state.signals.router.get(layer_idx)
        if sig is None:
            raise ConfigError(self._missing_router(runner, layer_idx))
        probs = sig.probs
        s = probs.amax(-1) if self.saliency == "max" else probs.topk(sig.top_k, dim=-1).values.sum(-1)
        return remap_rows(s, sig.orig_index, state.orig_index, fill=0.0)

    def drop(self, stage: int, layer_idx: int, state: RunState, keep_visual: Tensor, scores: Tensor,
             runner) -> RunState:
        frac = keep_visual.sum(-1).double() / self._n_input.clamp_min(1).double()
        self.kept_fractions[layer_idx] = frac
        new = super().drop(stage, layer_idx, state, keep_visual, scores, runner)
        new.signals.kept_fraction[layer_idx] = frac
        return new

    def report(self) -> list[dict]:
        """Per stage of the latest prefill: the layer K, the mean kept fraction of the input visual tokens and each
        sample's fraction."""
        return [{"layer": k, "kept_fraction": float(f.mean()), "per_sample": f.tolist()}
                for k, f in sorted(self.kept_fractions.items())]

    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("hte", ...)`` (keep mode only)."""
        if self.keep is None:
            raise ConfigError(f"{self.method}: only the keep mode has a schedule known in advance; a threshold's "
                              f"token counts depend on the input (measure them with measure.counted)")
        return {"layers": list(self.stages), "keep": list(self.keep), "relative_to": self.relative_to}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, score={self.saliency}"


@POLICIES.register("hte_native")
class HTENative(HTEPruning):
    """HTE pruning scored by an MoE LM's own routers (training-free; VEN-VL Table 7)."""

    method = "hte_native"
    default_layers = "second_half"
    macs_help = "HTE scored by an MoE LM's own routers (training-free), keep mode: the same stages as hte"

    def __init__(self, layers: Any = None, threshold: Any = None, keep: Any = None, count: Any = None,
                 drop_rate: Any = None, score: str = "max", relative_to: str = "input", min_keep: int = 1,
                 sparse_step: int = 2):
        self._tap = None
        super().__init__(layers, threshold, keep, count, drop_rate, score, relative_to, min_keep, sparse_step)

    def router_layers(self, runner) -> list[int]:
        return moe_layers(runner.lm)

    def _missing_router(self, runner, layer: int) -> str:
        found = self.router_layers(runner)
        return (f"hte_native: decoder layer {layer}'s mlp is {type(runner.layers[layer].mlp).__name__}, not a sparse "
                f"MoE block with a router; " + (f"stage layers K need K-1 in the MoE layers {found}" if found else
                "this LM has no MoE layers: add visual experts with experts: [{expert: hte}] and use the 'hte' "
                "policy"))

    def check(self, runner) -> None:
        super().check(runner)
        if self._tap is not None:
            self._tap.detach()
        self._tap = RouterTap(runner, [k - 1 for k in self.stages])

    def reset(self) -> None:
        if getattr(self, "_tap", None) is not None:
            self._tap.detach()
        super().reset()

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        state = super().before_layer(layer_idx, state, runner)  # checks (and builds the tap) on first use
        if layer_idx == 0:
            self._tap.attach()
        return state

    def after_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        state = super().after_layer(layer_idx, state, runner)
        if layer_idx == runner.num_layers - 1:
            self._tap.detach()
        return state
