"""HoloV (NeurIPS 2025): crop-wise adaptive allocation of the kept tokens.

Checked against a plain per-image transcription of the reference, written here from reading it (not copied):
github.com/obananas/HoloV, llava/model/utils.py, HoloV (crops, intra-crop similarity variance, scaled attention,
crop weights, quota with the remainder to the largest weights, per-crop top-k by attention, concatenation; the
zero padding of overflow is left out — compactvl keeps only real tokens) with the crop-count rule and ``power`` of
qwen-model-HoloV/modeling_qwen2_5_vl.py (forward) and qwen-model-HoloV/utils.py (HoloV). Attention as
llava/model/llava_arch.py, encode_images: the CLS row of the encoder attention, mean over heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import compactvl.ops.holov  # noqa: F401  (registers "holov")
from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens
from op_helpers import assert_row_equals_alone


@dataclass
class FakeEncoder:
    features: dict
    grid: tuple
    att: torch.Tensor  # [B, heads, N]
    cls: torch.Tensor | None = None
    attention_substitute: bool = False

    def attention(self, layer):
        return self.att

    def keys(self, layer):
        return self.features[layer]


def ref_crops(N, C):
    """The reference's runs: N // C tokens each, the first N % C one more, empty ones skipped."""
    size, extra = N // C, N % C
    runs, start = [], 0
    for c in range(C):
        m = size + (1 if c < extra else 0)
        if m > 0:
            runs.append(list(range(start, start + m)))
        start += m
    return runs


def ref_holov(x, a, k, C=None, alpha=0.09, power=1.0, rank_by="attention", refill=False):
    """One image: x [N, D] tokens, a [N] attention, k kept; returns the kept indices in output order (the
    reference's real tokens; ``refill``: the paper's reallocation as the op documents it, written as a loop)."""
    N = x.shape[0]
    if C is None:  # Qwen code: num_patches = max(1, int(((1024/576) * image_token_len) / keep_num))
        C = max(1, int(((1024 / 576) * N) / k))
    runs = ref_crops(N, C)
    scores, hol = [], []
    for idx in runs:
        f, att = x[idx], a[idx]
        M = len(idx)
        if M <= 1:
            scores.append(att.mean())
            hol.append(att * 1e3)
            continue
        unit = f / (f.norm(dim=1, keepdim=True) + 1e-6)
        sim = (unit @ unit.t()) * (1 - torch.eye(M, dtype=x.dtype))
        mu = sim.sum(1) / (M - 1)
        var = ((sim - mu[:, None]) ** 2).sum(1) / (M - 1)
        big = att * 1e3
        gamma = big.abs().mean() / (var.abs().mean() + 1e-6)
        h = big + alpha * var * gamma
        hol.append(h)
        scores.append(h.mean())
    s = torch.stack(scores) ** power
    w = s / (s.sum() + 1e-6)
    q = (w * k).floor().long()
    rest = int(k - q.sum())
    if rest > 0:
        for c in sorted(range(len(w)), key=lambda c: (-float(w[c]), c))[:rest]:
            q[c] += 1
    sizes = torch.tensor([len(r) for r in runs])
    q = torch.minimum(q, sizes)
    while refill and int(q.sum()) < k:
        owed = k - int(q.sum())
        room = sizes - q
        d = w * room
        if float(d.sum()) <= 0:
            d = room.to(w.dtype)
        share = torch.minimum((owed * d / d.sum()).floor().long(), room)
        left = owed - int(share.sum())
        for c in sorted((c for c in range(len(w)) if room[c] - share[c] > 0), key=lambda c: (-float(d[c]), c))[:left]:
            share[c] += 1
        q = q + share
    out = []
    for c, idx in enumerate(runs):
        if q[c] <= 0:
            continue
        if q[c] >= len(idx):
            out += idx
        else:
            key = a[idx] if rank_by == "attention" else hol[c]
            top = sorted(range(len(idx)), key=lambda i: (-float(key[i]), i))[: int(q[c])]
            out += [idx[i] for i in top]
    return out


def make(B=3, h=12, w=12, D=16, heads=4, seed=0, sharp=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    N = h * w
    x = torch.randn(B, N, D, generator=g, dtype=dtype)
    att = (torch.randn(B, heads, N, generator=g, dtype=dtype) * sharp).softmax(-1)
    enc = FakeEncoder({5: x}, (h, w), att)
    return Tokens.from_encoder(enc, 5), OpContext(encoders=[enc]), att.mean(1)


def run(spec, t, ctx):
    return build_ops([{"op": "holov", **spec}], [t.x.shape[-1]])(t, ctx)


def order_of(out, b):
    """Original patch index of each kept token, in output order."""
    k = int(out.kept_counts()[b])
    slot = out.assign[b]
    return [int((slot == s).nonzero()[0]) for s in range(k)]


@pytest.mark.parametrize("spec,k,ref_kw", [({}, 64, {}), ({"count": 16}, 16, {}), ({"count": 30}, 30, {}),
                                           ({"count": 16, "crops": 5}, 16, {"C": 5}),
                                           ({"count": 20, "crops": 100}, 20, {"C": 100}),
                                           ({"count": 12, "crops": 1}, 12, {"C": 1}),
                                           ({"ratio": 0.1}, 14, {}),
                                           ({"count": 16, "alpha": 0.5, "tau": 2.0}, 16, {"alpha": 0.5, "power": 2.0}),
                                           ({"count": 16, "within": "holistic"}, 16, {"rank_by": "holistic"})])
def test_holov_equals_reference(spec, k, ref_kw):
    t, ctx, a = make()
    out = run(spec, t, ctx)
    for b in range(3):
        idx = ref_holov(t.x[b], a[b], k, **ref_kw)
        assert order_of(out, b) == idx and out.kept_counts()[b] == len(idx)
        torch.testing.assert_close(out.x[b, : len(idx)], t.x[b, idx])
        torch.testing.assert_close(out.pos[b, : len(idx)], t.pos[b, idx])
    assert not out.notes


def test_holov_reference_crop_count_and_scale():
    """LLaVA-1.5 setting: 576 tokens, k = 64 gives the code's 16 crops of 36; the variance term only rescales the
    attention mean, so allocation follows attention mass per crop."""
    t, ctx, a = make(B=1, h=24, w=24, D=8)
    out = run({}, t, ctx)
    idx = ref_holov(t.x[0], a[0], 64, C=16)
    assert idx == ref_holov(t.x[0], a[0], 64) and order_of(out, 0) == idx


def test_holov_overflow_drop_and_refill():
    """One crop holds most of the attention: its quota exceeds its size. The code keeps fewer than k real tokens
    (drop, the default); refill reallocates the surplus (paper Sec. 4.1) and keeps exactly k."""
    t, ctx, a = make(B=2, h=8, w=8)
    att = ctx.encoders[0].att.clone()
    att[:, :, :4] += 5.0  # crop 0 (tokens 0..3 at 16 crops of 4)
    att = att / att.sum(-1, keepdim=True)
    enc = FakeEncoder(ctx.encoders[0].features, (8, 8), att)
    ctx, a = OpContext(encoders=[enc]), att.mean(1)
    drop = run({"count": 16, "crops": 16}, t, ctx)
    refill = run({"count": 16, "crops": 16, "overflow": "refill"}, t, ctx)
    for b in range(2):
        ref = ref_holov(t.x[b], a[b], 16, C=16)
        assert len(ref) < 16 and order_of(drop, b) == ref
        full = ref_holov(t.x[b], a[b], 16, C=16, refill=True)
        assert len(full) == 16 and order_of(refill, b) == full and set(ref) <= set(full)
        torch.testing.assert_close(refill.x[b], t.x[b, full])
    assert refill.kept_counts().tolist() == [16, 16]
    assert build_ops([{"op": "holov", "count": 16, "overflow": "refill"}], [16]).expected_tokens([64], [(8, 8)]) == 16
    assert build_ops([{"op": "holov", "count": 16}], [16]).expected_tokens([64], [(8, 8)]) is None


def test_holov_refill_equals_drop_without_overflow():
    t, ctx, _ = make()
    a = run({"count": 16}, t, ctx)
    b = run({"count": 16, "overflow": "refill"}, t, ctx)
    assert a.kept_counts().tolist() == [16] * 3
    assert torch.equal(a.x, b.x) and torch.equal(a.assign, b.assign)


def test_holov_grid_order():
    t, ctx, a = make()
    out = run({"count": 16, "order": "grid"}, t, ctx)
    for b in range(3):
        assert order_of(out, b) == sorted(ref_holov(t.x[b], a[b], 16))


@pytest.mark.parametrize("spec", [{"count": 12}, {"ratio": 0.3}, {"count": 12, "overflow": "refill"},
                                  {"count": 9, "crops": 4, "within": "holistic"}])
def test_holov_batch_invariance_with_different_counts(spec):
    counts = [30, 17, 6]
    t, ctx, a = make(h=5, w=6)
    n = torch.tensor(counts)
    batched = t.select(torch.arange(30).expand(3, 30), torch.arange(30) < n[:, None])
    pipe = build_ops([{"op": "holov", **spec}], [16])
    out = pipe(batched, ctx)
    for b, c in enumerate(counts):
        enc = FakeEncoder({5: t.x[b : b + 1]}, (5, 6), ctx.encoders[0].att[b : b + 1])
        alone = Tokens.from_encoder(enc, 5).select(torch.arange(c)[None])
        one = pipe(alone, OpContext(encoders=[enc]))
        assert_row_equals_alone(out, b, one)
        want = spec.get("count", None) or max(1, int(c * spec["ratio"] + 0.5))
        kw = {"C": spec.get("crops"), "rank_by": spec.get("within", "attention"),
              "refill": spec.get("overflow") == "refill"}
        assert order_of(one, 0) == ref_holov(t.x[b, :c], a[b, :c], min(want, c), **kw)


def test_holov_small_images_keep_at_most_n():
    t, ctx, a = make(B=1, h=2, w=3)
    out = run({"count": 10}, t, ctx)
    assert out.kept_counts().tolist() == [6] and sorted(order_of(out, 0)) == list(range(6))
    assert build_ops([{"op": "holov", "count": 10, "overflow": "refill"}], [16]).expected_tokens([6], [(2, 3)]) == 6


def test_holov_bfloat16_substitute_note_and_after_another_op():
    t, ctx, _ = make(dtype=torch.float32)
    out = build_ops([{"op": "holov", "count": 16}], [16]).to(torch.bfloat16)(t.replace(x=t.x.bfloat16()), ctx)
    assert out.x.dtype == torch.bfloat16 and out.kept_counts().tolist() == [16] * 3
    enc = ctx.encoders[0]
    sub = FakeEncoder(enc.features, enc.grid, enc.att, attention_substitute=True)
    out = run({"count": 16}, t, OpContext(encoders=[sub]))
    assert len(out.notes) == 1 and "no CLS token" in out.notes[0]
    pooled = build_ops([{"op": "avgpool", "k": 2}], [16])(t)
    out = build_ops([{"op": "avgpool", "k": 2}, {"op": "holov", "count": 8}], [16])(t, ctx)
    pa = enc.att.mean(1).view(3, 6, 2, 6, 2).sum((2, 4)).reshape(3, 36)  # attention summed into the pooled tokens
    for b in range(3):
        idx = ref_holov(pooled.x[b], pa[b], 8)
        torch.testing.assert_close(out.x[b], pooled.x[b, idx])


@pytest.mark.parametrize("knobs,match", [({"crops": 0}, "crops=0"), ({"crops": True}, "crops=True"),
                                         ({"alpha": -1}, "alpha=-1"), ({"alpha": float("nan")}, "alpha=nan"),
                                         ({"tau": 0}, "tau=0"), ({"within": "score"}, "within='score'"),
                                         ({"overflow": "pad"}, "overflow='pad'"), ({"order": "x"}, "order='x'"),
                                         ({"gamma": 1}, "no knob 'gamma'")])
def test_holov_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "holov", **knobs}], [8])
