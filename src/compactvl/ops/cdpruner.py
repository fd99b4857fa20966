"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs").

Keep the k tokens that (approximately) maximise det(L_S) of a conditional DPP kernel (paper Sec. 3):

1. Similarity: S = X̂ X̂ᵀ, the cosine similarity of a sample's valid tokens (X̂: features L2-normalised).
2. Relevance to the instruction: with T̂ the L2-normalised text embeddings (the valid ones, ``text_mask``),
   r_i = mean_t(−cos(x_i, t)) — the reference *negates* the similarity (its authors, issue #14: seen "only in
   CLIP (as used in LLaVA)"; ``negate=False`` uses +cos) — then min–max normalised: q_i = (r_i − min r + 1e-6) /
   (max r − min r). Optional weighting (the reference's commented-out ``theta``): q_i ← exp(α q_i),
   α = θ / (2(1 − θ)).
3. Kernel: L = diag(q) · S · diag(q), i.e. L_ij = q_i S_ij q_j.
4. Greedy MAP inference (fast Cholesky-update greedy, Chen et al., NeurIPS 2018): d_i² = L_ii; k times: j =
   argmax d²; e = (L_j· − Σ_t c_t[j] c_t) / d_j; c_step = e; d² −= e²; d²_j = −∞.
5. The kept tokens stay in their original order (the reference sorts the selected indices).

Reference: github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``
(similarity, relevance, kernel, greedy) and ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.forward`` (image and text embeddings). Documented differences:

- features: the reference builds S from the *projected* tokens (after mm_projector) and the relevance from CLIP's
  joint embedding space (``visual_projection(post_layernorm(patches))`` against the CLIP text tower's embedding of
  each 77-token chunk of the question). compactvl's token ops run before the projector and get the prompt as the
  LLM's input embeddings (``OpContext.text`` [B, T, D], ``text_mask``), so S uses the tokens' own features and the
  relevance compares the tokens with each valid prompt token embedding — only possible when D equals the tokens'
  width C. Where D ≠ C (no shared space: the usual case with an LLM wider than the encoder), or there is no text
  (``OpContext.text`` is None; the reference has no text-free path), or a sample's prompt is empty, the relevance
  is q = 1 — plain DPP on the cosine kernel — and the output's ``notes`` say so (said once per model).
- min–max: the reference normalises over the whole [B, N] relevance tensor (one min/max for the batch; its
  LLaVA-1.5 runs have B = 1, LLaVA-NeXT's crops of one image share it); compactvl normalises per sample over its
  valid tokens, so the result does not depend on the batch. Where max r = min r (e.g. one token) the reference
  divides by zero; compactvl uses q = 1.
- numerically exhausted kernel (rank < k: fewer channels than k, duplicate tokens): once the best remaining gain
  d²_j ≤ 1e-5 · max_i L_ii the reference would divide by ~0 (NaN/inf); compactvl stops the updates for that sample
  and picks its remaining tokens by descending q (ties toward the lower index). Exactly k distinct tokens are kept.
- ties in argmax break toward the lower index (as ``torch.argmax``); padding (``mask``) is never a candidate.
- count: the reference's ``visual_token_num`` is a count; ``ratio`` (fraction per image, kept(n, ratio), round half
  up) is compactvl's addition for budgets on images of varying n.

Batched: one [B, N, N] kernel, one loop over the k greedy steps (vectorised over the batch; samples with different
valid counts and different k via masks; gather/scatter only, so no host sync inside the loop), O(k² · N) per sample
on top of the kernel's O(N² · C). Its share of the LLM prefill: ``compactvl bench --op cdpruner:tokens=64``.
Knobs: ``count`` (tokens kept per image, ≥ 1; default 64, the README's MME example — the reference's own
``--visual_token_num`` default, 576, keeps all) or ``ratio`` (fraction kept per image, (0, 1]) — give one; ``theta``
(None: the reference's default, q as above; θ in [0, 1): q ← exp(θ/(2(1−θ)) · q); θ = 0 gives plain DPP);
``negate`` (True: the reference's −cos); ``streams``.
No parameters. Expected tokens: ``min(count, n)`` or ``kept(n, ratio)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..tokens import Tokens
from .base import CountOrRatioOp, OpContext, empty_prompt_note, no_text_note, prompt_text, register

DEFAULT_COUNT = 64  # the README's MME example (``mme.sh 64``); the reference has no default below 576
EXHAUSTED = 1e-5  # a gain d² ≤ EXHAUSTED · max_i L_ii counts as zero (the kernel's rank is used up)
FALLBACK = "it used relevance 1 (plain DPP on the tokens' cosine similarity, without the instruction condition)"
NOTE_NO_TEXT = no_text_note("cdpruner", FALLBACK)
NOTE_EMPTY = empty_prompt_note("cdpruner", FALLBACK)


def relevance(xn: Tensor, mask: Tensor, text: Tensor, text_mask: Tensor, negate: bool) -> tuple[Tensor, Tensor]:
    """([B,N] min–max normalised relevance q, [B] bool: the sample had prompt text) of unit tokens ``xn`` [B,N,C]
    to the prompt ``text`` [B,T,C] (valid where ``text_mask``)."""
    tn = F.normalize(text.to(xn.dtype), dim=-1)
    cos = xn @ tn.transpose(1, 2)  # [B, N, T]
    tm = text_mask.to(xn.dtype)[:, None, :]
    has = text_mask.any(1)
    r = (cos * tm).sum(-1) / tm.sum(-1).clamp_min(1)  # mean over the valid text embeddings
    r = -r if negate else r
    lo = r.masked_fill(~mask, float("inf")).amin(1, keepdim=True)
    hi = r.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
    span = hi - lo
    ok = has[:, None] & (span > 0)
    q = torch.where(ok, (r - lo + 1e-6) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(r))
    return q, has


def dpp_greedy_keep(xn: Tensor, q: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """[B,N] bool: the ``k [B]`` tokens per sample picked by fast greedy MAP inference (Chen et al. 2018) of the DPP
    with kernel L = diag(q)·(xn xnᵀ)·diag(q); ``xn [B,N,C]`` unit features, ``q [B,N]`` relevance."""
    B, N, _ = xn.shape
    q = q.masked_fill(~mask, 0.0)
    kernel = q[:, :, None] * (xn @ xn.transpose(1, 2)) * q[:, None, :]  # [B, N, N]
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i² = L_ii
    tol = EXHAUSTED * d2.amax(1)  # [B]
    d2 = d2.masked_fill(~mask, float("-inf"))
    steps = int(k.max()) if k.numel() else 0
    cis = xn.new_zeros(steps, B, N)
    picks = torch.full((B, steps), N, dtype=torch.long, device=xn.device)  # N: a spare column, "no pick"
    done = torch.zeros(B, dtype=torch.bool, device=xn.device)
    q_left = q.masked_fill(~mask, float("-inf"))  # relevance of the tokens not picked yet (the exhausted fallback)
    # one pass per greedy step, vectorised over the batch; gather / scatter (no boolean or two-tensor indexing):
    # no host sync and few kernels per step
    for i in range(steps):
        best = d2.max(1)
        done = done | (best.values <= tol)  # numerically exhausted: pick the rest by relevance
        j = torch.where(done, q_left.argmax(1), best.indices)
        picks[:, i] = torch.where(i < k, j, N)  # samples past their own k pick nothing
        if i == steps - 1:  # the last pick needs no update
            break
        jj = j[:, None]
        q_left.scatter_(1, jj, float("-inf"))
        upd = ~done  # where not done, j = argmax d² and d²_j = best.values > tol
        dj = torch.where(upd, best.values, 1.0)
        c_j = cis[:i].gather(2, jj[None].expand(i, B, 1)).squeeze(2)  # [i, B]: c_t[j] of every earlier step
        l_j = kernel.gather(1, jj[:, :, None].expand(B, 1, N)).squeeze(1)  # [B, N]: row j of L
        e = (l_j - torch.einsum("tb,tbn->bn", c_j, cis[:i])) / torch.sqrt(dj)[:, None]
        e = torch.where(upd[:, None], e, 0.0)
        cis[i] = e
        d2.sub_(e.square())
        d2.scatter_(1, jj, float("-inf"))
    chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=xn.device).scatter_(1, picks, True)
    return chosen[:, :N].contiguous()


@register("cdpruner")
class CDPruner(CountOrRatioOp):
    def __init__(self, in_channels: list[int], *, count: int | None = None, ratio: float | None = None,
                 theta: float | None = None, negate: bool = True, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.set_budget(count, ratio, default_count=DEFAULT_COUNT)
        if theta is not None and not (isinstance(theta, (int, float)) and not isinstance(theta, bool)
                                      and math.isfinite(theta) and 0 <= theta < 1):
            raise ConfigError(f"cdpruner: theta={theta!r} is out of range; use a number in [0, 1) (relevance weight "
                              "α = θ/(2(1−θ)); 0 = plain DPP) or null for the reference's default (no weighting)")
        if not isinstance(negate, bool):
            raise ConfigError(f"cdpruner: negate={negate!r} must be true (the reference's −cos relevance) or false")
        self.theta = None if theta is None else float(theta)
        self.negate = negate

    def relevance(self, t: Tokens, xn: Tensor, ctx: OpContext) -> tuple[Tensor, Tokens]:
        """[B,N] q (after ``theta``) and the tokens, with a note where the relevance fell back to 1."""
        B, N, C = xn.shape
        text, tm, note = prompt_text("cdpruner", ctx, B, C, xn.device, FALLBACK)
        if note is not None:
            t = t.with_note(note)
        q = xn.new_ones(B, N) if text is None else relevance(xn, t.mask, text, tm, self.negate)[0]
        if self.theta is not None:
            q = torch.exp(self.theta / (2 * (1 - self.theta)) * q)
        return q, t

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        x = t.x.float() if t.x.dtype in (torch.float16, torch.bfloat16) else t.x
        xn = F.normalize(x, dim=-1)
        q, t = self.relevance(t, xn, ctx)
        return t.keep(dpp_greedy_keep(xn, q, t.mask, self.counts(t.kept_counts())))

