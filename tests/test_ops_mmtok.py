"""MMTok (ICLR 2026): greedy multimodal maximum coverage of the text tokens and the visual tokens.

Checked against a plain per-image transcription of the reference, written here from reading it (not copied):
github.com/Ironieser/MMTok, mmtok/core/semantic_selector.py, SemanticTokenSelector.mm_coverage_selection (text–vision
P and vision–vision Q similarities, their softmaxes and 1/m, 1/n scaling, [P; αQ], the greedy gain loop, sorted
indices; greedy_merged_jit_kernel is the same loop) and mmtok/core/mmtok_core.py, MMTokCore.select_vision_tokens
(n ≤ k keeps everything). In compactvl P and Q both use the tokens' own features (documented in the op), so the
transcription takes x for both the projected and the CLIP features.
"""
from __future__ import annotations

import pytest
import torch

import compactvl.ops.mmtok  # noqa: F401  (registers "mmtok")
from compactvl.compression import op_spec
from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.ops.mmtok import NOTE_EMPTY, NOTE_NO_TEXT
from compactvl.tokens import Tokens


def ref_mmtok(x, text, k, alpha=0.5, tv_temp=0.02, vv_temp=0.2):
    """One image: x [N, C] tokens, text [M, C] text-token embeddings or None (no text rows: compactvl's fallback);
    returns the kept indices, sorted as the reference's selected_indices."""
    N = x.shape[0]
    if N <= k:
        return list(range(N))
    xn = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    Q = torch.softmax((xn @ xn.t()) * (1.0 / vv_temp), dim=1) / N
    blocks = []
    if text is not None:
        zn = text / text.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        P = torch.softmax((zn @ xn.t()) * (1.0 / tv_temp), dim=1) / text.shape[0]
        blocks.append(P)
    blocks.append(Q * alpha)
    comb = torch.cat(blocks, dim=0)
    covered = torch.zeros(comb.shape[0], dtype=x.dtype)
    banned = torch.zeros(N, dtype=x.dtype)
    picks = []
    for _ in range(k):
        gain = (comb - covered[:, None]).clamp_min(0).sum(0) + banned
        j = int(torch.argmax(gain))
        picks.append(j)
        covered = torch.maximum(covered, comb[:, j])
        banned[j] = float("-inf")
    return sorted(picks)


def make(B=3, h=8, w=8, C=16, T=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, C, generator=g, dtype=dtype)
    text = torch.randn(B, T, C, generator=g, dtype=dtype)
    return Tokens.from_grid(x, (h, w)), text


def kept_indices(out, b):
    return torch.nonzero(out.assign[b] >= 0).flatten().tolist()


@pytest.mark.parametrize("knobs,k,ref_kw", [({"count": 7}, 7, {}), ({"ratio": 0.25}, 16, {}),
                                            ({"count": 12, "alpha": 2.0}, 12, {"alpha": 2.0}),
                                            ({"count": 12, "alpha": 0}, 12, {"alpha": 0.0}),
                                            ({"count": 9, "tv_temperature": 0.01, "vv_temperature": 0.5}, 9,
                                             {"tv_temp": 0.01, "vv_temp": 0.5})])
def test_mmtok_equals_reference_with_text(knobs, k, ref_kw):
    t, text = make(C=32)
    pipe = build_ops([{"op": "mmtok", **knobs}], [32])
    out = pipe(t, OpContext(text=text, text_mask=torch.ones(3, 5, dtype=torch.bool)))
    assert out.kept_counts().tolist() == [k] * 3 and not out.notes
    for b in range(3):
        idx = ref_mmtok(t.x[b], text[b], k, **ref_kw)
        assert kept_indices(out, b) == idx
        torch.testing.assert_close(out.x[b], t.x[b, idx])


def test_mmtok_greedy_steps_maximise_the_coverage_objective():
    """The objective itself, written as f(S) = Σ_t max_{j∈S} P_tj + α Σ_i max_{j∈S} Q_ij: each of the
    reference's greedy picks is the best marginal gain of f (so the op climbs f, not some other score)."""
    t, text = make(B=1, h=5, w=6, C=8, T=3, seed=3)
    x, z = t.x[0], text[0]
    xn, zn = x / x.norm(dim=-1, keepdim=True), z / z.norm(dim=-1, keepdim=True)
    P = torch.softmax(zn @ xn.t() / 0.02, 1) / 3
    Q = torch.softmax(xn @ xn.t() / 0.2, 1) / 30

    def f(S):
        return (P[:, S].amax(1).sum() + 0.5 * Q[:, S].amax(1).sum()) if S else torch.tensor(0.0, dtype=x.dtype)

    S: list[int] = []
    for _ in range(6):
        gains = [float(f(S + [j]) - f(S)) if j not in S else float("-inf") for j in range(30)]
        S.append(max(range(30), key=lambda j: (gains[j], -j)))
    out = build_ops([{"op": "mmtok", "count": 6}], [8])(t, OpContext(text=text))
    assert kept_indices(out, 0) == sorted(S) == ref_mmtok(x, z, 6)


def test_mmtok_default_count_and_expected_tokens():
    pipe = build_ops([{"op": "mmtok"}], [16])
    assert pipe.expected_tokens([576], [(24, 24)]) == 64 and pipe.expected_tokens([40], [None]) == 40
    assert build_ops([{"op": "mmtok", "ratio": 0.1}], [16]).expected_tokens([576], [(24, 24)]) == 58
    op = pipe.ops[0]
    assert (op.count, op.ratio, op.alpha, op.tv_temperature, op.vv_temperature) == (64, None, 0.5, 0.02, 0.2)


def test_mmtok_text_changes_the_selection():
    t, text = make(C=32)
    a = build_ops([{"op": "mmtok", "count": 10}], [32])(t, OpContext(text=text))
    b = build_ops([{"op": "mmtok", "count": 10}], [32])(t, OpContext(text=-text))
    assert any(kept_indices(a, i) != kept_indices(b, i) for i in range(3))


@pytest.mark.parametrize("ctx_kind", ["none", "width"])
def test_mmtok_without_usable_text_is_vision_coverage_with_a_note(ctx_kind):
    t, _ = make(C=16)
    ctx = OpContext() if ctx_kind == "none" else OpContext(text=torch.randn(3, 4, 24, dtype=torch.float64))
    out = build_ops([{"op": "mmtok", "count": 8}], [16])(t, ctx)
    assert len(out.notes) == 1 and "vision–vision coverage only" in out.notes[0]
    if ctx_kind == "none":
        assert out.notes == (NOTE_NO_TEXT,)
    else:
        assert "24 wide" in out.notes[0] and "16" in out.notes[0]
    for b in range(3):
        assert kept_indices(out, b) == ref_mmtok(t.x[b], None, 8)


def test_mmtok_text_mask_and_empty_prompt():
    """Padded text embeddings are ignored (m counts the valid ones); an empty prompt drops the text term (noted)."""
    t, text = make(C=16, T=6)
    tm = torch.zeros(3, 6, dtype=torch.bool)
    tm[0, 2:] = True  # left-padded, as Processor.text_batch
    tm[1, :] = True
    garbage = text.clone()
    garbage[0, :2] = 1e3 * torch.randn(2, 16, dtype=torch.float64)
    out = build_ops([{"op": "mmtok", "count": 8}], [16])(t, OpContext(text=garbage, text_mask=tm))
    assert out.notes == (NOTE_EMPTY,)
    assert kept_indices(out, 0) == ref_mmtok(t.x[0], text[0, 2:], 8)
    assert kept_indices(out, 1) == ref_mmtok(t.x[1], text[1], 8)
    assert kept_indices(out, 2) == ref_mmtok(t.x[2], None, 8)


@pytest.mark.parametrize("spec", [{"op": "mmtok", "count": 5}, {"op": "mmtok", "ratio": 0.3},
                                  {"op": "mmtok", "count": 30, "alpha": 1.5},
                                  {"op": "mmtok", "count": 8, "tv_temperature": 0.01}])
def test_mmtok_batch_invariance_with_different_counts(spec):
    counts, T = [20, 11, 6], [3, 5, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    text = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    tm = torch.arange(5)[None] >= 5 - torch.tensor(T)[:, None]  # left padded, different prompt lengths
    n = torch.tensor(counts)
    full = Tokens.from_grid(x, (4, 5))
    batched = full.select(torch.arange(20).expand(3, 20), torch.arange(20) < n[:, None])
    pipe = build_ops([spec], [12])
    out = pipe(batched, OpContext(text=text, text_mask=tm))
    want = {"count": [min(spec.get("count", 0), c) for c in counts], "ratio": [6, 3, 2]}
    assert out.kept_counts().tolist() == want["ratio" if "ratio" in spec else "count"]
    ref_kw = {"alpha": spec.get("alpha", 0.5), "tv_temp": spec.get("tv_temperature", 0.02)}
    for b, c in enumerate(counts):
        alone = Tokens.from_grid(x[b : b + 1], (4, 5)).select(torch.arange(c)[None])
        one = pipe(alone, OpContext(text=text[b : b + 1, 5 - T[b]:]))
        k = int(one.kept_counts()[0])
        assert out.kept_counts()[b] == k and not out.mask[b, k:].any()
        for f in ("x", "pos", "size"):
            torch.testing.assert_close(getattr(out, f)[b, :k], getattr(one, f)[0, :k])
        assert torch.equal(out.assign[b], one.assign[0])
        assert kept_indices(one, 0) == ref_mmtok(x[b, :c], text[b, 5 - T[b]:], k, **ref_kw)


def test_mmtok_small_images_duplicates_and_single_token():
    t, text = make(B=2, h=3, w=4, C=8)
    out = build_ops([{"op": "mmtok", "count": 20}], [8])(t, OpContext(text=text))  # n = 12 ≤ k: all kept
    assert out.kept_counts().tolist() == [12, 12] and torch.equal(out.x, t.x)
    x = torch.randn(3, 4, dtype=torch.float64)[torch.arange(12) % 3][None]
    out = build_ops([{"op": "mmtok", "count": 5}], [4])(Tokens.from_grid(x, (3, 4)))
    assert len(set(kept_indices(out, 0))) == 5 and torch.isfinite(out.x).all()
    assert kept_indices(out, 0) == ref_mmtok(x[0], None, 5)
    one = Tokens.from_grid(torch.randn(1, 1, 4), (1, 1))
    o = build_ops([{"op": "mmtok", "count": 3}], [4])(one, OpContext(text=torch.randn(1, 2, 4)))
    assert o.kept_counts().tolist() == [1]


def test_mmtok_bfloat16_and_after_another_op():
    t, text = make(C=16, dtype=torch.float32)
    out = build_ops([{"op": "mmtok", "count": 6}], [16]).to(torch.bfloat16)(
        t.replace(x=t.x.bfloat16()), OpContext(text=text.bfloat16()))
    assert out.x.dtype == torch.bfloat16 and out.kept_counts().tolist() == [6] * 3
    pooled = build_ops([{"op": "avgpool", "k": 2}], [16])(t)
    out = build_ops([{"op": "avgpool", "k": 2}, {"op": "mmtok", "count": 5}], [16])(t, OpContext(text=text))
    for b in range(3):
        idx = ref_mmtok(pooled.x[b], text[b], 5)
        torch.testing.assert_close(out.x[b], pooled.x[b, idx])


def test_mmtok_text_batch_mismatch():
    t, text = make(C=16)
    with pytest.raises(InputError, match=r"expected \[3, T, 16\]"):
        build_ops([{"op": "mmtok", "count": 4}], [16])(t, OpContext(text=text[:2]))


def test_mmtok_budget_mapping():
    assert op_spec("mmtok", {"tokens": 8}, 36) == {"op": "mmtok", "count": 8}
    assert op_spec("mmtok", {"keep": 0.25}, 36) == {"op": "mmtok", "count": 9}
    assert op_spec("mmtok", {"keep": 0.1}, 576) == {"op": "mmtok", "count": 58}
    assert op_spec("mmtok", {"keep": 0.25}, None) == {"op": "mmtok", "ratio": 0.25}
    assert op_spec("mmtok", {"tokens": 8}, None) == {"op": "mmtok", "count": 8}
    assert op_spec("mmtok", {"tokens": 50}, 36) == {"op": "mmtok", "count": 36}
    assert build_ops([op_spec("mmtok", {"tokens": 8}, 36)], [6]).expected_tokens([36], [(6, 6)]) == 8


@pytest.mark.parametrize("knobs,match", [({"ratio": 0}, "ratio=0"), ({"ratio": 1.5}, r"ratio=1.5 .* \(0, 1\]"),
                                         ({"count": 0}, "count=0 must be an integer >= 1"),
                                         ({"count": 2.5}, "count=2.5"),
                                         ({"ratio": 0.2, "count": 3}, "give one"),
                                         ({"alpha": -0.1}, "alpha=-0.1 .* ≥ 0"),
                                         ({"alpha": float("nan")}, "alpha=nan"), ({"alpha": True}, "alpha=True"),
                                         ({"tv_temperature": 0}, "tv_temperature=0 .* > 0"),
                                         ({"vv_temperature": -1}, "vv_temperature=-1"),
                                         ({"vv_temperature": "0.2"}, "vv_temperature='0.2'"),
                                         ({"theta": 0.5}, "no knob 'theta'")])
def test_mmtok_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "mmtok", **knobs}], [6])
