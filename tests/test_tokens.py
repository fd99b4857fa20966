"""Tokens (compactvl.tokens) and the op plumbing (compactvl.ops.base): provenance, primitives, recipes, errors."""
from __future__ import annotations

import pytest
import torch

from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.registry import TOKEN_OPS
from compactvl.tokens import Tokens, cat, grid_positions, rank_keep, rescale_pos

torch.manual_seed(0)


def grid_tokens(B=2, h=4, w=6, C=5, source=0, dtype=torch.float64):
    return Tokens.from_grid(torch.randn(B, h * w, C, dtype=dtype), (h, w), layer=3, source=source)


def test_from_grid_fields():
    t = grid_tokens()
    assert t.x.shape == (2, 24, 5) and t.grid == t.grid0 == (4, 6) and t.layer == 3
    assert t.kept_counts().tolist() == [24, 24] and t.size.sum().item() == 48
    assert t.pos[0, 7].tolist() == [1.0, 1.0]  # row-major: token 7 of a 4x6 grid sits at row 1, col 1
    assert torch.equal(t.unmerge(), t.x)


def test_from_encoder_and_errors():
    class Enc:
        features = {5: torch.randn(1, 12, 3)}
        grid = (3, 4)

    t = Tokens.from_encoder(Enc(), 5, source=1)
    assert t.source == 1 and t.layer == 5 and t.grid == (3, 4)
    with pytest.raises(InputError, match=r"no features for layer 7.*\[5\].*required_layers"):
        Tokens.from_encoder(Enc(), 7)
    with pytest.raises(InputError, match="empty batch"):
        Tokens.from_grid(torch.randn(0, 12, 3), (3, 4))
    with pytest.raises(InputError, match=r"grid 3x5 has 15 cells but the features hold 12 tokens.*drop CLS"):
        Tokens.from_grid(torch.randn(1, 12, 3), (3, 5))
    with pytest.raises(InputError, match=r"\[batch, tokens, channels\]"):
        Tokens.from_grid(torch.randn(12, 3), (3, 4))


def test_regroup_is_size_weighted_mean_and_composes_provenance():
    t = grid_tokens(B=1, h=2, w=3, C=4)
    # 6 tokens -> slots [0, 0, 1, -1, 1, 1]: token 3 is dropped
    dest = torch.tensor([[0, 0, 1, -1, 1, 1]])
    u = t.regroup(dest, 2)
    assert u.size.tolist() == [[2.0, 3.0]] and u.mask.all()
    torch.testing.assert_close(u.x[0, 1], t.x[0, [2, 4, 5]].mean(0))
    torch.testing.assert_close(u.pos[0, 0], torch.tensor([0.0, 0.5], dtype=u.pos.dtype))
    assert u.assign.tolist() == [[0, 0, 1, -1, 1, 1]]
    # a second op composes through the first: merge both slots into one, sizes weight the mean
    v = u.regroup(torch.tensor([[0, 0]]), 1)
    assert v.assign.tolist() == [[0, 0, 0, -1, 0, 0]] and v.size.item() == 5.0
    torch.testing.assert_close(v.x[0, 0], t.x[0, [0, 1, 2, 4, 5]].mean(0))
    rec = v.unmerge()
    assert rec.shape == (1, 6, 4) and torch.equal(rec[0, 3], torch.zeros(4, dtype=rec.dtype))
    torch.testing.assert_close(rec[0, 5], v.x[0, 0])


def test_regroup_single_token_slots_are_bit_exact():
    t = grid_tokens(B=1, h=3, w=3, C=7)
    t = t.replace(size=torch.full_like(t.size, 3.0))  # sizes that are not powers of two
    u = t.regroup(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 7]]), 8)
    assert torch.equal(u.x[0, :7], t.x[0, :7])


def test_select_keeps_order_masks_and_provenance():
    t = grid_tokens(B=2, h=2, w=2, C=3)
    idx = torch.tensor([[1, 3, 0], [2, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    u = t.select(idx, valid)
    assert u.kept_counts().tolist() == [3, 1] and u.grid is None
    assert torch.equal(u.x[0], t.x[0, [1, 3, 0]]) and torch.equal(u.x[1, 1:], torch.zeros(2, 3, dtype=u.x.dtype))
    assert u.assign.tolist() == [[2, 0, -1, 1], [-1, -1, 0, -1]]
    assert torch.equal(u.unmerge()[0, 3], t.x[0, 3])


def test_cat_left_packs_rescales_positions_and_keeps_stream0_provenance():
    a = grid_tokens(B=2, h=2, w=2, C=3)
    a = a.select(torch.tensor([[0, 1, 2], [3, 0, 0]]), torch.tensor([[True, True, True], [True, False, False]]))
    b = Tokens.from_grid(torch.randn(2, 16, 3, dtype=torch.float64), (4, 4), source=1)
    c = cat([a, b])
    assert c.kept_counts().tolist() == [19, 17] and c.x.shape[1] == 19
    assert torch.equal(c.x[1, 1:17], b.x[1]) and torch.equal(c.x[1, 0], a.x[1, 0])
    assert torch.equal(c.assign, a.assign)
    # cell (0,0) of a 4x4 grid is centred at (-0.25, -0.25) of a 2x2 grid
    torch.testing.assert_close(c.pos[0, 3], torch.tensor([-0.25, -0.25]))
    torch.testing.assert_close(rescale_pos(grid_positions((4, 4)), (4, 4), (2, 2))[15], torch.tensor([1.25, 1.25]))
    with pytest.raises(InputError, match="channels.*project them"):
        cat([a, Tokens.from_grid(torch.randn(2, 4, 5), (2, 2))])


def test_pool_patches_sum_and_mean():
    t = grid_tokens(B=1, h=2, w=2, C=2)
    u = t.regroup(torch.tensor([[0, 0, 1, -1]]), 2)
    v = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    assert u.pool_patches(v, "sum").tolist() == [[3.0, 4.0]]
    assert u.pool_patches(v, "mean").tolist() == [[1.5, 4.0]]


def test_rank_keep_per_sample_k_and_masks():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 9.0, 0.0]])
    m = torch.tensor([[True] * 4, [True, True, False, False]])
    keep = rank_keep(s, m, torch.tensor([2, 1]))
    assert keep.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_attn_bias_is_log_size():
    t = grid_tokens(B=1, h=2, w=2, C=2).regroup(torch.tensor([[0, 0, 0, 1]]), 2)
    torch.testing.assert_close(t.attn_bias(), torch.tensor([[3.0, 1.0]]).log())


# ---- recipes -------------------------------------------------------------------------------------------------
def test_build_ops_unknown_op_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        build_ops([{"op": "tome_v9"}], [8])
    msg = str(e.value)
    assert "tome_v9" in msg and all(n in msg for n in ["avgpool", "mke", "cotr", "visionzip", "prumerge_plus"])


def test_build_ops_unknown_knob_names_the_knobs():
    with pytest.raises(ConfigError, match=r"'avgpool' has no knob 'ratio'; its knobs are: k, pad, streams"):
        build_ops([{"op": "avgpool", "ratio": 0.5}], [8])
    with pytest.raises(ConfigError, match="mapping like"):
        build_ops(["avgpool"], [8])


def test_bad_ratios_and_streams_are_config_errors():
    for spec, pat in [({"op": "random", "ratio": 0}, r"ratio=0 .*\(0, 1\]"),
                      ({"op": "random", "ratio": 1.5}, r"ratio=1.5 .*\(0, 1\]"),
                      ({"op": "random", "ratio": -0.2}, "out of range"),
                      ({"op": "bipartite_merge", "ratio": 1.0}, r"\[0, 1\)"),
                      ({"op": "mke", "self_ratio": 1.2}, "self_ratio"),
                      ({"op": "avgpool", "k": 0}, "integer >= 1"),
                      ({"op": "avgpool", "streams": [2]}, r"names streams \[2\] but only 2 exist")]:
        with pytest.raises(ConfigError, match=pat):
            build_ops([spec, {"op": "concat_tokens"}] if spec["op"] != "mke" else [spec], [8, 8])


def test_pipeline_must_end_with_one_stream():
    with pytest.raises(ConfigError, match=r"ends with 2 streams.*fusion op \(.*concat_channels.*cotr.*mke"):
        build_ops([{"op": "avgpool"}], [8, 8])


def test_empty_recipe_is_identity_and_checks_inputs():
    p = build_ops([], [5])
    t = grid_tokens()
    assert p(t) is t and p.out_channels == 5 and p.describe() == "identity"
    assert p.expected_tokens([24], [(4, 6)]) == 24
    with pytest.raises(InputError, match="built for channels \\[5\\] but the streams have \\[3\\]"):
        p(Tokens.from_grid(torch.randn(1, 4, 3), (2, 2)))
    with pytest.raises(InputError, match="built for 1 encoder streams but got 2"):
        p([t, t])
    empty = t.replace(x=t.x[:0], mask=t.mask[:0])
    with pytest.raises(InputError, match="empty batch"):
        p(empty)
    q = build_ops([{"op": "concat_tokens"}], [5, 5])
    with pytest.raises(InputError, match="disagree on the batch size"):
        q([t, grid_tokens(B=3)])


def test_pipeline_records_counts_channels_and_expected_tokens():
    p = build_ops([{"op": "pixel_shuffle", "k": 2}, {"op": "bipartite_merge", "ratio": 0.25}], [5])
    assert p.out_channels == 20 and p.expected_tokens([24], [(4, 6)]) == 5
    out = p(grid_tokens())
    assert out.kept_counts().tolist() == [5, 5] and out.x.shape[-1] == 20
    assert [c[1][0].tolist() for c in p.last_counts] == [[24, 24], [6, 6], [5, 5]]
    assert "pixel_shuffle(k=2" in p.last_counts[1][0] and "bipartite_merge(ratio=0.25" in p.describe()


def test_required_layers_per_stream():
    p = build_ops([{"op": "mbtf", "streams": [0]}, {"op": "visionzip", "layer": 10, "streams": [1]},
                   {"op": "concat_tokens"}, {"op": "prumerge", "layer": 4}], [8, 8])
    # mbtf: selected 23 and every third below it (8 taps); stream 1: its own tap plus visionzip's layer;
    # prumerge after the fusion reads stream 0's encoder
    assert p.required_layers(23, 24) == [[2, 4, 5, 8, 11, 14, 17, 20, 23], [10, 23]]
    assert p.required_layers(-2, 25) == [[2, 4, 5, 8, 11, 14, 17, 20, 23], [10, 23]]
    q = build_ops([{"op": "visionzip", "layer": -1}], [8])
    assert q.required_layers(-2, 24) == [[22, 23]]  # negative layers count from num_layers


def test_every_op_has_a_docstring_naming_its_knobs():
    for name in TOKEN_OPS.names():
        cls = TOKEN_OPS.get(name)
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert doc and "knobs" in doc.lower(), name
        for knob in cls.knobs():
            if knob != "streams":
                assert f"``{knob}``" in doc, (name, knob)


def test_op_context_missing_encoder_is_explained():
    p = build_ops([{"op": "visionzip"}], [5])
    with pytest.raises(InputError, match="OpContext has no encoder output for stream 0"):
        p(grid_tokens(), OpContext())
