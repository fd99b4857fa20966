"""Attention-guided ops: prumerge, prumerge_plus (LLaVA-PruMerge), visionzip (VisionZip), random (control)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens

torch.manual_seed(0)


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

    def attention(self, layer):
        self.calls.append(layer)
        return self.att

    def keys(self, layer):
        return self.k

    def sample(self, b):
        return FakeEncoder({l: f[b : b + 1] for l, f in self.features.items()}, self.grid, self.att[b : b + 1],
                           self.k[b : b + 1], attention_substitute=self.attention_substitute)


def make(B=2, h=6, w=6, C=4, heads=3, Ck=5, layer=7):
    N = h * w
    x = torch.randn(B, N, C, dtype=torch.float64)
    att = (torch.randn(B, heads, N, dtype=torch.float64) * 1.5).softmax(-1)  # CLS attention: a few outliers
    enc = FakeEncoder({layer: x}, (h, w), att, torch.randn(B, N, Ck, dtype=torch.float64))
    return enc, Tokens.from_encoder(enc, layer)


def cos(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def loop_prumerge(x, a, k, plus, neighbors=32, extra=True):
    """PruMerge(+) for one sample, written from the paper/authors' description with plain loops."""
    n = len(a)
    q1, q3 = np.percentile(a.numpy(), 25), np.percentile(a.numpy(), 75)
    keep = [i for i in range(n) if a[i] > q3 + 1.5 * (q3 - q1)] or [int(a.argmax())]
    if plus:
        step = max(1, (n // len(keep)) // 3)
        keep = sorted(set(keep) | set(range(0, n - 1, step)))
    out = []
    for i in keep:
        sims = sorted(((cos(k[i], k[j]), j) for j in range(n) if j != i), reverse=True)[:neighbors]
        out.append(x[i] + sum(a[j] * x[j] for _, j in sims))
    if extra:
        out.append(sum(a[j] * x[j] for j in range(n) if j not in keep))
    return torch.stack(out), keep


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_equals_plain_loop(plus):
    enc, t = make()
    name = "prumerge_plus" if plus else "prumerge"
    out = build_ops([{"op": name, "neighbors": 6}], [4])(t, OpContext(encoders=[enc]))
    for b in range(2):
        ref, keep = loop_prumerge(t.x[b], enc.att[b].mean(0), enc.k[b], plus, neighbors=6)
        assert out.kept_counts()[b].item() == len(keep) + 1
        torch.testing.assert_close(out.x[b, : len(ref)], ref)
        # provenance: kept patches -> their tokens; all pruned patches -> the extra token
        expect = torch.full((36,), len(keep))
        expect[keep] = torch.arange(len(keep))
        assert torch.equal(out.assign[b], expect) and out.size[b, len(keep)] == 36 - len(keep)
    assert enc.calls == [7]  # attention of the tokens' own layer, asked once for the whole batch
    assert 0 < out.kept_counts().float().mean() < 36


def test_prumerge_plus_keeps_more_and_without_extra_token_marks_pruned():
    enc, t = make()
    ctx = OpContext(encoders=[enc])
    n = build_ops([{"op": "prumerge"}], [4])(t, ctx).kept_counts()
    n_plus = build_ops([{"op": "prumerge_plus"}], [4])(t, ctx).kept_counts()
    assert (n_plus > n).all()
    out = build_ops([{"op": "prumerge", "extra_token": False}], [4])(t, ctx)
    assert ((out.assign >= 0).sum(1) == out.kept_counts()).all()  # one patch per kept token, the rest pruned
    ref, keep = loop_prumerge(t.x[0], enc.att[0].mean(0), enc.k[0], False, extra=False)
    torch.testing.assert_close(out.x[0, : len(keep)], ref)


def test_prumerge_after_pixel_shuffle_pools_attention_and_keys():
    enc, t = make(h=8, w=8, C=2)
    out = build_ops([{"op": "pixel_shuffle"}, {"op": "prumerge", "neighbors": 5}], [2])(t, OpContext(encoders=[enc]))
    ps = build_ops([{"op": "pixel_shuffle"}], [2])(t)
    win = ps.assign[0]  # patch -> window
    a = torch.zeros(16, dtype=torch.float64).index_add_(0, win, enc.att[0].mean(0))
    k = torch.zeros(16, 5, dtype=torch.float64).index_add_(0, win, enc.k[0]) / 4
    ref, keep = loop_prumerge(ps.x[0], a, k, False, neighbors=5)
    torch.testing.assert_close(out.x[0, : len(ref)], ref)


def loop_visionzip(x, a, k, dominant, contextual):
    n = len(a)
    dom = sorted(sorted(range(n), key=lambda i: -float(a[i]))[:dominant])
    rest = [i for i in range(n) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    groups = {t: [] for t in targets}
    for i in rest:
        if i not in groups:
            groups[max(targets, key=lambda t: cos(k[i], k[t]))].append(i)
    ctx = [x[t] + (torch.stack([x[i] for i in g]).mean(0) if g else 0) for t, g in groups.items()]
    return torch.stack([x[i] for i in dom] + ctx), dom, groups


def test_visionzip_equals_plain_loop():
    enc, t = make()
    pipe = build_ops([{"op": "visionzip", "dominant": 7, "contextual": 4}], [4])
    out = pipe(t, OpContext(encoders=[enc]))
    assert out.kept_counts().tolist() == [11, 11] and pipe.expected_tokens([36], [(6, 6)]) == 11
    for b in range(2):
        ref, dom, groups = loop_visionzip(t.x[b], enc.att[b].sum(0), enc.k[b], 7, 4)
        torch.testing.assert_close(out.x[b], ref)
        sizes = [1.0] * 7 + [1.0 + len(g) for g in groups.values()]
        assert out.size[b].tolist() == sizes and out.size[b].sum() == 36


def test_visionzip_without_cls_uses_the_documented_substitute_and_says_so():
    enc, t = make()
    enc.attention_substitute = True
    out = build_ops([{"op": "visionzip"}], [4])(t, OpContext(encoders=[enc]))
    assert any("no CLS token" in n and "mean attention" in n for n in out.notes)
    enc2, t2 = make()
    assert build_ops([{"op": "visionzip"}], [4])(t2, OpContext(encoders=[enc2])).notes == ()


def test_attention_layer_knob_and_errors():
    enc, t = make()
    pipe = build_ops([{"op": "prumerge", "layer": 3}], [4])
    pipe(t, OpContext(encoders=[enc]))
    assert enc.calls == [3] and pipe.required_layers(7, 12) == [[3, 7]]
    with pytest.raises(ConfigError, match="keep no token"):
        build_ops([{"op": "visionzip", "dominant": 0, "contextual": 0}], [4])
    with pytest.raises(InputError, match="needs the encoder layer"):
        build_ops([{"op": "visionzip"}], [4])(Tokens.from_grid(t.x, (6, 6)), OpContext(encoders=[enc]))


def ragged_attention(counts):
    enc, _ = make(B=len(counts), h=4, w=5)
    x = enc.features[7]
    n = torch.tensor(counts)
    full = Tokens.from_encoder(enc, 7)
    batched = full.select(torch.arange(20).expand(len(counts), 20), torch.arange(20) < n[:, None])
    alone = [Tokens.from_grid(x[b : b + 1], (4, 5), layer=7).select(torch.arange(c)[None])
             for b, c in enumerate(counts)]
    return enc, batched, alone


@pytest.mark.parametrize("spec", [{"op": "prumerge", "neighbors": 4}, {"op": "prumerge_plus"},
                                  {"op": "visionzip", "dominant": 3, "contextual": 3}, {"op": "random", "ratio": 0.3}])
def test_batch_invariance_with_different_counts(spec):
    enc, batched, alone = ragged_attention([20, 11, 6])
    pipe = build_ops([spec], [4])
    out = pipe(batched, OpContext(encoders=[enc]))
    for b, t in enumerate(alone):
        one = pipe(t, OpContext(encoders=[enc.sample(b)]))
        k = int(one.kept_counts()[0])
        assert out.kept_counts()[b] == k and not out.mask[b, k:].any()
        for f in ("x", "pos", "size"):
            torch.testing.assert_close(getattr(out, f)[b, :k], getattr(one, f)[0, :k])
        assert torch.equal(out.assign[b], one.assign[0])


def test_random_keeps_a_seeded_subset_of_real_tokens():
    _, t = make(B=3)
    out = build_ops([{"op": "random", "ratio": 0.25}], [4])(t)
    assert out.kept_counts().tolist() == [9, 9, 9]
    kept = out.assign[0] >= 0
    assert torch.equal(out.assign >= 0, kept.expand(3, -1))  # same seeded patches for every sample
    assert torch.equal(out.x[1], t.x[1, kept])  # exact features, original order
    other = build_ops([{"op": "random", "ratio": 0.25, "seed": 1}], [4])(t)
    assert not torch.equal(other.assign >= 0, out.assign >= 0)
    fresh = build_ops([{"op": "random", "ratio": 0.25, "seed": None}], [4])(t)
    assert fresh.kept_counts().tolist() == [9, 9, 9]
