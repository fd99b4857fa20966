"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024 (arXiv:2403.06764).

Definition. At layer K, rank the visual tokens by the attention they receive in layer K-1, averaged over heads, keep
the top ``keep`` fraction (the paper drops R = 1 - keep) and run layers K..L-1 on the kept visual tokens plus every
text token:

    s_j = 1/H Σ_h  A^{(K-1)}_h[q, j]          (j visual; A = softmax(q·kᵀ/√d) of layer K-1 on its input)
    keep_j  ⇔  j ∈ top-⌊n·keep⌋ of s          (per sample, n = its visual tokens; at least 1)

Which queries. The paper says "the average attention score one token received from all other tokens"; the
released code (pkunlp-icler/FastV, ``fastv_forward`` / the in-place variant) takes row ``[-1]`` of the head-averaged
attention, i.e. only the LAST token of the prompt as query. We default to the code (``query="last"``): it is what
produced the paper's numbers and costs one query row. ``query="all"`` averages over every real token of the prompt
(rows where j is in a query's causal future contribute 0, as in the full matrix).

The score rows come from layer K-1's own q/k projections on the hidden state entering K-1 (``scores.py``), so SDPA
stays on in every layer. Positions follow the Runner's policy (the in-place reference keeps the original position
ids, i.e. ``keep``). Decoding never prunes.

Reference fidelity (checked in ``tests/test_fidelity_inllm.py`` against a transcription of
``src/transformers/src/transformers/models/llama/modeling_llama.py``, ``LlamaModel.forward`` (the attention-mask
variant) and ``src/FastV/lmms-eval-with-kvcache/fastv_kvcache.py``, ``FastVLlamaModel.forward`` (the token-drop
variant)):

* layer convention: the code prunes at 0-based decoder index ``AGG_LAYER`` = K with ``layer_outputs[1]``, the eager
  attention of layer K-1 on its input — same K here (0-based, tokens dropped before layer K). Matched.
* score: ``mean(dim=1)`` over heads of the full-width softmax (every key of the causal row), row ``[-1]`` (the last
  prompt token), the image columns. Matched (``query="last"``; ``query="all"`` is an option, see above).
* count: the code's ``fast_v_attention_rank`` is a count (``count`` here, matched); its kv-cache variant turns a
  ratio into ``int(576 * ratio)``, i.e. rounds DOWN. Default ``rounding="floor"`` (``int(n·keep)``, matched);
  ``rounding="half_up"`` is the project's ⌊n·keep + ½⌋ rule. Both keep at least 1 visual token (the code's
  ``topk(0)`` would keep none).
* token order / positions: kept rows are re-sorted into their original order (``keep_indexs.sort()``) and keep their
  original position ids (``position_ids = keep_indexs``; the mask variant never moves a token): reference position
  policy ``keep``. Matched.
* ties: ``torch.topk`` order is unspecified; here ties go to the earlier slot (random inputs have none).
* layout: the code runs batch 1 with one image at ``[SYS_LENGTH, SYS_LENGTH + IMAGE_TOKEN_LENGTH)``; here each
  sample uses its own visual rows (any layout, batched with padding).

Knobs: ``layer`` K (default 2, as in the paper; 1 <= K <= L-1), ``keep`` (fraction in (0, 1], default 0.5 = R 50%)
or ``count`` (visual tokens kept, like the reference's ``fast_v_attention_rank``), ``query`` ("last" | "all"),
``rounding`` ("floor" | "half_up", default "floor"). MACs schedule (:meth:`FastV.macs_schedule`): layers before K see
every token, layers K.. see kept(n, keep) visual tokens (with the same rounding) — ``schedule_for("fastv", L, visual,
text, layer=K, keep=keep, rounding=...)``. Budget: ``keep=f`` → ``keep``, ``tokens=k`` → ``count``. Reference
position policy: ``keep`` (the in-place variant keeps the original positions).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import RunState
from ..schedules import Budget, Schedule, made, parse_fraction, parse_layers
from .base import ScorePolicy, _is_int, check_rounding, kept_count
from .scores import attention_received, check_attention_layer, last_token_mask

QUERIES = ("last", "all")


@POLICIES.register("fastv")
class FastV(ScorePolicy):
    method = "fastv"
    layers_knob = "layer"
    score_offset = 1  # attention of layer K-1, on the state entering K-1
    reference_positions = "keep"
    macs_help = ("FastV (Chen et al. 2024): layers before K see every token; layers K.. see the kept fraction of "
                 "visual tokens")
    macs_knobs = {"layer": "K, the first pruned layer (default 2)",
                  "keep": "fraction of visual tokens kept from layer K on (default 0.5)",
                  "rounding": "fraction -> count: floor (the reference code's int(n·keep), default) or half_up"}

    def __init__(self, layer: int = 2, keep: Any = None, count: Any = None, query: str = "last",
                 rounding: str = "floor"):
        if not _is_int(layer):
            raise ConfigError(f"fastv: layer={layer!r} must be one layer index K (the first pruned layer), e.g. 2")
        if query not in QUERIES:
            raise ConfigError(f"fastv: query={query!r}; use 'last' (the reference code: last prompt token) or 'all' "
                              f"(the paper's wording: every token)")
        if keep is None and count is None:
            keep = 0.5
        super().__init__(layers=layer, keep=keep, count=count, relative_to="input")
        self.layer, self.query = layer, query
        self.rounding = check_rounding(self.method, rounding)

    def check(self, runner) -> None:
        super().check(runner)
        check_attention_layer(runner, self.layer - 1, self.method)

    def score(self, layer_idx: int, state: RunState, runner) -> Tensor:
        queries = last_token_mask(state) if self.query == "last" else state.prompt()
        return attention_received(runner, layer_idx, state, queries)

    def schedule_knobs(self) -> dict[str, Any]:
        """Knobs for ``measure.macs.schedule_for("fastv", ...)`` (ratio mode only)."""
        if self.keep is None:
            raise ConfigError("fastv: count mode has no fraction schedule; build the schedule from keep=<fraction>")
        return {"layer": self.layer, "keep": self.keep[0], "rounding": self.rounding}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        return {"count": budget.tokens} if budget.tokens is not None else {"keep": budget.fraction}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layer: Any = 2, keep: Any = 0.5,
                      rounding: str = "floor") -> Schedule:
        ks = parse_layers("fastv", "layer", layer, 1, num_layers - 1)
        if len(ks) != 1:
            raise ConfigError(f"fastv: --layer takes one layer index K, got {layer!r}")
        k = ks[0]
        f = parse_fraction("fastv", "keep", keep)
        rounding = check_rounding("fastv", rounding)
        return made("fastv", [visual] * k + [kept_count(visual, f, rounding)] * (num_layers - k), visual, text,
                    layer=k, keep=f, rounding=rounding)
