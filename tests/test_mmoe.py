"""LEO-MINI MMoE-LLM (eqs. 8-9): LoRA experts + general expert on the MLP linears with a router fed the hidden state
and causal per-sample visual / text summaries. Checked against a naive per-token loop, the base LM, and decoding."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import ConfigError
from compactvl.experts import MMoEMLP, added_parameters, apply_mmoe, balance_loss
from compactvl.model import CompactVLM
from compactvl.registry import EXPERTS
from compactvl.runner import Runner
from compactvl.testing import tiny_lm, tiny_tokenizer, layout_batch

LAYERS = 3



def batch(lm, layouts, seed=0, visual_seed=None):
    return layout_batch(lm, layouts, seed, seed if visual_seed is None else visual_seed)


def mmoe_lm(kind="llama", randomize=True, **knobs):
    lm = tiny_lm(kind, num_hidden_layers=LAYERS)
    apply_mmoe(lm, **knobs)
    if randomize:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in added_parameters(lm):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lm


LAYOUTS = ["ttVVVVVVtttt", "tVVVVtt"]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_zero_initialised_lora_b_reproduces_the_base_lm_exactly(kind):
    base, lm = tiny_lm(kind, num_hidden_layers=LAYERS), tiny_lm(kind, num_hidden_layers=LAYERS)
    apply_mmoe(lm)  # B matrices start at zero (A and the router are random)
    assert all(isinstance(layer.mlp, MMoEMLP) for layer in lm.model.layers)
    emb, mask, vis = batch(base, LAYOUTS)
    a = Runner(lm).prefill(emb, mask, vis, use_cache=False)
    b = Runner(base).prefill(emb, mask, vis, use_cache=False)
    assert torch.equal(a.hidden, b.hidden)
    assert a.state.signals.router[0].source == "mmoe"
    assert torch.equal(lm(inputs_embeds=emb).logits, base(inputs_embeds=emb).logits)  # outside the Runner too


def naive_mmoe(mlp: MMoEMLP, x, real, vis):
    """Eq. 9 on every linear, token by token, with the summaries recomputed from scratch for each token."""
    y = torch.zeros_like(x)
    k = mlp.top_k
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if not real[b, t]:
                continue
            vrows = [s for s in range(t + 1) if vis[b, s]]
            trows = [s for s in range(t + 1) if real[b, s] and not vis[b, s]]
            v = x[b, vrows].mean(0) if vrows else torch.zeros_like(x[b, t])
            tt = x[b, trows].mean(0) if trows else torch.zeros_like(x[b, t])
            p = torch.softmax(mlp.router(torch.cat([x[b, t], v, tt])).float(), -1)
            chosen = p.topk(k).indices.tolist()

            def lin(name, z):
                out = getattr(mlp.base, name)(z)
                bank, gen = mlp.experts[name], mlp.general[name]
                out = out + (z @ gen.A[0]) @ gen.B[0] * gen.scale
                for e in chosen:
                    out = out + (z @ bank.A[e]) @ bank.B[e] * bank.scale / k
                return out

            h = mlp.base.act_fn(lin("gate_proj", x[b, t])) * lin("up_proj", x[b, t])
            y[b, t] = lin("down_proj", h)
    return y


@pytest.mark.parametrize("top_k", [1, 2])
def test_mmoe_layer_equals_a_naive_per_token_loop(top_k):
    lm = mmoe_lm(num_experts=3, top_k=top_k, rank=4)
    emb, mask, vis = batch(lm, LAYOUTS)
    seen = {}
    lm.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    Runner(lm).prefill(emb, mask, vis, use_cache=False)
    ref = naive_mmoe(lm.model.layers[1].mlp, seen["x"], mask, vis)
    torch.testing.assert_close(seen["y"][mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_changing_the_image_changes_the_routing_through_the_summaries():
    lm = mmoe_lm(num_experts=3)
    D = lm.config.hidden_size
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.mlp.router[0].weight[:, :D] = 0  # route on [visual summary, text summary] only
    layout = ["tttVVVVVVttt"]
    a = Runner(lm).prefill(*batch(lm, layout, visual_seed=5), use_cache=False).state.signals.router[0].probs
    b = Runner(lm).prefill(*batch(lm, layout, visual_seed=6), use_cache=False).state.signals.router[0].probs
    assert torch.equal(a[0, :3], b[0, :3])  # text before the image: same summaries, same routing
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-4)  # after it: the image summary moved the router


def test_vlm_routing_of_the_question_depends_on_the_image():
    from PIL import Image

    model = CompactVLM.build(lm=tiny_lm(num_hidden_layers=LAYERS), encoders=[tiny_encoder("clip", 32)],
                             tokenizer=tiny_tokenizer(), experts=[{"expert": "mmoe", "rank": 4}]).eval()
    probs = []
    for color in [(220, 20, 20), (20, 20, 220)]:
        x = model.prepare([[("<image>\nWhat color?", None)]], [[Image.new("RGB", (32, 32), color)]])
        probs.append(model(x).state.signals.router[2].probs[0, -1])
    assert not torch.allclose(probs[0], probs[1], atol=1e-5)


def test_cached_generation_equals_uncached_and_batch_equals_single():
    lm = mmoe_lm(num_experts=3, top_k=1, rank=4)
    emb, mask, vis = batch(lm, LAYOUTS)
    runner = Runner(lm)
    a = runner.generate(emb, mask, vis, max_new_tokens=6)
    b = runner.generate(emb, mask, vis, max_new_tokens=6, use_cache=False)
    assert a.sequences.tolist() == b.sequences.tolist()
    full = torch.cat([emb, lm.get_input_embeddings()(a.sequences[:, :-1])], 1)
    fmask = torch.cat([mask, torch.ones_like(a.sequences[:, :-1], dtype=torch.bool)], 1)
    fvis = torch.cat([vis, torch.zeros_like(fmask[:, mask.shape[1]:])], 1)
    out = runner.prefill(emb, mask, vis)  # cached: prefill then one step at a time
    steps = [runner.logits(out.hidden[:, -1])]
    for j in range(a.sequences.shape[1] - 1):
        steps.append(runner.logits(runner.extend(lm.get_input_embeddings()(a.sequences[:, j:j + 1]),
                                                 out.cache).hidden[:, -1]))
    ref = runner.logits(runner.prefill(full, fmask, fvis, use_cache=False).hidden)[:, mask.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(steps, 1), ref, rtol=1e-4, atol=1e-4)
    for i in range(2):
        n = int(mask[i].sum())
        one = runner.generate(emb[i:i + 1, -n:], mask[i:i + 1, -n:], vis[i:i + 1, -n:], max_new_tokens=6)
        assert one.sequences[0].tolist() == a.sequences[i].tolist()


def test_training_adds_the_balance_loss_and_trains_router_and_experts():
    lm = mmoe_lm(num_experts=3, top_k=1, rank=4, layers=[1])
    emb, mask, vis = batch(lm, LAYOUTS)
    mlp, seen = lm.model.layers[1].mlp, {}
    mlp.router.register_forward_hook(lambda m, a, o: seen.update(logits=o.detach()))
    lm.train()
    out = Runner(lm).prefill(emb, mask, vis, use_cache=False)
    probs = torch.softmax(seen["logits"].float(), -1)
    assert seen["logits"].shape[0] == int(mask.sum())  # every real token is routed, padding is not
    (aux,) = out.state.signals.aux_losses
    torch.testing.assert_close(aux, 0.05 * balance_loss(probs, probs.topk(1, -1).indices))
    # a few steps on the added parameters only (base frozen) lower a next-token loss on a fixed batch
    lm.requires_grad_(False)
    params = added_parameters(lm)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-2)
    target = torch.randint(3, 128, mask.shape, generator=torch.Generator().manual_seed(3))
    runner, losses = Runner(lm), []
    for step in range(8):
        st = runner.prefill(emb, mask, vis, use_cache=False)
        logits = runner.logits(st.hidden)
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask]) + sum(st.state.signals.aux_losses)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # eq. 8's mean of the selected experts still trains the router (straight-through)
            assert mlp.router[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.9


def test_vanilla_lora_moe_routes_on_the_hidden_state_only():
    lm = mmoe_lm(num_experts=3, multimodal=False)
    mlp, seen = lm.model.layers[1].mlp, {}
    assert mlp.router[0].in_features == lm.config.hidden_size
    mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))
    emb, mask, vis = batch(lm, LAYOUTS)
    probs = Runner(lm).prefill(emb, mask, vis, use_cache=False).state.signals.router[1].probs
    torch.testing.assert_close(probs[mask], torch.softmax(mlp.router(seen["x"][mask]).float(), -1))


def test_bad_input_names_the_problem():
    lm = tiny_lm(num_hidden_layers=LAYERS)
    with pytest.raises(ConfigError, match="top_k=4 is greater than the number of experts \\(3\\)"):
        EXPERTS.get("mmoe")(lm, num_experts=3, top_k=4)
    with pytest.raises(ConfigError, match="targets="):
        apply_mmoe(lm, targets=["q_proj"])
    with pytest.raises(ConfigError, match="rank=0"):
        apply_mmoe(lm, rank=0)
    with pytest.raises(ConfigError, match="weighting='max'"):
        apply_mmoe(lm, weighting="max")
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(ConfigError, match="decoder layer 0's mlp is Qwen3MoeSparseMoeBlock"):
        apply_mmoe(moe)
    lm2 = mmoe_lm()
    emb, mask, vis = batch(lm2, LAYOUTS)
    runner = Runner(lm2)
    cache = runner.prefill(emb[:1], mask[:1], vis[:1]).cache
    runner.prefill(emb, mask, vis)  # the modules now follow a batch of 2
    with pytest.raises(RuntimeError, match="without a prefill of the same batch"):
        runner.extend(emb[:1, :1], cache)


def test_extra_macs_count_router_and_activated_lora_experts_for_every_token():
    from compactvl.experts import extra_macs
    from compactvl.measure.macs import schedule_for

    lm = mmoe_lm(num_experts=3, top_k=2, rank=4, layers=[0, 2])
    sched = schedule_for("vanilla", LAYERS, 10, 7)
    D, I, r = 64, 128, 4
    router = 3 * D * D + D * 3  # 2-layer MLP on [x, visual, text], hidden D
    lora = (2 + 1) * r * ((D + I) + (D + I) + (I + D))  # general + top-2 experts on gate, up, down
    assert extra_macs(lm, sched) == 2 * 17 * (router + lora)
