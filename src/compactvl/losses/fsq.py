"""Finite Scalar Quantization — Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024
(arXiv:2309.15505), Sec. 3; the quantizer VEN-VL's SIP loss (eq. 12) supervises against.

Definition, per dimension with L levels:

    f(z) = h · tanh(z + s) − o,    h = (L − 1)(1 + ε) / 2,   o = ½ if L is even else 0,   s = artanh(o / h)
    FSQ(z) = round_ste(f(z)) / ⌊L/2⌋

so every dimension takes exactly L values (odd L = 5: {−1, −½, 0, ½, 1}; even L = 4: {−1, −½, 0, ½}) and f(0) = 0.
``round_ste`` rounds in the forward pass and passes the gradient straight through (x + sg(round(x) − x)); ε = 1e-3
lets the outermost levels be reached.

The input is projected to the code dimensions first. In FSQ that projection is learned with the autoencoder; here the
quantizer builds *targets* (SIP compares a reconstruction with FSQ(original features)), and a learned projection on
the target side could collapse to a constant code. So the projection is fixed: ``dim=None`` (default) keeps the
feature dimensions (channel-wise quantization, no projection); ``dim=d`` uses a fixed random orthonormal map
[in_dim, d] (d <= in_dim) drawn from ``seed`` (a buffer, saved with the model). ``normalize=True`` (default) first standardises
each token (layer norm without affine) so tanh sees unit-scale values whatever the feature scale.

Knobs: ``levels`` (5, one for every dimension, or a list with one per code dimension as in the paper's
[8, 5, 5, 5]), ``dim``, ``in_dim`` (needed with ``dim``), ``normalize``, ``seed``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError

EPS = 1e-3


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


class FSQ(nn.Module):
    def __init__(self, levels: int | Sequence[int] = 5, dim: int | None = None, in_dim: int | None = None,
                 normalize: bool = True, seed: int = 0):
        super().__init__()
        lv = [levels] if isinstance(levels, int) and not isinstance(levels, bool) else list(levels)
        if not lv or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in lv):
            raise ConfigError(f"fsq: levels={levels!r} must be a whole number >= 2 (or a list of them, one per code "
                              f"dimension), e.g. 5 or [8, 5, 5, 5]")
        if dim is not None:
            if not isinstance(dim, int) or dim < 1 or not isinstance(in_dim, int) or in_dim < 1:
                raise ConfigError(f"fsq: dim={dim!r} needs in_dim (the feature width) and both must be whole numbers "
                                  f">= 1; or leave dim out to quantize the features channel-wise")
            if dim > in_dim:
                raise ConfigError(f"fsq: dim={dim} is larger than the feature width {in_dim}; quantize to at most "
                                  f"{in_dim} dimensions (or leave dim out)")
            if len(lv) not in (1, dim):
                raise ConfigError(f"fsq: {len(lv)} levels for {dim} code dimensions; give one level or one per dim")
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(in_dim, dim, generator=g))  # orthonormal columns
            self.register_buffer("projection", q)
        else:
            self.register_buffer("projection", None)
        self.register_buffer("levels", torch.tensor(lv, dtype=torch.float32), persistent=False)
        self.dim, self.normalize = dim, bool(normalize)

    def _levels(self, z: Tensor) -> Tensor:
        if self.levels.numel() not in (1, z.shape[-1]):
            raise InputError(f"fsq has {self.levels.numel()} levels but the codes have {z.shape[-1]} dimensions; give "
                             f"one level for all or one per dimension")
        return self.levels.to(z.device)

    def bound(self, z: Tensor) -> Tensor:
        """f(z): each dimension squashed into its L-level range (before rounding)."""
        L = self._levels(z)
        half = (L - 1) * (1 + EPS) / 2
        offset = (L % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z.float() + shift) * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """FSQ(z) in [-1, 1]: round_ste(f(z)) / ⌊L/2⌋."""
        return round_ste(self.bound(z)) / torch.div(self._levels(z), 2, rounding_mode="floor")

    def codes(self, z: Tensor) -> Tensor:
        """Integer level index in 0..L-1 of every dimension."""
        L = self._levels(z)
        return (torch.round(self.bound(z)) + torch.div(L, 2, rounding_mode="floor")).long()

    def project(self, x: Tensor) -> Tensor:
        z = F.layer_norm(x.float(), x.shape[-1:]) if self.normalize else x.float()
        return z @ self.projection.to(z.device) if self.projection is not None else z

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(self.project(x))

    def extra_repr(self) -> str:
        return f"levels={self.levels.tolist()}, dim={self.dim}, normalize={self.normalize}"
