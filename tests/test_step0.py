"""Step-0 equivalence (issue 19): every learned part of a system, at its initialisation, leaves the model equal to the
baseline it extends — the same logits (fp32 tolerance) as the baseline model built from the same shared weights
(LM, encoders, projector, shared token ops):

* STF (``init`` default "concat")      == TokenConcat / ``pixel_shuffle`` with the same projector;
* MBTF (``init`` default "last")       == the selected encoder block alone (the recipe without MBTF);
* CoTR (``init`` default "pool")       == average pooling of each encoder's grid to N^V tokens, channel-concatenated;
* HTE experts (``zero_init``)          == the dense LM (pruning off: the ``hte`` policy with drop_rate 0; pruning is
  the token budget, not a learned part — see docs/experts.md);
* MMoE LoRA experts (B = 0)            == the LM without MMoE.
Each system is also checked batch-1 vs batch-N. The baselines are written independently of the learned op (plain
``F.adaptive_avg_pool1d/2d``, a reshape of the grid), not by calling the op under test.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import compactvl.policies.hte  # noqa: F401  (registers hte)
from compactvl.data import SynthVQA
from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import ConfigError
from compactvl.experts import HTEMoE, MMoEMLP
from compactvl.model import CompactVLM
from compactvl.ops import OpContext, build_ops
from compactvl.testing import tiny_lm, tiny_tokenizer
from compactvl.tokens import Tokens
from compactvl.train import collate

ATOL = 1e-5


def encoders(kinds):
    return [tiny_encoder(k, 64, seed=i) for i, k in enumerate(kinds)]


def build(lm, encs, token_ops, experts=(), policies=(), seed=0):
    return CompactVLM.build(lm=copy.deepcopy(lm), encoders=encs, tokenizer=tiny_tokenizer(), token_ops=token_ops,
                            projector={"type": "mlp", "depth": 2}, experts=list(experts), policies=list(policies),
                            system_prompt="", seed=seed).eval()


def share(system: CompactVLM, baseline: CompactVLM) -> None:
    """Give the baseline the system's weights wherever both have them (projector, shared token ops, LM)."""
    own = baseline.state_dict()
    common = {k: v for k, v in system.state_dict().items() if k in own and own[k].shape == v.shape}
    assert any(k.startswith("projector.") for k in common)  # the projectors have the same input width
    baseline.load_state_dict(common, strict=False)


def batch(n=3):
    data = SynthVQA("train", size=n)
    return collate([data[i] for i in range(n)])


def logits(model: CompactVLM, b) -> list[torch.Tensor]:
    """Per sample: the logits of its real rows (left padding removed)."""
    with torch.no_grad():
        x = model.prepare(b.conversations, b.images)
        out = model(x)
    return [out.logits[s][x.attention_mask[s]] for s in range(len(b.conversations))]


def assert_same_logits(system: CompactVLM, baseline: CompactVLM):
    b = batch()
    got, want = logits(system, b), logits(baseline, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    one = logits(system, collate([SynthVQA("train", size=3)[1]]))[0]  # batch-1 vs batch-N
    torch.testing.assert_close(one, got[1], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- LLaVA-STF
@pytest.mark.parametrize("ops", [
    [{"op": "stf", "k": 2}],  # llava_stf_no_mbtf vs TokenConcat
    [{"op": "mbtf", "count": 3, "every": 1}, {"op": "stf", "k": 2}],  # llava_stf (tiny encoder: 3 blocks)
    [{"op": "mbtf", "count": 3, "every": 1}, {"op": "token_concat", "k": 2}],  # llava_stf_token_concat
], ids=["stf", "mbtf+stf", "mbtf+token_concat"])
def test_llava_stf_systems_start_as_token_concat(ops):
    lm, encs = tiny_lm(num_hidden_layers=2), encoders(["dinov2"])
    system = build(lm, encs, ops)
    baseline = build(lm, encs, [{"op": "token_concat", "k": 2}], seed=1)
    share(system, baseline)
    assert_same_logits(system, baseline)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stf_at_init_is_the_window_concatenation(n):
    torch.manual_seed(0)
    x = torch.randn(2, 5 * 3, 4)  # an odd 5x3 grid, zero-padded to 6x4
    op = build_ops([{"op": "stf", "k": 2, "n": n, "pad": True}], [4])
    out = op(Tokens.from_grid(x, (5, 3)))
    m = F.pad(x.view(2, 5, 3, 4), (0, 0, 0, 1, 0, 1))  # [B, 6, 4, C]
    win = m.view(2, 3, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(2, 6, 16)  # row-major cells of each window
    torch.testing.assert_close(out.x, win.reshape(2, 6 * n, 16 // n), atol=0, rtol=0)


def mbtf_input():
    feats = {l: torch.randn(2, 16, 4) for l in range(3)}
    enc = type("Enc", (), {"features": feats, "grid": (4, 4)})()
    t = Tokens.from_grid(feats[2], (4, 4), layer=2)
    return t, OpContext(encoders=[enc])


def cotr_input():
    a, b = Tokens.from_grid(torch.randn(2, 16, 4), (4, 4)), Tokens.from_grid(torch.randn(2, 16, 4), (4, 4), source=1)
    return [a, b], OpContext(text=torch.randn(2, 3, 5))


@pytest.mark.parametrize("spec,first,make", [
    ([{"op": "stf", "k": 2}], ["ops.0.nets.0.align.2.weight"], lambda: (Tokens.from_grid(torch.randn(2, 16, 4), (4, 4)),
                                                                       OpContext())),
    ([{"op": "mbtf", "count": 3, "every": 1}], ["ops.0.nets.0.2.weight"], mbtf_input),
    ([{"op": "cotr", "num_queries": 4}], ["ops.0.gate"], cotr_input),
], ids=["stf", "mbtf", "cotr"])
def test_baseline_inits_learn(spec, first, make):
    """The zeroed last layer (or CoTR's gate) gets a gradient at step 0, every other parameter from step 1 on, and a
    few Adam steps towards a random target halve the loss."""
    torch.manual_seed(0)
    inp, ctx = make()
    pipe = build_ops(spec, [4] * (2 if spec[0]["op"] == "cotr" else 1), text_dim=5)
    with torch.no_grad():
        target = torch.randn_like(pipe(inp, ctx).x)
    opt = torch.optim.Adam(pipe.parameters(), lr=2e-2)
    losses = []
    for step in range(80):
        loss = F.mse_loss(pipe(inp, ctx).x, target)
        opt.zero_grad()
        loss.backward()
        grads = {k: float(p.grad.abs().sum()) for k, p in pipe.named_parameters()}
        if step == 0:
            assert all(grads[k] > 0 for k in first), grads
        if step == 1:
            assert all(g > 0 for g in grads.values()), grads
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_init_knobs_check_their_widths():
    with pytest.raises(ConfigError, match="init='last' adds the selected block's 3 channels.*needs out = 3"):
        build_ops([{"op": "mbtf", "count": 1, "out": 5, "init": "last"}], [3])
    with pytest.raises(ConfigError, match="mbtf: init='zero'"):
        build_ops([{"op": "mbtf", "count": 1, "init": "zero"}], [3])
    with pytest.raises(ConfigError, match="cotr: init='zero'"):
        build_ops([{"op": "cotr", "init": "zero"}], [3])
    assert not build_ops([{"op": "mbtf", "count": 1, "out": 5}], [3]).ops[0].skip  # paper's init when out != C
    assert not build_ops([{"op": "stf", "dim": 6}], [4]).ops[0].nets["0"].skip


# ----------------------------------------------------------------------------------------------- LEO-MINI
def test_cotr_system_starts_as_average_pooling():
    """leomini's token path: 16 CoTR queries over two 8x8 grids == 2x2 avgpool of each, channel-concatenated
    (two encoders of one width, so W^I starts as the identity and the baseline has no parameters)."""
    lm, encs = tiny_lm(num_hidden_layers=2), encoders(["dinov2", "dinov2"])
    system = build(lm, encs, [{"op": "cotr", "num_queries": 16}])
    baseline = build(lm, encs, [{"op": "avgpool", "k": 2}, {"op": "concat_channels"}], seed=1)
    share(system, baseline)
    assert_same_logits(system, baseline)


def test_cotr_op_pools_projected_tokens_of_any_width_and_ragged_streams():
    torch.manual_seed(0)
    a = Tokens.from_grid(torch.randn(2, 6 * 8, 4), (6, 8))  # full grid: 2-D adaptive pooling to 3x3
    xb = torch.randn(2, 7, 6)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    b = Tokens.from_grid(xb, (1, 7), source=1).select(torch.arange(7).expand(2, 7), keep)  # ragged: no grid
    pipe = build_ops([{"op": "cotr", "num_queries": 9}], [4, 6], text_dim=5)
    ctx = OpContext(text=torch.randn(2, 3, 5))
    out = pipe([a, b], ctx)
    cotr = pipe.ops[0]
    ia = F.adaptive_avg_pool2d(a.x.transpose(1, 2).reshape(2, 4, 6, 8), 3).flatten(2).transpose(1, 2)
    ib = torch.stack([F.adaptive_avg_pool1d(cotr.i_proj[1](xb[s, :n]).T[None], 9)[0].T for s, n in enumerate([7, 4])])
    torch.testing.assert_close(out.x, torch.cat([ia, ib], -1), atol=ATOL, rtol=0)
    b1 = Tokens.from_grid(xb[1:], (1, 7), source=1).select(torch.arange(7)[None], keep[1:])
    one = pipe([Tokens.from_grid(a.x[1:], (6, 8)), b1], OpContext(text=ctx.text[1:]))
    torch.testing.assert_close(one.x[0], out.x[1], atol=ATOL, rtol=0)  # batch-1 vs batch-N
    loss = out.x.square().mean()
    loss.backward()
    assert cotr.gate.grad.abs().sum() > 0  # the gate learns from step 0


@pytest.mark.parametrize("multimodal", [True, False], ids=["leomini", "leomini_lora_moe"])
def test_mmoe_experts_start_as_zero_deltas(multimodal):
    lm, encs = tiny_lm(num_hidden_layers=2), encoders(["dinov2", "dinov2"])
    ops = [{"op": "cotr", "num_queries": 16}]
    system = build(lm, encs, ops, experts=[{"expert": "mmoe", "layers": "all", "num_experts": 3, "top_k": 1,
                                            "rank": 4, "multimodal": multimodal}])
    assert all(isinstance(layer.mlp, MMoEMLP) for layer in system.lm.model.layers)
    baseline = build(lm, encs, ops, seed=1)
    share(system, baseline)
    assert_same_logits(system, baseline)


# ----------------------------------------------------------------------------------------------- VEN-VL
VENVL_OPS = [{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.5, "cross_ratio": 0.4}]


@pytest.mark.parametrize("layers", ["second_half", "all"])
def test_hte_experts_add_zero(layers):
    """venvl with pruning off (drop_rate 0) and SIP (a training loss only) == the same MKE model without HTE."""
    lm, encs = tiny_lm(num_hidden_layers=4), encoders(["dinov2", "efficientnet"])
    system = build(lm, encs, VENVL_OPS,
                   experts=[{"expert": "hte", "layers": layers, "num_experts": 4, "top_k": 1, "expert_ratio": 0.5}],
                   policies=[{"policy": "sip", "alpha": 0.8, "iterations": 3, "topk": 8, "target": "fsq"},
                             {"policy": "hte", "drop_rate": 0.0, "score": "max"}])
    assert sum(isinstance(layer.mlp, HTEMoE) for layer in system.lm.model.layers) == (2 if layers != "all" else 4)
    baseline = build(lm, encs, VENVL_OPS, seed=1)
    share(system, baseline)
    assert_same_logits(system, baseline)


def test_a_checkpoint_of_the_plain_equations_does_not_load_silently():
    """The skip of STF / MBTF is recorded in the weights: loading weights saved without it is an error, not a silent
    change of the forward (and vice versa)."""
    for spec, key in (({"op": "stf", "k": 2}, "concat_skip"), ({"op": "mbtf", "count": 1}, "last_skip")):
        plain = build_ops([{**spec, "init": "random"}], [4]).state_dict()
        with pytest.raises(RuntimeError, match=key):
            build_ops([spec], [4]).load_state_dict(plain)
        with pytest.raises(RuntimeError, match=key):
            build_ops([{**spec, "init": "random"}], [4]).load_state_dict(build_ops([spec], [4]).state_dict())
