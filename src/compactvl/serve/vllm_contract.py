"""The contract a vLLM plugin needs from compactvl's fixed-budget pre-LLM selections (docs/serving.md, "Past one
machine: vLLM"). Pure functions of torch tensors and compactvl's own ops: nothing here imports vLLM.

vLLM sizes each image's placeholder tokens in its multimodal processor (the prompt update), from the image size
alone, before the vision tower runs; the model's ``embed_multimodal`` must then return exactly that many embeddings
for the item. Its one built-in pruning method does the same in two steps (``vllm/multimodal/evs.py``:
``compute_retained_tokens_count`` sizes the placeholders, ``compute_retention_mask`` picks the kept embeddings, and
Qwen2.5-VL's ``_get_prompt_updates`` / ``_postprocess_video_embeds_evs`` call them). The two functions here are that
pair for compactvl's methods:

- :func:`retained_count` ``(method, budget, grid)`` -> the tokens the method keeps from an image of ``grid`` patches,
  known before any feature is seen (the method's own ``budget_knobs`` and ``tokens_out``);
- :func:`retention_mask` ``(method, features, grid, budget, ...)`` -> a boolean mask over the image's tokens with
  exactly that many True entries, computed by the registered compactvl op on those features, so that
  ``features[mask]`` is the op's output (its kept tokens, in their original order).

A method qualifies when (1) its kept count depends on the grid and the budget only and (2) its output is a subset
of its input tokens in input order (a selection: one mask says it). :data:`CONTRACT` lists them, with the knobs the
contract pins (HoloV: ``overflow="refill"`` for an exact count, ``order="grid"`` for input order). Everything else
is refused with the reason (:data:`REFUSED`): merges and pools (VisionZip, ToMe, AvgPool, ...) make new embeddings,
PruMerge keeps a data-dependent count, fusion ops need several encoders, layer policies act inside the LLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import CompactVLError, ConfigError, InputError
from ..ops.base import OpContext, StreamOp
from ..registry import POLICIES, TOKEN_OPS
from ..schedules import Budget, is_int
from ..tokens import Grid, Tokens


@dataclass(frozen=True)
class Contract:
    """How a qualifying op runs under the contract: ``pinned`` knobs (value -> why), whether it reads CLS
    attention (``attention``) or the prompt (``text``: optional, see docs: vLLM's encoder cache is keyed by the
    image, so the plugin runs these text-free)."""

    pinned: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    attention: bool = False
    text: bool = False


CONTRACT: dict[str, Contract] = {
    "cdpruner": Contract(text=True),
    "divprune": Contract(),
    "holov": Contract(pinned={
        "overflow": ("refill", "'drop' keeps a data-dependent count when a crop's quota exceeds its size"),
        "order": ("grid", "'score' emits the kept tokens by crop and attention, not in their input order")},
        attention=True),
    "mmtok": Contract(text=True),
    "random": Contract(),
    "vispruner": Contract(attention=True),
}

REFUSED: dict[str, str] = {
    "visionzip": "its count is fixed, but it merges the remaining tokens into its contextual tokens and emits "
                 "dominant-then-contextual: new embeddings, not a subset of the input",
    "bipartite_merge": "it merges tokens (size-weighted averages): new embeddings, not a subset of the input",
    "prumerge": "it keeps a data-dependent count (IQR outliers of the attention) and merges neighbours into them",
    "prumerge_plus": "it keeps a data-dependent count (IQR outliers of the attention) and merges neighbours into them",
    "avgpool": "it averages k×k windows: new embeddings (the vision tower's own merger is the place for it)",
    "pixel_shuffle": "it concatenates k×k windows along channels: new embeddings of another width",
    "stf": "it fuses k×k windows with learned convolutions: new embeddings and weights the plugin's model lacks",
    "mbtf": "it fuses several encoder blocks per token and keeps every token",
    "resampler": "learned queries attend over the tokens: new embeddings and weights",
    "cotr": "learned queries over several encoders: new embeddings and weights",
    "mke": "it fuses two encoder streams", "cross_merge": "it fuses two encoder streams",
    "concat_channels": "it fuses several encoder streams", "concat_tokens": "it fuses several encoder streams",
}
NOT_KNOBS_HERE = {"streams": "there is one stream (the item's embeddings)",
                  "layer": "the attention you pass is the layer's"}


def contract_methods() -> list[str]:
    """The methods that fit the contract, sorted."""
    return sorted(CONTRACT)


def _qualifying() -> str:
    return ", ".join(contract_methods())


def _check_grid(grid: Any) -> Grid:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(is_int(g) and g >= 1 for g in grid)
    if not ok:
        raise InputError(f"grid={grid!r}; give the item's token grid as (rows, cols) of whole numbers >= 1 (for "
                         f"Qwen2.5-VL: grid_h // spatial_merge_size, grid_w // spatial_merge_size)")
    return int(grid[0]), int(grid[1])


def _plan(method: str, budget: Budget, grid: Any,
          knobs: Mapping[str, Any] | None) -> tuple[type, Contract, dict, Grid]:
    """(op class, its contract, its constructor knobs, grid) for ``method`` under ``budget``; refusals here."""
    if not isinstance(method, str):
        raise ConfigError(f"method={method!r}; name a token op that fits the vLLM contract: {_qualifying()}")
    if method not in TOKEN_OPS:
        where = (f"'{method}' is a layer policy: it prunes inside the LLM's decoder loop, which vLLM's model runner "
                 f"owns" if method in POLICIES else f"unknown method '{method}'")
        raise ConfigError(f"{where}; the vLLM contract takes a pre-LLM selection: {_qualifying()}")
    cls = TOKEN_OPS.get(method)
    name = cls.name  # canonical (self_merge -> bipartite_merge, token_concat -> pixel_shuffle)
    if name not in CONTRACT:
        why = REFUSED.get(name, "it is not a fixed-count selection of the input tokens")
        raise ConfigError(f"{method} cannot map onto vLLM's placeholder contract: {why}; the methods that fit "
                          f"(fixed count known before the features, kept tokens a subset in input order) are: "
                          f"{_qualifying()}")
    if not isinstance(budget, Budget):
        raise ConfigError(f"{method}: budget={budget!r}; give a compactvl.schedules.Budget, e.g. Budget(tokens=64) "
                          f"or Budget(fraction=0.25)")
    h, w = _check_grid(grid)
    spec = CONTRACT[name]
    made = cls.budget_knobs(budget, h * w)
    own = dict(knobs or {})
    for k, why in NOT_KNOBS_HERE.items():
        if k in own:
            raise ConfigError(f"{method}: knob '{k}' does not apply under the vLLM contract ({why}); drop it")
    clash = sorted(set(own) & set(made))
    if clash:
        raise ConfigError(f"{method}: knob(s) {', '.join(clash)} set the kept count, which comes from budget="
                          f"{budget}; drop them and give the budget only")
    for k, (value, why) in spec.pinned.items():
        if k in own and own[k] != value:
            raise ConfigError(f"{method}: {k}={own[k]!r} breaks the vLLM contract ({why}); the contract runs it "
                              f"with {k}={value!r}")
        own[k] = value
    if name == "random" and own.get("seed", 0) is None:
        raise ConfigError("random: seed=None draws new scores on every call, so a cached or recomputed item would "
                          "keep other tokens; give seed=<int> (default 0)")
    allowed = set(cls.knobs())
    unknown = sorted(set(own) - allowed)
    if unknown:
        raise ConfigError(f"{method} has no knob {', '.join(map(repr, unknown))}; its knobs are: "
                          f"{', '.join(sorted(allowed - set(NOT_KNOBS_HERE) - set(made)))}")
    return cls, spec, {**own, **made}, (h, w)


def retained_count(method: str, budget: Budget, grid: Grid, knobs: Mapping[str, Any] | None = None) -> int:
    """Tokens ``method`` keeps from one image whose tokens form ``grid`` (rows, cols), under ``budget``, before any
    feature is seen: the number of placeholder tokens the vLLM processor must emit for the image. ``knobs``: the
    method's own other knobs (e.g. ``{"important_ratio": 0.75}`` for VisPruner). ConfigError for a method that does
    not fit, naming those that do."""
    cls, _, kn, (h, w) = _plan(method, budget, grid, knobs)
    op: StreamOp = cls([1], **kn)  # the count does not depend on the channel width
    k = op.tokens_out(h * w, (h, w))
    if k is None:  # CONTRACT lists only ops with a count known in advance; a changed op must fail loudly
        raise CompactVLError(f"{method}: the op no longer declares its kept count in advance (tokens_out is None); "
                             f"remove it from compactvl.serve.vllm_contract.CONTRACT")
    return int(k)


@dataclass
class _GivenEncoder:
    """An EncoderOutputLike over the attention the caller passes (one layer: the op's ``layer`` knob is refused)."""

    features: dict[int, Tensor]
    grid: Grid
    given: Tensor  # [B, heads, N]
    attention_substitute: bool = False
    cls: Tensor | None = None

    def attention(self, layer: int) -> Tensor:
        return self.given

    def keys(self, layer: int) -> Tensor:  # read by attention_and_keys; VisPruner and HoloV do not use the keys
        return self.features[0]


def _batched(x: Tensor | None, item_dims: int, name: str, shape: str, B: int, single: bool) -> Tensor | None:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    given = tuple(x.shape)
    x = x.unsqueeze(0) if single else x
    if x.dim() != item_dims + 1 or x.shape[0] != B:
        raise InputError(f"{name} has shape {given}; expected {shape} with the features' batch ({B})")
    return x


def retention_mask(method: str, features: Tensor, grid: Grid, budget: Budget, *,
                   knobs: Mapping[str, Any] | None = None, attention: Tensor | None = None,
                   attention_substitute: bool = False, text: Tensor | None = None,
                   text_mask: Tensor | None = None) -> Tensor:
    """Boolean mask over the tokens of ``features`` (``[N, C]`` one item, as vLLM's per-item embeddings, or
    ``[B, N, C]``; row-major over ``grid``, N = rows·cols) with exactly :func:`retained_count` True entries per item,
    chosen by the registered compactvl op on these features: ``features[mask]`` equals the op's output.

    Context, for the methods that read it: ``attention`` (VisPruner, HoloV; required) the CLS→patch attention of the
    encoder layer, ``[heads, N]`` / ``[N]`` per item (``[B, ...]`` batched), or the mean attention each patch
    receives with ``attention_substitute=True`` (encoders without CLS, e.g. Qwen2.5-VL's); ``text`` / ``text_mask``
    (CDPruner, MMTok; optional) the prompt embeddings ``[T, C]`` (``[B, T, C]``), same width as the features —
    without them these ops fall back to their text-free rule. Passing context a method does not read is an error."""
    cls, spec, kn, (h, w) = _plan(method, budget, grid, knobs)
    if not isinstance(features, Tensor) or features.dim() not in (2, 3):
        raise InputError(f"{method}: features must be a tensor [N, C] (one item) or [B, N, C], got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    single = features.dim() == 2
    x = features.unsqueeze(0) if single else features
    B, N, C = x.shape
    if N != h * w:
        raise InputError(f"{method}: grid {h}x{w} has {h * w} cells but the features hold {N} tokens; pass the "
                         f"item's embeddings in row-major order over its grid")
    if attention is not None and not spec.attention:
        raise InputError(f"{method} does not read attention; drop attention= (only VisPruner and HoloV read it)")
    if text is not None and not spec.text:
        raise InputError(f"{method} does not read the prompt; drop text= (only CDPruner and MMTok read it)")
    encoders = []
    if spec.attention:
        if attention is None:
            raise InputError(f"{method} ranks tokens by the encoder's CLS attention; pass attention=[heads, N] per "
                             f"item (or the mean attention each patch receives, with attention_substitute=True)")
        a = attention.unsqueeze(-2) if isinstance(attention, Tensor) and attention.dim() == (1 if single else 2) \
            else attention
        a = _batched(a, 2, "attention", "[heads, N] per item or [B, heads, N]", B, single)
        if a.shape[-1] != N:
            raise InputError(f"{method}: attention covers {a.shape[-1]} tokens but the features hold {N}")
        encoders = [_GivenEncoder({0: x}, (h, w), a, bool(attention_substitute))]
    tx = _batched(text, 2, "text", "[T, C] per item or [B, T, C]", B, single)
    tm = _batched(text_mask, 1, "text_mask", "[T] per item or [B, T]", B, single)
    op = cls([C], **kn)
    with torch.no_grad():
        out = op([Tokens.from_grid(x, (h, w), layer=0)], OpContext(encoders=encoders, text=tx, text_mask=tm))[0]
    mask = out.assign >= 0  # [B, N]: the patches some output token holds
    k = retained_count(method, budget, (h, w), knobs)
    counts = mask.sum(1)
    holds_one = bool((out.size[out.mask] == 1).all())
    if not bool((counts == k).all()) or not bool((out.kept_counts() == k).all()) or not holds_one:
        raise CompactVLError(f"{method} kept {counts.tolist()} tokens but declared {k}, or merged tokens; it no "
                             f"longer fits the vLLM contract (remove it from CONTRACT)")
    order = out.assign.masked_select(mask).view(B, k)
    if not torch.equal(order, torch.arange(k, device=order.device).expand(B, k)):
        raise CompactVLError(f"{method} emits its kept tokens out of their input order; a mask cannot say that")
    return mask[0] if single else mask
