"""Query ops: cotr (LEO-MINI eqs. 2-7) and resampler (Q-Former / Perceiver cross-attention)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compactvl.errors import InputError
from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens

torch.manual_seed(0)


def ragged(counts, N, C, grid, source=0):
    B = len(counts)
    x = torch.randn(B, N, C, dtype=torch.float64) * 0.5
    t = Tokens.from_grid(x, grid, source=source)
    return t.select(torch.arange(N).expand(B, N), torch.arange(N) < torch.tensor(counts)[:, None]), x


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_cotr_equals_equations_2_to_7(pool):
    a, xa = ragged([12, 7], 12, 4, (3, 4))
    b, xb = ragged([6, 9], 9, 6, (3, 3), source=1)
    text = torch.randn(2, 5, 3, dtype=torch.float64)
    tmask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    spec = [{"op": "cotr", "num_queries": 3, "dim": 8, "pool": pool, "init": "random"}]  # the paper's plain eqs.
    pipe = build_ops(spec, [4, 6], text_dim=3).double()
    out = pipe([a, b], OpContext(text=text, text_mask=tmask))
    cotr = pipe.ops[0]
    assert out.x.shape == (2, 3, 16) and pipe.out_channels == 16 and out.mask.all()
    for s in range(2):
        I = [lin(cotr.i_proj[0], xa[s, : [12, 7][s]]), lin(cotr.i_proj[1], xb[s, : [6, 9][s]])]  # Î_i
        T = lin(cotr.t_proj, text[s, tmask[s]])  # T̂
        one = lambda n: torch.ones(1, n, dtype=torch.float64) / (n if pool == "mean" else 1)
        outs = []
        for i in range(2):
            Q = lin(cotr.q_proj[i], cotr.queries[i])  # Q̂_i
            s_query = Q @ I[i].T  # (2)
            s_self = one(len(I[i])) @ I[i] @ I[i].T  # (3)
            s_cross = one(len(I[1 - i])) @ I[1 - i] @ I[i].T  # (4)
            s_text = one(len(T)) @ T @ I[i].T  # (5)
            alpha = torch.softmax((s_query + s_self + s_cross + s_text) / math.sqrt(8), -1)  # (6), scale inside
            outs.append(alpha @ I[i])  # (7)
        torch.testing.assert_close(out.x[s], torch.cat(outs, -1))  # channel concat across encoders


def test_cotr_text_handling_and_query_count():
    a, _ = ragged([12, 12], 12, 4, (3, 4))
    for nq in (1, 16):
        pipe = build_ops([{"op": "cotr", "num_queries": nq}], [4]).double()
        out = pipe(a)
        assert out.x.shape == (2, nq, 4) and pipe.expected_tokens([12], [(3, 4)]) == nq
        assert any("text score (eq. 5) was omitted" in n for n in out.notes)
        torch.testing.assert_close(out.size.sum(1), torch.full((2,), 12.0, dtype=out.size.dtype))
    with pytest.raises(InputError, match="built without text_dim; pass text_dim"):
        pipe(a, OpContext(text=torch.randn(2, 3, 5)))
    with_text = build_ops([{"op": "cotr", "num_queries": 2, "init": "random"}], [4], text_dim=5).double()
    with pytest.raises(InputError, match=r"shape \(1, 3, 5\), expected \[2, T, 5\]"):
        with_text(a, OpContext(text=torch.randn(1, 3, 5, dtype=torch.float64)))
    # the prompt changes the output (text-conditioned reduction)
    t1, t2 = (torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(2))
    assert not torch.allclose(with_text(a, OpContext(text=t1)).x, with_text(a, OpContext(text=t2)).x)


def teach(pipe, teacher, inp, ctx, steps=40, lr=2e-2):
    with torch.no_grad():
        target = teacher(inp, ctx).x
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
    return losses


def test_cotr_and_resampler_learn():
    torch.manual_seed(3)
    a, _ = ragged([12, 8], 12, 4, (3, 4))
    b, _ = ragged([9, 9], 9, 4, (3, 3), source=1)
    ctx = OpContext(text=torch.randn(2, 4, 3, dtype=torch.float64))
    spec = [{"op": "cotr", "num_queries": 4, "dim": 6, "init": "random"}]  # paper's init: all learn at step 0
    losses = teach(build_ops(spec, [4, 4], text_dim=3).double(), build_ops(spec, [4, 4], text_dim=3).double(),
                   [a, b], ctx)
    assert losses[-1] < 0.5 * losses[0]
    spec = [{"op": "resampler", "num_queries": 4, "heads": 2}]
    losses = teach(build_ops(spec, [4]).double(), build_ops(spec, [4]).double(), a, OpContext())
    assert losses[-1] < 0.5 * losses[0]


def test_resampler_equals_cross_attention_computed_directly():
    t, x = ragged([10, 6], 10, 8, (2, 5))
    pipe = build_ops([{"op": "resampler", "num_queries": 3, "heads": 2, "dim": 6, "dim_head": 3, "bias": True,
                   "kv_latents": False}], [8]).double()  # plain cross-attention (the Perceiver default: test_fidelity_tome)
    out = pipe(t)
    net = pipe.ops[0].nets["0"]
    layer = net["layers"][0]
    q0 = pipe.ops[0].queries_0
    assert out.x.shape == (2, 3, 6) and pipe.out_channels == 6 and pipe.expected_tokens([10], [None]) == 3
    for s, n in enumerate([10, 6]):
        xs = F.layer_norm(lin(net["inp"], x[s, :n]), (6,), layer.ln_x.weight, layer.ln_x.bias)
        qs = F.layer_norm(q0, (6,), layer.ln_q.weight, layer.ln_q.bias)
        Q, K, V = lin(layer.q, qs), lin(layer.k, xs), lin(layer.v, xs)
        heads = [torch.softmax(Q[:, h * 3 : h * 3 + 3] @ K[:, h * 3 : h * 3 + 3].T / math.sqrt(3), -1)
                 @ V[:, h * 3 : h * 3 + 3] for h in range(2)]
        q = q0 + lin(layer.o, torch.cat(heads, -1))
        q = q + layer.mlp(F.layer_norm(q, (6,), layer.ln_f.weight, layer.ln_f.bias))
        torch.testing.assert_close(out.x[s], F.layer_norm(q, (6,), net["out"].weight, net["out"].bias))
    torch.testing.assert_close(out.size.sum(1), torch.tensor([10.0, 6.0], dtype=out.size.dtype))
    assert (out.assign[1, 6:] == -1).all() and (out.assign[1, :6] >= 0).all()


def test_query_ops_batch_invariance():
    counts = [12, 5, 9]
    a, xa = ragged(counts, 12, 4, (3, 4))
    b, xb = ragged([7, 9, 3], 9, 4, (3, 3), source=1)
    text = torch.randn(3, 4, 5, dtype=torch.float64)
    tmask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2, [True] + [False] * 3])
    cotr = build_ops([{"op": "cotr", "num_queries": 3}], [4, 4], text_dim=5).double()
    res = build_ops([{"op": "resampler", "num_queries": 3, "heads": 2}, {"op": "concat_channels"}], [4, 4]).double()
    full_c = cotr([a, b], OpContext(text=text, text_mask=tmask))
    full_r = res([a, b])
    for s in range(3):
        one_a = Tokens.from_grid(xa[s : s + 1], (3, 4)).select(torch.arange(counts[s])[None])
        one_b = Tokens.from_grid(xb[s : s + 1], (3, 3), source=1).select(torch.arange([7, 9, 3][s])[None])
        nt = int(tmask[s].sum())
        c = cotr([one_a, one_b], OpContext(text=text[s : s + 1, :nt]))
        torch.testing.assert_close(c.x[0], full_c.x[s])
        torch.testing.assert_close(c.pos[0], full_c.pos[s])
        assert torch.equal(c.assign[0], full_c.assign[s])
        torch.testing.assert_close(res([one_a, one_b]).x[0], full_r.x[s])
