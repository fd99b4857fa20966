"""HoloV (Zou et al., NeurIPS 2025, "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
Context Retention").

Keep k tokens per image spread over C crops by crop-wise adaptive allocation (paper Sec. 4.1; the reference code):

1. Crops: the image's n tokens, in sequence (row-major) order, cut into C contiguous runs — ⌊n/C⌋ tokens each, the
   first n mod C runs one more; empty runs are skipped. (The reference's "crops" are these 1-D runs, not 2-D
   windows: with 576 tokens and C = 16 each crop is 36 tokens, 1.5 rows of the 24×24 grid.)
2. Token score inside a crop c of M > 1 tokens (paper eqs. 1–3): Z = x / (‖x‖ + 1e-6); S = (1 − I) ⊙ Z Zᵀ;
   μ_i = Σ_j S_ij / (M − 1); V_i = Σ_j (S_ij − μ_i)² / (M − 1) (the sum runs over all M columns, the masked
   diagonal included, as the reference); A = 1000 · a (a: CLS→patch attention, mean over heads);
   γ_c = mean|A| / (mean|V| + 1e-6); H = A + α · γ_c · V (α = 0.09).
3. Crop score s_c = mean_i H_i (M > 1), s_c = a of the token, unscaled (M = 1, as the reference);
   w_c = s_c^τ / (Σ_c' s_c'^τ + 1e-6) (paper eq. 4; τ = 1 in the code). Quota q_c = ⌊w_c · k⌋; the k − Σ q_c left
   over go one each to the crops with the largest w (the reference's ``topk`` of the weights).
4. Inside each crop: q_c ≥ M keeps the crop whole; 0 < q_c < M keeps its q_c tokens of largest a (the code ranks by
   attention alone; ``within="holistic"`` ranks by H, as paper eq. 5 writes).
5. Order: crop by crop; a whole crop in its own order, a cut crop by descending attention (the reference
   concatenates per-crop ``topk`` results). ``order="grid"`` keeps the original order.

Overflow (a crop's quota above its size M). The reference code drops the surplus and pads the output with zero
embeddings up to k (after the projector, in the LLM's input space); compactvl's ops run before the projector, so
``overflow="drop"`` (default, the code's selection) keeps only the real tokens: the image keeps ≤ k tokens, a
data-dependent count. ``overflow="refill"`` is the paper's procedure (Sec. 4.1, "iterative reallocation"): the
surplus R goes to the crops with room by Δ_c ∝ w_c · (M_c − q_c), discretised like step 3 (⌊R·d_c/Σd⌋, the rest one
each to the largest d_c), capped at M_c, repeated until R = 0 — exactly min(k, n) tokens, and the same selection as
the code wherever no crop overflows.

Reference: github.com/obananas/HoloV, ``llava/model/utils.py``, ``HoloV(image_tokens, attention, num_patches,
new_image_token_num)`` (LLaVA-1.5, called in ``llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal``
with num_patches=16, new_image_token_num=64; attention from ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.feature_select``: the selected layer's ``attentions[:, :, 0, 1:]``, averaged over heads in
``encode_images``) and ``qwen-model-HoloV/utils.py``, ``HoloV`` (same rule, with ``power`` = τ = 1; crop count
C = max(1, int(1024/576 · n / k)) in ``modeling_qwen2_5_vl.py``, ``forward`` — 16 at n = 576, k = 64, the LLaVA
setting). Documented differences:

- features: the reference computes S on the *projected* tokens (after mm_projector); compactvl's token ops run
  before the projector, so S uses the tokens' own features. Attention and the rule are the reference's.
- overflow: see above (no zero tokens; ``refill`` is the paper's reallocation, absent from the code).
- ties: ``torch.topk`` in the reference leaves the tie order unspecified; compactvl breaks ties toward the lower
  index (crops and tokens).
- ``ratio``: the Qwen code keeps int(n · rate) (floor); compactvl keeps kept(n, ratio) (round half up, ≥ 1).
- images of n < k tokens keep at most n (k ← n).
Encoders without a CLS token: the mean attention each patch receives replaces CLS attention
(``EncoderOutput.attention_substitute``, via prumerge's ``attention_and_keys``, as the Qwen2.5-VL code's mean
received attention); the output's ``notes`` say so. After other ops, per-patch attention is summed into the tokens.

Batched: one [B, N, N] similarity masked to same-crop pairs, per-crop sums by scatter; samples with different valid
counts have their own k, C and crops. Knobs: ``count`` (k per image, ≥ 1; default 64, the reference's
``new_image_token_num``) or ``ratio`` ((0, 1], kept(n, ratio) per image) — give one; ``crops`` (C ≥ 1; None: the
Qwen code's rule above); ``alpha`` (α ≥ 0, 0.09); ``tau`` (τ > 0, 1); ``within`` ("attention" | "holistic");
``overflow`` ("drop" | "refill"); ``order`` ("score" | "grid"); ``layer`` (encoder tap for the attention; default
the tokens' own layer, as the reference's ``mm_vision_select_layer``); ``streams``. No parameters.
Expected tokens: data dependent with ``overflow="drop"`` (≤ min(k, n)); ``min(count, n)`` or ``kept(n, ratio)`` with
``"refill"``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from ..tokens import Grid, Tokens
from .base import CountOrRatioOp, OpContext, check_int, register
from .prumerge import attention_and_keys

DEFAULT_COUNT = 64  # the reference's new_image_token_num (llava_arch.py)
ALPHA = 0.09  # the reference's alpha (LLaVA) / beta (Qwen)
ATTN_SCALE = 1e3  # the reference's patch_attn * 1e3
EPS = 1e-6  # the reference's esp
CROPS_PER_TOKEN = 1024 / 576  # Qwen code: num_patches = max(1, int(1024/576 * n / k))


def crop_ids(n: Tensor, crops: Tensor, N: int) -> Tensor:
    """[B,N] crop of each token: n [B] valid tokens cut into ``crops [B]`` contiguous runs (the first n mod C runs
    one token longer); runs are numbered over the non-empty ones; padding gets -1."""
    j = torch.arange(N, device=n.device)[None]
    base, rem = (n // crops)[:, None], (n % crops)[:, None]
    head = rem * (base + 1)
    seg = torch.where(j < head, j // (base + 1), rem + (j - head) // base.clamp_min(1))
    return torch.where(j < n[:, None], seg, -1)


def _per_crop(v: Tensor, seg: Tensor, S: int) -> Tensor:
    """[B,S] sums of ``v [B,N]`` over each crop (padding, seg = -1, dropped)."""
    d = torch.where(seg >= 0, seg, S)
    return v.new_zeros(v.shape[0], S + 1).scatter_add_(1, d, v)[:, :S]


def _largest(score: Tensor, ok: Tensor, count: Tensor) -> Tensor:
    """[B,S] bool: the ``count [B]`` entries of largest score where ``ok``; ties toward the lower index."""
    s = score.masked_fill(~ok, float("-inf"))
    order = s.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < count[:, None]) & ok


def holov_scores(x: Tensor, a: Tensor, seg: Tensor, S: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """(H [B,N] token scores, crop scores [B,S], crop sizes [B,S]) of HoloV's steps 2–3 (module doc)."""
    valid = seg >= 0
    xf = x.to(a.dtype)  # a is already the wider of the two float types (HoloV.apply)
    z = xf / (xf.norm(dim=-1, keepdim=True) + EPS)
    same = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None]
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    sim = (z @ z.transpose(1, 2)) * (same & ~eye)  # (1 − I) ⊙ Z Zᵀ inside each crop, 0 elsewhere
    m = _per_crop(valid.to(a.dtype), seg, S)
    m_tok = m.gather(1, seg.clamp_min(0))
    denom = (m_tok - 1).clamp_min(1)
    mean = sim.sum(-1) / denom
    var = (((sim - mean[:, :, None]) ** 2) * same).sum(-1) / denom  # the diagonal's (0 − μ)² counts, as the code
    A = a * ATTN_SCALE
    gamma = (_per_crop(A.abs() * valid, seg, S) / m.clamp_min(1)) / (_per_crop(var.abs() * valid, seg, S)
                                                                      / m.clamp_min(1) + EPS)
    H = A + alpha * var * gamma.gather(1, seg.clamp_min(0))
    score = _per_crop(H * valid, seg, S) / m.clamp_min(1)
    score = torch.where(m == 1, _per_crop(a * valid, seg, S), score)  # one-token crop: its attention, unscaled
    return H, score, m


def holov_quota(score: Tensor, m: Tensor, k: Tensor, tau: float, refill: bool) -> Tensor:
    """[B,S] tokens kept per crop (≤ its size ``m``) for ``k [B]`` per sample (module doc, steps 3 and overflow)."""
    live = m > 0
    s = score if tau == 1 else score.clamp_min(0) ** tau
    s = s * live
    w = s / (s.sum(1, keepdim=True) + EPS)
    q = torch.floor(w * k[:, None].to(w.dtype)).long()
    rest = k - q.sum(1)
    q = q + _largest(w, live, rest.clamp_min(0)).long()
    size = m.long()
    q = torch.minimum(q, size)
    if not refill:
        return q
    for _ in range(int(size.sum(1).max()) + 1):  # each round places ≥ 1 token where any are owed
        owed = k - q.sum(1)
        if not bool((owed > 0).any()):
            break
        room = size - q
        d = w * room
        d = torch.where(d.sum(1, keepdim=True) > 0, d, room.to(w.dtype))  # zero weights: by room alone
        share = torch.floor(owed[:, None].clamp_min(0) * d / d.sum(1, keepdim=True).clamp_min(EPS)).long()
        share = torch.minimum(share, room)
        left = (owed - share.sum(1)).clamp_min(0)
        share = share + _largest(d, room - share > 0, left).long()
        q = q + torch.where(owed[:, None] > 0, share, 0)
    return q


def within_rank(key: Tensor, seg: Tensor, m: Tensor) -> Tensor:
    """[B,N] rank of each token inside its crop by descending ``key`` (ties toward the lower index)."""
    B, N = key.shape
    order = key.masked_fill(seg < 0, float("-inf")).argsort(dim=1, descending=True, stable=True)
    sseg = torch.where(seg >= 0, seg, m.shape[1]).gather(1, order)
    order = order.gather(1, sseg.argsort(dim=1, stable=True))  # by crop, inside by descending key
    start = torch.cumsum(m.long(), 1) - m.long()
    pos = torch.arange(N, device=key.device).expand(B, N)
    seg_sorted = seg.gather(1, order)
    r = pos - start.gather(1, seg_sorted.clamp_min(0))
    return torch.empty_like(r).scatter_(1, order, r)


@register("holov")
class HoloV(CountOrRatioOp):
    def __init__(self, in_channels: list[int], *, count: int | None = None, ratio: float | None = None,
                 crops: int | None = None, alpha: float = ALPHA, tau: float = 1.0, within: str = "attention",
                 overflow: str = "drop", order: str = "score", layer: int | None = None,
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.set_budget(count, ratio, default_count=DEFAULT_COUNT)
        self.crops = None if crops is None else check_int(crops, "crops", "holov")
        for knob, v, low_open in (("alpha", alpha, False), ("tau", tau, True)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (low_open and v == 0):
                raise ConfigError(f"holov: {knob}={v!r} must be a finite number {'>' if low_open else '>='} 0")
        self.alpha, self.tau = float(alpha), float(tau)
        for knob, v, allowed in (("within", within, ("attention", "holistic")), ("overflow", overflow,
                                 ("drop", "refill")), ("order", order, ("score", "grid"))):
            if v not in allowed:
                raise ConfigError(f"holov: {knob}={v!r} must be one of {', '.join(map(repr, allowed))}")
        self.within, self.overflow, self.order = within, overflow, order
        self.layer = layer

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return [self.layer] if self.layer is not None and stream in self.targets else []

    def crop_counts(self, n: Tensor, k: Tensor) -> Tensor:
        """C per sample: the ``crops`` knob, or the Qwen code's max(1, int(1024/576 · n / k))."""
        if self.crops is not None:
            return torch.full_like(n, self.crops)
        c = torch.floor(CROPS_PER_TOKEN * n.double() / k.clamp_min(1).double()).long()
        return c.clamp_min(1)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        a, _, t = attention_and_keys(t, ctx, self.layer, "holov", "mean")
        up = lambda d: torch.float32 if d in (torch.float16, torch.bfloat16) else d  # noqa: E731
        a = a.to(torch.promote_types(up(a.dtype), up(t.x.dtype)))
        B, N, _ = t.x.shape
        n = t.kept_counts()
        k = self.counts(n)
        seg = crop_ids(n, self.crop_counts(n, k), N)
        S = int(seg.max()) + 1
        a = a.masked_fill(seg < 0, 0)
        H, score, m = holov_scores(t.x, a, seg, S, self.alpha)
        q = holov_quota(score, m, k, self.tau, self.overflow == "refill")
        rank = within_rank(a if self.within == "attention" else H, seg, m)
        sc = seg.clamp_min(0)
        keep = (seg >= 0) & (rank < q.gather(1, sc))
        if self.order == "grid":
            return t.keep(keep)
        whole = (q >= m.long()).gather(1, sc)
        start = (torch.cumsum(m.long(), 1) - m.long()).gather(1, sc)
        j = torch.arange(N, device=a.device).expand(B, N)
        key = torch.where(keep, seg * N + torch.where(whole, j - start, rank), N * N + j)
        nk = keep.sum(1)
        K = int(nk.max())
        index = key.argsort(dim=1, stable=True)[:, :K]
        return t.select(index, torch.arange(K, device=a.device) < nk[:, None])

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return None if self.overflow == "drop" else super().tokens_out(n, grid)
