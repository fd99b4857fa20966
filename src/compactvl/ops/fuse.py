"""Plain multi-encoder fusion: channel concatenation (MMoE-Vision / LEO-MINI Sec. 3.1 "concatenated channel-wise";
also the fusion of Eagle / Cambrian-style mixtures of encoders) and sequence concatenation (VEN-VL Table 11
"w/o merge", the 200% baseline).

``concat_channels``: y[n] = concat_c(x_1[n], ..., x_m[n]). Streams must agree on the token layout: either all have
the same token count with no padding (e.g. after a resampler), or all still form grids — then every stream is
resampled to the first stream's grid (the common grid) with ``F.interpolate(mode=mode)`` before concatenation
(knobs: ``mode`` — "bilinear" (default), "area", "nearest", "bicubic"; ``resample`` — default true, false makes
different grids an error instead). Expected tokens: those of stream 0. Provenance and positions follow stream 0.
``concat_tokens``: the streams' valid tokens one after another per sample (widths must match; positions of later
streams are rescaled into stream 0's grid); no knobs. Expected tokens: Σ n_i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..tokens import Grid, Tokens, cat
from .base import OpContext, TokenOp, register

MODES = ("bilinear", "area", "nearest", "bicubic")


@register("concat_channels")
class ConcatChannels(TokenOp):
    fusion = True

    def __init__(self, in_channels: list[int], *, mode: str = "bilinear", resample: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"concat_channels: mode={mode!r}; use one of {', '.join(MODES)}")
        self.mode, self.resample = mode, bool(resample)

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        ref = streams[0]
        same = all(s.x.shape[1] == ref.x.shape[1] and bool(s.mask.all()) for s in streams) and bool(ref.mask.all())
        grids = [s.grid for s in streams]
        if all(g == ref.grid for g in grids) and ref.grid is not None or (same and None in grids):
            xs = [s.x for s in streams]
        elif None not in grids:
            if not self.resample:
                raise InputError(f"concat_channels: encoder grids {grids} differ and resample is off; set "
                                 "resample: true or pick image sizes that give every encoder the same grid")
            h, w = ref.grid
            B = ref.x.shape[0]
            xs = [s.x if s.grid == ref.grid else F.interpolate(
                s.x.transpose(1, 2).reshape(B, -1, *s.grid), size=(h, w), mode=self.mode,
                **({"align_corners": False} if self.mode in ("bilinear", "bicubic") else {})).flatten(2).transpose(1, 2)
                for s in streams]
        else:
            raise InputError(f"concat_channels needs streams on grids or with equal token counts; got grids "
                             f"{grids} and counts {[s.x.shape[1] for s in streams]}; concatenate before pruning "
                             "or merging, or use concat_tokens / mke / cotr")
        aux = [s.aux_loss for s in streams if s.aux_loss is not None]
        notes = tuple(dict.fromkeys(n for s in streams for n in s.notes))
        return [ref.replace(x=torch.cat([x.to(ref.x.dtype) for x in xs], -1), aux_loss=sum(aux) if aux else None,
                            notes=notes)]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return [sum(in_channels)]

    def expected_tokens(self, n_in: list[int | None], grids: list[Grid | None]) -> list[int | None]:
        return [n_in[0]]

    def out_grids(self, grids: list[Grid | None]) -> list[Grid | None]:
        return [grids[0]]


@register("concat_tokens")
class ConcatTokens(TokenOp):
    fusion = True

    def __init__(self, in_channels: list[int]):
        super().__init__()
        if len(set(in_channels)) > 1:
            raise ConfigError(f"concat_tokens needs streams of one width, got {in_channels}; add a per-stream "
                              "op that changes width, or use concat_channels / mke (dim knob)")

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        return [cat(streams)]

    def expected_tokens(self, n_in: list[int | None], grids: list[Grid | None]) -> list[int | None]:
        return [None if None in n_in else sum(n_in)]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return [in_channels[0]]
