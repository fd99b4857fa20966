"""Diversity-based selection ops: divprune (DivPrune, CVPR 2025) and vispruner (VisPruner, ICCV 2025).

Each op is checked against a plain per-sample transcription of its reference code, written here from reading it
(not copied): DivPrune — github.com/vbdi/divprune, LLaVA/llava/model/llava_arch.py, LlavaMetaForCausalLM.DivPrune;
VisPruner — github.com/Theia-4869/VisPruner, llava/model/llava_arch.py, LlavaMetaForCausalLM.encode_images.
"""
from __future__ import annotations

import pytest
import torch

from compactvl.compression import op_spec
from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens
from op_helpers import assert_row_equals_alone, FakeEncoder


def make(B=2, h=8, w=8, C=6, heads=3, layer=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = h * w
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    att = (torch.randn(B, heads, N, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    enc = FakeEncoder({layer: x}, (h, w), att, torch.randn(B, N, 4, generator=g, dtype=torch.float64))
    return enc, Tokens.from_encoder(enc, layer)


def kept_indices(out, b):
    return torch.nonzero(out.assign[b] >= 0).flatten().tolist()


def ragged(counts, h=4, w=5):
    """The same tokens batched with different valid counts, and each sample alone."""
    enc, full = make(B=len(counts), h=h, w=w)
    N = h * w
    n = torch.tensor(counts)
    batched = full.select(torch.arange(N).expand(len(counts), N), torch.arange(N) < n[:, None])
    alone = [Tokens.from_grid(enc.features[7][b : b + 1], (h, w), layer=7).select(torch.arange(c)[None])
             for b, c in enumerate(counts)]
    return enc, batched, alone


def assert_batch_invariant(spec, counts=(20, 11, 6)):
    enc, batched, alone = ragged(list(counts))
    pipe = build_ops([spec], [6])
    out = pipe(batched, OpContext(encoders=[enc]))
    for b, t in enumerate(alone):
        one = pipe(t, OpContext(encoders=[enc.sample(b)]))
        assert_row_equals_alone(out, b, one)
    return out


# ----------------------------------------------------------------------------------------------- divprune
def ref_divprune(x, k):
    """DivPrune for one image (transcribed from vbdi/divprune llava_arch.py, DivPrune + pairwise_cosine_similarity):
    distance 1 - cos; first pick = column with the largest second-smallest distance; then the column whose minimum
    distance to the picked rows is largest; kept indices sorted (prepare_inputs_labels_for_multimodal)."""
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    picks = []
    for _ in range(k):
        if picks:
            score = dist[torch.tensor(picks)].min(dim=0).values
        else:
            score = dist.sort(dim=0).values[1]
        picks.append(int(score.argmax()))
    return sorted(picks)


@pytest.mark.parametrize("knobs,k", [({"count": 7}, 7), ({"ratio": 0.25}, 16), ({}, 6)])
def test_divprune_equals_reference(knobs, k):
    enc, t = make(B=3)
    pipe = build_ops([{"op": "divprune", **knobs}], [6])
    out = pipe(t)
    assert out.kept_counts().tolist() == [k] * 3 and pipe.expected_tokens([64], [(8, 8)]) == k  # {}: 0.098·64
    for b in range(3):
        idx = ref_divprune(t.x[b], k)
        assert kept_indices(out, b) == idx
        torch.testing.assert_close(out.x[b], t.x[b, idx], atol=1e-5, rtol=1e-5)


def test_divprune_in_float32_and_after_another_op():
    _, t = make(B=2, C=16)
    t = t.replace(x=t.x.float())
    pooled = build_ops([{"op": "avgpool", "k": 2}], [16])(t)
    out = build_ops([{"op": "avgpool", "k": 2}, {"op": "divprune", "count": 5}], [16])(t)
    for b in range(2):
        idx = ref_divprune(pooled.x[b], 5)
        torch.testing.assert_close(out.x[b], pooled.x[b, idx], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [{"op": "divprune", "ratio": 0.3}, {"op": "divprune", "count": 4},
                                  {"op": "divprune", "count": 30}])
def test_divprune_batch_invariance_with_different_counts(spec):
    out = assert_batch_invariant(spec)
    want = {"ratio": [6, 3, 2], "count": [4, 4, 4] if spec.get("count") == 4 else [20, 11, 6]}
    assert out.kept_counts().tolist() == want["ratio" if "ratio" in spec else "count"]


def test_divprune_never_repicks_a_token():
    """Documented difference: only 3 distinct vectors, 5 tokens kept -> 5 distinct tokens (the reference could
    pick a selected token again once the rest duplicate it)."""
    base = torch.randn(3, 4, dtype=torch.float64)
    x = base[torch.arange(12) % 3][None]
    out = build_ops([{"op": "divprune", "count": 5}], [4])(Tokens.from_grid(x, (3, 4)))
    assert out.kept_counts().tolist() == [5] and len(set(kept_indices(out, 0))) == 5
    assert sorted(set((torch.arange(12)[out.assign[0] >= 0] % 3).tolist())) == [0, 1, 2]  # all three kept first


# ----------------------------------------------------------------------------------------------- vispruner
def ref_vispruner(x, att, count, ratio):
    """VisPruner for one image (transcribed from Theia-4869/VisPruner llava_arch.py, encode_images): important =
    top ⌊T·r⌋ by head-mean CLS attention; residual list in descending attention; rounds of: A = even positions,
    B = odd positions, drop the r = min(8, |R| - T_div) A tokens most similar (max cos) to any B, new list = kept A
    by descending score + B. Kept tokens in index order."""
    a = att.mean(0)
    n_imp = int(count * ratio)
    n_div = count - n_imp
    ranked = sorted(range(len(a)), key=lambda i: -float(a[i]))
    important, residual = ranked[:n_imp], ranked[n_imp:]
    unit = x / x.norm(dim=-1, keepdim=True)
    while n_div > 0:
        r = min(8, len(residual) - n_div)
        if r <= 0:
            break
        A, B = residual[0::2], residual[1::2]
        score = {i: max(float(unit[i] @ unit[j]) for j in B) for i in A}
        by_score = sorted(A, key=lambda i: -score[i])
        residual = by_score[r:] + B
    return sorted(important + (residual if n_div > 0 else []))


@pytest.mark.parametrize("count,ratio", [(16, 0.5), (20, 0.5), (32, 0.75), (12, 1.0), (10, 0.0)])
def test_vispruner_equals_reference(count, ratio):
    enc, t = make(B=2)
    pipe = build_ops([{"op": "vispruner", "count": count, "important_ratio": ratio}], [6])
    out = pipe(t, OpContext(encoders=[enc]))
    assert out.kept_counts().tolist() == [count, count] and pipe.expected_tokens([64], [(8, 8)]) == count
    for b in range(2):
        idx = ref_vispruner(t.x[b], enc.att[b], count, ratio)
        assert kept_indices(out, b) == idx
        torch.testing.assert_close(out.x[b], t.x[b, idx], atol=1e-5, rtol=1e-5)
    assert enc.calls == [7]  # attention of the tokens' own layer, once for the batch


def test_vispruner_odd_residual_follows_the_documented_generalisation():
    """|R| odd (the reference's shapes do not line up there): A = the ⌈|R|/2⌉ even positions."""
    enc, t = make(B=2)
    out = build_ops([{"op": "vispruner", "count": 19, "important_ratio": 0.5}], [6])(t, OpContext(encoders=[enc]))
    for b in range(2):
        assert kept_indices(out, b) == ref_vispruner(t.x[b], enc.att[b], 19, 0.5)


@pytest.mark.parametrize("spec", [{"op": "vispruner", "count": 8}, {"op": "vispruner", "count": 5,
                                                                      "important_ratio": 0.3},
                                  {"op": "vispruner", "count": 30}])
def test_vispruner_batch_invariance_with_different_counts(spec):
    out = assert_batch_invariant(spec)
    assert out.kept_counts().tolist() == [min(spec["count"], n) for n in (20, 11, 6)]


def test_vispruner_substitute_layer_knob_and_budget():
    enc, t = make()
    enc.attention_substitute = True
    pipe = build_ops([{"op": "vispruner", "count": 8, "layer": 3}], [6])
    out = pipe(t, OpContext(encoders=[enc]))
    assert enc.calls == [3] and pipe.required_layers(7, 12) == [[3, 7]]
    assert any("no CLS token" in n and "mean attention" in n for n in out.notes)
    assert op_spec("vispruner", {"tokens": 8}, 36) == {"op": "vispruner", "count": 8}
    assert op_spec("vispruner", {"keep": 0.25}, 36) == {"op": "vispruner", "count": 9}
    assert op_spec("vispruner", {"tokens": 8}, None) == {"op": "vispruner", "count": 8}
    with pytest.raises(ConfigError, match="give a count"):
        op_spec("vispruner", {"keep": 0.25}, None)


@pytest.mark.parametrize("knobs,match", [({"count": 0}, "count=0 must be an integer >= 1"),
                                         ({"count": 8.0}, "count=8.0"),
                                         ({"important_ratio": 1.5}, r"important_ratio=1.5 .* \[0, 1\]"),
                                         ({"important_ratio": -0.1}, "important_ratio=-0.1")])
def test_vispruner_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "vispruner", **knobs}], [6])
