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
from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens
from op_helpers import kept_indices, text_tokens as make


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


@pytest.mark.parametrize("knobs,match", [({"theta": 1.0}, r"theta=1.0 .* \[0, 1\)"),
                                         ({"theta": -0.1}, "theta=-0.1"), ({"theta": True}, "theta=True"),
                                         ({"negate": "yes"}, "negate='yes'"), ({"alpha": 1}, "no knob 'alpha'")])
def test_cdpruner_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        build_ops([{"op": "cdpruner", **knobs}], [6])
