"""DART (compactvl.policies.dart): the kept set equals an independent transcription of the reference computation
(ZichenWen1/DART, llava/model/language_model/modeling_llama_self.py, ``DART.forward`` + ``get_retained_image_token``)
on HF's own eager model, batch 1 == batch N, cached == uncached generation, tokens per layer == the MACs schedule,
and bad knobs are ConfigErrors."""
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import compactvl.policies.dart as dart_mod
from compactvl.errors import CompactVLWarning, ConfigError
from compactvl.measure.counted import CountingPolicy
from compactvl.measure.macs import schedule_for
from compactvl.policies import build_policy
from compactvl.registry import POLICIES
from compactvl.runner import ReplayPolicy, Runner
from compactvl.schedules import Budget
from compactvl.testing import TINY_LM_KINDS, layout_batch, tiny_lm

DART = dart_mod.DART
LAYERS = 6
# one contiguous image per sample (the reference's layout), different visual counts, text after the image
LAYOUTS = ["ttt" + "V" * 40 + "tttttt", "t" + "V" * 33 + "ttttttttt", "tt" + "V" * 21 + "ttttt"]


def lms(kind, seed=0):
    """The same random weights twice (SDPA for the Runner, eager for the reference); a non-trivial final norm so the
    similarity's use of ``self.norm`` is tested."""
    lm = tiny_lm(kind, seed=seed, num_hidden_layers=LAYERS)
    elm = tiny_lm(kind, seed=seed, attn="eager", num_hidden_layers=LAYERS)
    w = torch.rand(lm.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 2 + 0.1
    with torch.no_grad():
        lm.model.norm.weight.copy_(w)
        elm.model.norm.weight.copy_(w)
    return lm, elm


def reference_kept(elm, emb, K, start, length, pivot_image, pivot_text, max_num_trunction=None,
                   reduction_ratio=None):
    """Transcription of the reference for one unpadded sample (batch 1, as the reference): the retained image
    token indices. Keys: layer K-1's post-RoPE key states (after repeat_kv, all heads concatenated); similarity on
    self.norm(output of layer K-1); pivots by L1 norm; greedy over ``list(set(image + query indices))``."""
    L = emb.shape[1]
    pos = torch.arange(L)[None]
    with torch.no_grad():
        hs = elm(inputs_embeds=emb, position_ids=pos, output_hidden_states=True).hidden_states
        lay = elm.model.layers[K - 1]
        attn = lay.self_attn
        x = lay.input_layernorm(hs[K - 1])
        hd = attn.head_dim
        k = attn.k_proj(x).view(1, L, -1, hd)
        q = attn.q_proj(x).view(1, L, -1, hd)
        if getattr(attn, "k_norm", None) is not None:
            k, q = attn.k_norm(k), attn.q_norm(q)
        k, q = k.transpose(1, 2), q.transpose(1, 2)
        cos, sin = elm.model.rotary_emb(x, pos)
        _, k = apply_rotary_pos_emb(q, k, cos, sin)
        any_states = repeat_kv(k, elm.config.num_attention_heads // elm.config.num_key_value_heads)
        last_layer_state = elm.model.norm(hs[K])
    P = pivot_image + pivot_text
    budget = max_num_trunction if max_num_trunction is not None else length * (1 - reduction_ratio)
    token_topk = math.ceil(budget // P)
    ks = any_states.permute(0, 2, 1, 3).reshape(1, L, -1)
    k_img = ks[0][start:start + length]
    k_query = ks[0][start + length:]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(pivot_image).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        vecs = last_layer_state[0][valid_list, :]
        neg = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], vecs, dim=-1)
        picked = [valid_list[i] for i in neg.topk(token_topk).indices]
        indices_set.update(picked)
        valid.difference_update(picked)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return indices_set


def dart_trace(lm, policy, emb, mask, vis):
    with torch.no_grad():
        out = Runner(lm, [policy]).prefill(emb, mask, vis, use_cache=False)
    assert len(out.state.trace) == 1 and out.state.trace[0][0] == policy.layer
    return out.state.trace[0][1]


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("knobs", [dict(count=16), dict(keep=0.5), dict(count=15, pivots_image=3, pivots_text=2),
                                   dict(layer=3, keep=0.3)], ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_kept_set_equals_reference_transcription(kind, knobs):
    lm, elm = lms(kind)
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=1)
    policy = DART(**knobs)
    kept = dart_trace(lm, policy, emb, mask, vis)
    K = policy.layer
    for b, layout in enumerate(LAYOUTS):
        pad = mask.shape[1] - len(layout)
        start, length = layout.index("V"), layout.count("V")
        ref = reference_kept(elm, emb[b:b + 1, pad:], K, start, length, policy.pivots_image, policy.pivots_text,
                             max_num_trunction=knobs.get("count"),
                             reduction_ratio=None if "keep" not in knobs else 1 - knobs["keep"])
        mine = {i - pad for i in kept[b].tolist() if i >= 0 and vis[b, i]}
        assert mine == ref
        assert len(mine) == dart_mod.dart_kept(length, knobs.get("keep"), knobs.get("count"), policy.pivots_image,
                                               policy.pivots_text)
        # text is always kept, in order, at its original positions (reference position policy: keep)
        text = [i - pad for i in kept[b].tolist() if i >= 0 and not vis[b, i]]
        assert text == [i for i, c in enumerate(layout) if c == "t"]


def test_pivot_order_matters_and_is_the_reference_set_order():
    """The greedy order changes the result (so the test above checks it): visiting the pivots in another order
    gives another kept set for at least one sample."""
    lm, elm = lms("llama")
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=1)
    policy = DART(count=16)
    kept = dart_trace(lm, policy, emb, mask, vis)
    differs = False

    class Reversed(DART):
        def pivots(self, state, scores):
            is_pivot, order, valid = super().pivots(state, scores)
            n = valid.sum(-1)
            idx = (n[:, None] - 1 - torch.arange(order.shape[1])).clamp_min(0)
            return is_pivot, order.gather(1, idx), valid

    other = dart_trace(lm, Reversed(count=16), emb, mask, vis)
    for b in range(len(LAYOUTS)):
        a = {i for i in kept[b].tolist() if i >= 0}
        c = {i for i in other[b].tolist() if i >= 0}
        assert len(a) == len(c)
        differs |= a != c
    assert differs


def test_batch_of_one_equals_batch_of_many():
    lm, _ = lms("qwen3")
    layouts = LAYOUTS + ["t" + "V" * 12 + "tt" + "V" * 9 + "tttttt"]  # two images in one sample
    emb, mask, vis = layout_batch(lm, layouts, seed=7)
    runner = Runner(lm, [DART(count=8, pivots_image=2, pivots_text=2)])
    with torch.no_grad():
        batch = runner.generate(emb, mask, vis, max_new_tokens=5)
        for b, layout in enumerate(layouts):
            n = len(layout)
            alone = runner.generate(emb[b:b + 1, -n:], None, vis[b:b + 1, -n:], max_new_tokens=5)
            assert alone.sequences[0].tolist() == batch.sequences[b].tolist()
            pad = mask.shape[1] - n
            (_, ids_b), = batch.state.trace
            (_, ids_1), = alone.state.trace
            assert [i - pad for i in ids_b[b].tolist() if i != -1] == [i for i in ids_1[0].tolist() if i != -1]


@pytest.mark.parametrize("position_policy", ["keep", "compact"])
def test_cached_generation_equals_uncached_recomputation(position_policy):
    lm, _ = lms("llama")
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=6)
    runner = Runner(lm, [DART(keep=0.3)], position_policy=position_policy)
    with torch.no_grad():
        cached = runner.generate(emb, mask, vis, max_new_tokens=6)
        out = runner.prefill(emb, mask, vis, use_cache=False)
        rep = ReplayPolicy(out.state.trace, emb.shape[1])
        logits, tokens, e, m, v = runner.logits(out.hidden[:, -1]), [], emb, mask, vis
        for _ in range(6):
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            e = torch.cat([e, runner.embed(nxt[:, None])], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            v = torch.cat([v, torch.zeros_like(v[:, :1])], 1)
            logits = runner.logits(runner.prefill(e, m, v, use_cache=False, policies=[rep]).hidden[:, -1])
        ref = torch.stack(tokens, 1)
        assert cached.sequences.tolist() == ref.tolist()
        assert runner.generate(emb, mask, vis, max_new_tokens=6, use_cache=False).sequences.tolist() == ref.tolist()
    lengths = cached.cache.lengths()
    assert lengths[0] > lengths[-1]
    last = cached.state.position_ids.amax(-1)
    expected = (mask.sum(-1) - 1) if position_policy == "keep" else (cached.state.mask.sum(-1) - 1)
    assert last.tolist() == expected.tolist()


def test_budget_at_least_every_token_reproduces_unpruned_logits():
    lm, _ = lms("qwen2")
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=5)
    ref, _ = Runner(lm).forward_logits(emb, mask, vis)
    got, state = Runner(lm, [DART(count=10_000)]).forward_logits(emb, mask, vis)
    assert (got - ref).abs().max() <= 1e-5
    assert state.visual_counts().tolist() == [40, 33, 21]


@pytest.mark.parametrize("spec", [
    {"policy": "dart"},
    {"policy": "dart", "layer": 3, "keep": 0.25},
    {"policy": "dart", "layer": 1, "count": 20, "pivots_image": 3, "pivots_text": 1},
    {"policy": "dart", "keep": 0.9, "pivots_text": 0},
    {"policy": "dart", "count": 3},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_tokens_per_layer_equal_macs_schedule(spec):
    lm = tiny_lm("qwen2", num_hidden_layers=8)
    layouts = ["tt" + "V" * 40 + "tttt", "t" + "V" * 23 + "tt" + "V" * 14 + "ttttt", "ttt" + "V" * 9 + "tttt",
               "t" + "VVV" + "tttt"]  # 3 visual tokens: fewer than the image pivots
    emb, mask, vis = layout_batch(lm, layouts, seed=9)
    policy, counter = build_policy(spec), CountingPolicy()
    Runner(lm, [policy, counter]).prefill(emb, mask, vis, use_cache=False)
    for b in range(len(layouts)):
        v = int(vis[b].sum())
        sched = schedule_for("dart", 8, v, int(mask[b].sum()) - v, **policy.schedule_knobs())
        assert [t[b] for t in counter.tokens] == sched.tokens
        assert [t[b] for t in counter.visual] == sched.visual


def test_schedule_defaults_budget_and_registration():
    assert POLICIES.get("dart") is DART and DART.reference_positions == "keep"
    # the reference's LLaVA-1.5 run: 576 tokens, max_num_trunction 128, 4 + 4 pivots -> 4 + 8 * 16 = 132 kept
    s = schedule_for("dart", 32, 576, 40)
    assert s.visual == [576, 576] + [132] * 30 and s.knobs["count"] == 128
    assert schedule_for("dart", 32, 576, 40, keep="0.222").visual[2] == 4 + 8 * 15  # reduction_ratio 0.778
    assert schedule_for("dart", 32, 576, 40, count="64", layer="3").visual[3] == 68
    assert DART.budget_knobs(Budget(tokens=64)) == {"count": 64}
    assert DART.budget_knobs(Budget(fraction=0.25)) == {"keep": 0.25}
    assert DART().schedule_knobs() == {"layer": 2, "count": 128, "pivots_image": 4, "pivots_text": 4}


@pytest.mark.parametrize("knobs", [dict(layer=0), dict(layer="2"), dict(layer=[2, 4]), dict(keep=0.0),
                                   dict(keep=1.5), dict(count=0), dict(keep=0.5, count=8), dict(keep=[0.5]),
                                   dict(pivots_image=0), dict(pivots_text=-1), dict(pivots_image=True),
                                   dict(pivots_text=2.0)], ids=str)
def test_bad_knobs_are_config_errors(knobs):
    with pytest.raises(ConfigError):
        DART(**knobs)


def test_bad_layers_and_schedules_are_config_errors():
    lm = tiny_lm("llama", num_hidden_layers=4)
    with pytest.raises(ConfigError, match="layer"):
        Runner(lm, [DART(layer=4)])
    with pytest.raises(ConfigError):
        build_policy({"policy": "dart", "ratio": 0.5})
    for knobs in (dict(layer=0), dict(layer="1,2"), dict(keep=0.5, count=8), dict(count=0), dict(keep=2),
                  dict(pivots_image=0)):
        with pytest.raises(ConfigError):
            schedule_for("dart", 4, 64, 10, **knobs)


def test_sample_without_visual_tokens_passes_through_with_one_warning():
    lm = tiny_lm("llama", num_hidden_layers=4)
    emb, mask, vis = layout_batch(lm, ["tt" + "V" * 12 + "tttt", "tttttttt"], seed=2)
    with pytest.warns(CompactVLWarning, match="no visual tokens"):
        out = Runner(lm, [DART(count=4, pivots_image=1, pivots_text=1)]).generate(emb, mask, vis, max_new_tokens=3)
    assert out.state.visual_counts().tolist() == [1 + 4 // 2 * 2, 0]
    assert out.state.token_counts().tolist() == [6 + 5, 8]
