"""The Runner reproduces transformers exactly, batches with left padding, and decodes from its cache correctly."""
import pytest
import torch

from compactvl.errors import ConfigError, InputError
from compactvl.runner import LayerPolicy, Runner
from compactvl.runner.layer import cache_keyword
from compactvl.testing import TINY_LM_KINDS, emulate_no_cache_rename, tiny_lm


def left_pad(seqs, pad=0):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = True
    return ids, mask


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_transformers_text_only(kind, attn):
    lm = tiny_lm(kind, attn=attn)
    ids = torch.randint(3, 128, (2, 11))
    ref = lm(input_ids=ids).logits
    logits, state = Runner(lm).forward_logits(lm.get_input_embeddings()(ids))
    assert (logits - ref).abs().max() <= 1e-4
    assert state.orig_index.tolist() == [list(range(11))] * 2


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_logits_match_transformers_with_visual_embeddings(kind):
    lm = tiny_lm(kind)
    torch.manual_seed(1)
    embeds = lm.get_input_embeddings()(torch.randint(3, 128, (2, 14)))
    embeds[:, 3:9] = torch.randn(2, 6, 64)  # "visual" rows that are not vocabulary embeddings
    visual = torch.zeros(2, 14, dtype=torch.bool)
    visual[:, 3:9] = True
    ref = lm(inputs_embeds=embeds).logits
    logits, _ = Runner(lm).forward_logits(embeds, visual_mask=visual)
    assert (logits - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_left_padded_batch_equals_each_prompt_alone(kind):
    lm = tiny_lm(kind)
    runner = Runner(lm)
    seqs = [[5, 9, 17, 33, 4], [7, 8, 21, 60, 61, 62, 90, 100, 3], [44, 45]]
    ids, mask = left_pad(seqs)
    emb = lm.get_input_embeddings()
    batch = runner.generate(emb(ids), mask, max_new_tokens=6)
    logits_b, _ = runner.forward_logits(emb(ids), mask)
    for i, s in enumerate(seqs):
        one = torch.tensor([s])
        alone = runner.generate(emb(one), max_new_tokens=6)
        assert batch.sequences[i].tolist() == alone.sequences[0].tolist()
        logits_1, _ = runner.forward_logits(emb(one))
        assert (logits_b[i, -len(s):] - logits_1[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_equals_uncached(kind, attn):
    lm = tiny_lm(kind, attn=attn)
    runner = Runner(lm)
    ids, mask = left_pad([[5, 9, 17, 33, 4, 8], [7, 8, 21]])
    emb = lm.get_input_embeddings()(ids)
    cached = runner.generate(emb, mask, max_new_tokens=8)
    uncached = runner.generate(emb, mask, max_new_tokens=8, use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    assert cached.sequences.shape == (2, 8)


def test_greedy_generation_matches_transformers_generate():
    lm = tiny_lm("llama")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    ref = lm.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 6:]
    ours = Runner(lm).generate(lm.get_input_embeddings()(ids), max_new_tokens=8)
    assert ours.sequences.tolist() == ref.tolist()


def test_eos_stops_and_pads():
    lm = tiny_lm("llama")
    runner = Runner(lm)
    ids = torch.tensor([[5, 9, 17]])
    free = runner.generate(lm.get_input_embeddings()(ids), max_new_tokens=5).sequences[0].tolist()
    eos = free[2]  # pretend the third generated token is EOS
    out = runner.generate(lm.get_input_embeddings()(ids), max_new_tokens=5, eos_token_id=eos, pad_token_id=99)
    first = free.index(eos)
    assert out.lengths.tolist() == [first + 1]
    assert out.token_lists(eos) == [free[:first]]


def test_sampling_is_seeded_and_valid():
    lm = tiny_lm("qwen2")
    runner = Runner(lm)
    emb = lm.get_input_embeddings()(torch.tensor([[5, 9, 17]]))
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = runner.generate(emb, generator=torch.Generator().manual_seed(3), **kw).sequences
    b = runner.generate(emb, generator=torch.Generator().manual_seed(3), **kw).sequences
    assert a.tolist() == b.tolist()
    assert ((a >= 0) & (a < 128)).all()


class DropEveryOtherVisual(LayerPolicy):
    """A test policy: before layer 2 drop every second visual token (the 1st, 3rd, ... of each sample)."""

    def before_layer(self, i, state, runner):
        if i != 2:
            return state
        rank = state.visual.long().cumsum(-1) - 1
        drop = state.visual & (rank % 2 == 0)
        return state.select(~drop, layer=i)


@pytest.mark.parametrize("policy", ["keep", "compact"])
def test_pruned_cache_decoding_equals_uncached_and_layers_hold_different_lengths(policy):
    lm = tiny_lm("qwen3")
    runner = Runner(lm, [DropEveryOtherVisual()], position_policy=policy)
    ids, mask = left_pad([[5, 9, 17, 33, 4, 8, 10, 11, 12], [7, 8, 21, 22, 23, 24]])
    visual = torch.zeros_like(mask)
    visual[:, 4:8] = True
    emb = lm.get_input_embeddings()(ids)
    cached = runner.generate(emb, mask, visual, max_new_tokens=8)
    uncached = runner.generate(emb, mask, visual, max_new_tokens=8, use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    lengths = cached.cache.lengths()
    assert lengths[0] == lengths[1] > lengths[2] == lengths[3]
    # batch 1 == batch N with pruning
    for i in range(2):
        n = int(mask[i].sum())
        alone = runner.generate(emb[i:i + 1, -n:], None, visual[i:i + 1, -n:], max_new_tokens=8)
        assert alone.sequences[0].tolist() == cached.sequences[i].tolist()


def test_keep_policy_keeps_original_positions_compact_renumbers():
    lm = tiny_lm("llama")
    emb = lm.get_input_embeddings()(torch.tensor([[5, 9, 17, 33, 4, 8]]))
    visual = torch.tensor([[False, True, True, True, True, False]])
    for policy, expected in [("keep", [0, 2, 4, 5]), ("compact", [0, 1, 2, 3])]:
        out = Runner(lm, [DropEveryOtherVisual()], position_policy=policy).prefill(emb, visual_mask=visual)
        assert out.state.position_ids[0].tolist() == expected
        assert out.state.orig_index[0].tolist() == [0, 2, 4, 5]
        assert out.cache.next_pos[3].tolist() == [expected[-1] + 1]


def test_follow_up_turn_on_pruned_cache_equals_recomputation():
    lm = tiny_lm("llama")
    runner = Runner(lm, [DropEveryOtherVisual()])
    emb = lm.get_input_embeddings()
    first = torch.tensor([[5, 9, 17, 33, 4, 8]])
    visual = torch.tensor([[False, True, True, True, True, False]])
    out = runner.prefill(emb(first), visual_mask=visual)
    follow = torch.tensor([[40, 41, 42]])
    ext = runner.extend(emb(follow), out.cache)
    # reference: whole conversation at once, with the same tokens dropped
    from compactvl.runner import ReplayPolicy
    full = torch.cat([first, follow], 1)
    vis = torch.cat([visual, torch.zeros(1, 3, dtype=torch.bool)], 1)
    ref = runner.prefill(emb(full), visual_mask=vis, policies=[ReplayPolicy(out.state.trace, 6)], use_cache=False)
    assert (runner.logits(ext.hidden) - runner.logits(ref.hidden[:, -3:])).abs().max() <= 1e-4


def test_bad_inputs():
    lm = tiny_lm("llama", max_position_embeddings=16)
    runner = Runner(lm)
    with pytest.raises(InputError, match="needs 20 positions but the LM's context is 16"):
        runner.prefill(torch.zeros(1, 20, 64))
    with pytest.raises(InputError, match="max_new_tokens"):
        runner.generate(torch.zeros(1, 10, 64), max_new_tokens=8)
    with pytest.raises(ConfigError, match="not a Llama-family causal LM"):
        Runner(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="unknown position policy 'sideways'"):
        Runner(lm, position_policy="sideways")
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        runner.generate(torch.zeros(1, 3, 64), max_new_tokens=0)


def test_modules_inside_a_layer_see_the_current_state():
    """The Runner binds (layer, state) to a LayerStateModule mlp while it runs that layer, and ``runner.active`` is the
    same context; both are None outside the layer call."""
    from compactvl.runner import LayerStateModule

    lm = tiny_lm("llama")
    seen, spies = [], []

    class Spy(LayerStateModule):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            ctx = self.layer_context
            assert runner.active is ctx
            seen.append((ctx.layer_idx, int(ctx.state.visual.sum()), x.shape[1]))
            return self.mlp(x)

    for layer in lm.model.layers:
        layer.mlp = Spy(layer.mlp)
        spies.append(layer.mlp)
    emb = lm.get_input_embeddings()(torch.tensor([[5, 9, 17, 33, 4, 8]]))
    visual = torch.tensor([[False, True, True, True, True, False]])
    runner = Runner(lm, [DropEveryOtherVisual()])
    runner.prefill(emb, visual_mask=visual)
    assert seen == [(0, 4, 6), (1, 4, 6), (2, 2, 4), (3, 2, 4)]
    assert runner.active is None and all(s.layer_context is None for s in spies)


# ------------------------------------------------------------------ transformers' cache keyword (issue: 5.40 rename)
@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_cache_keyword_survives_a_transformers_that_no_longer_renames_it(kind):
    """Emulate a release that stops renaming ``past_key_values`` -> ``cache`` in decoder layers: the Runner reads the
    keyword from the layer's signature, so cached generation still equals uncached, single and left-padded."""
    lm = tiny_lm(kind)
    ids, mask = left_pad([[5, 9, 17, 33, 4, 8], [7, 8, 21]])
    emb = lm.get_input_embeddings()(ids).detach()
    reference = Runner(lm).generate(emb, mask, max_new_tokens=8).sequences.tolist()
    changed = emulate_no_cache_rename(lm)
    runner = Runner(lm)
    assert runner.cache_kwarg == cache_keyword(lm.model.layers[0])
    if runner.cache_kwarg == "cache":  # transformers releases with the deprecation wrapper
        assert changed >= lm.config.num_hidden_layers
    cached = runner.generate(emb, mask, max_new_tokens=8)
    uncached = runner.generate(emb, mask, max_new_tokens=8, use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist() == reference
    for i in range(2):  # each prompt alone (no padding)
        row = emb[i:i + 1, ~(mask[i] == 0)]
        alone = runner.generate(row, max_new_tokens=8)
        assert alone.sequences[0].tolist() == reference[i]


def test_a_cache_the_layers_never_fill_is_a_clear_error_not_wrong_tokens():
    lm = tiny_lm("llama")
    emulate_no_cache_rename(lm)
    runner = Runner(lm)
    if runner.cache_kwarg != "cache":
        pytest.skip("this transformers release declares past_key_values itself")
    runner.cache_kwarg = "past_key_values"  # what the Runner passed before it read the signature
    emb = lm.get_input_embeddings()(torch.tensor([[5, 9, 17]])).detach()
    with pytest.raises(ConfigError, match="did not write its keys and values into the KV cache passed as "
                                          "'past_key_values='.*outside compactvl's supported range"):
        runner.generate(emb, max_new_tokens=3)
    assert runner.generate(emb, max_new_tokens=3, use_cache=False).sequences.shape == (1, 3)


def test_a_layer_without_any_cache_keyword_is_refused_at_construction():
    class NoCache(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None):
            return hidden_states

    with pytest.raises(ConfigError, match="declares none of the cache keywords"):
        cache_keyword(NoCache())
