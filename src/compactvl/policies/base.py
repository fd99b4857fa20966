"""Shared machinery of in-LLM pruning policies: recipes, knob checks, per-sample keep counts, and ``ScorePolicy``.

``ScorePolicy`` drops visual tokens at scheduled layers by ANY per-token score (attention received, a router's
saliency, a norm...). A subclass only implements ``score(layer_idx, state, runner) -> [B, L]`` (higher = more worth
keeping); the schedule, the per-sample counts, the batched top-k and the drop itself live here.

Schedule (one entry per *stage*):

* ``layers``: for each stage, the 0-based index K of the first decoder layer that runs on the reduced set: tokens are
  dropped right before layer K (``before_layer(K)``) and stay dropped for every later layer.
* where the score comes from: ``score_offset`` (class attribute) says how many layers before K the score is taken,
  and ``score_after`` whether on the state entering (False) or leaving (True) that layer. FastV and SparseVLM score
  on the input of layer K-1 (its attention); PyramidDrop on the input of layer K; a router-saliency policy reads the
  router of layer K-1 after it ran.
* how many visual tokens each sample keeps, exactly one of:
  ``keep`` (fraction in (0, 1], per stage or one for all), ``count`` (whole number >= 1) or ``threshold``
  (keep tokens whose score >= threshold). Fractions are of each sample's *input* visual count
  (``relative_to="input"``) or of the visual tokens it still has (``"remaining"``), and are turned into counts by
  ``measure.macs.kept`` (round half up, at least 1) so a real forward matches the MACs schedule.

Rules shared by every policy here: text tokens are always kept; each sample keeps its own set, counted from its own
number of visual tokens (the Runner re-pads the batch); a sample with no visual tokens passes through unchanged (one
``UserWarning`` per policy instance says so); no schedule can drop every visual token of a sample: at least
``min_keep`` (default 1) stay. Knob errors are ``ConfigError`` naming the knob and the fix.
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import CompactVLWarning, ConfigError
from ..registry import POLICIES
from ..runner import LayerPolicy, RunState

RELATIVE_TO = ("input", "remaining")


# ----------------------------------------------------------------------------------------------- recipes
def policy_knobs(cls: type) -> list[str]:
    """The knob names a policy class takes (its constructor's parameters)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_policy(spec: Mapping[str, Any]) -> LayerPolicy:
    """A policy from a recipe dict: ``{"policy": "fastv", "layer": 2, "keep": 0.5}``."""
    if not isinstance(spec, Mapping) or "policy" not in spec:
        raise ConfigError(f"a layer-policy recipe is a mapping with a 'policy' key, got {spec!r}; write e.g. "
                          f"{{'policy': 'fastv', 'layer': 2, 'keep': 0.5}} "
                          f"(known policies: {', '.join(POLICIES.names())})")
    name = spec["policy"]
    cls = POLICIES.get(name)  # unknown name -> ConfigError listing the known ones
    knobs = policy_knobs(cls)
    unknown = [k for k in spec if k != "policy" and k not in knobs]
    if unknown:
        raise ConfigError(f"policy '{name}' has no knob {', '.join(repr(k) for k in unknown)}; its knobs are: "
                          f"{', '.join(knobs)}")
    return cls(**{k: v for k, v in spec.items() if k != "policy"})


# ----------------------------------------------------------------------------------------------- knob checks
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_layers(method: str, knob: str, layers: Any, lowest: int = 0) -> tuple[int, ...]:
    """Increasing 0-based layer indices >= ``lowest`` (the model's depth is checked later, in ``check``)."""
    seq = [layers] if _is_int(layers) else layers
    if not isinstance(seq, (list, tuple)) or not seq or not all(_is_int(k) for k in seq):
        raise ConfigError(f"{method}: {knob}={layers!r} must be a layer index or a list of increasing layer indices, "
                          f"e.g. {knob}=[8, 16, 24]")
    if any(k < lowest for k in seq) or any(a >= b for a, b in zip(seq, seq[1:])):
        raise ConfigError(f"{method}: {knob}={layers!r} must be increasing layer indices >= {lowest} (K is the first "
                          f"layer that runs on the reduced set; {method} scores on layer K-1 or K, and layer 0 "
                          f"sees the whole input — prune before the LLM with a token op instead)" if lowest else
                          f"{method}: {knob}={layers!r} must be increasing layer indices >= 0")
    return tuple(seq)


def per_stage(method: str, knob: str, value: Any, stages: int) -> list[Any]:
    """One value per stage: a scalar is repeated, a list must have one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != stages:
            raise ConfigError(f"{method}: {knob}={list(value)!r} has {len(value)} entries but the schedule has "
                              f"{stages} stage(s); give one value per stage or a single value for all")
        return list(value)
    return [value] * stages


def check_fraction(method: str, knob: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) <= 1.0:
        raise ConfigError(f"{method}: {knob}={x!r} is outside (0, 1]; give the fraction of visual tokens to keep, "
                          f"e.g. {knob}=0.5 (1.0 keeps all; 0 would drop every visual token, so drop the image "
                          f"instead)")
    return float(x)


def check_count(method: str, knob: str, x: Any) -> int:
    if not _is_int(x) or x < 1:
        raise ConfigError(f"{method}: {knob}={x!r} must be a whole number of visual tokens >= 1 (a schedule may not "
                          f"drop every visual token)")
    return int(x)


# ----------------------------------------------------------------------------------------------- counts and top-k
ROUNDINGS = ("half_up", "floor")


def kept_count(n: int, fraction: float, rounding: str = "half_up") -> int:
    """Python-int twin of :func:`kept_counts` for MACs schedules: ``"half_up"`` is ``schedules.kept`` (⌊n·f + ½⌋);
    ``"floor"`` is ``int(n·f)`` exactly as the FastV / PyramidDrop reference code writes it (no epsilon); both at
    least 1 when n > 0 and f > 0, at most n."""
    if n <= 0 or fraction <= 0:
        return 0
    k = math.floor(n * fraction + 0.5 + 1e-9) if rounding == "half_up" else int(n * fraction)
    return min(n, max(1, k))


def check_rounding(method: str, rounding: Any) -> str:
    if rounding not in ROUNDINGS:
        raise ConfigError(f"{method}: rounding={rounding!r}; use 'floor' (int(n·f), the reference code's rule) or "
                          f"'half_up' (⌊n·f + ½⌋, the project's schedules.kept rule)")
    return rounding


def kept_counts(n: Tensor, fraction: float, rounding: str = "half_up") -> Tensor:
    """Per-sample ``measure.macs.kept(n, fraction)``: ⌊n·f + ½⌋, at least 1 when n > 0, at most n (same float64
    arithmetic, so counts agree with the MACs schedule bit for bit). ``rounding="floor"``: ``int(n·f)`` (float64,
    no epsilon, as Python's ``int(n * f)`` in the FastV / PyramidDrop reference code), at least 1 when n > 0."""
    if fraction <= 0:
        return torch.zeros_like(n)
    m = n.cpu()  # [B] counts; float64 on the CPU (some accelerators have no float64)
    if rounding == "floor":
        k = torch.floor(m.double() * fraction).long()
    else:
        k = torch.floor(m.double() * fraction + 0.5 + 1e-9).long()
    return (torch.minimum(k.clamp_min(1), m) * (m > 0)).to(n.device)


def topk_mask(scores: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """``[B, L]`` bool: for each sample the ``k[b]`` candidates with the highest scores (ties: earlier slot first)."""
    L = scores.shape[-1]
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=s.device).expand_as(order))
    return candidates & (rank < k[:, None])


def remap_rows(values: Tensor, from_orig: Tensor, to_orig: Tensor, fill: float = float("-inf")) -> Tensor:
    """Move per-row ``values [B, L0]`` keyed by ``from_orig`` onto the rows of ``to_orig [B, L1]``."""
    if from_orig.shape == to_orig.shape and torch.equal(from_orig, to_orig):
        return values
    hit = (to_orig[:, :, None] == from_orig[:, None, :]) & (from_orig[:, None, :] != -1)
    found = hit.any(-1)
    picked = values.gather(1, hit.float().argmax(-1))
    return torch.where(found, picked, torch.full_like(picked, fill))


# ----------------------------------------------------------------------------------------------- ScorePolicy
class ScorePolicy(LayerPolicy):
    """Drop visual tokens at scheduled layers by any per-token score; see the module docstring for the schedule.

    Subclasses set ``method`` (name in messages), ``score_offset`` / ``score_after`` and implement ``score``. They may
    override ``drop`` (e.g. to merge dropped tokens instead of discarding them). After each prefill,
    ``score_seconds`` / ``score_cpu_seconds`` hold the wall / process CPU time spent scoring, selecting and (for
    SparseVLM) recycling: the overhead the benchmark reports.
    """

    method = "score"
    keep_knob = "keep"  # names users give the fraction and the layers (PyramidDrop: ratio; FastV: layer), for messages
    layers_knob = "layers"
    score_offset = 0
    score_after = False
    first_layer = 0  # lowest stage layer K the method allows (K = 0 prunes before the first layer)
    rounding = "half_up"  # fraction -> count rule of kept_counts (FastV / PyramidDrop default to their code's "floor")

    def __init__(self, layers: Any, keep: Any = None, count: Any = None, threshold: Any = None,
                 relative_to: str = "input", min_keep: int = 1):
        super().__init__()
        if self.score_after and self.score_offset < 1:
            raise ConfigError(f"{type(self).__name__}: a score read after a layer (score_after) can only prune later "
                              f"layers; set score_offset >= 1")
        self.stages = check_layers(self.method, self.layers_knob, layers, self.lowest_layer)
        given = [n for n, v in (("keep", keep), ("count", count), ("threshold", threshold)) if v is not None]
        if len(given) != 1:
            raise ConfigError(f"{self.method}: give exactly one of keep (fraction), count (tokens) or threshold "
                              f"(score), got {', '.join(given) or 'none'}")
        n = len(self.stages)
        kk = self.keep_knob
        self.keep = [check_fraction(self.method, kk, x) for x in per_stage(self.method, kk, keep, n)] \
            if keep is not None else None
        self.count = [check_count(self.method, "count", x) for x in per_stage(self.method, "count", count, n)] \
            if count is not None else None
        if threshold is not None:
            ts = per_stage(self.method, "threshold", threshold, n)
            if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in ts):
                raise ConfigError(f"{self.method}: threshold={threshold!r} must be finite number(s)")
            self.threshold = [float(t) for t in ts]
        else:
            self.threshold = None
        if relative_to not in RELATIVE_TO:
            raise ConfigError(f"{self.method}: relative_to={relative_to!r}; use one of {', '.join(RELATIVE_TO)}")
        self.relative_to = relative_to
        self.min_keep = check_count(self.method, "min_keep", min_keep)
        self._warned = False
        self._checked_for = None
        self.reset()

    # ---- to implement
    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        """``[B, L]`` score of every row of ``state`` (only visual rows are used; higher = keep)."""
        raise NotImplementedError

    # ---- schedule
    @property
    def lowest_layer(self) -> int:
        return max(self.score_offset, self.first_layer)

    def score_layer(self, stage: int) -> int:
        return self.stages[stage] - self.score_offset

    def reset(self) -> None:
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}
        self._n_input: Tensor | None = None
        self.score_seconds = 0.0  # wall clock
        self.score_cpu_seconds = 0.0  # process CPU time (all threads): robust on a shared machine

    def check(self, runner) -> None:
        L = runner.num_layers
        for k in self.stages:
            if not self.lowest_layer <= k <= L - 1:
                lo = self.lowest_layer
                raise ConfigError(f"{self.method}: pruning layer {k} is outside this model's decoder layers; it has "
                                  f"{L} layers, so use layers {lo}..{L - 1}" + (f" ({self.method} scores on layer K-{lo})"
                                                                          if self.score_offset else ""))

    def _warn_no_visual(self, counts: Tensor) -> None:
        if self._warned or bool((counts > 0).all()):
            return
        self._warned = True
        which = torch.nonzero(counts == 0).flatten().tolist()
        warnings.warn(f"{self.method}: sample(s) {which} of the batch have no visual tokens (visual_mask is empty "
                      f"there); they pass through unpruned. Pass visual_mask to the Runner to prune them "
                      f"(shown once per policy)", CompactVLWarning, stacklevel=3)

    def stage_counts(self, stage: int, state: RunState, scores: Tensor, candidates: Tensor) -> Tensor:
        """Visual tokens each sample keeps at ``stage`` (``[B]``); threshold mode is handled in ``keep_mask``."""
        now = candidates.sum(-1)
        if self.count is not None:
            return torch.minimum(now, torch.full_like(now, self.count[stage]))
        base = self._n_input if self.relative_to == "input" else now
        return torch.minimum(kept_counts(base, self.keep[stage], self.rounding), now)

    def keep_mask(self, stage: int, state: RunState, scores: Tensor) -> Tensor:
        """``[B, L]`` visual rows to keep at ``stage``."""
        cand = state.visual & state.mask
        if self.threshold is not None:
            floor = torch.minimum(cand.sum(-1), torch.full_like(cand.sum(-1), self.min_keep))
            return cand & ((scores >= self.threshold[stage]) | topk_mask(scores, cand, floor))
        k = self.stage_counts(stage, state, scores, cand)
        return topk_mask(scores, cand, torch.maximum(k, torch.minimum(cand.sum(-1), torch.full_like(k, self.min_keep))))

    def drop(self, stage: int, layer_idx: int, state: RunState, keep_visual: Tensor, scores: Tensor,
             runner) -> RunState:
        """Apply a stage's decision: keep every text token and the chosen visual ones."""
        return state.select(keep_visual | ~state.visual, layer=layer_idx)

    # ---- hooks
    def _maybe_score(self, i: int, state: RunState, runner, now: bool) -> None:
        """Score the stages scored at layer ``i``: ``now`` = those that drop at ``i`` too (offset 0, scored before
        the drop), otherwise those that drop later (scored on the state layer ``i`` really sees, after any drop at
        ``i``)."""
        for s, k in enumerate(self.stages):
            if self.score_layer(s) == i and (k == i) == now and bool((state.visual & state.mask).any()):
                t0, c0 = time.perf_counter(), time.process_time()
                self._pending[s] = (self.score(i, state, runner).float(), state.orig_index)
                self.score_seconds += time.perf_counter() - t0
                self.score_cpu_seconds += time.process_time() - c0

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if self._checked_for is None or self._checked_for() is not runner:  # policies passed to prefill(policies=...)
            self.check(runner)                                                # skip Runner.__init__'s check
            self._checked_for = weakref.ref(runner)
        if self._n_input is None:
            self._n_input = state.visual_counts()
            self._warn_no_visual(self._n_input)
        if layer_idx in self.stages:
            if not self.score_after:
                self._maybe_score(layer_idx, state, runner, now=True)
            s = self.stages.index(layer_idx)
            pending = self._pending.pop(s, None)
            if pending is not None:  # None: no visual token left anywhere in the batch, nothing to rank
                t0, c0 = time.perf_counter(), time.process_time()
                scores = remap_rows(pending[0], pending[1], state.orig_index)
                keep = self.keep_mask(s, state, scores)
                state = self.drop(s, layer_idx, state, keep, scores, runner)
                self.score_seconds += time.perf_counter() - t0
                self.score_cpu_seconds += time.process_time() - c0
        if not self.score_after:
            self._maybe_score(layer_idx, state, runner, now=False)
        return state

    def after_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if self.score_after:
            self._maybe_score(layer_idx, state, runner, now=False)
        return state

    def extra_repr(self) -> str:
        mode = (f"keep={self.keep}" if self.keep is not None else f"count={self.count}" if self.count is not None
                else f"threshold={self.threshold}")
        return f"layers={list(self.stages)}, {mode}, relative_to={self.relative_to}"
