"""Attention-guided ops: prumerge, prumerge_plus (LLaVA-PruMerge), visionzip (VisionZip), random (control)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compactvl.encoders import tiny_encoder
from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.ops.prumerge import single_head_attention
from compactvl.tokens import Tokens
from op_helpers import assert_row_equals_alone, FakeEncoder

torch.manual_seed(0)


def make(B=2, h=6, w=6, C=4, heads=3, Ck=6, layer=7):
    """Features and an attention layer built from a CLS query and keys (CLS key first), as a CLIP block: the
    per-head CLS row softmax(q_h·K_hᵀ/sqrt(d)) over CLS + patches, restricted to the patch columns."""
    N = h * w
    x = torch.randn(B, N, C, dtype=torch.float64)
    q = torch.randn(B, Ck, dtype=torch.float64) * 1.5
    k_all = torch.randn(B, 1 + N, Ck, dtype=torch.float64)
    d = Ck // heads
    logits = torch.einsum("bhd,bnhd->bhn", q.view(B, heads, d), k_all.view(B, 1 + N, heads, d)) / d ** 0.5
    att = logits.softmax(-1)[..., 1:]
    enc = FakeEncoder({layer: x}, (h, w), att, k_all[:, 1:].clone(), q_cls=q, k_all=k_all)
    return enc, Tokens.from_encoder(enc, layer)


def cos(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def reference_cls_attention(q, k_all):
    """PruMerge's CLS attention, transcribed from the reference (github.com/42Shawn/LLaVA-PruMerge,
    llava/model/multimodal_encoder/clip_encoder.py, CLIPVisionTower.token_prune_merge_advanced[_plus]):
    attn = softmax(q @ kᵀ * C**-0.5) of the hooked q_proj / k_proj outputs (all heads at once, C = their width,
    softmax over CLS + patches); cls_attn = attn[:, 0, 1:]."""
    attn = (q[:, None] @ k_all.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, 1, 1 + N]
    return torch.softmax(attn, dim=-1)[:, 0, 1:]


def reference_prumerge(x, cls_attn, key, plus, neighbors=32):
    """One sample (the reference runs PruMerge+ at batch 1), transcribed from the same functions: IQR ratio
    (outlier_dectection, np.percentile), topk(cls_attn, int(N*ratio)) sorted; PruMerge+ appends
    arange(0, N-1, int(int(1/ratio)/3)) minus the kept ones; each kept token i: rest = other kept tokens then the
    complement, topk cosine of the normalised keys, x_i + Σ weights·tokens; extra token Σ_complement attn·x.
    Returns the emitted tokens and the kept indices in emission order."""
    N = len(cls_attn)
    a_np = cls_attn.numpy().astype(np.float32)
    q1, q3 = np.percentile(a_np, 25), np.percentile(a_np, 75)
    ratio = len(np.where(a_np > q3 + 1.5 * (q3 - q1))[0]) / len(a_np)
    idx = torch.topk(cls_attn, int(N * ratio), largest=True).indices.tolist()
    if plus:
        step = int(int(1 / ratio) / 3)
        idx = idx + [i for i in range(0, N - 1, step) if i not in idx]
    compl = sorted(set(range(N)) - set(idx))
    kn = torch.nn.functional.normalize(key, p=2, dim=-1)
    out = []
    for pos, i in enumerate(idx):
        rest = idx[:pos] + idx[pos + 1:] + compl
        sims = kn[rest] @ kn[i]
        top = torch.topk(sims, k=neighbors, largest=True).indices
        out.append(x[i] + (x[rest][top] * cls_attn[rest][top, None]).sum(0))
    out.append((x[compl] * cls_attn[compl, None]).sum(0))
    return torch.stack(out), idx


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_defaults_equal_the_reference(plus):
    """Default knobs == the reference: single-head CLS attention over the concatenated heads, IQR outliers, kNN
    merge, tokens emitted by decreasing attention (PruMerge+: then the spatial tokens by index), extra token last."""
    enc, t = make(h=8, w=8)
    name = "prumerge_plus" if plus else "prumerge"
    out = build_ops([{"op": name, "neighbors": 6}], [4])(t, OpContext(encoders=[enc]))
    cls_attn = reference_cls_attention(enc.q_cls, enc.k_all)
    assert enc.calls == [-1]  # the reference hooks layers[23], the last block of CLIP-L
    unsorted = []
    for b in range(2):
        ref, idx = reference_prumerge(t.x[b], cls_attn[b], enc.k[b], plus, neighbors=6)
        assert len(idx) > 1 and out.kept_counts()[b].item() == len(idx) + 1
        torch.testing.assert_close(out.x[b, : len(ref)], ref, atol=1e-6, rtol=1e-6)
        expect = torch.full((64,), len(idx))  # kept patches -> their slots; all pruned -> the extra token
        expect[idx] = torch.arange(len(idx))
        assert torch.equal(out.assign[b], expect)
        kept = [int((out.assign[b] == s).nonzero()) for s in range(len(idx))]  # slot -> patch
        assert kept == idx
        unsorted.append(kept != sorted(kept))
    assert any(unsorted)  # decreasing attention, not grid order (one sample's top tokens may happen to be sorted)


def test_single_head_attention_is_exact_from_per_head_rows():
    enc, _ = make(B=3, heads=4, Ck=8)
    torch.testing.assert_close(single_head_attention(enc.att), reference_cls_attention(enc.q_cls, enc.k_all),
                               atol=1e-12, rtol=1e-9)


def hooked_clip(block: int, seed: int):
    """A tiny random CLIP run on 2 seeded images (features of hidden_states[-2]) with the q_proj / k_proj outputs of
    encoder block ``block`` captured, as the references hook them: (encoder, output, {"q": ..., "k": ...})."""
    enc = tiny_encoder("clip")
    attn = getattr(enc.model, "vision_model", enc.model).encoder.layers[block].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))]
    try:
        with torch.no_grad():
            out = enc(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)), layers=[-2])
    finally:
        for h in hooks:
            h.remove()
    return enc, out, seen


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_on_a_clip_encoder_equals_the_reference_hooks(plus):
    """End to end on a tiny random CLIP: q/k hooked on the last block's q_proj/k_proj as the reference does
    (token_prune_merge_advanced[_plus]: hooks on layers[23], features hidden_states[-2][:, 1:])."""
    enc, out, seen = hooked_clip(block=-1, seed=3)
    with torch.no_grad():
        cls_attn = reference_cls_attention(seen["q"][:, 0], seen["k"])
        torch.testing.assert_close(single_head_attention(out.attention(-1)), cls_attn, atol=1e-6, rtol=1e-4)
        t = Tokens.from_encoder(out, -2)
        name = "prumerge_plus" if plus else "prumerge"
        got = build_ops([{"op": name, "neighbors": 6}], [enc.hidden_size])(t, OpContext(encoders=[out]))
    for b in range(2):
        ref, idx = reference_prumerge(t.x[b], cls_attn[b], seen["k"][b, 1:], plus, neighbors=6)
        assert len(idx) >= 1 and got.kept_counts()[b].item() == len(idx) + 1
        torch.testing.assert_close(got.x[b, : len(ref)], ref, atol=1e-5, rtol=1e-5)


def loop_prumerge(x, a, k, plus, neighbors=32, extra=True):
    """PruMerge(+) with the options attention="head_mean", order="grid" (compactvl's earlier rule), plain loops."""
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


OLD = {"attention": "head_mean", "order": "grid", "layer": None}


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_head_mean_grid_options_equal_plain_loop(plus):
    enc, t = make()
    name = "prumerge_plus" if plus else "prumerge"
    out = build_ops([{"op": name, "neighbors": 6, **OLD}], [4])(t, OpContext(encoders=[enc]))
    for b in range(2):
        ref, keep = loop_prumerge(t.x[b], enc.att[b].mean(0), enc.k[b], plus, neighbors=6)
        assert out.kept_counts()[b].item() == len(keep) + 1
        torch.testing.assert_close(out.x[b, : len(ref)], ref)
        # provenance: kept patches -> their tokens; all pruned patches -> the extra token
        expect = torch.full((36,), len(keep))
        expect[keep] = torch.arange(len(keep))
        assert torch.equal(out.assign[b], expect) and out.size[b, len(keep)] == 36 - len(keep)
    assert enc.calls == [7]  # layer=None: attention of the tokens' own layer, asked once for the whole batch
    assert 0 < out.kept_counts().float().mean() < 36


def test_prumerge_plus_keeps_more_and_without_extra_token_marks_pruned():
    enc, t = make()
    ctx = OpContext(encoders=[enc])
    n = build_ops([{"op": "prumerge"}], [4])(t, ctx).kept_counts()
    n_plus = build_ops([{"op": "prumerge_plus"}], [4])(t, ctx).kept_counts()
    assert (n_plus > n).all()
    out = build_ops([{"op": "prumerge", "extra_token": False, **OLD}], [4])(t, ctx)
    assert ((out.assign >= 0).sum(1) == out.kept_counts()).all()  # one patch per kept token, the rest pruned
    ref, keep = loop_prumerge(t.x[0], enc.att[0].mean(0), enc.k[0], False, extra=False)
    torch.testing.assert_close(out.x[0, : len(keep)], ref)
    with pytest.raises(ConfigError, match="attention"):
        build_ops([{"op": "prumerge", "attention": "max"}], [4])
    with pytest.raises(ConfigError, match="order"):
        build_ops([{"op": "prumerge_plus", "order": "random"}], [4])


def test_prumerge_after_pixel_shuffle_pools_attention_and_keys():
    enc, t = make(h=8, w=8, C=2)
    ctx = OpContext(encoders=[enc])
    ps = build_ops([{"op": "pixel_shuffle"}], [2])(t)
    win = ps.assign[0]  # patch -> window
    k = torch.zeros(16, 6, dtype=torch.float64).index_add_(0, win, enc.k[0]) / 4
    out = build_ops([{"op": "pixel_shuffle"}, {"op": "prumerge", "neighbors": 5, **OLD}], [2])(t, ctx)
    a = torch.zeros(16, dtype=torch.float64).index_add_(0, win, enc.att[0].mean(0))
    ref, keep = loop_prumerge(ps.x[0], a, k, False, neighbors=5)
    torch.testing.assert_close(out.x[0, : len(ref)], ref)
    # default: the reference attention per patch, summed into the windows; tokens by decreasing pooled attention
    out = build_ops([{"op": "pixel_shuffle"}, {"op": "prumerge", "neighbors": 5}], [2])(t, ctx)
    a = torch.zeros(16, dtype=torch.float64).index_add_(0, win, reference_cls_attention(enc.q_cls, enc.k_all)[0])
    ref, keep = loop_prumerge(ps.x[0], a, k, False, neighbors=5)
    order = sorted(range(len(keep)), key=lambda s: -float(a[keep[s]]))
    torch.testing.assert_close(out.x[0, : len(keep)], ref[order])
    torch.testing.assert_close(out.x[0, len(keep)], ref[-1])


def reference_visionzip(x, attn, key, heads, dominant_num, contextual_num):
    """One sample, transcribed from the reference (github.com/dvlab-research/VisionZip, visionzip/clip_encoder.py,
    CLIPVisionTower_VisionZip.forward; metric from visionzip/utils.py, CLIPAttention_forward:
    raw_key_states.mean(1), keys [B, heads, N, head_dim] averaged over heads), without the CLS token the reference
    also emits first: dominant = topk of the head-summed CLS attention, in index order; the rest in order;
    targets = arange(0, n_rest, max(1, n_rest // contextual))[:contextual]; the others join argmax cosine of the
    normalised metric; contextual = target + (one-hot sum) / counts.clamp(min=1)."""
    N = x.shape[0]
    metric = key.view(N, heads, -1).mean(1)
    topk = attn.sum(0).topk(dominant_num).indices
    mask = torch.ones(N, dtype=torch.bool).scatter_(0, topk, False)  # True = not dominant
    dominant_tokens = x[~mask]
    metric_normalized = metric[mask] / metric[mask].norm(dim=-1, keepdim=True)
    hidden = x[mask]
    n_rest = metric_normalized.shape[0]
    step = max(1, n_rest // contextual_num)
    target_indices = torch.arange(0, n_rest, step)[:contextual_num]
    others = ~torch.isin(torch.arange(n_rest), target_indices)
    similarity = metric_normalized[others] @ metric_normalized[target_indices].T
    one_hot = torch.zeros(int(others.sum()), contextual_num, dtype=x.dtype)
    one_hot.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    contextual = hidden[target_indices] + one_hot.T @ hidden[others] / counts
    groups = [torch.nonzero(mask).flatten()[others][one_hot[:, c] > 0].tolist() for c in range(contextual_num)]
    return torch.cat([dominant_tokens, contextual]), groups


@pytest.mark.parametrize("dominant,contextual", [(7, 4), (20, 6)])
def test_visionzip_equals_the_reference(dominant, contextual):
    enc, t = make(B=3, h=8, w=8)
    pipe = build_ops([{"op": "visionzip", "dominant": dominant, "contextual": contextual}], [4])
    out = pipe(t, OpContext(encoders=[enc]))
    n = dominant + contextual
    assert out.kept_counts().tolist() == [n] * 3 and pipe.expected_tokens([64], [(8, 8)]) == n
    for b in range(3):
        ref, groups = reference_visionzip(t.x[b], enc.att[b], enc.k[b], 3, dominant, contextual)
        torch.testing.assert_close(out.x[b], ref, atol=1e-6, rtol=1e-6)
        sizes = [1.0] * dominant + [1.0 + len(g) for g in groups]
        assert out.size[b].tolist() == sizes and out.size[b].sum() == 64
        for c, g in enumerate(groups):
            assert (out.assign[b, g] == dominant + c).all()


def test_visionzip_on_a_clip_encoder_equals_the_reference_hooks():
    """End to end on a tiny random CLIP: the block producing hidden_states[-2] hooked as the reference patches it
    (visionzip/utils.py CLIPAttention_forward: per-head softmax(q·kᵀ/sqrt(d)) — attentions[-2] — and the metric
    raw keys [B, heads, T, d] .mean(1)); features hidden_states[-2][:, 1:]."""
    enc, out, seen = hooked_clip(block=-2, seed=4)
    with torch.no_grad():
        t = Tokens.from_encoder(out, -2)
        got = build_ops([{"op": "visionzip", "dominant": 10, "contextual": 5}], [enc.hidden_size])(
            t, OpContext(encoders=[out]))
    B, T, C = seen["k"].shape
    H = enc.num_heads
    q = seen["q"].view(B, T, H, -1).transpose(1, 2) * (C // H) ** -0.5
    k = seen["k"].view(B, T, H, -1).transpose(1, 2)
    attentions = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, T, T]
    for b in range(2):
        # reference_visionzip takes the patch keys [N, H·d] and averages the heads (the reference's k.mean(1))
        keys = k[b, :, 1:].transpose(0, 1).reshape(T - 1, C)
        ref, groups = reference_visionzip(t.x[b], attentions[b, :, 0, 1:], keys, H, 10, 5)
        assert got.kept_counts()[b].item() == 15
        torch.testing.assert_close(got.x[b], ref, atol=1e-5, rtol=1e-5)
        for c, g in enumerate(groups):
            assert (got.assign[b, g] == 10 + c).all()


def test_visionzip_head_mean_keys_is_not_concatenated_keys():
    """The reference metric (keys averaged over heads) groups differently from the concatenated keys here."""
    enc, t = make(B=3, h=8, w=8)
    ctx = OpContext(encoders=[enc])
    ours = build_ops([{"op": "visionzip", "dominant": 7, "contextual": 4}], [4])(t, ctx)
    old = build_ops([{"op": "visionzip", "dominant": 7, "contextual": 4, "similarity": "keys"}], [4])(t, ctx)
    assert not torch.equal(ours.assign, old.assign)
    with pytest.raises(ConfigError, match="similarity"):
        build_ops([{"op": "visionzip", "similarity": "hidden"}], [4])


def loop_visionzip(x, a, k, dominant, contextual):
    """VisionZip with the option similarity="keys" (cosine of the concatenated keys), plain loops."""
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


def test_visionzip_keys_option_equals_plain_loop():
    enc, t = make()
    pipe = build_ops([{"op": "visionzip", "dominant": 7, "contextual": 4, "similarity": "keys"}], [4])
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
    # default: the last block (the reference's layers[23] of CLIP-L), normalised from -1
    assert build_ops([{"op": "prumerge_plus"}], [4]).required_layers(7, 12) == [[7, 11]]
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
        assert_row_equals_alone(out, b, one)


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
