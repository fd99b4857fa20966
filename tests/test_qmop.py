"""QMoP (ops/qmop.py): the fused output equals an independent per-sample transcription of the equations (pooling by
``F.adaptive_avg_pool2d``, the Perceiver attention written out, top-k by Python sorting, the router by hand); batch 1
== batch N on ragged streams; the MACs equal torch's own FlopCounterMode count; init="pool" starts as the pooling
baseline (the model equals its avgpool baseline at step 0, test_step0's pattern) and learns; bad input is explained.
No public code exists for QMoP (arXiv:2603.21232); the transcription follows the module docstring's reading."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from compactvl.compression import op_spec
from compactvl.errors import ConfigError, InputError
from compactvl.ops import OpContext, build_ops
from compactvl.testing import tiny_lm
from compactvl.tokens import Tokens

from test_step0 import assert_same_logits, build, encoders, share

C, TD, GRID = 8, 5, (6, 6)
KNOBS = {"num_queries": 9, "heads": 2, "dim_head": 4}


def reference(op, x: torch.Tensor, grid, text: torch.Tensor) -> torch.Tensor:
    """Y = Σ_b g_b Y_b for each sample alone, written from the equations (no batched code of the op)."""
    net, Q = op.nets["0"], op.num_queries
    lay, side = net["layers"][0], math.isqrt(Q)
    H, dh = op.heads, op.dim_head
    outs = []
    for b in range(x.shape[0]):
        xb = x[b]
        pool = F.adaptive_avg_pool2d(xb.T.reshape(1, C, *grid), side).reshape(C, Q).T
        lat = op.queries_0
        kv = torch.cat([lay.ln_x(xb), lay.ln_q(lat)])
        qh = lay.q(lay.ln_q(lat)).view(Q, H, dh).transpose(0, 1)
        kh, vh = (m(kv).view(-1, H, dh).transpose(0, 1) for m in (lay.k, lay.v))
        att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(dh), -1)
        lat = lat + lay.o((att @ vh).transpose(0, 1).reshape(Q, H * dh))
        res = net["out"](lat + lay.mlp(lay.ln_f(lat)))
        s = net["scorer"](xb)[:, 0]
        prune = xb[sorted(s.topk(Q).indices.tolist())]
        logits = net["head"](F.gelu(net["v_proj"](xb.mean(0)) + net["t_proj"](text[b].mean(0))))
        g = torch.softmax(logits, -1)
        if op.top_k < 3:
            kept = g.topk(op.top_k).indices
            g = torch.zeros(3).index_copy(0, kept, g[kept])
            g = g / g.sum()
        outs.append(g[0] * pool + g[1] * res + g[2] * prune)
    return torch.stack(outs)


@pytest.mark.parametrize("top_k", [3, 2])
def test_qmop_equals_the_equations(top_k):
    torch.manual_seed(0)
    pipe = build_ops([{"op": "qmop", **KNOBS, "top_k": top_k, "init": "random"}], [C], text_dim=TD)
    x, text = torch.randn(3, 36, C), torch.randn(3, 4, TD)
    with torch.no_grad():
        out = pipe(Tokens.from_grid(x, GRID), OpContext(text=text))
        want = reference(pipe.ops[0], x, GRID, text)
    torch.testing.assert_close(out.x, want, atol=1e-5, rtol=0)
    assert out.kept_counts().tolist() == [9, 9, 9] and not out.notes


def test_qmop_batch_one_equals_batch_n_on_ragged_streams():
    torch.manual_seed(1)
    pipe = build_ops([{"op": "qmop", **KNOBS, "init": "random"}], [C], text_dim=TD)
    x, text = torch.randn(3, 14, C), torch.randn(3, 4, TD)
    tmask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    keep = torch.tensor([[True] * 14, [True] * 6 + [False] * 8, [True] * 11 + [False] * 3])  # 6 < 9 queries
    idx = torch.arange(14).expand(3, 14)
    toks = Tokens.from_grid(x, (2, 7)).select(idx, keep)
    with torch.no_grad():
        out = pipe(toks, OpContext(text=text, text_mask=tmask))
        for b in range(3):
            n, t = int(keep[b].sum()), int(tmask[b].sum())
            one = pipe(Tokens.from_grid(x[b:b + 1], (2, 7)).select(idx[:1, :n]),  # alone, unpadded
                       OpContext(text=text[b:b + 1, :t]))
            torch.testing.assert_close(one.x[0], out.x[b], atol=1e-5, rtol=0)
            torch.testing.assert_close(one.pos[0], out.pos[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("text", [True, False])
def test_qmop_macs_equal_torchs_flop_count(text):
    torch.manual_seed(2)
    pipe = build_ops([{"op": "qmop", **KNOBS, "depth": 2, "router_hidden": 6}], [C], text_dim=TD)
    ctx = OpContext(text=torch.randn(2, 3, TD)) if text else OpContext()
    with FlopCounterMode(display=False) as fc:  # (under no_grad its module tracker trips on the queries' view)
        pipe(Tokens.from_grid(torch.randn(2, 36, C), GRID), ctx)
    assert fc.get_total_flops() == 2 * 2 * pipe.ops[0].macs(36, text=text)  # flops = 2·MACs, 2 images


def test_qmop_system_starts_as_its_pooling_baseline():
    """The whole model at step 0: QMoP with 16 queries over an 8x8 grid == avgpool 2x2 with the same projector."""
    lm, encs = tiny_lm(num_hidden_layers=2), encoders(["dinov2"])
    system = build(lm, encs, [{"op": "qmop", "num_queries": 16, "heads": 2, "dim_head": 8}])
    baseline = build(lm, encs, [{"op": "avgpool", "k": 2}], seed=1)
    share(system, baseline)
    assert_same_logits(system, baseline)


def test_qmop_gate_learns_from_step_0_and_the_rest_from_step_1():
    torch.manual_seed(3)
    pipe = build_ops([{"op": "qmop", **KNOBS}], [C], text_dim=TD)
    toks, ctx = Tokens.from_grid(torch.randn(2, 36, C), GRID), OpContext(text=torch.randn(2, 3, TD))
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(toks.x.transpose(1, 2).reshape(2, C, *GRID), 3).flatten(2).transpose(1, 2)
        torch.testing.assert_close(pipe(toks, ctx).x, pooled, atol=1e-6, rtol=0)  # exactly the pooling at init
        target = torch.randn_like(pooled)
    opt = torch.optim.Adam(pipe.parameters(), lr=1e-2)
    for step in range(2):
        loss = F.mse_loss(pipe(toks, ctx).x, target)
        opt.zero_grad()
        loss.backward()
        grads = {k: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for k, p in pipe.named_parameters()}
        if step == 0:
            assert grads["ops.0.gate_0"] > 0
            assert all(g == 0 for k, g in grads.items() if k != "ops.0.gate_0"), grads
        else:
            assert all(g > 0 for g in grads.values()), grads
        opt.step()


def test_qmop_budget_and_bad_input():
    assert op_spec("qmop", {"tokens": 8}, 36) == {"op": "qmop", "num_queries": 8}
    assert op_spec("qmop", {"keep": 0.25}, 36) == {"op": "qmop", "num_queries": 9}
    assert build_ops([{"op": "qmop", "num_queries": 5}], [C]).expected_tokens([36], [GRID]) == 5
    with pytest.raises(ConfigError, match="qmop: top_k=4 but there are only 3 branches"):
        build_ops([{"op": "qmop", "top_k": 4}], [C])
    with pytest.raises(ConfigError, match="qmop: init='zero'"):
        build_ops([{"op": "qmop", "init": "zero"}], [C])
    toks = Tokens.from_grid(torch.randn(2, 36, C), GRID)
    with pytest.raises(InputError, match="qmop got prompt text but was built without text_dim"):
        build_ops([{"op": "qmop", **KNOBS}], [C])(toks, OpContext(text=torch.randn(2, 3, TD)))
    with pytest.raises(InputError, match=r"qmop: text embeddings have shape \(2, 3, 7\), expected \[2, T, 5\]"):
        build_ops([{"op": "qmop", **KNOBS}], [C], text_dim=TD)(toks, OpContext(text=torch.randn(2, 3, 7)))
    out = build_ops([{"op": "qmop", **KNOBS}], [C], text_dim=TD)(toks, OpContext())
    assert "qmop: no prompt text; the router read the image only" in out.notes
