"""What the text-conditioned selection ops (CDPruner, MMTok) share, each against its own reference transcription:
the prompt changes the selection; without usable text (none, or another width) the documented fallback with one
note; padded prompt embeddings are ignored and an empty prompt falls back for that sample (noted); batch 1 ==
batch N with different token counts and prompt lengths; bf16; composing after another op; a prompt batch that
does not match the tokens' is a clear error."""
from __future__ import annotations

import pytest
import torch

from compactvl.errors import InputError
from compactvl.ops import OpContext, build_ops, cdpruner, mmtok
from compactvl.tokens import Tokens
from op_helpers import assert_row_equals_alone, kept_indices, text_tokens
from test_ops_cdpruner import ref_cdpruner
from test_ops_mmtok import ref_mmtok

TEXT_OPS = [("cdpruner", ref_cdpruner), ("mmtok", ref_mmtok)]
MODULES = {"cdpruner": cdpruner, "mmtok": mmtok}
FALLBACK = {"cdpruner": "plain DPP", "mmtok": "vision–vision coverage only"}


def ref_knobs(op: str, spec: dict) -> dict:
    """The reference transcription's keywords for an op spec."""
    if op == "cdpruner":
        return {"theta": spec.get("theta")}
    return {"alpha": spec.get("alpha", 0.5), "tv_temp": spec.get("tv_temperature", 0.02)}


@pytest.mark.parametrize("op,ref", TEXT_OPS)
def test_the_prompt_changes_the_selection(op, ref):
    t, text = text_tokens(C=32)
    a = build_ops([{"op": op, "count": 10}], [32])(t, OpContext(text=text))
    b = build_ops([{"op": op, "count": 10}], [32])(t, OpContext(text=-text))
    assert any(kept_indices(a, i) != kept_indices(b, i) for i in range(3))


@pytest.mark.parametrize("ctx_kind", ["none", "width"])
@pytest.mark.parametrize("op,ref", TEXT_OPS)
def test_without_usable_text_the_fallback_with_one_note(op, ref, ctx_kind):
    t, _ = text_tokens(C=16)
    ctx = OpContext() if ctx_kind == "none" else OpContext(text=torch.randn(3, 4, 24, dtype=torch.float64))
    out = build_ops([{"op": op, "count": 8}], [16])(t, ctx)
    assert len(out.notes) == 1 and FALLBACK[op] in out.notes[0]
    if ctx_kind == "none":
        assert out.notes == (MODULES[op].NOTE_NO_TEXT,)
    else:
        assert "24 wide" in out.notes[0] and "16" in out.notes[0]
    for b in range(3):
        assert kept_indices(out, b) == ref(t.x[b], None, 8)


@pytest.mark.parametrize("op,ref", TEXT_OPS)
def test_padded_prompt_embeddings_are_ignored_and_an_empty_prompt_falls_back(op, ref):
    t, text = text_tokens(C=16, T=6)
    tm = torch.zeros(3, 6, dtype=torch.bool)
    tm[0, 2:] = True  # left-padded, as Processor.text_batch
    tm[1, :] = True
    garbage = text.clone()
    garbage[0, :2] = 1e3 * torch.randn(2, 16, dtype=torch.float64)
    out = build_ops([{"op": op, "count": 8}], [16])(t, OpContext(text=garbage, text_mask=tm))
    assert out.notes == (MODULES[op].NOTE_EMPTY,)
    assert kept_indices(out, 0) == ref(t.x[0], text[0, 2:], 8)
    assert kept_indices(out, 1) == ref(t.x[1], text[1], 8)
    assert kept_indices(out, 2) == ref(t.x[2], None, 8)


@pytest.mark.parametrize("op,spec", [("cdpruner", {"count": 5}), ("cdpruner", {"ratio": 0.3}),
                                     ("cdpruner", {"count": 30, "theta": 0.5}), ("mmtok", {"count": 5}),
                                     ("mmtok", {"ratio": 0.3}), ("mmtok", {"count": 30, "alpha": 1.5}),
                                     ("mmtok", {"count": 8, "tv_temperature": 0.01})])
def test_batch_invariance_with_different_counts_and_prompts(op, spec):
    ref = dict(TEXT_OPS)[op]
    counts, T = [20, 11, 6], [3, 5, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    text = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    tm = torch.arange(5)[None] >= 5 - torch.tensor(T)[:, None]  # left padded, different prompt lengths
    n = torch.tensor(counts)
    batched = Tokens.from_grid(x, (4, 5)).select(torch.arange(20).expand(3, 20), torch.arange(20) < n[:, None])
    pipe = build_ops([{"op": op, **spec}], [12])
    out = pipe(batched, OpContext(text=text, text_mask=tm))
    want = {"count": [min(spec.get("count", 0), c) for c in counts], "ratio": [6, 3, 2]}
    assert out.kept_counts().tolist() == want["ratio" if "ratio" in spec else "count"]
    for b, c in enumerate(counts):
        alone = Tokens.from_grid(x[b : b + 1], (4, 5)).select(torch.arange(c)[None])
        one = pipe(alone, OpContext(text=text[b : b + 1, 5 - T[b]:]))
        k = assert_row_equals_alone(out, b, one)
        if op == "mmtok" or k < x.shape[-1]:  # cdpruner beyond the kernel's rank: see its exhausted-kernel test
            assert kept_indices(one, 0) == ref(x[b, :c], text[b, 5 - T[b]:], k, **ref_knobs(op, spec))


@pytest.mark.parametrize("op,ref", TEXT_OPS)
def test_bfloat16_and_after_another_op(op, ref):
    t, text = text_tokens(C=16, dtype=torch.float32)
    out = build_ops([{"op": op, "count": 6}], [16]).to(torch.bfloat16)(
        t.replace(x=t.x.bfloat16()), OpContext(text=text.bfloat16()))
    assert out.x.dtype == torch.bfloat16 and out.kept_counts().tolist() == [6] * 3
    pooled = build_ops([{"op": "avgpool", "k": 2}], [16])(t)
    out = build_ops([{"op": "avgpool", "k": 2}, {"op": op, "count": 5}], [16])(t, OpContext(text=text))
    for b in range(3):
        torch.testing.assert_close(out.x[b], pooled.x[b, ref(pooled.x[b], text[b], 5)])


@pytest.mark.parametrize("op", [op for op, _ in TEXT_OPS])
def test_a_prompt_batch_that_does_not_match_the_tokens_is_an_error(op):
    t, text = text_tokens(C=16)
    with pytest.raises(InputError, match=rf"{op}: prompt embeddings have shape .* expected \[3, T, 16\]"):
        build_ops([{"op": op, "count": 4}], [16])(t, OpContext(text=text[:2]))
