"""VEN-VL HTE: the visual MoE FFN (eqs. 5-6), shared dispatch and balance loss, router-saliency pruning (eqs. 7-8)
and its training-free variant on MoE LMs. Every check compares with an independent direct computation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

import compactvl.policies.hte  # noqa: F401  (registers the hte / hte_native policies)
from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import ConfigError
from compactvl.experts import (HTEMoE, added_parameters, apply_hte, balance_loss, dispatch, extra_macs, hte_layers,
                               resolve_layers)
from compactvl.measure.counted import CountingPolicy, per_sample_schedules
from compactvl.measure.macs import schedule_for
from compactvl.model import CompactVLM
from compactvl.policies import build_policy
from compactvl.policies.hte import HTENative, HTEPruning
from compactvl.registry import EXPERTS
from compactvl.runner import Runner, positions_from_mask
from compactvl.testing import tiny_lm, tiny_tokenizer, layout_batch

LAYERS = 6


batch = layout_batch


def randomize_experts(lm, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in added_parameters(lm):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def hte_lm(kind="llama", seed=0, randomize=True, **knobs):
    lm = tiny_lm(kind, num_hidden_layers=LAYERS, seed=seed)
    apply_hte(lm, **knobs)
    if randomize:
        randomize_experts(lm)
    return lm


LAYOUTS = ["ttVVVVVVVVVVtt", "tVVVVVVt"]


# ------------------------------------------------------------------------------------------------ the MoE FFN
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("layers", ["second_half", "all", [0, 3]])
def test_zero_initialised_experts_reproduce_the_dense_lm_exactly(kind, layers):
    dense, lm = tiny_lm(kind, num_hidden_layers=LAYERS), tiny_lm(kind, num_hidden_layers=LAYERS)
    apply_hte(lm, layers=layers, upcycle=layers == "all")
    assert all(isinstance(lm.model.layers[i].mlp, HTEMoE) for i in resolve_layers("t", layers, LAYERS))
    emb, mask, vis = batch(dense, LAYOUTS)
    a = Runner(lm).prefill(emb, mask, vis, use_cache=False)
    b = Runner(dense).prefill(emb, mask, vis, use_cache=False)
    assert torch.equal(a.hidden, b.hidden)
    assert a.state.signals.router  # the experts did run on the visual rows


def test_text_rows_never_reach_the_router_or_the_experts():
    lm = hte_lm(layers=[1, 4], num_experts=3, top_k=2)
    emb, mask, vis = batch(lm, LAYOUTS)
    seen = {}

    def grab(i):
        def hook(mod, args, out):
            seen[i] = (args[0].detach(), out.detach())
        return hook

    router_in, expert_rows = {}, {1: 0, 4: 0}
    for i in (1, 4):
        mlp = lm.model.layers[i].mlp
        mlp.register_forward_hook(grab(i))
        mlp.router.register_forward_hook(lambda m, a, o, i=i: router_in.__setitem__(i, a[0].detach()))
        for e in mlp.experts:
            e.register_forward_hook(lambda m, a, o, i=i: expert_rows.__setitem__(i, expert_rows[i] + a[0].shape[0]))
    Runner(lm).prefill(emb, mask, vis, use_cache=False)
    n_vis = int(vis.sum())
    for i in (1, 4):
        x, y = seen[i]
        assert torch.equal(router_in[i], x[vis])  # exactly the visual rows, in order
        assert expert_rows[i] == 2 * n_vis  # top-2: every visual row twice, no text row
        text = mask & ~vis
        assert torch.equal(y[text], lm.model.layers[i].mlp.global_ffn(x)[text])  # text output = global FFN


def naive_hte(mlp: HTEMoE, x, vis):
    """y = FFN(x) + m(x)·Σ_{TopK} g_i E_i(x), one token at a time."""
    y = mlp.global_ffn(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if vis[b, t]:
                g = torch.softmax(mlp.router(x[b, t]).float(), -1)
                w, idx = g.topk(mlp.top_k)
                for wj, j in zip(w, idx):
                    y[b, t] += wj * mlp.experts[int(j)](x[b, t:t + 1])[0]
    return y


def test_hte_layer_equals_a_naive_per_token_loop():
    lm = hte_lm(layers=[2], num_experts=4, top_k=2)
    emb, mask, vis = batch(lm, LAYOUTS)
    mlp, seen = lm.model.layers[2].mlp, {}
    mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    Runner(lm).prefill(emb, mask, vis, use_cache=False)
    torch.testing.assert_close(seen["y"], naive_hte(mlp, seen["x"], vis), rtol=1e-5, atol=1e-5)


def test_dispatch_equals_a_naive_loop_and_handles_idle_experts():
    g = torch.Generator().manual_seed(0)
    experts = [torch.nn.Linear(6, 5) for _ in range(5)]
    x = torch.randn(11, 6, generator=g)
    logits = torch.randn(11, 5, generator=g)
    logits[:, 3] = -1e4  # expert 3 gets no token
    w, idx = torch.softmax(logits, -1).topk(2, -1)
    out = dispatch(x, idx, w, experts)
    ref = torch.stack([sum(w[n, j] * experts[int(idx[n, j])](x[n]) for j in range(2)) for n in range(11)])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()  # the idle expert is still in the graph (zero gradient, not None)
    assert experts[3].weight.grad is not None and not experts[3].weight.grad.any()


def test_balance_loss_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(13, 4, generator=g), -1)
    idx = probs.topk(2, -1).indices
    E, N, k = 4, 13, 2
    f = [sum(int(idx[n, j]) == i for n in range(N) for j in range(k)) / (N * k) for i in range(E)]
    P = [float(probs[:, i].sum()) / N for i in range(E)]
    assert balance_loss(probs, idx).item() == pytest.approx(E * sum(a * b for a, b in zip(f, P)), rel=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert balance_loss(uniform, torch.arange(8).remainder(4)[:, None]).item() == pytest.approx(1.0)
    assert balance_loss(uniform, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(1.0)  # f all on one
    one_hot = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    assert balance_loss(one_hot, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)  # collapse: E


def test_training_adds_the_balance_loss_of_the_visual_rows_only():
    lm = hte_lm(layers=[3], num_experts=4, top_k=1, balance_weight=0.05)
    emb, mask, vis = batch(lm, LAYOUTS)
    mlp, seen = lm.model.layers[3].mlp, {}
    mlp.router.register_forward_hook(lambda m, a, o: seen.update(logits=o.detach()))
    lm.eval()
    out = Runner(lm).prefill(emb, mask, vis, use_cache=False)
    assert not out.state.signals.aux_losses  # eval: no auxiliary loss
    lm.train()
    out = Runner(lm).prefill(emb, mask, vis, use_cache=False)
    probs = torch.softmax(seen["logits"].float(), -1)
    assert seen["logits"].shape[0] == int(vis.sum())
    expected = 0.05 * balance_loss(probs, probs.topk(1, -1).indices)
    (aux,) = out.state.signals.aux_losses
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert mlp.router.weight.grad is not None and mlp.router.weight.grad.abs().sum() > 0


def test_upcycled_experts_are_slices_of_the_ffn():
    lm = tiny_lm(num_hidden_layers=2)
    ffn = lm.model.layers[1].mlp
    W = ffn.gate_proj.weight.detach().clone()
    apply_hte(lm, layers=[1], num_experts=4, upcycle=True, zero_init=False)
    mlp = lm.model.layers[1].mlp
    I, m = W.shape[0], mlp.intermediate
    for i, e in enumerate(mlp.experts):
        idx = [(i * I // 4 + j) % I for j in range(m)]
        assert torch.equal(e.gate_proj.weight, W[idx])
        assert torch.equal(e.down_proj.weight, ffn.down_proj.weight[:, idx])


def test_placements_of_the_ablation():
    assert resolve_layers("hte", "second_half", 6) == [3, 4, 5]
    assert resolve_layers("hte", "first_half", 6) == [0, 1, 2]
    assert resolve_layers("hte", "dense", 6) == resolve_layers("hte", "all", 6) == list(range(6))
    assert resolve_layers("hte", "sparse", 6) == [1, 3, 5]
    assert resolve_layers("hte", "sparse", 6, sparse_step=3) == [2, 5]
    lm = hte_lm(layers="first_half", randomize=False)
    assert hte_layers(lm) == [0, 1, 2]
    policy = build_policy({"policy": "hte", "keep": 0.5})
    Runner(lm, [policy])
    assert policy.stages == (1, 2, 3)  # a stage after every HTE layer
    policy = build_policy({"policy": "hte", "keep": 0.5, "layers": "sparse"})
    Runner(lm, [policy])
    assert policy.stages == (2,)  # HTE layers in the sparse placement: only layer 1


# ------------------------------------------------------------------------------------------------ pruning
def router_scores(lm, layer):
    """Capture the router probabilities of ``layer`` (rows = visual rows of the state, row-major)."""
    store = []
    h = lm.model.layers[layer].mlp.router.register_forward_hook(
        lambda m, a, o: store.append(torch.softmax(o.detach().float(), -1)))
    return store, h


def visual_rows(mask_like):
    """(b, position) of each True entry, row-major."""
    return [(b, t) for b, t in torch.nonzero(mask_like).tolist()]


def expected_kept(rows, scores, tau, n_samples):
    kept = {(b, o) for (b, o), s in zip(rows, scores.tolist()) if s >= tau}
    for b in range(n_samples):  # min_keep = 1: a sample with nothing above tau keeps its best token
        mine = [(s, -i) for i, ((bb, _), s) in enumerate(zip(rows, scores.tolist())) if bb == b]
        if mine and not any(bb == b for bb, _ in kept):
            kept.add(rows[-max(mine)[1]])
    return sorted(kept)


@pytest.mark.parametrize("score, top_k", [("max", 1), ("max", 2), ("sum", 2)])
def test_kept_set_equals_the_threshold_rule_on_router_outputs(score, top_k):
    lm = hte_lm(layers=[2, 4], num_experts=4, top_k=top_k)
    emb, mask, vis = batch(lm, LAYOUTS)
    s2, h2 = router_scores(lm, 2)
    s4, h4 = router_scores(lm, 4)
    saliency = (lambda p: p.amax(-1)) if score == "max" else (lambda p: p.topk(2, -1).values.sum(-1))
    rows1 = visual_rows(vis)  # layer 2 sees every input row (orig index = position)

    def run(t1, t2):
        s2.clear(), s4.clear()
        policy = build_policy({"policy": "hte", "threshold": [t1, t2], "layers": [3, 5], "score": score})
        return Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False), policy

    run(0.0, 0.0)
    tau1 = float(saliency(s2[0]).median())
    run(tau1, 0.0)
    kept1 = expected_kept(rows1, saliency(s2[0]), tau1, 2)
    tau2 = float(saliency(s4[0]).median())
    out, policy = run(tau1, tau2)
    kept2 = expected_kept(kept1, saliency(s4[0]), tau2, 2)  # layer 4 sees the stage-1 survivors, in order
    h2.remove(), h4.remove()
    for (layer, orig), want in zip(out.state.trace, (kept1, kept2)):
        got = sorted((b, o) for b, j in torch.nonzero(orig >= 0).tolist() for o in [int(orig[b, j])] if vis[b, o])
        assert got == want, layer
    n_in = vis.sum(-1).double()
    for (layer, orig), want in zip(out.state.trace, (kept1, kept2)):
        frac = torch.tensor([sum(b == i for b, _ in want) for i in range(2)]).double() / n_in
        assert torch.equal(policy.kept_fractions[layer], frac)
    assert [r["layer"] for r in policy.report()] == [3, 5]
    assert len(kept2) < len(kept1) < len(rows1)


def test_keep_ratio_token_counts_equal_the_macs_schedule_and_extra_macs():
    lm = hte_lm(layers="second_half")
    emb, mask, vis = batch(lm, ["tVVVVVVVVVVVVVVVVVVVtt", "ttVVVVVVVVVVVt"])
    policy, counter = build_policy({"policy": "hte", "drop_rate": 0.3}), CountingPolicy()
    out = Runner(lm, [policy, counter]).prefill(emb, mask, vis, use_cache=False)
    knobs = policy.schedule_knobs()
    assert knobs == {"layers": [4, 5], "keep": [0.7, 0.7], "relative_to": "remaining"}
    for b, measured in enumerate(per_sample_schedules(counter)):
        n_vis, n_txt = int(vis[b].sum()), int((mask[b] & ~vis[b]).sum())
        expected = schedule_for("hte", LAYERS, n_vis, n_txt, **knobs)
        assert measured.tokens == expected.tokens and measured.visual == expected.visual
        assert out.state.signals.kept_fraction[5][b].item() == pytest.approx(expected.visual[5] / n_vis)
        mlp = lm.model.layers[3].mlp
        per_token = 64 * 4 + 1 * 3 * 64 * mlp.intermediate
        assert extra_macs(lm, expected) == per_token * sum(expected.visual[3:])
    assert [s.visual[5] for s in per_sample_schedules(counter)] == [9, 6]  # 19 -> 13 -> 9, 11 -> 8 -> 6


def test_pruned_generation_cached_equals_uncached_and_batch_equals_single():
    lm = hte_lm(layers="second_half", top_k=2)
    emb, mask, vis = batch(lm, LAYOUTS)
    runner = Runner(lm, [build_policy({"policy": "hte", "drop_rate": 0.4})])
    a = runner.generate(emb, mask, vis, max_new_tokens=6)
    b = runner.generate(emb, mask, vis, max_new_tokens=6, use_cache=False)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.cache.lengths()[5] < a.cache.lengths()[3]
    for i in range(2):
        n = int(mask[i].sum())
        one = runner.generate(emb[i:i + 1, -n:], mask[i:i + 1, -n:], vis[i:i + 1, -n:], max_new_tokens=6)
        assert one.sequences[0].tolist() == a.sequences[i].tolist()


# ------------------------------------------------------------------------------------------------ native MoE
def moe_lm(kind="qwen3"):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                  num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    cfg = Qwen3MoeConfig(head_dim=16, **common) if kind == "qwen3" else \
        Qwen2MoeConfig(shared_expert_intermediate_size=64, **common)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper routers than the 0.02 init, so saliency separates tokens
        for layer in lm.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return lm


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_native_hte_scores_with_the_lms_own_router(kind):
    lm = moe_lm(kind)
    emb, mask, vis = batch(lm, ["tVVVVVVVVVVVtt", "ttVVVVVVVVVttt"])  # no padding: HF's own forward is the reference
    with torch.no_grad():
        ref = lm(inputs_embeds=emb, position_ids=positions_from_mask(mask), output_router_logits=True).router_logits
    probs = torch.softmax(ref[3].float(), -1).view(2, -1, 4)  # layer K-1 = 3 (first of the second half)
    s = probs.amax(-1)
    tau = float(s[vis].median())
    policy = build_policy({"policy": "hte_native", "threshold": tau})
    hooks = [len(layer.mlp.gate._forward_hooks) for layer in lm.model.layers]  # transformers installs its own
    out = Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False)
    assert policy.stages == (4, 5)
    (layer, orig), _ = out.state.trace
    assert layer == 4
    want = sorted((b, t) for b, t in visual_rows(vis) if s[b, t] >= tau)
    got = sorted((b, int(orig[b, j])) for b, j in torch.nonzero(orig >= 0).tolist() if vis[b, int(orig[b, j])])
    assert got == want
    assert [len(layer.mlp.gate._forward_hooks) for layer in lm.model.layers] == hooks  # ours: prefill only


def test_native_hte_keep_mode_matches_the_schedule_and_decodes_cached_like_uncached():
    lm = moe_lm("qwen3")
    emb, mask, vis = batch(lm, LAYOUTS)
    policy, counter = HTENative(keep=[0.5, 0.25], layers=[4, 5]), CountingPolicy()
    Runner(lm, [policy, counter]).prefill(emb, mask, vis, use_cache=False)
    for b, measured in enumerate(per_sample_schedules(counter)):
        expected = schedule_for("hte", LAYERS, int(vis[b].sum()), int((mask[b] & ~vis[b]).sum()),
                                **policy.schedule_knobs())
        assert measured.tokens == expected.tokens
    runner = Runner(lm, [HTENative(drop_rate=0.5)])
    a = runner.generate(emb, mask, vis, max_new_tokens=5)
    b = runner.generate(emb, mask, vis, max_new_tokens=5, use_cache=False)
    assert a.sequences.tolist() == b.sequences.tolist()


# ------------------------------------------------------------------------------------------------ the VLM
def test_vlm_with_hte_saves_and_loads_the_same_model(tmp_path):
    from PIL import Image

    lm = tiny_lm(num_hidden_layers=LAYERS)
    model = CompactVLM.build(lm=lm, encoders=[tiny_encoder("clip", 32)], tokenizer=tiny_tokenizer(),
                             experts=[{"expert": "hte", "num_experts": 3}],
                             policies=[{"policy": "hte", "drop_rate": 0.5}]).eval()
    randomize_experts(model.lm)
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    x = model.prepare([[("<image>\nWhat?", None)]], [[img]])
    logits = model(x).logits
    model.save_pretrained(tmp_path / "m")
    again = CompactVLM.from_pretrained(tmp_path / "m")
    assert isinstance(again.lm.model.layers[4].mlp, HTEMoE)
    torch.testing.assert_close(again(x).logits, logits, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_knobs_and_unsupported_layers_name_the_problem():
    lm = tiny_lm(num_hidden_layers=4)
    with pytest.raises(ConfigError, match="top_k=5 is greater than the number of experts \\(4\\)"):
        EXPERTS.get("hte")(lm, num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="outside this LM's decoder layers 0..3"):
        apply_hte(lm, layers=[2, 7])
    with pytest.raises(ConfigError, match="not a placement"):
        apply_hte(lm, layers="middle")
    with pytest.raises(ConfigError, match=r"threshold=1.5 is outside \[0, 1\]"):
        HTEPruning(threshold=1.5)
    with pytest.raises(ConfigError, match=r"threshold=\[0.2, -0.1\] is outside \[0, 1\]"):
        HTEPruning(threshold=[0.2, -0.1], layers=[2, 3])
    with pytest.raises(ConfigError, match="drop_rate=1.0 must be in \\[0, 1\\)"):
        HTEPruning(drop_rate=1.0)
    with pytest.raises(ConfigError, match="score='mean'"):
        HTEPruning(keep=0.5, score="mean")
    with pytest.raises(ConfigError, match="per-stage list but layers=None"):
        HTEPruning(keep=[0.5, 0.4])
    with pytest.raises(ConfigError, match="no router layer to prune after"):
        Runner(lm, [HTEPruning(keep=0.5)])  # no HTE experts in this LM
    apply_hte(lm, layers=[3])
    with pytest.raises(ConfigError, match="layer 1 has no HTE router \\(its mlp is LlamaMLP\\)"):
        Runner(lm, [HTEPruning(keep=0.5, layers=[2])])
    with pytest.raises(ConfigError, match="decoder layer 3's mlp is HTEMoE.*one expert surgery per layer"):
        apply_hte(lm, layers=[3])
    moe = moe_lm("qwen3")
    with pytest.raises(ConfigError, match="decoder layer 0's mlp is Qwen3MoeSparseMoeBlock.*hte_native"):
        apply_hte(moe, layers="all")
    with pytest.raises(ConfigError, match="decoder layer 2's mlp is LlamaMLP.*no MoE layers"):
        Runner(tiny_lm(num_hidden_layers=4), [HTENative(keep=0.5, layers=[3])])
