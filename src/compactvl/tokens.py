"""Tokens: the value that flows from the vision encoders to the projector (docs/design.md, "The one picture").

A :class:`Tokens` holds, for a batch, the token features and everything needed to reason about where they came from:

- ``x [B,N,C]`` features; ``mask [B,N]`` valid tokens. Samples may keep different counts; valid tokens are always
  *left-packed* (a sample's ``n`` valid tokens sit at positions ``0..n-1``), which every op relies on.
- ``pos [B,N,2]`` row/col of the token centre in the coordinates of the source grid ``grid0`` (size-weighted mean
  of the patches it stands for); ``size [B,N]`` how many original patches it stands for (float: soft ops such as
  query resamplers spread a patch over several tokens).
- ``assign [B,N0]`` provenance: for every original patch, the index of the current token holding it, or -1 once
  pruned. Every op maps its input tokens to output slots (``dest``) and composes ``assign`` through that map, so
  :meth:`Tokens.unmerge` gathers back to the original grid after any composition of ops (ToMe's unmerge).
- ``grid`` the current (h, w) while tokens still form a full row-major grid, else ``None``.

Ops build new ``Tokens`` with three primitives: :meth:`Tokens.regroup` (merge/prune by a destination map, size
weighted), :meth:`Tokens.select` (keep by index) and :func:`cat` (sequence concatenation of streams). None loops over
samples; per-sample counts come from masks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import InputError

Grid = tuple[int, int]


class EncoderOutputLike(Protocol):
    """What ops read from an encoder (compactvl.encoders.base.EncoderOutput provides it)."""

    features: dict[int, Tensor]  # layer -> [B, N, C] patch tokens, row-major over ``grid``
    grid: Grid
    cls: Tensor | None
    attention_substitute: bool  # True: ``attention`` is mean attention received (no CLS token)

    def attention(self, layer: int) -> Tensor: ...  # [B, heads, N] CLS -> patch attention

    def keys(self, layer: int) -> Tensor: ...  # [B, N, Ck]


def grid_positions(grid: Grid, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[h*w, 2] (row, col) of every cell of a row-major grid."""
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], -1).to(dtype)


def rescale_pos(pos: Tensor, src: Grid, dst: Grid) -> Tensor:
    """Cell-centre coordinates of grid ``src`` expressed in grid ``dst`` (cell i covers [i-0.5, i+0.5])."""
    scale = pos.new_tensor([dst[0] / src[0], dst[1] / src[1]])
    return (pos + 0.5) * scale - 0.5


def scatter_mean(values: Tensor, dest: Tensor, n_out: int, weight: Tensor) -> Tensor:
    """Weighted mean of ``values [B,N,...]`` into ``n_out`` slots by ``dest [B,N]`` (-1 = drop).

    Weights are normalised per slot *before* summing, so a slot fed by one token copies it bit-exactly."""
    B, N = dest.shape
    d = torch.where(dest >= 0, dest, n_out)
    w = torch.where(dest >= 0, weight, torch.zeros_like(weight))
    total = w.new_zeros(B, n_out + 1).scatter_add_(1, d, w)
    w = (w / total.gather(1, d).clamp_min(torch.finfo(w.dtype).tiny)).to(values.dtype)
    shape = (B, N) + (1,) * (values.dim() - 2)
    idx = d.view(shape).expand_as(values)
    out = values.new_zeros((B, n_out + 1) + values.shape[2:])
    return out.scatter_add_(1, idx, values * w.view(shape))[:, :n_out]


def pack_dest(keep: Tensor) -> tuple[Tensor, int]:
    """Slots that left-pack the tokens where ``keep [B,N]`` is True, in their order; -1 elsewhere."""
    slot = keep.long().cumsum(1) - 1
    return torch.where(keep, slot, -1), int(keep.sum(1).max()) if keep.numel() else 0


def mask_to_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L]`` bool -> slot indices ``[B, Q]`` of the True entries in order (Q = largest count), and validity."""
    counts = mask.sum(-1)
    Q = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~mask).long(), dim=-1, stable=True).indices[:, :Q]
    valid = torch.arange(Q, device=mask.device) < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def rank_keep(scores: Tensor, mask: Tensor, k: Tensor | int) -> Tensor:
    """[B,N] bool: the ``k`` (per sample) highest-scoring valid tokens. Ties break toward the lower index."""
    s = scores.masked_fill(~mask, float("-inf"))
    order = s.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    k = torch.as_tensor(k, device=s.device).reshape(-1, 1)
    return (rank < k) & mask


def floor_count(ratio: float, n: Tensor) -> Tensor:
    """floor(ratio * n) per sample, robust to float error (0.3 * 70 -> 21, not 20)."""
    return torch.floor(ratio * n.double() + 1e-6).long()


@dataclass(eq=False, slots=True)
class Tokens:
    x: Tensor  # [B, N, C]
    mask: Tensor  # [B, N] bool, left-packed
    pos: Tensor  # [B, N, 2] float, in grid0 coordinates
    size: Tensor  # [B, N] float, patches represented
    assign: Tensor  # [B, N0] long, current token holding each original patch, -1 if pruned
    grid0: Grid
    grid: Grid | None
    aux_loss: Tensor | None = None
    layer: int | None = None  # encoder tap the tokens were read from
    source: int = 0  # index of the encoder (OpContext.encoders) whose grid0 ``assign``/``pos`` refer to
    prop_attn: bool = False  # consumers should add :meth:`attn_bias` to attention logits (ToMe)
    notes: tuple[str, ...] = ()  # what ops want the user to know (e.g. a substitute for CLS attention)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_grid(cls, x: Tensor, grid: Grid, layer: int | None = None, source: int = 0) -> "Tokens":
        if x.dim() != 3:
            raise InputError(f"token features must be [batch, tokens, channels], got shape {tuple(x.shape)}; "
                             "reshape a feature map [B,C,h,w] with x.flatten(2).transpose(1, 2)")
        B, N, _ = x.shape
        if B == 0:
            raise InputError("empty batch: got 0 samples; pass at least one image")
        h, w = grid
        if h * w != N:
            raise InputError(f"grid {h}x{w} has {h * w} cells but the features hold {N} tokens; pass patch "
                             "tokens only (drop CLS/register tokens) and the grid the encoder produced")
        pos = grid_positions(grid, x.device).expand(B, N, 2)
        return cls(x, torch.ones(B, N, dtype=torch.bool, device=x.device), pos,
                   torch.ones(B, N, device=x.device), torch.arange(N, device=x.device).expand(B, N),
                   (h, w), (h, w), layer=layer, source=source)

    @classmethod
    def from_encoder(cls, out: EncoderOutputLike, layer: int, source: int = 0) -> "Tokens":
        if layer not in out.features:
            raise InputError(f"the encoder output has no features for layer {layer} (it has "
                             f"{sorted(out.features)}); ask the encoder for that tap "
                             "(TokenPipeline.required_layers lists what the ops need)")
        return cls.from_grid(out.features[layer], tuple(out.grid), layer=layer, source=source)

    def replace(self, **changes: Any) -> "Tokens":
        return dataclasses.replace(self, **changes)

    def with_note(self, note: str) -> "Tokens":
        return self if note in self.notes else self.replace(notes=self.notes + (note,))

    # ---- reading ------------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def kept_counts(self) -> Tensor:
        """LongTensor[B]: valid tokens per sample."""
        return self.mask.sum(1)

    def unmerge(self, x: Tensor | None = None) -> Tensor:
        """[B,N0,C]: every original patch gets the features of the token holding it (zeros if pruned)."""
        x = self.x if x is None else x
        idx = self.assign.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.gather(1, idx) * (self.assign >= 0).unsqueeze(-1).to(x.dtype)

    def pool_patches(self, values: Tensor, reduce: str = "sum") -> Tensor:
        """Per-patch ``values [B,N0,...]`` (e.g. CLS attention, keys) summed or averaged into current tokens."""
        B, N = self.mask.shape
        if self.grid is not None and self.grid == self.grid0 and N == self.assign.shape[1]:
            return values  # still the encoder's own grid: assign is the identity
        ones = torch.ones(self.assign.shape, dtype=torch.float32, device=values.device)
        if reduce == "sum":
            d = torch.where(self.assign >= 0, self.assign, N)
            shape = d.shape + (1,) * (values.dim() - 2)
            out = values.new_zeros((B, N + 1) + values.shape[2:])
            return out.scatter_add_(1, d.view(shape).expand_as(values), values)[:, :N]
        return scatter_mean(values, self.assign, N, ones)

    def attn_bias(self) -> Tensor:
        """[B,N] log(size) for proportional attention (ToMe eq. 5: softmax(qkᵀ/√d + log s)); -inf at padding."""
        return self.size.clamp_min(1e-6).log().masked_fill(~self.mask, float("-inf"))

    # ---- building new tokens ------------------------------------------------------------------------------
    def _compose(self, dest: Tensor) -> Tensor:
        dest = torch.where(self.mask, dest, -1)
        return torch.where(self.assign >= 0, dest.gather(1, self.assign.clamp_min(0)), -1)

    def regroup(self, dest: Tensor, n_out: int, x: Tensor | None = None, grid: Grid | None = None) -> "Tokens":
        """Send token i to output slot ``dest[:, i]`` (-1 drops it). Slots average their tokens' features and
        positions weighted by size and add sizes; pass ``x [B,n_out,C']`` to set features directly. Callers
        must keep the valid slots left-packed."""
        valid = self.mask & (dest >= 0)
        dest = torch.where(valid, dest, -1)
        w = self.size * valid
        d = torch.where(valid, dest, n_out)
        size = w.new_zeros(self.size.shape[0], n_out + 1).scatter_add_(1, d, w)[:, :n_out]
        mask = size > 0
        if x is None:
            x = scatter_mean(self.x, dest, n_out, w)
        elif not bool(mask.all()):
            x = x * mask.unsqueeze(-1).to(x.dtype)
        return self.replace(x=x, mask=mask, pos=scatter_mean(self.pos, dest, n_out, w), size=size,
                            assign=self._compose(dest), grid=grid)

    def keep(self, keep: Tensor) -> "Tokens":
        """Keep the tokens where ``keep [B,N]`` is True (in their order, left-packed); a gather, no averaging."""
        K = int(keep.sum(1).max())
        index = (~keep).long().argsort(dim=1, stable=True)[:, :K]
        return self.select(index, torch.arange(K, device=keep.device) < keep.sum(1, keepdim=True))

    def select(self, index: Tensor, valid: Tensor | None = None) -> "Tokens":
        """Keep the tokens at ``index [B,K]`` (``valid [B,K]`` marks real entries; keep them left-packed)."""
        B, K = index.shape
        valid = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
        valid = valid & self.mask.gather(1, index)
        slots = torch.arange(K, device=index.device).expand(B, K)
        dest = torch.full((B, self.mask.shape[1] + 1), -1, dtype=torch.long, device=index.device)
        dest.scatter_(1, torch.where(valid, index, self.mask.shape[1]), torch.where(valid, slots, -1))
        g = lambda t: t.gather(1, index.view(B, K, *([1] * (t.dim() - 2))).expand(B, K, *t.shape[2:]))
        x = g(self.x) if bool(valid.all()) else g(self.x) * valid.unsqueeze(-1).to(self.x.dtype)
        return self.replace(x=x, mask=valid, pos=g(self.pos),
                            size=g(self.size) * valid, assign=self._compose(dest[:, :-1]), grid=None)

    def attend(self, attn: Tensor, x: Tensor) -> "Tokens":
        """Soft-query output: ``attn [B,Q,N]`` (each query's weights over the valid tokens, summing to 1) and the
        queries' features ``x [B,Q,C]``. A token's size is shared among queries in proportion to the weight they
        give it; positions are attention-weighted means; each patch is assigned to the query that weighs its
        token most (resampler, CoTR)."""
        a = attn.float() * self.mask[:, None]
        tiny = torch.finfo(a.dtype).tiny
        size = (a / a.sum(1, keepdim=True).clamp_min(tiny) * self.size[:, None]).sum(-1)
        pos = (a / a.sum(-1, keepdim=True).clamp_min(tiny)) @ self.pos.float()
        B, Q = attn.shape[:2]
        return self.replace(x=x, mask=torch.ones(B, Q, dtype=torch.bool, device=x.device), pos=pos.to(self.pos.dtype),
                            size=size.clamp_min(1e-6).to(self.size.dtype), assign=self._compose(a.argmax(1)),
                            grid=None)


def cat(streams: list[Tokens], x: list[Tensor] | None = None) -> Tokens:
    """Sequence concatenation of streams, per sample, left-packed: [s0 valid, s1 valid, ...].

    Positions of later streams are rescaled into stream 0's grid0 coordinates; provenance (``assign``) follows
    stream 0 (its tokens keep their indices); aux losses add up."""
    xs = [s.x for s in streams] if x is None else x
    C = xs[0].shape[-1]
    if any(t.shape[-1] != C for t in xs):
        raise InputError(f"cannot concatenate token streams with channels {[t.shape[-1] for t in xs]}; "
                         "project them to one width first (e.g. mke's dim knob or a projector)")
    ref = streams[0]
    B = ref.mask.shape[0]
    counts = torch.stack([s.kept_counts() for s in streams], 1)
    offsets = counts.cumsum(1) - counts
    n_out = int(counts.sum(1).max())
    dtype = xs[0].dtype  # streams projected under autocast may differ (bf16 Linear output beside fp32 features)
    for t in xs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out_x = xs[0].new_zeros(B, n_out + 1, C, dtype=dtype)
    pos = ref.pos.new_zeros(B, n_out + 1, 2)
    size = ref.size.new_zeros(B, n_out + 1)
    for i, (s, xi) in enumerate(zip(streams, xs)):
        N = s.mask.shape[1]
        d = torch.where(s.mask, torch.arange(N, device=s.mask.device) + offsets[:, i : i + 1], n_out)
        p = s.pos if s.grid0 == ref.grid0 else rescale_pos(s.pos, s.grid0, ref.grid0)
        out_x.scatter_(1, d.unsqueeze(-1).expand(-1, -1, C), xi.to(dtype))
        pos.scatter_(1, d.unsqueeze(-1).expand(-1, -1, 2), p)
        size.scatter_(1, d, s.size)
    aux = [s.aux_loss for s in streams if s.aux_loss is not None]
    notes = tuple(dict.fromkeys(n for s in streams for n in s.notes))
    return ref.replace(x=out_x[:, :n_out], mask=size[:, :n_out] > 0, pos=pos[:, :n_out], size=size[:, :n_out],
                       grid=None, aux_loss=sum(aux) if aux else None, notes=notes,
                       prop_attn=any(s.prop_attn for s in streams))
