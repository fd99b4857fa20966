"""DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
EMNLP 2025 (arXiv:2502.11494). Definitions follow the released code (ZichenWen1/DART,
``llava/model/language_model/modeling_llama_self.py``: ``DART.forward`` and ``DART.get_retained_image_token``) where
it is more specific than the paper.

Definition. Right before decoder layer K (default 2), with k = layer K-1's roped keys of the state entering K-1
(every key head concatenated) and h = the model's final norm applied to the state entering K (the output of K-1):

    image pivots  = the ``pivots_image`` visual tokens with the largest ‖k_j‖₁           (default 4)
    text pivots   = the ``pivots_text`` text tokens after the image with the largest ‖k_j‖₁  (default 4)
    t = ⌊B / (pivots_image + pivots_text)⌋,  B = ``count`` (the code's max_num_trunction) or n·``keep``
    for each pivot p in turn:  keep the t remaining visual tokens j with the smallest cos(h_p, h_j)
                               (least duplicated), and remove them from the remaining set
    kept visual tokens = image pivots ∪ every pick:  min(n, min(pivots_image, n) + t·(pivots_image + pivots_text))

Text tokens (text pivots included) are always kept; the image pivots are always kept; the kept rows stay in their
original order and keep their original positions (the code sets ``position_ids = keep_indexs``; reference position
policy ``keep``). Decoding never prunes.

Details transcribed from the code: the pivot norm is the L1 norm (``torch.norm(p=1)``) of the post-RoPE keys layer
K-1 returned (``layer_outputs[-2]`` of the previous layer); under GQA the code's ``repeat_kv`` copies scale every norm
by the same factor, so we sum over the key heads (same ranking). The similarity uses ``self.norm`` (the LM's final
RMSNorm, weight included) of the previous layer's output. Pivots are visited in the iteration order of the code's
Python ``set`` of their sequence indices (``list(set(image_indices + query_indices))``); we build that same set from
each sample's own sequence indices (padding excluded), so the greedy order equals the code's. t uses the configured
pivot counts (the code's ``math.ceil(B // (p_img + p_txt))`` is a floor; we add 1e-9 before flooring n·keep / P so
a float product like 0.7·5 does not lose a token).

Differences: the code runs batch 1 with one contiguous image (``image_token_start_index`` / ``image_token_length``);
here every sample uses its own visual rows (any layout) and "text after the image" means the real text rows after
the sample's last visual row. Where the code would fail (fewer visual tokens than t per pivot, fewer than
``pivots_text`` text tokens after the image), we clamp: a pivot takes what is left, a missing text pivot picks
nothing — the MACs schedule assumes at least ``pivots_text`` text tokens after the image, true of every chat prompt.
Cosines are taken in float32. The code's default ``max_num_trunction=128`` overrides its ``reduction_ratio``, so
the default here is ``count=128`` (132 visual tokens kept of LLaVA-1.5's 576).

Knobs: ``layer`` K (1 <= K <= L-1, default 2), ``count`` (default 128) or ``keep`` (fraction of each sample's input
visual tokens, = 1 - the code's reduction_ratio), ``pivots_image`` (>= 1, default 4), ``pivots_text`` (>= 0,
default 4). MACs schedule (:meth:`DART.macs_schedule`): ``schedule_for("dart", L, visual, text, layer=K,
count=c | keep=f)``. Budget: ``tokens=k`` → ``count=k``, ``keep=f`` → ``keep=f`` (the code's semantics: the kept
visual tokens are the image pivots plus the budget rounded down to a multiple of the pivot count).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, made, parse_fraction, parse_layers
from .base import ScorePolicy, _is_int, topk_mask
from .scores import _QK, check_attention_layer

DEFAULT_COUNT = 128  # the code's max_num_trunction default (llava/eval/model_vqa_loader.py), used by its scripts


def per_pivot(n: int, keep: float | None, count: int | None, pivots_image: int, pivots_text: int) -> int:
    """t: visual tokens each pivot picks, from the budget (``count`` or ``n·keep``) and the configured pivots."""
    p = pivots_image + pivots_text
    if count is not None:
        return count // p
    return math.floor(n * keep / p + 1e-9)


def dart_kept(n: int, keep: float | None, count: int | None, pivots_image: int, pivots_text: int) -> int:
    """Visual tokens a sample with ``n`` of them keeps: the image pivots plus t per pivot, at most n."""
    if n <= 0:
        return 0
    t = per_pivot(n, keep, count, pivots_image, pivots_text)
    return min(n, min(pivots_image, n) + t * (pivots_image + pivots_text))


def _whole(method: str, knob: str, x: Any, lowest: int, strings: bool = True) -> int:
    """A whole-number knob >= ``lowest`` (ints, or with ``strings`` the CLI's strings "4")."""
    if strings and isinstance(x, str):
        try:
            f = float(x)
        except ValueError:
            f = math.nan
        x = int(f) if f.is_integer() else x
    if not _is_int(x) or x < lowest:
        raise ConfigError(f"{method}: {knob}={x!r} must be a whole number >= {lowest}")
    return int(x)


def _ranked(scores: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Slots ``[B, k]`` of each sample's top-k candidates, best first (ties: earlier slot), and which are real."""
    s = scores.float().masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    valid = torch.arange(order.shape[1], device=s.device) < cand.sum(-1, keepdim=True)
    return order, valid


@POLICIES.register("dart")
class DART(ScorePolicy):
    method = "dart"
    layers_knob = "layer"
    score_offset = 1  # keys of layer K-1 on the state entering K-1; the similarity on the state entering K
    reference_positions = "keep"
    macs_help = ("DART (Wen et al. 2025): layers before K see every token; layers K.. see the image pivots plus the "
                 "visual tokens least similar to the pivots")
    macs_knobs = {"layer": "K, the first pruned layer (default 2)",
                  "count": "budget B in tokens (the code's max_num_trunction; default 128)",
                  "keep": "budget as a fraction of the visual tokens (1 - the code's reduction_ratio)",
                  "pivots_image": "image pivots (default 4)", "pivots_text": "text pivots (default 4)"}

    def __init__(self, layer: int = 2, keep: Any = None, count: Any = None, pivots_image: int = 4,
                 pivots_text: int = 4):
        if not _is_int(layer):
            raise ConfigError(f"dart: layer={layer!r} must be one layer index K (the first pruned layer), e.g. 2")
        if keep is None and count is None:
            count = DEFAULT_COUNT
        self.pivots_image = _whole(self.method, "pivots_image", pivots_image, 1, strings=False)
        self.pivots_text = _whole(self.method, "pivots_text", pivots_text, 0, strings=False)
        if isinstance(keep, (list, tuple)) or isinstance(count, (list, tuple)):
            raise ConfigError("dart: keep / count is one value (DART prunes once, at layer K)")
        super().__init__(layers=layer, keep=keep, count=count, relative_to="input")
        self.layer = layer

    # ---- schedule
    def reset(self) -> None:
        super().reset()
        self._offset: Tensor | None = None  # first real slot of each sample: its sequence index 0

    def check(self, runner) -> None:
        super().check(runner)
        check_attention_layer(runner, self.layer - 1, self.method)

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if self._offset is None:
            self._offset = torch.where(state.mask, state.orig_index,
                                       torch.full_like(state.orig_index, state.mask.shape[1])).amin(-1)
        return super().before_layer(layer_idx, state, runner)

    # ---- score and selection
    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        """The pivot score: L1 norm of layer ``layer_idx``'s roped keys (every key head) of each row."""
        return _QK(runner, layer_idx, state).k.abs().sum(dim=(1, 2))

    def keep_mask(self, stage: int, state: RunState, scores: Tensor) -> Tensor:
        return state.visual & state.mask  # not a top-k: ``drop`` makes DART's selection

    def pivots(self, state: RunState, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Image-pivot mask ``[B, L]`` and the pivots in the code's visiting order: slots ``[B, P]``, validity."""
        B, L = state.mask.shape
        cand = state.visual & state.mask
        slots = torch.arange(L, device=cand.device)
        last_vis = torch.where(cand, slots, -1).amax(-1)
        text = state.prompt() & ~state.visual & (slots > last_vis[:, None])  # the prompt's text, not an answer
        img, img_ok = _ranked(scores, cand, self.pivots_image)
        txt, txt_ok = _ranked(scores, text, self.pivots_text)
        is_pivot = torch.zeros_like(cand)
        is_pivot.scatter_(1, img, img_ok)
        seq = (state.orig_index - self._offset[:, None]).tolist()
        order = []
        for b in range(B):
            found = [s for s, ok in zip(img[b].tolist(), img_ok[b].tolist()) if ok] + \
                    [s for s, ok in zip(txt[b].tolist(), txt_ok[b].tolist()) if ok]
            index = [seq[b][s] for s in found]  # sequence indices, image pivots first (best first), then text
            slot_of = dict(zip(index, found))
            order.append([slot_of[i] for i in set(index)])  # the code's list(set(image_indices + query_indices))
        P = self.pivots_image + self.pivots_text
        slots_out = torch.tensor([o + [0] * (P - len(o)) for o in order], dtype=torch.long, device=cand.device)
        valid = torch.tensor([[j < len(o) for j in range(P)] for o in order], dtype=torch.bool, device=cand.device)
        return is_pivot, slots_out.view(B, P), valid.view(B, P)

    def per_pivot_counts(self) -> Tensor:
        n = self._n_input.cpu().tolist()
        keep = self.keep[0] if self.keep is not None else None
        count = self.count[0] if self.count is not None else None
        t = [per_pivot(m, keep, count, self.pivots_image, self.pivots_text) for m in n]
        return torch.tensor(t, dtype=torch.long, device=self._n_input.device)

    def drop(self, stage: int, layer_idx: int, state: RunState, keep_visual: Tensor, scores: Tensor,
             runner) -> RunState:
        cand = state.visual & state.mask
        is_pivot, order, valid = self.pivots(state, scores)
        h = runner.base.norm(state.hidden).float()
        t = self.per_pivot_counts()
        remaining = cand & ~is_pivot
        chosen = is_pivot.clone()
        for j in range(order.shape[1]):
            p = h.gather(1, order[:, j, None, None].expand(-1, 1, h.shape[-1]))  # [B, 1, D]
            sim = F.cosine_similarity(p, h, dim=-1)  # [B, L]
            k = torch.where(valid[:, j], torch.minimum(t, remaining.sum(-1)), torch.zeros_like(t))
            picked = topk_mask(-sim, remaining, k)
            chosen |= picked
            remaining &= ~picked
        return state.select(chosen | ~state.visual, layer=layer_idx)

    # ---- MACs, budgets
    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("dart", ...)``."""
        budget = {"count": self.count[0]} if self.count is not None else {"keep": self.keep[0]}
        return {"layer": self.layer, **budget, "pivots_image": self.pivots_image, "pivots_text": self.pivots_text}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        return {"count": budget.tokens} if budget.tokens is not None else {"keep": budget.fraction}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layer: Any = 2, keep: Any = None, count: Any = None,
                      pivots_image: Any = 4, pivots_text: Any = 4) -> Schedule:
        ks = parse_layers("dart", "layer", layer, 1, num_layers - 1)
        if len(ks) != 1:
            raise ConfigError(f"dart: --layer takes one layer index K, got {layer!r}")
        k = ks[0]
        if keep is not None and count is not None:
            raise ConfigError("dart: give --keep (a fraction) or --count (tokens), not both")
        pi = _whole("dart", "pivots_image", pivots_image, 1)
        pt = _whole("dart", "pivots_text", pivots_text, 0)
        if keep is not None:
            f = parse_fraction("dart", "keep", keep)
            if f <= 0:
                raise ConfigError("dart: --keep must be in (0, 1]")
            budget: dict[str, Any] = {"keep": f}
            v = dart_kept(visual, f, None, pi, pt)
        else:
            c = _whole("dart", "count", DEFAULT_COUNT if count is None else count, 1)
            budget = {"count": c}
            v = dart_kept(visual, None, c, pi, pt)
        return made("dart", [visual] * k + [v] * (num_layers - k), visual, text, layer=k, **budget,
                    pivots_image=pi, pivots_text=pt)
