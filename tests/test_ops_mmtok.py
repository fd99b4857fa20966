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
from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens
from op_helpers import kept_indices, text_tokens as make


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


@pytest.mark.parametrize("knobs,match", [({"alpha": -0.1}, "alpha=-0.1 .* ≥ 0"),
                                         ({"alpha": float("nan")}, "alpha=nan"), ({"alpha": True}, "alpha=True"),
                                         ({"tv_temperature": 0}, "tv_temperature=0 .* > 0"),
                                         ({"vv_temperature": -1}, "vv_temperature=-1"),
                                         ({"vv_temperature": "0.2"}, "vv_temperature='0.2'"),
                                         ({"theta": 0.5}, "no knob 'theta'")])
def test_mmtok_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "mmtok", **knobs}], [6])
