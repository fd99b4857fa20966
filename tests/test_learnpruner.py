"""LearnPruner (ops/learnpruner.py + policies/learnpruner.py): stage 1's kept tokens equal an independent per-sample
transcription of the scorer equation, its straight-through factor leaves values unchanged and trains the scorer;
stage 2 keeps the visual tokens with the most text-to-vision attention, recomputed from transformers' own eager
attentions; batch 1 == batch N for both stages; the op's MACs equal torch's FlopCounterMode count and the policy's
token counts per layer equal its MACs schedule; the packaged recipe has the 5.5 % its comment claims; bad input is
explained. No public code exists for LearnPruner (arXiv:2604.23950); the transcription follows the docstrings."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from compactvl.config import load_config
from compactvl.errors import ConfigError
from compactvl.ops import build_ops
from compactvl.policies import build_policy
from compactvl.policies.learnpruner import LearnPrunerT2V
from compactvl.runner import Runner, positions_from_mask
from compactvl.schedules import Budget, kept, schedule_for
from compactvl.testing import tiny_lm
from compactvl.tokens import Tokens

C, N = 6, 20
LAYERS = 6


def ragged(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, N, C, generator=g)
    counts = [20, 13, 7]
    keep = torch.arange(N)[None] < torch.tensor(counts)[:, None]
    return x, counts, Tokens.from_grid(x, (4, 5)).select(torch.arange(N).expand(3, N), keep)


# ----------------------------------------------------------------------------------------------- stage 1: the op
def test_learnpruner_op_keeps_the_top_scored_tokens_of_each_sample():
    torch.manual_seed(0)
    pipe = build_ops([{"op": "learnpruner", "ratio": 0.3, "hidden": 5}], [C])
    net = pipe.ops[0].nets["0"]
    x, counts, toks = ragged()
    with torch.no_grad():
        out = pipe(toks)
        for b, n in enumerate(counts):
            u = net.norm(x[b, :n])
            s = net.fc2(F.gelu(net.fc1(torch.cat([u, u.mean(0).expand_as(u)], -1))))[:, 0]
            k = kept(n, 0.3)
            top = sorted(s.topk(k).indices.tolist())
            assert out.kept_counts()[b] == k
            torch.testing.assert_close(out.x[b, :k], x[b, top], atol=0, rtol=0)  # values unchanged (factor 1)
            assert int((out.assign[b] >= 0).sum()) == k  # each kept token holds its one patch
            one = pipe(Tokens.from_grid(x[b:b + 1, :n], (1, n)))  # batch 1, unpadded
            torch.testing.assert_close(one.x[0], out.x[b, :k], atol=0, rtol=0)


def test_learnpruner_scorer_learns_through_the_straight_through_factor():
    torch.manual_seed(1)
    pipe = build_ops([{"op": "learnpruner", "count": 4}], [C])
    _, _, toks = ragged(1)
    pipe(toks).x.square().sum().backward()
    net = pipe.ops[0].nets["0"]
    assert all(float(p.grad.abs().sum()) > 0 for p in (net.fc1.weight, net.fc2.weight, net.norm.weight))


def test_learnpruner_op_macs_equal_torchs_flop_count():
    pipe = build_ops([{"op": "learnpruner", "count": 4, "hidden": 7}], [C])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe(Tokens.from_grid(torch.randn(2, N, C), (4, 5)))
    assert fc.get_total_flops() == 2 * 2 * pipe.ops[0].macs(N)
    assert pipe.ops[0].macs(N) == N * (2 * C * 7 + 7)


# ----------------------------------------------------------------------------------------------- stage 2: the policy
LAYOUTS = ["ttVVVVVVVVVVttttt", "tttVVVVVVtVVVVVVtttttt", "tVVVVVVVVtt"]  # 10, 12 (two images), 8 visual tokens


def make_batch(lm, layouts, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, D = max(len(s) for s in layouts), lm.config.hidden_size
    emb, mask = torch.zeros(len(layouts), L, D), torch.zeros(len(layouts), L, dtype=torch.bool)
    vis = torch.zeros_like(mask)
    for b, s in enumerate(layouts):
        off = L - len(s)
        rows = lm.get_input_embeddings()(torch.randint(3, 128, (len(s),), generator=g)).detach()
        v = torch.tensor([c == "V" for c in s])
        rows[v] = torch.randn(int(v.sum()), D, generator=g) * 0.5
        emb[b, off:], mask[b, off:], vis[b, off:] = rows, True, v
    return emb, mask, vis


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_t2v_keeps_the_visual_tokens_text_attends_most(kind):
    lm = tiny_lm(kind, num_hidden_layers=LAYERS)
    elm = tiny_lm(kind, attn="eager", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=1)
    policy = LearnPrunerT2V(keep=0.5)
    out = Runner(lm, [policy]).prefill(emb, mask, vis)
    K = LAYERS // 2
    assert policy.stages == (K,)
    with torch.no_grad():
        att = elm(inputs_embeds=emb, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                  output_attentions=True).attentions[K - 1].mean(1)  # [B, L, L], layer K-1, mean over heads
    (layer, ids), = out.state.trace
    assert layer == K
    L = mask.shape[1]
    for b in range(len(LAYOUTS)):
        first = int(torch.nonzero(vis[b])[0])
        rows = [i for i in range(L) if mask[b, i] and not vis[b, i] and i > first]  # text after the image
        s = att[b, rows].mean(0)
        cand = torch.nonzero(vis[b]).flatten()
        n = len(cand)
        want = set(cand[s[cand].topk(kept(n, 0.5)).indices].tolist())
        assert {i for i in ids[b].tolist() if i >= 0 and vis[b, i]} == want
    text = (mask & ~vis).sum(-1)
    assert out.state.token_counts().tolist() == [int(t) + kept(int(v), 0.5) for t, v in zip(text, vis.sum(-1))]
    # batch 1 == batch N: each sample alone (unpadded) ends in the same hidden state
    for b in range(len(LAYOUTS)):
        n = int(mask[b].sum())
        one = Runner(lm, [LearnPrunerT2V(keep=0.5)]).prefill(emb[b:b + 1, -n:], mask[b:b + 1, -n:], vis[b:b + 1, -n:])
        torch.testing.assert_close(one.hidden[0, -1], out.hidden[b, -1], atol=1e-4, rtol=0)


def test_t2v_schedule_budget_and_bad_input():
    s = schedule_for("learnpruner_t2v", LAYERS, 10, 5, keep=0.5)
    assert s.tokens == [15] * 3 + [10] * 3 and s.visual == [10] * 3 + [5] * 3
    assert schedule_for("learnpruner_t2v", LAYERS, 10, 5, layer=1, keep=0.3).visual == [10] + [3] * 5
    assert LearnPrunerT2V.budget_knobs(Budget(tokens=8)) == {"count": 8}
    assert LearnPrunerT2V.budget_knobs(Budget(fraction=0.25)) == {"keep": 0.25}
    with pytest.raises(ConfigError, match="learnpruner_t2v: layer='top'"):
        LearnPrunerT2V(layer="top")
    with pytest.raises(ConfigError, match="learnpruner_t2v: layer 6 is outside 1..5"):
        Runner(tiny_lm(num_hidden_layers=LAYERS), [LearnPrunerT2V(layer=6)])
    lm = tiny_lm(num_hidden_layers=LAYERS)
    delattr(lm.model.layers[2].self_attn, "q_proj")  # an LM whose layer K-1 has no Llama-style attention
    with pytest.raises(ConfigError, match="use a Llama-family LM"):
        Runner(lm, [LearnPrunerT2V()])


# ----------------------------------------------------------------------------------------------- the recipe
def test_learnpruner_recipe_keeps_five_and_a_half_percent():
    cfg = load_config("learnpruner")
    ops = build_ops(cfg["model"]["token_ops"], [384])
    first = ops.expected_tokens([256], [(16, 16)])
    assert first == kept(256, 0.111) == 28
    policy = build_policy(cfg["model"]["policies"][0])
    s = schedule_for("learnpruner_t2v", 30, first, 10, **policy.schedule_knobs())
    assert s.visual == [28] * 15 + [14] * 15
    assert abs(s.visual[-1] / 256 - 0.055) < 0.001
