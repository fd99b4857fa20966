"""Merging ops: bipartite_merge / self_merge (ToMe), cross_merge and mke (VEN-VL MKE), concat_tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens

torch.manual_seed(0)


# ---- plain-loop references (one sample, Python lists) ---------------------------------------------------------
def cos(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def weighted(groups, x, size, pos):
    xs = torch.stack([sum(size[j] * x[j] for j in g) / sum(size[j] for j in g) for g in groups])
    ps = torch.stack([sum(size[j] * pos[j] for j in g) / sum(size[j] for j in g) for g in groups])
    return xs, torch.tensor([float(sum(size[j] for j in g)) for g in groups]), ps


def loop_pass(x, size, pos, r):
    """One ToMe pass: even positions A, odd positions B, top-r edges merged by size-weighted average."""
    n = len(x)
    A, Bs = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for a in A:
        sims = [cos(x[a], x[b]) for b in Bs]
        j = max(range(len(Bs)), key=lambda i: sims[i])
        best[a] = (sims[j], Bs[j])
    merged = set(sorted(A, key=lambda a: -best[a][0])[:r])
    groups = {i: [i] for i in range(n) if i not in merged}
    for a in merged:
        groups[best[a][1]].append(a)
    return weighted([groups[k] for k in sorted(groups)], x, size, pos)


def loop_merge(x, size, pos, remove):
    while remove > 0:
        r = min(remove, len(x) // 2)
        x, size, pos = loop_pass(x, size, pos, r)
        remove -= r
    return x, size, pos


def loop_cross(xa, sa, pa, xb, sb, pb, ratio):
    """Cross-merge: each B token's best A by cosine; the floor(ratio·n_B) best-matching B tokens merge into A."""
    best = [max(((cos(xb[i], xa[j]), j) for j in range(len(xa))), key=lambda t: t[0]) for i in range(len(xb))]
    r = int(ratio * len(xb) + 1e-6)
    merged = sorted(range(len(xb)), key=lambda i: -best[i][0])[:r]
    x, s, p = torch.cat([xa, xb]), torch.cat([sa, sb]), torch.cat([pa, pb])
    groups = [[j] for j in range(len(xa))]
    for i in merged:
        groups[best[i][1]].append(len(xa) + i)
    groups += [[len(xa) + i] for i in range(len(xb)) if i not in merged]
    return weighted(groups, x, s, p)


def ragged(counts, N=20, C=6, grid=(4, 5), source=0):
    """A batch whose samples keep different counts (left-packed, padded), and each sample alone."""
    B = len(counts)
    x = torch.randn(B, N, C, dtype=torch.float64)
    full = Tokens.from_grid(x, grid, source=source)
    n = torch.tensor(counts)
    batched = full.select(torch.arange(N).expand(B, N), torch.arange(N) < n[:, None])
    alone = [Tokens.from_grid(x[b : b + 1], grid, source=source).select(torch.arange(counts[b])[None])
             for b in range(B)]
    return batched, alone


def assert_sample_equal(batched: Tokens, b: int, alone: Tokens):
    k = int(batched.kept_counts()[b])
    assert k == int(alone.kept_counts()[0])
    for f in ("x", "pos", "size"):
        torch.testing.assert_close(getattr(batched, f)[b, :k], getattr(alone, f)[0, :k])
    assert torch.equal(batched.assign[b], alone.assign[0])
    assert not batched.mask[b, k:].any()


# ---- bipartite merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_bipartite_merge_equals_plain_loop(ratio):
    t = Tokens.from_grid(torch.randn(2, 21, 5, dtype=torch.float64), (3, 7))
    out = build_ops([{"op": "bipartite_merge", "ratio": ratio, "order": "original"}], [5])(t)  # loop: input order
    for b in range(2):
        x, s, p = loop_merge(list(t.x[b]), list(t.size[b]), list(t.pos[b]), int(ratio * 21 + 1e-6))
        assert out.kept_counts()[b].item() == len(x) == 21 - int(ratio * 21 + 1e-6)
        torch.testing.assert_close(out.x[b], x)
        torch.testing.assert_close(out.size[b], s.to(out.size.dtype))
        torch.testing.assert_close(out.pos[b], p.to(out.pos.dtype))


def test_bipartite_merge_after_pixel_shuffle_weights_by_size_and_matches_loop():
    t = Tokens.from_grid(torch.randn(1, 64, 3, dtype=torch.float64), (8, 8))
    ps = build_ops([{"op": "pixel_shuffle"}, {"op": "bipartite_merge", "r": 5, "order": "original"}], [3])
    out = ps(t)
    mid = ps.ops[0]([t], OpContext())[0]
    x, s, _ = loop_merge(list(mid.x[0]), [torch.tensor(4.0, dtype=torch.float64)] * 16, list(mid.pos[0]), 5)
    torch.testing.assert_close(out.x[0], x)
    assert out.size[0].tolist() == s.tolist() and out.size.sum() == 64


def test_merge_then_unmerge_restores_shape_and_unmerged_tokens_exactly():
    t = Tokens.from_grid(torch.randn(2, 30, 4), (5, 6))
    out = build_ops([{"op": "bipartite_merge", "ratio": 0.3}], [4])(t)
    rec = out.unmerge()
    assert rec.shape == t.x.shape and (out.assign >= 0).all()
    alone = out.size == 1  # tokens that were not merged with anything
    patch_alone = alone.gather(1, out.assign)
    assert (patch_alone.sum(1) >= 30 - 2 * 9).all()  # 9 merges per sample touch at most 18 patches
    assert torch.equal(rec[patch_alone], t.x[patch_alone])
    # merged patches get their group's average
    b, p = torch.nonzero(~patch_alone)[0].tolist()
    group = out.assign[b] == out.assign[b, p]
    torch.testing.assert_close(rec[b, p], t.x[b, group].mean(0))


def test_bipartite_merge_batch_invariance_with_different_counts():
    batched, alone = ragged([20, 13, 7])
    pipe = build_ops([{"op": "bipartite_merge", "ratio": 0.6}], [6])
    out = pipe(batched)
    assert out.kept_counts().tolist() == [8, 6, 3]  # n - floor(0.6 n)
    for b, t in enumerate(alone):
        assert_sample_equal(out, b, pipe(t))


def test_bipartite_merge_prop_attn_and_r_errors():
    out = build_ops([{"op": "bipartite_merge", "ratio": 0.5, "prop_attn": True}], [3])(
        Tokens.from_grid(torch.randn(1, 8, 3), (2, 4)))
    assert out.prop_attn and torch.equal(out.attn_bias(), out.size.log())
    with pytest.raises(ConfigError, match="r=8 would remove every token of a sample with 8 tokens"):
        build_ops([{"op": "bipartite_merge", "r": 8}], [3])(Tokens.from_grid(torch.randn(1, 8, 3), (2, 4)))
    assert build_ops([{"op": "self_merge", "ratio": 0.8}], [3]).expected_tokens([100], [None]) == 20


# ---- MKE ----------------------------------------------------------------------------------------------------
TABLE_11 = [(0.0, 0.0, 50.0), (0.3, 0.2, 39.0), (0.3, 0.4, 35.5), (0.5, 0.4, 32.5), (0.8, 0.4, 28.0), (0.8, 0.6, 27.0)]


@pytest.mark.parametrize("rs,rc,percent", TABLE_11)
def test_mke_count_formula_reproduces_table_11(rs, rc, percent):
    N = 400  # each encoder: a 20x20 grid; pixel shuffle -> 100 tokens
    a = Tokens.from_grid(torch.randn(2, N, 4), (20, 20))
    b = Tokens.from_grid(torch.randn(2, N, 4), (20, 20), source=1)
    pipe = build_ops([{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": rs, "cross_ratio": rc}], [4, 4])
    out = pipe([a, b])
    formula = N / 4 + (N / 4) * (1 - rs) * (1 - rc)
    assert out.kept_counts().tolist() == [formula, formula]
    assert pipe.expected_tokens([N, N], [(20, 20), (20, 20)]) == formula
    assert 100 * formula / N == percent
    assert out.size.sum(1).tolist() == [2.0 * N, 2.0 * N] and out.x.shape[-1] == 16


def test_mke_equals_self_merge_then_cross_merge_and_plain_loops():
    a = Tokens.from_grid(torch.randn(2, 36, 3, dtype=torch.float64), (6, 6))
    b = Tokens.from_grid(torch.randn(2, 16, 3, dtype=torch.float64), (4, 4), source=1)
    mke = build_ops([{"op": "mke", "self_ratio": 0.5, "cross_ratio": 0.4}], [3, 3])([a, b])
    split = build_ops([{"op": "self_merge", "ratio": 0.5, "streams": [1]}, {"op": "cross_merge", "ratio": 0.4}],
                      [3, 3])([a, b])
    for f in ("x", "pos", "size", "assign", "mask"):
        assert torch.equal(getattr(mke, f), getattr(split, f)), f
    for s in range(2):
        bp = (b.pos[s] + 0.5) * 1.5 - 0.5  # B's 4x4 positions in A's 6x6 grid
        xb, sb, pb = loop_merge(list(b.x[s]), list(b.size[s]), list(bp), 8)
        x, size, pos = loop_cross(a.x[s], a.size[s], a.pos[s], xb, sb, pb, 0.4)
        assert len(x) == 36 + 8 - 3 == mke.kept_counts()[s]
        torch.testing.assert_close(mke.x[s], x)
        torch.testing.assert_close(mke.size[s], size.to(mke.size.dtype))
        torch.testing.assert_close(mke.pos[s], pos.to(mke.pos.dtype))
    assert torch.equal(mke.assign, a.assign)  # provenance follows encoder A, whose tokens keep their slots


def test_mke_batch_invariance_with_different_counts():
    a, a1 = ragged([20, 9, 14])
    b, b1 = ragged([17, 20, 6], source=1)
    pipe = build_ops([{"op": "mke", "self_ratio": 0.3, "cross_ratio": 0.5}], [6, 6])
    out = pipe([a, b])
    for s in range(3):
        assert_sample_equal(out, s, pipe([a1[s], b1[s]]))
    nb = torch.tensor([17, 20, 6])
    nb = nb - (0.3 * nb + 1e-6).floor().long()
    assert out.kept_counts().tolist() == (torch.tensor([20, 9, 14]) + nb - (0.5 * nb + 1e-6).floor().long()).tolist()


def test_mke_projects_unequal_widths_and_learns():
    a = Tokens.from_grid(torch.randn(2, 16, 4), (4, 4))
    b = Tokens.from_grid(torch.randn(2, 16, 6), (4, 4), source=1)
    pipe = build_ops([{"op": "mke", "dim": 5}], [4, 6])
    assert pipe.out_channels == 5 and sum(p.numel() for p in pipe.parameters()) == 4 * 5 + 5 + 6 * 5 + 5
    assert sum(p.numel() for p in build_ops([{"op": "mke"}], [4, 4]).parameters()) == 0
    teacher = build_ops([{"op": "mke", "dim": 5}], [4, 6])  # a reachable target: same op, other weights
    with torch.no_grad():
        target = teacher([a, b]).x
    opt = torch.optim.Adam(pipe.parameters(), lr=0.05)
    losses = []
    for step in range(30):
        loss = F.mse_loss(pipe([a, b]).x, target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mke_needs_two_encoders():
    with pytest.raises(ConfigError, match="mke fuses exactly two encoder streams .* has 3"):
        build_ops([{"op": "mke"}], [4, 4, 4])
    with pytest.raises(ConfigError, match=r"cross_ratio=1.5 is out of range; use a number in \[0, 1\]"):
        build_ops([{"op": "mke", "cross_ratio": 1.5}], [4, 4])


def test_concat_tokens_is_mke_without_merging():
    a, b = ragged([20, 9])[0], ragged([5, 20], source=1)[0]
    plain = build_ops([{"op": "concat_tokens"}], [6, 6])([a, b])
    mke0 = build_ops([{"op": "mke", "self_ratio": 0.0, "cross_ratio": 0.0}], [6, 6])([a, b])
    assert plain.kept_counts().tolist() == [25, 29]
    for f in ("x", "pos", "size", "mask", "assign"):
        assert torch.equal(getattr(plain, f), getattr(mke0, f)), f


def test_mke_under_bf16_autocast_where_one_stream_is_projected_and_the_other_is_not():
    """Under autocast the projected stream comes out bf16 and the unprojected one stays fp32 (the venvl recipe on a
    CPU: DINOv2-S 384 channels, EfficientNet-Lite0 projected to 384): merging promotes instead of failing."""
    torch.manual_seed(0)
    a = Tokens.from_grid(torch.randn(2, 16, 4), (4, 4))
    b = Tokens.from_grid(torch.randn(2, 16, 6), (4, 4), source=1)
    pipe = build_ops([{"op": "mke", "dim": 4}], [4, 6])
    ref = pipe([a, b])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pipe([a, b])
    assert got.x.dtype == torch.float32 and torch.equal(got.mask, ref.mask) and bool(got.x.isfinite().all())
    # (bf16 similarities may pick other merge targets for near ties, so values are not compared with fp32 here)
