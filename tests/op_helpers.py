"""Helpers shared by the token-op tests (imported by them; not a test module)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compactvl.tokens import Tokens


def text_tokens(B=3, h=8, w=8, C=16, T=5, seed=0, dtype=torch.float64):
    """Seeded tokens on an h x w grid and prompt embeddings of the same width: (Tokens [B, h*w, C], text [B, T, C])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, C, generator=g, dtype=dtype)
    text = torch.randn(B, T, C, generator=g, dtype=dtype)
    return Tokens.from_grid(x, (h, w)), text


def kept_indices(out, b):
    """Input indices sample ``b`` kept (assign >= 0), in input order."""
    return torch.nonzero(out.assign[b] >= 0).flatten().tolist()



def assert_row_equals_alone(out, b, one) -> int:
    """Row ``b`` of a batched op output equals the op's output on that sample alone (``one``, batch 1): kept count,
    no valid slot past it, features, positions, sizes and provenance. Returns the kept count."""
    k = int(one.kept_counts()[0])
    assert out.kept_counts()[b] == k and not out.mask[b, k:].any()
    for f in ("x", "pos", "size"):
        torch.testing.assert_close(getattr(out, f)[b, :k], getattr(one, f)[0, :k])
    assert torch.equal(out.assign[b], one.assign[0])
    return k

@dataclass
class FakeEncoder:
    """Same attributes as compactvl.encoders.base.EncoderOutput."""

    features: dict
    grid: tuple
    att: torch.Tensor  # [B, heads, N]
    k: torch.Tensor  # [B, N, Ck]
    cls: torch.Tensor | None = None
    attention_substitute: bool = False
    calls: list = field(default_factory=list)
    q_cls: torch.Tensor | None = None  # [B, Ck] CLS query the attention was computed from
    k_all: torch.Tensor | None = None  # [B, 1 + N, Ck] keys, CLS first

    def attention(self, layer):
        self.calls.append(layer)
        return self.att

    def keys(self, layer):
        return self.k

    def sample(self, b):
        return FakeEncoder({l: f[b : b + 1] for l, f in self.features.items()}, self.grid, self.att[b : b + 1],
                           self.k[b : b + 1], attention_substitute=self.attention_substitute)
