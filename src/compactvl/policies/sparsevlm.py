"""SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025 (arXiv:2410.04417); definitions follow the released v1.0 code (Gumpest/SparseVLMs,
``modelling_sparse_llama.py`` and ``score.py``) where it is more specific than the paper.

1. Text raters (once, on the LLM's input embeddings H). Candidates are the text tokens after a sample's first visual
   token (only they can attend to visual tokens). With V the visual rows and T the candidates,
       r = mean_over_V( softmax_over_T( V Tᵀ ) )      (no 1/√D, as in the code)
   and the raters are the candidates with r > mean(r). A sample with no rater (e.g. no text after the image) uses
   its last token.
2. Scores at each sparsification layer l: the attention the raters pay each visual token in layer l, averaged over
   heads and raters (rows of layer l's attention recomputed from its q/k, see ``scores.py``; SDPA stays on).
3. Per-layer keep counts: the visual tokens are cut to a fixed count per stage, the code's tables for 576 visual
   tokens (``RETAIN``: e.g. "192" → 300, 200, 110 after layers 2, 6, 15), here as fractions of each sample's own
   input visual count (⌊n·f + ½⌋, at least 1). The paper's rank-based adaptive count is not what the released code
   runs; give ``keep`` to set the fractions yourself.
4. Recycling: of the tokens deleted at a stage, the top ``recycle_ratio`` (⌊0.3·d⌋ + 1, at most d) by score are
   clustered by density-peak kNN clustering (DPC-kNN: density ρ_i = exp(-mean of squared distances to the c
   nearest), δ_i = distance to the nearest denser token, centres = top-c of ρ·δ, others join the nearest centre;
   distances are Euclidean / √D) into c = ⌊cluster_ratio·m⌋ + 1 tokens, each the mean of its members. They are
   inserted right after the sample's last visual token, count as visual tokens in later stages, and take the RoPE
   position of their cluster centre under the ``keep`` position policy (renumbered under ``compact``). The
   reference breaks density ties with random noise; we break them by order (deterministic).

Layers: the code sparsifies with the attention of layers 2, 6, 15 (0-based) of 32-layer LLaVA and drops tokens from
the next layer on. Our ``layers`` knob names, as for every policy here, the FIRST layer that runs on the reduced set,
so the reference is ``layers=(3, 7, 16)`` (scored on layer K-1). For other depths the default scales the scoring
layers: K = round(l·L/32) + 1 for l in (2, 6, 15) (28 layers → 3, 6, 14; 4 layers → 1, 2, 3).

Knobs: ``layers``, ``retain`` (192 | 128 | 96 | 64: the reference table; default 192) or ``keep`` (fractions of the
input visual tokens per stage), ``recycle`` (default True), ``recycle_ratio`` (0.3), ``cluster_ratio`` (0.1).

Reference fidelity (checked in ``tests/test_fidelity_inllm.py`` against a transcription of the v1.0 code:
``modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``, ``score.py`` ``attn_postprocess_topk``, ``utils.py``
``cluster_and_merge``; kept sets per stage, recycled tokens, counts and logits equal on 576-token inputs):

* layers: the code scores with the attention of ``pruning_loc`` layer l (on its input) and prunes that layer's
  output, i.e. layers l+1.. run reduced: our K = l + 1 (score_offset 1). Matched.
* score: ``mean(1)`` over heads of the full-width softmax, the raters' rows, mean over raters. Matched (the code's
  softmax runs in the model dtype, ours in float32). Raters: matched for one image (the code's "text" is every
  token after the image); a sample with no rater falls back to its last token (the code would average nothing).
* counts: the code keeps ``min(table[stage], v_token_num - 1)`` of the CURRENT visual tokens (recycled ones
  included); here ``kept(n_0, table[stage] / 576)`` capped at the current count: the same for 576-token inputs
  (the tables' setting) unless a table entry reaches the current count; other input sizes scale the table.
* recycling: ``int(0.3·d) + 1`` deleted tokens, ``int(m / 10) + 1`` clusters, DPC-kNN with k = the cluster count,
  centres by ρ·δ (descending), inserted right after the kept visual tokens: matched. The code's cluster means divide
  by ``count + 1e-6`` (relative change ≤ 1e-6; we divide by the count) and break density ties with ``torch.rand``
  noise; we break them by order. With exactly 2 clusters the two densest tokens always tie (mutual nearest
  neighbours), so the code's order of its two recycled tokens is random there: not checkable.
* positions: the code renumbers (``position_ids[:, :new_len]``): reference position policy ``compact``. Matched.

Replays (uncached recomputation, multi-turn references): recycled tokens are new rows, so the Runner's
``ReplayPolicy`` (which only re-selects rows) cannot rebuild them; use ``SparseVLM.replay(prefill_state,
prompt_len)``, which re-applies the kept sets and rebuilds each recycled token from its recorded members
(``state.signals.recycled``, one ``runner.RecycledTokens`` per stage). ``Runner.generate(use_cache=False)`` uses ``ReplayPolicy`` and is therefore only a
valid reference with ``recycle=False``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import LayerPolicy, RecycledTokens, RunState
from ..schedules import Budget, Schedule, kept
from .base import ScorePolicy, check_fraction, check_layers, remap_rows, topk_mask
from .scores import attention_received, check_attention_layer, last_token_mask, mask_to_index

# Visual tokens kept after each sparsification layer, for 576 input tokens (score.py of the v1.0 code).
RETAIN = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
REFERENCE_LAYERS = (2, 6, 15)  # scoring layers of the 32-layer reference; tokens drop from the next layer on
_PAD_ID = 2 ** 62  # member-id padding: matches no row (orig ids are < L, -1 for padding, <= -2 for recycled rows)


def default_layers(num_layers: int) -> list[int]:
    out = [min(num_layers - 1, max(1, math.floor(l * num_layers / 32 + 0.5) + 1)) for l in REFERENCE_LAYERS]
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ConfigError(f"sparsevlm: a {num_layers}-layer model is too shallow for the default three stages "
                          f"({out}); give layers and keep explicitly, e.g. layers=[1], keep=[0.3]")
    return out


def recycle_counts(deleted: Tensor, recycle_ratio: float, cluster_ratio: float) -> tuple[Tensor, Tensor]:
    """Per sample: ``m`` deleted tokens recycled (⌊ratio·d⌋ + 1, at most d), ``c`` clusters (⌊ratio·m⌋ + 1)."""
    d = deleted.long().cpu()  # [B] counts; float64 on the CPU (some accelerators have no float64)
    m = torch.minimum(torch.floor(d.double() * recycle_ratio + 1e-9).long() + 1, d) * (d > 0)
    c = (torch.floor(m.double() * cluster_ratio + 1e-9).long() + 1) * (m > 0)
    return m.to(deleted.device), torch.minimum(c, m).to(deleted.device)


def dpc_knn(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """Batched DPC-kNN clustering of ``x [B, M, D]`` (rows with ``valid`` False ignored) into ``clusters [B]`` groups.

    Returns ``assign [B, M]`` (cluster id in 0..C-1, -1 for invalid rows; C = clusters.max()) and ``centres [B, C]``
    (row of each cluster's centre, -1 where a sample has fewer clusters). Cluster ids follow the centre score ρ·δ,
    highest first."""
    B, M, D = x.shape
    C = int(clusters.max()) if clusters.numel() else 0
    xf = x.float()
    dist = torch.cdist(xf, xf).clamp_min_(0).div_(math.sqrt(D))
    dist.diagonal(dim1=1, dim2=2).zero_()  # exact zeros on the diagonal
    inf = float("inf")
    k = clusters.clamp_min(1)
    # density: exp(-mean squared distance to the k nearest valid rows, self included); only the k smallest are needed
    near = dist.masked_fill(~valid[:, None, :], inf).topk(max(C, 1), dim=-1, largest=False).values  # ascending
    sq = near.square().masked_fill_(torch.isinf(near), 0).cumsum(-1)
    mean_sq = sq.gather(-1, (k - 1)[:, None, None].expand(B, M, 1)).squeeze(-1) / k[:, None]
    density = torch.exp(-mean_sq).masked_fill_(~valid, -1.0)  # invalid rows are never denser than a valid one
    pair = valid[:, :, None] & valid[:, None, :]
    dmax = dist.masked_fill(~pair, 0).flatten(1).amax(-1)
    # delta: distance to the nearest denser row (dmax for the densest)
    delta = dist.masked_fill(density[:, None, :] <= density[:, :, None], inf).amin(-1)
    delta = torch.where(torch.isinf(delta), dmax[:, None].expand_as(delta), delta)
    score = torch.where(valid, delta * density, torch.full_like(delta, float("-inf")))
    centres = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :C]  # [B, C]
    has = torch.arange(C, device=x.device) < clusters[:, None]
    to_centre = dist.gather(1, centres[:, :, None].expand(B, C, M))  # [B, C, M]
    assign = to_centre.masked_fill(~has[:, :, None], inf).argmin(1)  # nearest centre
    # each centre belongs to its own cluster (absent centres write into a spare column that is then cut off)
    spare = torch.cat([assign, torch.zeros_like(assign[:, :1])], 1)
    own = torch.arange(C, device=x.device).expand(B, C)
    assign = spare.scatter(1, torch.where(has, centres, M), own)[:, :M]
    return torch.where(valid, assign, -1), torch.where(has, centres, -1)


def aggregate(x: Tensor, assign: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """Mean of the rows of ``x [B, M, D]`` in each cluster (``assign [B, M]``, -1 = none) → ``[B, C, D]``, counts."""
    onehot = (assign[:, None, :] == torch.arange(C, device=x.device)[None, :, None]).to(x.dtype)  # [B, C, M]
    counts = onehot.sum(-1)
    return torch.matmul(onehot, x) / counts.clamp_min(1)[..., None], counts


def insert_and_select(state: RunState, keep: Tensor, new_hidden: Tensor, new_valid: Tensor, new_ids: Tensor,
                      new_pos: Tensor, layer: int) -> RunState:
    """Keep the rows in ``keep`` and insert ``new_hidden [B, C, D]`` (where ``new_valid``) right after each sample's
    last visual row, as visual rows with ids ``new_ids`` and positions ``new_pos`` (``[B, C]`` or ``[k, B, C]``)."""
    B, L = state.mask.shape
    C = new_hidden.shape[1]
    dev = state.mask.device
    slots = torch.arange(L, device=dev)
    last_vis = torch.where(state.visual & state.mask, slots, -1).amax(-1)  # [B]
    key = torch.cat([(slots * (C + 1)).expand(B, L), last_vis[:, None] * (C + 1) + 1 + torch.arange(C, device=dev)], 1)
    order = torch.sort(key, dim=-1, stable=True).indices  # [B, L + C]

    def cat(old: Tensor, new: Tensor) -> Tensor:
        both = torch.cat([old, new], dim=-1)
        return both.gather(-1, order.expand(both.shape[:-2] + order.shape))

    hidden = torch.cat([state.hidden, new_hidden.to(state.hidden.dtype)], 1)
    hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    combined = replace(
        state, hidden=hidden, mask=cat(state.mask, new_valid), visual=cat(state.visual, new_valid),
        orig_index=cat(state.orig_index, torch.where(new_valid, new_ids, -1)),
        position_ids=cat(state.position_ids, new_pos.to(state.position_ids.dtype)), position_embeddings=None,
    )
    return combined.select(cat(keep, new_valid), layer=layer)


def _rows_of(state: RunState, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Slot of each id ``[B, N]`` in ``state`` and whether it was found."""
    hit = state.orig_index[:, None, :] == ids[:, :, None]  # [B, N, L]
    return hit.float().argmax(-1), hit.any(-1)


def _positions_at(state: RunState, slots: Tensor) -> Tensor:
    pos = state.position_ids
    return pos.gather(-1, slots.expand(pos.shape[:-2] + slots.shape))


@POLICIES.register("sparsevlm")
class SparseVLM(ScorePolicy):
    method = "sparsevlm"
    score_offset = 1  # attention of layer K-1 (the reference's sparsification layer), tokens dropped from K on
    reference_positions = "compact"  # v1.0 renumbers the shorter sequence
    macs_help = ("SparseVLM (Zhang et al. 2024): per-stage keep counts of the input visual tokens, plus recycled "
                 "cluster tokens")
    macs_knobs = dict(
        layers="first layer of each stage (default: the reference's 2, 6, 15 scaled to the depth, plus 1)",
        keep="fractions of the input visual tokens kept per stage (default: the retain table)",
        retain="reference table 192 | 128 | 96 | 64 (default 192)", recycle="recycle deleted tokens (default true)",
        recycle_ratio="share of deleted tokens recycled (0.3)", cluster_ratio="clusters per recycled token (0.1)")

    def __init__(self, layers: Any = None, retain: Any = None, keep: Any = None, recycle: bool = True,
                 recycle_ratio: float = 0.3, cluster_ratio: float = 0.1):
        if retain is not None and keep is not None:
            raise ConfigError("sparsevlm: give retain (the reference's table) or keep (your fractions), not both")
        if keep is None:
            retain = 192 if retain is None else retain
            if retain not in RETAIN:
                raise ConfigError(f"sparsevlm: retain={retain!r} has no reference table; use one of "
                                  f"{', '.join(map(str, RETAIN))}, or give keep=[fractions per stage]")
            keep = [c / 576 for c in RETAIN[retain]]
        keep = list(keep) if isinstance(keep, (list, tuple)) else keep
        if not isinstance(recycle, bool):
            raise ConfigError(f"sparsevlm: recycle={recycle!r} must be true or false")
        self.recycle_ratio = check_fraction(self.method, "recycle_ratio", recycle_ratio)
        self.cluster_ratio = check_fraction(self.method, "cluster_ratio", cluster_ratio)
        self._auto_layers = layers is None
        stages = len(keep) if isinstance(keep, list) else (1 if layers is None else len(check_layers(
            self.method, "layers", layers, self.lowest_layer)))
        super().__init__(layers=list(range(1, stages + 1)) if layers is None else layers, keep=keep,
                         relative_to="input")
        self.retain, self.recycle = retain, recycle

    def check(self, runner) -> None:
        if self._auto_layers:
            layers = default_layers(runner.num_layers)
            if len(layers) != len(self.keep):
                raise ConfigError(f"sparsevlm: keep has {len(self.keep)} fraction(s) but the default schedule has "
                                  f"{len(layers)} stages {layers}; give layers too")
            self.stages = tuple(layers)
        super().check(runner)
        for k in self.stages:
            check_attention_layer(runner, k - 1, self.method)

    def reset(self) -> None:
        super().reset()
        self._raters: tuple[Tensor, Tensor] | None = None
        self._next_id = -2

    # ---- text raters
    @staticmethod
    def raters(state: RunState) -> Tensor:
        """``[B, L]`` bool: the text raters of each sample (computed on the LLM's input embeddings)."""
        vis = state.visual & state.mask
        cand = state.prompt() & ~state.visual & (vis.long().cumsum(-1) > 0)  # an answer in the forward never rates
        vi, vv = mask_to_index(vis)
        ti, tv = mask_to_index(cand)
        D = state.hidden.shape[-1]
        V = state.hidden.gather(1, vi[..., None].expand(-1, -1, D)).float()
        T = state.hidden.gather(1, ti[..., None].expand(-1, -1, D)).float()
        logits = torch.matmul(V, T.transpose(1, 2)).masked_fill(~tv[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0) * vv[..., None]
        r = p.sum(1) / vv.sum(-1, keepdim=True).clamp_min(1)  # [B, Nt]
        mean = (r * tv).sum(-1, keepdim=True) / tv.sum(-1, keepdim=True).clamp_min(1)
        chosen = tv & (r > mean)
        out = torch.zeros_like(state.mask)
        return out.scatter(1, ti, chosen) & cand

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if self._raters is None:
            self._raters = (self.raters(state), state.orig_index)
        return super().before_layer(layer_idx, state, runner)

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        raters = remap_rows(self._raters[0].float(), self._raters[1], state.orig_index, fill=0.0) > 0.5
        raters = raters & state.mask
        queries = torch.where(raters.any(-1, keepdim=True), raters, last_token_mask(state))
        return attention_received(runner, layer_idx, state, queries)

    # ---- drop + recycle
    def drop(self, stage: int, layer_idx: int, state: RunState, keep_visual: Tensor, scores: Tensor,
             runner) -> RunState:
        keep = keep_visual | ~state.visual
        deleted = state.visual & state.mask & ~keep_visual
        if not self.recycle or not bool(deleted.any()):
            return state.select(keep, layer=layer_idx)
        m, c = recycle_counts(deleted.sum(-1), self.recycle_ratio, self.cluster_ratio)
        rows, valid = mask_to_index(topk_mask(scores, deleted, m))  # recycled rows, in sequence order
        D = state.hidden.shape[-1]
        x = state.hidden.gather(1, rows[..., None].expand(-1, -1, D))
        assign, centres = dpc_knn(x, valid, c)
        C = centres.shape[1]
        has = centres >= 0
        ids = (self._next_id - torch.arange(C, device=x.device)).expand_as(centres)
        self._next_id -= C
        centre_ids = state.orig_index.gather(1, rows.gather(1, centres.clamp_min(0)))
        members = torch.where(valid, state.orig_index.gather(1, rows), _PAD_ID)
        record = RecycledTokens(layer=layer_idx, members=members, assign=assign, ids=ids, valid=has,
                                centres=torch.where(has, centre_ids, _PAD_ID))
        state.signals.recycled.append(record)
        return _rebuild(state, keep, record)

    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("sparsevlm", ...)`` (after ``check`` resolved the layers)."""
        return dict(layers=list(self.stages), keep=list(self.keep), recycle=self.recycle,
                    recycle_ratio=self.recycle_ratio, cluster_ratio=self.cluster_ratio)

    @staticmethod
    def replay(prefill_state: RunState, prompt_len: int) -> "SparseVLMReplay":
        return SparseVLMReplay(prefill_state, prompt_len)


    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        """``tokens=k`` for k in the reference's tables (192, 128, 96, 64) → ``retain=k``; ``keep=f`` → every stage
        keeps kept(n, f) of the input visual tokens (``keep=[f, f, f]``; recycling adds its cluster tokens)."""
        if budget.tokens is not None:
            if budget.tokens not in RETAIN:
                raise ConfigError(f"sparsevlm: tokens={budget.tokens} has no reference table; use one of "
                                  f"{', '.join(map(str, RETAIN))} or keep=<fraction>")
            return {"retain": budget.tokens}
        return {"keep": [budget.fraction] * len(REFERENCE_LAYERS)}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layers: Any = None, keep: Any = None,
                      retain: Any = None, recycle: Any = True, recycle_ratio: Any = 0.3, cluster_ratio: Any = 0.1):
        """Visual tokens entering each layer under SparseVLM (same counting code as the policy)."""
        split = lambda x, f: [f(k) for k in x.split(",")] if isinstance(x, str) else x  # noqa: E731 (CLI strings)
        pol = SparseVLM(layers=None if layers is None else [int(k) for k in split(layers, int)],
                        retain=None if retain is None else int(retain),
                        keep=None if keep is None else split(keep, float),
                        recycle=recycle if isinstance(recycle, bool) else str(recycle).lower() in ("1", "true", "yes"),
                        recycle_ratio=float(recycle_ratio), cluster_ratio=float(cluster_ratio))
        stages = default_layers(num_layers) if pol._auto_layers else list(pol.stages)
        if not 1 <= stages[0] or stages[-1] > num_layers - 1:
            raise ConfigError(f"sparsevlm: layers {stages} must lie in 1..{num_layers - 1} for a {num_layers}-layer model")
        if len(stages) != len(pol.keep):
            raise ConfigError(f"sparsevlm: {len(stages)} layers but {len(pol.keep)} keep fractions; give one per layer")
        out, v = [], visual
        for i in range(num_layers):
            if i in stages:
                k = min(kept(visual, pol.keep[stages.index(i)]), v)
                _, c = recycle_counts(torch.tensor([v - k]), pol.recycle_ratio, pol.cluster_ratio)
                v = k + (int(c[0]) if pol.recycle else 0)
            out.append(v)
        return Schedule([v + text for v in out], out, text, method="sparsevlm", visual_input=visual,
                        knobs=dict(layers=stages, keep=list(pol.keep), recycle=pol.recycle,
                                   recycle_ratio=pol.recycle_ratio, cluster_ratio=pol.cluster_ratio))


def _rebuild(state: RunState, keep: Tensor, record: RecycledTokens) -> RunState:
    """Build the recycled tokens of ``record`` from the rows of ``state`` and apply the stage."""
    slots, _ = _rows_of(state, record.members)
    D = state.hidden.shape[-1]
    x = state.hidden.gather(1, slots[..., None].expand(-1, -1, D))
    agg, _ = aggregate(x, record.assign, record.ids.shape[1])
    centre_slots, _ = _rows_of(state, record.centres)
    return insert_and_select(state, keep, agg, record.valid, record.ids, _positions_at(state, centre_slots),
                             record.layer)


class SparseVLMReplay(LayerPolicy):
    """Re-applies a SparseVLM prefill (kept sets and recycled tokens) to a longer input whose first ``prompt_len``
    tokens are that prompt; later tokens are always kept. The uncached reference for SparseVLM with recycling."""

    def __init__(self, prefill_state: RunState, prompt_len: int):
        super().__init__()
        self.steps = {layer: kept for layer, kept in prefill_state.trace}
        self.records = {r.layer: r for r in prefill_state.signals.recycled}
        self.prompt_len = prompt_len

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        kept_ids = self.steps.get(layer_idx)
        if kept_ids is None:
            return state
        idx = state.orig_index
        hit = (idx[:, :, None] == kept_ids[:, None, :]).any(-1) & (idx != -1)
        keep = hit | (idx >= self.prompt_len)
        record = self.records.get(layer_idx)
        if record is None:
            return state.select(keep, layer=layer_idx)
        return _rebuild(state, keep, record)
