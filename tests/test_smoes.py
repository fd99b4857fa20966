"""SMoES (experts/smoes.py): binning, the inter-bin MI and the Gaussian modality scores equal independent
computations (Python sums, torch.distributions); cross-bin dispatch counts under a simulated expert-parallel
placement are checked against counts worked out by hand; on a tiny MoE router, maximising the MI makes the binned
placement cross fewer bins than a bin-unaware one; on tiny Qwen2/3-MoE LMs the policy reads the LM's own routers (MI
and counts equal a recomputation from transformers' ``output_router_logits``), leaves the forward unchanged, adds its
loss only in training, and per-token counts add up over a batch (batch 1 == batch N); its MACs equal torch's
FlopCounterMode count; bad input is explained. No public code exists for SMoES (arXiv:2604.23996)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

from compactvl.errors import ConfigError
from compactvl.experts import apply_hte
from compactvl.experts.smoes import (SMoES, bin_probs, cross_bin_dispatches, dispatches, gaussian_modality_scores,
                                     mutual_information, placement, smoes_loss, smoes_macs)
from compactvl.policies import build_policy
from compactvl.runner import Runner, positions_from_mask
from compactvl.testing import layout_batch, tiny_lm

LAYERS = 3


# ----------------------------------------------------------------------------------------------- pure functions
def test_placements_and_bin_probabilities_by_hand():
    assert placement(4, 2).tolist() == [0, 0, 1, 1]
    assert placement(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert placement(4, 2, "round_robin").tolist() == [0, 1, 0, 1]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125]])
    torch.testing.assert_close(bin_probs(probs, placement(4, 2), 2), torch.tensor([[0.3, 0.7], [0.75, 0.25]]))
    with pytest.raises(ConfigError, match="num_bins=3 does not divide the 4 experts.*use one of \\[1, 2, 4\\]"):
        placement(4, 3)


def mi_by_hand(q, s):
    """I(B; M) with plain Python sums over the definition."""
    N, M = len(q), len(q[0])
    joint = [[sum(q[n][b] * (s[n] if m == 0 else 1 - s[n]) for n in range(N)) / N for m in range(2)]
             for b in range(M)]
    pb = [sum(row) for row in joint]
    pm = [sum(joint[b][m] for b in range(M)) for m in range(2)]
    return sum(joint[b][m] * math.log(joint[b][m] / (pb[b] * pm[m])) for b in range(M) for m in range(2)
               if joint[b][m] > 0)


def test_mutual_information_equals_the_definition():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert abs(float(mutual_information(q, torch.tensor([1.0, 0.0]))) - math.log(2)) < 1e-6  # bins = modalities
    assert abs(float(mutual_information(torch.full((4, 2), 0.5), torch.tensor([1.0, 0, 1, 0])))) < 1e-6
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(12, 3, generator=g), -1)
    s = torch.rand(12, generator=g)
    assert abs(float(mutual_information(q, s)) - mi_by_hand(q.tolist(), s.tolist())) < 1e-5
    loss, mi = smoes_loss(torch.softmax(torch.randn(12, 6, generator=g), -1), s, placement(6, 3), 3, 0.1)
    assert abs(float(loss) + 0.1 * float(mi)) < 1e-7


def test_gaussian_modality_scores_equal_torch_distributions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g)
    vis = torch.tensor([True] * 6 + [False] * 4)
    x[vis] += 1.5
    rows = torch.tensor([True, False] * 5)
    got = gaussian_modality_scores(x, vis, rows, temperature=0.5)

    def ll(sel):
        d = torch.distributions.Normal(x[sel].mean(0), (x[sel].var(0, unbiased=False) + 1e-5).sqrt())
        return d.log_prob(x[rows]).mean(-1)

    torch.testing.assert_close(got, torch.sigmoid((ll(vis) - ll(~vis)) / 0.5), atol=1e-6, rtol=0)
    assert got[:3].mean() > 0.5 > got[3:].mean()  # rows 0, 2, 4 visual; 6, 8 text
    assert gaussian_modality_scores(x, torch.ones(10, dtype=torch.bool)).tolist() == [1.0] * 10  # no text: hard


def test_cross_bin_dispatches_by_hand():
    # vision tokens 0, 1 route to experts {0, 1}, text tokens 2, 3 to {2, 3}; one token mixes
    index = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [0, 3]])
    binned, unaware = placement(4, 2), placement(4, 2, "round_robin")  # [0, 0, 1, 1] vs [0, 1, 0, 1]
    # binned: devices per token {0}, {0}, {1}, {1}, {0, 1} -> 6 copies, 1 crosses a bin
    assert dispatches(index, binned) == 6 and cross_bin_dispatches(index, binned) == 1
    # round robin: {0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1} -> 10 copies, 5 cross
    assert dispatches(index, unaware) == 10 and cross_bin_dispatches(index, unaware) == 5
    # with home devices (tokens 0, 1, 4 on device 0; 2, 3 on device 1): copies leaving the home device
    home = torch.tensor([0, 0, 1, 1, 0])
    assert cross_bin_dispatches(index, binned, home) == 1  # only token 4 -> device 1
    assert cross_bin_dispatches(index, unaware, home) == 5  # every token -> the other device
    assert dispatches(index[:0], binned) == cross_bin_dispatches(index[:0], binned) == 0


def test_smoes_macs_equal_torchs_flop_count():
    assert SMoES.macs_schedule(4, 10, 3) == [10] * 4  # no token is dropped: the LM's own MACs are unchanged
    probs, s = torch.softmax(torch.randn(9, 8), -1), torch.rand(9)
    with FlopCounterMode(display=False) as fc:
        smoes_loss(probs, s, placement(8, 4), 4, 0.01)
    assert fc.get_total_flops() == 2 * smoes_macs(9, 8, 4) == 2 * (9 * 8 * 4 + 2 * 9 * 4)


def test_mi_term_specialises_the_bins_of_a_tiny_moe():
    """A tiny MoE router (4 experts, top-2, 2 bins) trained on the MI term alone: the MI rises, and the binned
    placement then needs no cross-bin dispatch while the bin-unaware one does."""
    torch.manual_seed(0)
    D, E, k = 8, 4, 2
    vis = torch.tensor([True] * 16 + [False] * 16)
    x = torch.randn(32, D) + torch.where(vis, 1.0, -1.0)[:, None]  # two modalities
    router = torch.nn.Linear(D, E, bias=False)
    bins, unaware = placement(E, 2), placement(E, 2, "round_robin")
    with torch.no_grad():
        before = float(mutual_information(bin_probs(router(x).softmax(-1), bins, 2), vis.float()))
    opt = torch.optim.Adam(router.parameters(), lr=5e-2)
    for _ in range(60):
        loss, _ = smoes_loss(router(x).softmax(-1), vis.float(), bins, 2, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probs = router(x).softmax(-1)
    after = float(mutual_information(bin_probs(probs, bins, 2), vis.float()))
    assert after > before + 0.3 and after > 0.9 * math.log(2)
    index = probs.topk(k).indices
    assert cross_bin_dispatches(index, bins) == 0
    assert cross_bin_dispatches(index, unaware) == 32  # each token's two experts sit on both round-robin devices


# ----------------------------------------------------------------------------------------------- on MoE LMs
def moe_lm(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                  num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
    cfg = Qwen3MoeConfig(head_dim=8, **common) if kind == "qwen3" else \
        Qwen2MoeConfig(shared_expert_intermediate_size=32, **common)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return lm


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_smoes_reads_the_lms_own_routers(kind):
    lm = moe_lm(kind)
    layouts = ["tVVVVVVtt", "ttVVVVVtt"]  # no padding: HF's own forward is the reference
    emb, mask, vis = layout_batch(lm, layouts)
    with torch.no_grad():
        ref = lm(inputs_embeds=emb, position_ids=positions_from_mask(mask), output_router_logits=True).router_logits
        plain = Runner(lm).prefill(emb, mask, vis, use_cache=False).hidden
        policy = build_policy({"policy": "smoes", "num_bins": 2, "score": "hard"})
        out = Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False)
    torch.testing.assert_close(out.hidden, plain, atol=0, rtol=0)  # the forward is unchanged
    assert not out.state.signals.aux_losses  # no loss outside training
    rep = policy.report()
    assert [r["layer"] for r in rep] == list(range(LAYERS))
    bins, unaware = [0, 0, 1, 1], [0, 1, 0, 1]
    labels = vis.reshape(-1).float().tolist()
    for r in rep:
        probs = torch.softmax(ref[r["layer"]].float(), -1)
        q = [[p[0] + p[1], p[2] + p[3]] for p in probs.tolist()]
        assert abs(r["mi"] - mi_by_hand(q, labels)) < 1e-5
        top = probs.topk(2).indices.tolist()
        assert r["tokens"] == len(top)
        assert r["binned"] == sum(len({bins[e] for e in t}) - 1 for t in top)
        assert r["round_robin"] == sum(len({unaware[e] for e in t}) - 1 for t in top)
    # batch 1 == batch N: the per-token counts of each sample alone add up to the batch's
    alone = []
    for b in range(2):
        p = build_policy({"policy": "smoes", "score": "hard"})
        with torch.no_grad():
            Runner(lm, [p]).prefill(emb[b:b + 1], mask[b:b + 1], vis[b:b + 1], use_cache=False)
        alone.append(p.report())
    for i, r in enumerate(rep):
        assert r["binned"] == alone[0][i]["binned"] + alone[1][i]["binned"]
        assert r["round_robin"] == alone[0][i]["round_robin"] + alone[1][i]["round_robin"]


def test_smoes_adds_its_loss_in_training_and_it_reaches_the_router():
    lm = moe_lm("qwen3").train()
    emb, mask, vis = layout_batch(lm, ["tVVVVVtt", "ttVVVVtt"])
    policy = SMoES(layers=[1, 2], weight=0.5)
    out = Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False)
    losses = out.state.signals.aux_losses
    assert len(losses) == 2
    assert all(abs(float(a.detach()) + 0.5 * policy.mi[i]) < 1e-6 for a, i in zip(losses, [1, 2]))
    sum(losses).backward()
    assert all(lm.model.layers[i].mlp.gate.weight.grad.abs().sum() > 0 for i in (1, 2))


def test_smoes_on_hte_experts_routes_visual_rows_only():
    lm = tiny_lm(num_hidden_layers=4)
    apply_hte(lm, layers="second_half", num_experts=4, top_k=2)
    emb, mask, vis = layout_batch(lm, ["tVVVVVtt", "ttVVVVtt"])
    policy = SMoES()
    with torch.no_grad():
        Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False)
    rep = policy.report()
    assert [r["layer"] for r in rep] == [2, 3]
    assert all(r["tokens"] == int(vis.sum()) for r in rep)


def test_smoes_bad_input_is_explained():
    with pytest.raises(ConfigError, match="smoes regularises MoE routers: Qwen2-MoE / Qwen3-MoE.*hte visual experts; "
                                          "this LlamaForCausalLM has only LlamaMLP MLPs"):
        Runner(tiny_lm(num_hidden_layers=2), [SMoES()])
    with pytest.raises(ConfigError, match="num_bins=3 does not divide the 4 experts"):
        Runner(moe_lm("qwen3"), [SMoES(num_bins=3)])
    with pytest.raises(ConfigError, match="smoes: layers \\[7\\] have no MoE router"):
        Runner(moe_lm("qwen3"), [SMoES(layers=[7])])
    with pytest.raises(ConfigError, match="smoes: score='attention'; use one of gaussian, hard"):
        SMoES(score="attention")
    with pytest.raises(ConfigError, match="smoes: weight=-1 must be a number >= 0"):
        SMoES(weight=-1)
