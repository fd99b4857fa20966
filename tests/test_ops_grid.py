"""Grid ops: avgpool, pixel_shuffle / token_concat, stf, mbtf, concat_channels (LLaVA-STF, VEN-VL eq. 1, LEO-MINI)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens

torch.manual_seed(0)


@dataclass
class FakeEncoder:
    features: dict
    grid: tuple
    cls: torch.Tensor | None = None
    attention_substitute: bool = False


def feature_map(B, C, h, w):
    return torch.randn(B, C, h, w, dtype=torch.float64)


def as_tokens(m, **kw):
    return Tokens.from_grid(m.flatten(2).transpose(1, 2), tuple(m.shape[2:]), **kw)


def test_avgpool_equals_f_avg_pool2d_and_tracks_provenance():
    m = feature_map(2, 3, 6, 4)
    out = build_ops([{"op": "avgpool", "k": 2}], [3])(as_tokens(m))
    ref = F.avg_pool2d(m, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.x, ref)
    assert out.grid == (3, 2) and out.size.eq(4).all()
    # patch (row 3, col 1) lies in window (1, 0) -> token 2; window centres are mean cell positions
    assert out.assign[0, 3 * 4 + 1].item() == 2
    torch.testing.assert_close(out.pos[0, 2], torch.tensor([2.5, 0.5], dtype=out.pos.dtype))


def test_avgpool_not_divisible_errors_or_pads_with_partial_windows():
    m = feature_map(1, 2, 5, 4)
    with pytest.raises(InputError, match=r"grid 5x4 is not divisible by k=2.*pad: true"):
        build_ops([{"op": "avgpool", "k": 2}], [2])(as_tokens(m))
    out = build_ops([{"op": "avgpool", "k": 2, "pad": True}], [2])(as_tokens(m))
    assert out.grid == (3, 2) and out.size[0].tolist() == [4, 4, 4, 4, 2, 2]
    torch.testing.assert_close(out.x[0, 4], m[0, :, 4, 0:2].mean(-1))  # last row: mean of the real patches only


def test_pixel_shuffle_is_neighbour_major_concat():
    m = feature_map(2, 3, 4, 6)
    out = build_ops([{"op": "pixel_shuffle", "k": 2}], [3])(as_tokens(m))
    assert out.x.shape == (2, 6, 12) and out.grid == (2, 3)
    x = m.permute(0, 2, 3, 1)  # [B,h,w,C]
    i, j = 1, 2  # window row 1, col 2
    ref = torch.cat([x[:, 2 * i + a, 2 * j + b] for a in range(2) for b in range(2)], -1)
    torch.testing.assert_close(out.x[:, i * 3 + j], ref)
    assert build_ops([{"op": "token_concat", "k": 2}], [3]).out_channels == 12


def test_pixel_shuffle_pad_zero_fills_missing_neighbours():
    m = feature_map(1, 2, 3, 3)
    out = build_ops([{"op": "pixel_shuffle", "k": 2, "pad": True}], [2])(as_tokens(m))
    assert out.grid == (2, 2) and out.size[0].tolist() == [4, 2, 2, 1]
    last = out.x[0, 3].view(4, 2)
    torch.testing.assert_close(last[0], m[0, :, 2, 2])
    torch.testing.assert_close(last[1:], torch.zeros(3, 2, dtype=last.dtype))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stf_with_concat_init_and_identity_act_equals_token_concat(n):
    m = feature_map(2, 3, 4, 4).float()
    t = as_tokens(m)
    stf = build_ops([{"op": "stf", "k": 2, "n": n, "init": "concat", "act": "identity"}], [3])
    concat = build_ops([{"op": "pixel_shuffle", "k": 2}], [3])(t)
    out = stf(t)
    torch.testing.assert_close(out.x, concat.x.reshape(2, 4 * n, 12 // n))
    assert out.x.shape == (2, 4 * n, 12 // n) and stf.expected_tokens([16], [(4, 4)]) == 4 * n
    assert out.size[0].eq(4 / n).all() and (out.grid == (2, 2)) == (n == 1)
    # sub-token q of a window holds the window's cells q*4/n .. : patch (1,1) is cell 3 of window 0
    assert out.assign[0, 5].item() == 3 * n // 4


def test_stf_default_is_strided_conv_gelu_then_two_aligned_gelu_layers():
    m = feature_map(1, 4, 4, 4).float()
    pipe = build_ops([{"op": "stf", "k": 2, "dim": 6}], [4])
    out = pipe(as_tokens(m))
    net = pipe.ops[0].nets["0"]
    z = F.gelu(net["conv"](m)).flatten(2).transpose(1, 2)  # eq. 2: GeLU(Conv_{k,stride k}(X))
    lin1, lin2 = net["align"][0], net["align"][2]
    torch.testing.assert_close(out.x, F.gelu(lin2(F.gelu(lin1(z)))))
    assert net["conv"].weight.shape == (16, 4, 2, 2) and pipe.out_channels == 6


def test_stf_bad_knobs():
    with pytest.raises(ConfigError, match=r"n=3 tokens per window must divide k²=4; pick n in \[1, 2, 4\]"):
        build_ops([{"op": "stf", "n": 3}], [4])
    with pytest.raises(ConfigError, match="init='concat' needs fused"):
        build_ops([{"op": "stf", "init": "concat", "dim": 7}], [4])
    with pytest.raises(InputError, match="stf needs tokens that still form a grid"):
        build_ops([{"op": "bipartite_merge"}, {"op": "stf"}], [4])(as_tokens(feature_map(1, 4, 4, 4).float()))


def make_mbtf_input(B=2, C=3, h=2, w=3, layers=range(12)):
    feats = {l: torch.randn(B, h * w, C) for l in layers}
    enc = FakeEncoder(feats, (h, w))
    return enc, Tokens.from_encoder(enc, 11)


def test_mbtf_fuses_every_third_block_with_two_1x1_layers():
    enc, t = make_mbtf_input()
    pipe = build_ops([{"op": "mbtf", "count": 4, "hidden": 8, "out": 5}], [3])
    assert pipe.required_layers(11, 12) == [[2, 5, 8, 11]]
    out = pipe(t, OpContext(encoders=[enc]))
    net = pipe.ops[0].nets["0"]
    cat = torch.cat([enc.features[l] for l in (2, 5, 8, 11)], -1)
    torch.testing.assert_close(out.x, F.gelu(net[2](F.gelu(net[0](cat)))))
    assert out.grid == (2, 3) and pipe.out_channels == 5 and net[0].in_features == 12


def test_mbtf_errors():
    enc, t = make_mbtf_input(layers=[11, 8])
    pipe = build_ops([{"op": "mbtf", "count": 4}], [3])
    with pytest.raises(InputError, match=r"needs encoder layers \[2, 5, 8, 11\].*lacks \[2, 5\].*required_layers"):
        pipe(t, OpContext(encoders=[enc]))
    with pytest.raises(ConfigError, match="4 blocks every 3 below layer 5 reach layer -4 < 0"):
        pipe.required_layers(5, 12)
    with pytest.raises(InputError, match="put mbtf first"):
        build_ops([{"op": "avgpool"}, {"op": "mbtf", "count": 1}], [3])(
            Tokens.from_grid(torch.randn(1, 16, 3), (4, 4), layer=0), OpContext(encoders=[enc]))


def learn(pipe, make_input, steps=25, lr=3e-2):
    """A few Adam steps on a fixed random target; returns (first loss, last loss) and checks gradients."""
    torch.manual_seed(1)
    inp, ctx = make_input()
    with torch.no_grad():
        target = torch.randn_like(pipe(inp, ctx).x)
    opt = torch.optim.Adam(pipe.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = F.mse_loss(pipe(inp, ctx).x, target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in pipe.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_stf_and_mbtf_learn():
    torch.manual_seed(0)  # the ops' initial weights come from the global generator: independent of test order
    stf = build_ops([{"op": "stf", "k": 2, "dim": 8}], [4])
    first, last = learn(stf, lambda: (as_tokens(feature_map(2, 4, 4, 4).float()), OpContext()))
    assert last < 0.5 * first
    enc, t = make_mbtf_input()
    mbtf = build_ops([{"op": "mbtf", "count": 2, "hidden": 8, "init": "random"}], [3])  # all learn at step 0
    first, last = learn(mbtf, lambda: (t, OpContext(encoders=[enc])))
    assert last < 0.5 * first


def test_concat_channels_resamples_to_the_first_grid():
    a, b = feature_map(2, 3, 4, 4), feature_map(2, 2, 2, 2)
    pipe = build_ops([{"op": "concat_channels"}], [3, 2])
    out = pipe([as_tokens(a), as_tokens(b, source=1)])
    up = F.interpolate(b, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.x, torch.cat([as_tokens(a).x, up], -1))
    assert out.grid == (4, 4) and pipe.out_channels == 5 and pipe.expected_tokens([16, 4], [(4, 4), (2, 2)]) == 16
    with pytest.raises(InputError, match=r"grids \[\(4, 4\), \(2, 2\)\] differ and resample is off"):
        build_ops([{"op": "concat_channels", "resample": False}], [3, 2])([as_tokens(a), as_tokens(b)])
    with pytest.raises(InputError, match="needs streams on grids or with equal token counts"):
        build_ops([{"op": "bipartite_merge", "streams": [0]}, {"op": "concat_channels"}], [3, 2])(
            [as_tokens(a), as_tokens(b)])


def test_grid_ops_batch_invariance():
    m = feature_map(3, 4, 4, 6).float()
    for spec in ([{"op": "avgpool"}], [{"op": "pixel_shuffle"}], [{"op": "stf", "n": 2}]):
        pipe = build_ops(spec, [4])
        full = pipe(as_tokens(m))
        for b in range(3):
            torch.testing.assert_close(pipe(as_tokens(m[b : b + 1])).x[0], full.x[b])
