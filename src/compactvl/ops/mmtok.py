"""MMTok (Dong et al., ICLR 2026, "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs",
arXiv 2508.18264).

Keep the k visual tokens S that greedily maximise a multimodal maximum-coverage (facility-location) objective
(paper Sec. 3): S must cover the prompt's text tokens and the image's own visual tokens,

    f(S) = Σ_t max_{j∈S} P_tj + α · Σ_i max_{j∈S} Q_ij,

1. text–vision coverage: P_tj = softmax_j(cos(z_t, x_j) / τ_tv) / m, for each of the m text tokens z_t a
   distribution over the n visual tokens x_j (cosine: both L2-normalised, norms clamped at 1e-8);
2. vision–vision coverage: Q_ij = softmax_j(cos(x_i, x_j) / τ_vv) / n, for each visual token i a distribution over
   the n visual tokens;
3. greedy (f is monotone submodular: the (1 − 1/e) guarantee): c = 0 over the m + n rows of [P; α·Q]; k times,
   gain_j = Σ_r max(C_rj − c_r, 0) over the not yet selected j, pick j = argmax gain (ties toward the lower index,
   as ``torch.argmax``), then c ← max(c, C_·j);
4. the kept tokens stay in their original order (the reference sorts the selected indices). An image with n ≤ k
   tokens keeps them all.

Reference: github.com/Ironieser/MMTok, ``mmtok/core/semantic_selector.py``,
``SemanticTokenSelector.mm_coverage_selection`` (P, Q, softmaxes, [P; αQ], greedy loop) and
``greedy_merged_jit_kernel`` (the same greedy, TorchScript); ``mmtok/core/mmtok_core.py``,
``MMTokCore.select_vision_tokens`` (per image; n ≤ k keeps all) and ``apply_selection`` (text = the question's
keywords); defaults from ``mmtok/llava/llava_inject.py``, ``mmtok``: 64 tokens, α = 0.5, τ_tv = 0.02, τ_vv = 0.2
(``mmtok/qwen/qwen2_5_vl_mmtok.py`` uses τ_tv = 0.01). Documented differences:

- features: the reference's P compares the *projected* tokens (mm_projector output) with the LLM's input
  embeddings of the question's keywords, and its Q uses the CLIP features (penultimate layer, CLS dropped).
  compactvl's token ops run before the projector, so both P and Q use the tokens' own features, and the text is the
  LLM's prompt embeddings (``OpContext.text`` [B, T, D], valid where ``text_mask``) — P only exists when D equals
  the tokens' width C. Where D ≠ C (the usual case: an LLM wider than the encoder), or there is no text
  (``OpContext.text`` is None), or a sample's prompt is empty, the text term is dropped (vision coverage only:
  greedy facility location on Q) and the output's ``notes`` say so (once per model).
- text: the reference embeds the question with the fixed answer-format prompts and a stopword list removed
  (``mmtok/core/text_processor.py``, ``VQATextProcessor.extract_keywords_simple``), one embedding per word piece,
  no BOS; compactvl's op receives embeddings, not strings, and uses every valid prompt embedding (m = their count).
- padding: compactvl's ``mask`` marks batch padding, which is removed everywhere (candidates, rows, softmax, n).
  The reference's optional ``padding_patch_indices`` (LLaVA-1.5's pad-to-square patches, excluded as candidates
  only) has no counterpart.
- count: the reference's ``target_vision_tokens`` is a count (its Qwen path takes ``int(ratio · n)``, rounding
  down); ``ratio`` keeps ``kept(n, ratio)`` (round half up, at least 1), the project's one fraction→count rule.

Batched: one [B, m + n, n] coverage matrix (padding rows and columns zero), one loop over the k greedy steps
(vectorised over the batch; samples with different valid counts and different k via masks), O(k · (m + n) · n) per
sample on top of the similarities' O((m + n) · n · C).
Knobs: ``count`` (tokens kept per image, ≥ 1; default 64, the reference's ``target_vision_tokens``) or ``ratio``
(fraction kept per image, (0, 1]) — give one; ``alpha`` (weight of the vision–vision coverage, ≥ 0; 0.5);
``tv_temperature`` (τ_tv > 0; 0.02) and ``vv_temperature`` (τ_vv > 0; 0.2); ``streams``.
No parameters. Expected tokens: ``min(count, n)`` or ``kept(n, ratio)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..tokens import Tokens
from .base import CountOrRatioOp, OpContext, empty_prompt_note, no_text_note, prompt_text, register

DEFAULT_COUNT = 64  # llava_inject.mmtok / MMTokCore: target_vision_tokens=64
DEFAULT_ALPHA = 0.5
DEFAULT_TV_TEMPERATURE = 0.02  # LLaVA (llava_inject.mmtok); Qwen2.5-VL uses 0.01
DEFAULT_VV_TEMPERATURE = 0.2
FALLBACK = "it used vision–vision coverage only (the text–vision coverage term was dropped)"
NOTE_NO_TEXT = no_text_note("mmtok", FALLBACK)
NOTE_EMPTY = empty_prompt_note("mmtok", FALLBACK)


def unit(x: Tensor) -> Tensor:
    """L2-normalised rows, the norm clamped at 1e-8 (the reference's ``_l2_normalize``)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def coverage_matrix(xn: Tensor, mask: Tensor, zn: Tensor | None, text_mask: Tensor | None, alpha: float,
                    tv_temperature: float, vv_temperature: float) -> Tensor:
    """[B, m + n, n] = [P; α·Q] of unit tokens ``xn [B,N,C]`` (valid where ``mask``) and unit text ``zn [B,T,C]``
    (valid where ``text_mask``; None: no text rows). Padding rows and columns are 0."""
    dt = xn.dtype
    n = mask.sum(1).clamp_min(1).to(dt)[:, None, None]  # [B,1,1]
    cols = mask[:, None, :]
    q = (xn @ xn.transpose(1, 2) * (1.0 / vv_temperature)).masked_fill(~cols, float("-inf")).softmax(-1)
    q = torch.where(mask[:, :, None] & cols, q / n * alpha, torch.zeros_like(q))  # [B, N, N]
    if zn is None:
        return q
    m = text_mask.sum(1).clamp_min(1).to(dt)[:, None, None]
    p = (zn @ xn.transpose(1, 2) * (1.0 / tv_temperature)).masked_fill(~cols, float("-inf")).softmax(-1)
    p = torch.where(text_mask[:, :, None] & cols, p / m, torch.zeros_like(p))  # [B, T, N]
    return torch.cat([p, q], 1)


def coverage_greedy_keep(cover: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """[B,N] bool: the ``k [B]`` tokens per sample chosen by greedy maximum coverage of the rows of ``cover
    [B, R, N]`` (entries ≥ 0; padding rows and columns 0); padding (``mask``) is never a candidate."""
    B = cover.shape[0]
    best = cover.new_zeros(B, cover.shape[1])  # current coverage of each row
    chosen = torch.zeros_like(mask)
    rows = torch.arange(B, device=cover.device)
    buf = torch.empty_like(cover)  # reused each step: allocating [B, R, N] per step costs more than the arithmetic
    for step in range(int(k.max()) if k.numel() else 0):
        torch.sub(cover, best[:, :, None], out=buf)
        gain = buf.clamp_min_(0).sum(1)  # [B, N]
        pick = gain.masked_fill(~mask | chosen, float("-inf")).argmax(1)  # first maximum: lower index on ties
        active = step < k
        chosen[rows[active], pick[active]] = True
        best = torch.maximum(best, cover[rows, :, pick])
    return chosen


def check_positive(value: Any, knob: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        want = "a finite number ≥ 0" if allow_zero else "a finite number > 0"
        raise ConfigError(f"mmtok: {knob}={value!r} is out of range; use {want}")
    return float(value)


@register("mmtok")
class MMTok(CountOrRatioOp):
    def __init__(self, in_channels: list[int], *, count: int | None = None, ratio: float | None = None,
                 alpha: float = DEFAULT_ALPHA, tv_temperature: float = DEFAULT_TV_TEMPERATURE,
                 vv_temperature: float = DEFAULT_VV_TEMPERATURE, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.set_budget(count, ratio, default_count=DEFAULT_COUNT)
        self.alpha = check_positive(alpha, "alpha", allow_zero=True)
        self.tv_temperature = check_positive(tv_temperature, "tv_temperature")
        self.vv_temperature = check_positive(vv_temperature, "vv_temperature")

    def text(self, t: Tokens, xn: Tensor, ctx: OpContext) -> tuple[Tensor | None, Tensor | None, Tokens]:
        """(unit text [B,T,C] or None, its mask [B,T] or None, the tokens with a note where the text is unused)."""
        B, _, C = xn.shape
        text, tm, note = prompt_text("mmtok", ctx, B, C, xn.device, FALLBACK)
        if note is not None:
            t = t.with_note(note)
        return (None if text is None else unit(text.to(xn.dtype))), tm, t

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        x = t.x.float() if t.x.dtype in (torch.float16, torch.bfloat16) else t.x  # the reference works in float32
        xn = unit(x)
        zn, tm, t = self.text(t, xn, ctx)
        with torch.no_grad():  # a selection: the kept features (t.keep's gather) carry the gradient
            cover = coverage_matrix(xn, t.mask, zn, tm, self.alpha, self.tv_temperature, self.vv_temperature)
            keep = coverage_greedy_keep(cover, t.mask, self.counts(t.kept_counts()))
        return t.keep(keep)

