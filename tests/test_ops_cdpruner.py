"""CDPruner (NeurIPS 2025): conditional DPP token selection.

Checked against a plain per-image transcription of the reference, written here from reading it (not copied):
github.com/Theia-4869/CDPruner, llava/model/llava_arch.py, LlavaMetaForCausalLM.encode_images (cosine similarity,
query relevance, kernel, fast greedy MAP inference of the DPP) with the text/image embeddings of
llava/model/multimodal_encoder/clip_encoder.py, CLIPVisionTower.forward. In compactvl both the similarity and the
relevance use the tokens' own features (documented in the op), so the transcription takes x for both.
"""
from __future__ import annotations

import pytest
import torch

import compactvl.ops.cdpruner  # noqa: F401  (registers "cdpruner")
from compactvl.compression import op_spec
from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.ops.cdpruner import NOTE_EMPTY, NOTE_NO_TEXT
from compactvl.tokens import Tokens


def ref_cdpruner(x, text, k, theta=None, negate=True):
    """One image (the reference's B = 1 path): x [N, C] tokens, text [M, C] instruction embeddings or None
    (relevance 1: the plain-DPP substitute); returns the kept indices, sorted as the reference's select_idx."""
    N = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = unit @ unit.t()
    if text is None:
        rel = torch.ones(N, dtype=x.dtype)
    else:
        tunit = text / text.norm(dim=-1, keepdim=True)
        rel = unit @ tunit.t()  # [N, M]
        rel = (-rel if negate else rel).mean(dim=-1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    if theta is not None:  # the reference's commented-out weighting
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    L = rel[:, None] * sim * rel[None, :]
    cis = torch.zeros(k, N, dtype=x.dtype)
    di2s = torch.diagonal(L).clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (L[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s = di2s - eis ** 2
        di2s[j] = -float("inf")
    return sorted(picks)


def make(B=3, h=8, w=8, C=16, T=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, C, generator=g, dtype=dtype)
    text = torch.randn(B, T, C, generator=g, dtype=dtype)
    return Tokens.from_grid(x, (h, w)), text


def kept_indices(out, b):
    return torch.nonzero(out.assign[b] >= 0).flatten().tolist()


@pytest.mark.parametrize("knobs,k,ref_kw", [({"count": 7}, 7, {}), ({"ratio": 0.25}, 16, {}),
                                            ({"count": 9, "theta": 0.5}, 9, {"theta": 0.5}),
                                            ({"count": 9, "theta": 0.8}, 9, {"theta": 0.8}),
                                            ({"count": 9, "negate": False}, 9, {"negate": False})])
def test_cdpruner_equals_reference_with_text(knobs, k, ref_kw):
    t, text = make(C=32)
    pipe = build_ops([{"op": "cdpruner", **knobs}], [32])
    out = pipe(t, OpContext(text=text, text_mask=torch.ones(3, 5, dtype=torch.bool)))
    assert out.kept_counts().tolist() == [k] * 3 and not out.notes
    for b in range(3):
        idx = ref_cdpruner(t.x[b], text[b], k, **ref_kw)
        assert kept_indices(out, b) == idx
        torch.testing.assert_close(out.x[b], t.x[b, idx])


def test_cdpruner_default_count_and_expected_tokens():
    pipe = build_ops([{"op": "cdpruner"}], [16])
    assert pipe.expected_tokens([576], [(24, 24)]) == 64 and pipe.expected_tokens([40], [None]) == 40
    assert build_ops([{"op": "cdpruner", "ratio": 0.1}], [16]).expected_tokens([576], [(24, 24)]) == 58


def test_cdpruner_text_changes_the_selection():
    t, text = make(C=32)
    a = build_ops([{"op": "cdpruner", "count": 10}], [32])(t, OpContext(text=text))
    b = build_ops([{"op": "cdpruner", "count": 10}], [32])(t, OpContext(text=-text))
    assert any(kept_indices(a, i) != kept_indices(b, i) for i in range(3))


@pytest.mark.parametrize("ctx_kind", ["none", "width"])
def test_cdpruner_without_usable_text_is_plain_dpp_with_a_note(ctx_kind):
    t, text = make(C=16)
    ctx = OpContext() if ctx_kind == "none" else OpContext(text=torch.randn(3, 4, 24, dtype=torch.float64))
    out = build_ops([{"op": "cdpruner", "count": 8}], [16])(t, ctx)
    assert len(out.notes) == 1 and "relevance 1" in out.notes[0] and "plain DPP" in out.notes[0]
    if ctx_kind == "none":
        assert out.notes == (NOTE_NO_TEXT,)
    else:
        assert "24 wide" in out.notes[0] and "16" in out.notes[0]
    for b in range(3):
        assert kept_indices(out, b) == ref_cdpruner(t.x[b], None, 8)


def test_cdpruner_text_mask_and_empty_prompt():
    """Padded text embeddings are ignored; a sample with an empty prompt falls back to relevance 1 (noted)."""
    t, text = make(C=16, T=6)
    tm = torch.zeros(3, 6, dtype=torch.bool)
    tm[0, 2:] = True  # left-padded, as Processor.text_batch
    tm[1, :] = True
    garbage = text.clone()
    garbage[0, :2] = 1e3 * torch.randn(2, 16, dtype=torch.float64)
    out = build_ops([{"op": "cdpruner", "count": 8}], [16])(t, OpContext(text=garbage, text_mask=tm))
    assert out.notes == (NOTE_EMPTY,)
    assert kept_indices(out, 0) == ref_cdpruner(t.x[0], text[0, 2:], 8)
    assert kept_indices(out, 1) == ref_cdpruner(t.x[1], text[1], 8)
    assert kept_indices(out, 2) == ref_cdpruner(t.x[2], None, 8)


@pytest.mark.parametrize("spec", [{"op": "cdpruner", "count": 5}, {"op": "cdpruner", "ratio": 0.3},
                                  {"op": "cdpruner", "count": 30, "theta": 0.5}])
def test_cdpruner_batch_invariance_with_different_counts(spec):
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
    for b, c in enumerate(counts):
        alone = Tokens.from_grid(x[b : b + 1], (4, 5)).select(torch.arange(c)[None])
        one = pipe(alone, OpContext(text=text[b : b + 1, 5 - T[b]:]))
        k = int(one.kept_counts()[0])
        assert out.kept_counts()[b] == k and not out.mask[b, k:].any()
        for f in ("x", "pos", "size"):
            torch.testing.assert_close(getattr(out, f)[b, :k], getattr(one, f)[0, :k])
        assert torch.equal(out.assign[b], one.assign[0])
        if k < x.shape[-1]:  # beyond the kernel's rank the reference divides by ~0 (see the exhausted test)
            assert kept_indices(one, 0) == ref_cdpruner(x[b, :c], text[b, 5 - T[b]:], k, theta=spec.get("theta"))


def test_cdpruner_exhausted_kernel_keeps_k_distinct_tokens():
    """Documented difference: rank 4 < k = 10. The reference would divide by ~0 after 4 picks; compactvl keeps
    the reference's first 4 picks, then the remaining tokens with the highest relevance."""
    t, text = make(B=2, h=4, w=5, C=4)
    out = build_ops([{"op": "cdpruner", "count": 10}], [4])(t, OpContext(text=text))
    assert out.kept_counts().tolist() == [10, 10] and torch.isfinite(out.x).all()
    for b in range(2):
        first = ref_cdpruner(t.x[b], text[b], 4)
        unit = t.x[b] / t.x[b].norm(dim=-1, keepdim=True)
        rel = -(unit @ (text[b] / text[b].norm(dim=-1, keepdim=True)).t()).mean(-1)
        rest = [i for i in rel.argsort(descending=True, stable=True).tolist() if i not in first][:6]
        assert kept_indices(out, b) == sorted(first + rest)


def test_cdpruner_duplicates_and_single_token():
    x = torch.randn(3, 4, dtype=torch.float64)[torch.arange(12) % 3][None]
    out = build_ops([{"op": "cdpruner", "count": 5}], [4])(Tokens.from_grid(x, (3, 4)))
    assert len(set(kept_indices(out, 0))) == 5 and torch.isfinite(out.x).all()
    assert sorted(set((torch.arange(12)[out.assign[0] >= 0] % 3).tolist())) == [0, 1, 2]
    one = Tokens.from_grid(torch.randn(1, 1, 4), (1, 1))
    o = build_ops([{"op": "cdpruner", "count": 3}], [4])(one, OpContext(text=torch.randn(1, 2, 4)))
    assert o.kept_counts().tolist() == [1]


def test_cdpruner_bfloat16_and_after_another_op():
    t, text = make(C=16, dtype=torch.float32)
    out = build_ops([{"op": "cdpruner", "count": 6}], [16]).to(torch.bfloat16)(
        t.replace(x=t.x.bfloat16()), OpContext(text=text.bfloat16()))
    assert out.x.dtype == torch.bfloat16 and out.kept_counts().tolist() == [6] * 3
    pooled = build_ops([{"op": "avgpool", "k": 2}], [16])(t)
    out = build_ops([{"op": "avgpool", "k": 2}, {"op": "cdpruner", "count": 5}], [16])(t, OpContext(text=text))
    for b in range(3):
        idx = ref_cdpruner(pooled.x[b], text[b], 5)
        torch.testing.assert_close(out.x[b], pooled.x[b, idx])


def test_cdpruner_text_batch_mismatch():
    t, text = make(C=16)
    with pytest.raises(InputError, match=r"expected \[3, T, 16\]"):
        build_ops([{"op": "cdpruner", "count": 4}], [16])(t, OpContext(text=text[:2]))


def test_cdpruner_budget_mapping():
    assert op_spec("cdpruner", {"tokens": 8}, 36) == {"op": "cdpruner", "count": 8}
    assert op_spec("cdpruner", {"keep": 0.25}, 36) == {"op": "cdpruner", "count": 9}
    assert op_spec("cdpruner", {"keep": 0.1}, 576) == {"op": "cdpruner", "count": 58}
    assert op_spec("cdpruner", {"keep": 0.25}, None) == {"op": "cdpruner", "ratio": 0.25}
    assert op_spec("cdpruner", {"tokens": 8}, None) == {"op": "cdpruner", "count": 8}
    assert op_spec("cdpruner", {"tokens": 50}, 36) == {"op": "cdpruner", "count": 36}
    assert build_ops([op_spec("cdpruner", {"tokens": 8}, 36)], [6]).expected_tokens([36], [(6, 6)]) == 8


@pytest.mark.parametrize("knobs,match", [({"ratio": 0}, "ratio=0"), ({"ratio": 1.5}, r"ratio=1.5 .* \(0, 1\]"),
                                         ({"count": 0}, "count=0 must be an integer >= 1"),
                                         ({"count": 2.5}, "count=2.5"),
                                         ({"ratio": 0.2, "count": 3}, "give one"),
                                         ({"theta": 1.0}, r"theta=1.0 .* \[0, 1\)"),
                                         ({"theta": -0.1}, "theta=-0.1"), ({"theta": True}, "theta=True"),
                                         ({"negate": "yes"}, "negate='yes'"), ({"alpha": 1}, "no knob 'alpha'")])
def test_cdpruner_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "cdpruner", **knobs}], [6])
