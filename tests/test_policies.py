"""In-LLM pruning policies (FastV, PyramidDrop, SparseVLM, ScorePolicy): decisions equal direct computations from
eager attention, keep=100% is exact, cached == uncached, batch 1 == batch N, multi-turn on a pruned cache, token
counts per layer == the MACs schedule, and bad input."""
import math
import warnings

import pytest
import torch

from compactvl.errors import CompactVLWarning, ConfigError
from compactvl.measure.counted import CountingPolicy
from compactvl.measure.macs import kept, schedule_for
from compactvl.policies import (FastV, PyramidDrop, ScorePolicy, SparseVLM, attention_received, attention_rows,
                                build_policy, kept_counts, policy_knobs)
from compactvl.policies import pyramiddrop as pdrop_mod
from compactvl.policies import sparsevlm as svlm_mod
from compactvl.registry import POLICIES
from compactvl.runner import LayerPolicy, ReplayPolicy, Runner, RunState, positions_from_mask
from compactvl.testing import TINY_LM_KINDS, tiny_lm

LAYERS = 6


def lms(kind="llama"):
    """The same random weights twice: SDPA for the Runner, eager for the reference attentions."""
    return tiny_lm(kind, num_hidden_layers=LAYERS), tiny_lm(kind, attn="eager", num_hidden_layers=LAYERS)


def make_batch(lm, layouts, seed=0):
    """Left-padded embeddings from layouts like "ttVVVVtt" (t: text token, V: visual token)."""
    g = torch.Generator().manual_seed(seed)
    L = max(len(s) for s in layouts)
    D = lm.config.hidden_size
    emb = torch.zeros(len(layouts), L, D)
    mask = torch.zeros(len(layouts), L, dtype=torch.bool)
    vis = torch.zeros_like(mask)
    for b, s in enumerate(layouts):
        off = L - len(s)
        ids = torch.randint(3, 128, (len(s),), generator=g)
        rows = lm.get_input_embeddings()(ids).detach()
        v = torch.tensor([c == "V" for c in s])
        rows[v] = torch.randn(int(v.sum()), D, generator=g) * 0.5
        emb[b, off:], mask[b, off:], vis[b, off:] = rows, True, v
    return emb, mask, vis


def eager_attentions(elm, emb, mask):
    with torch.no_grad():
        out = elm(inputs_embeds=emb, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                  output_attentions=True, output_hidden_states=True)
    return out.attentions, out.hidden_states


def eager_layer_attention(elm, layer, hidden, pos, mask):
    """HF's own eager attention of one layer on a (pruned) state: an independent recomputation."""
    lay = elm.model.layers[layer]
    L = hidden.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & mask[:, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool)[None]
    add = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        _, w = lay.self_attn(hidden_states=lay.input_layernorm(hidden),
                             position_embeddings=elm.model.rotary_emb(hidden, pos), attention_mask=add)
    return w


def top_set(scores, cand, k):
    """Indices (python set) of the k highest scores among cand."""
    idx = torch.nonzero(cand).flatten()
    return set(idx[scores[idx].topk(k).indices].tolist())


def kept_visual(trace_ids, vis_input_row):
    """Original indices of the visual tokens a trace entry keeps (recycled rows, id <= -2, excluded)."""
    ids = [i for i in trace_ids.tolist() if i >= 0]
    return {i for i in ids if vis_input_row[i]}


class Recorder(LayerPolicy):
    """Test helper: remembers the state entering each layer (placed before or after the policy under test)."""

    def reset(self):
        self.seen = {}

    def before_layer(self, i, state, runner):
        self.seen[i] = RunState(state.hidden.clone(), state.position_ids.clone(), state.mask.clone(),
                                state.visual.clone(), state.orig_index.clone())
        return state


LAYOUTS = ["ttVVVVVVVVVVttttt", "tttVVVVVVtVVVVVVtttttt", "tVVVVVVVVtt"]  # 10, 12 (two images), 8 visual tokens


# ----------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_attention_rows_equal_eager_attention(kind):
    lm, elm = lms(kind)
    emb, mask, vis = make_batch(lm, LAYOUTS)
    att, hs = eager_attentions(elm, emb, mask)
    runner = Runner(lm)
    L = mask.shape[1]
    for layer in (0, 3):
        state = RunState(hs[layer], positions_from_mask(mask), mask, vis, torch.where(mask, torch.arange(L), -1))
        q = torch.tensor([[L - 1, L - 3, 8], [L - 1, 6, 7], [L - 1, L - 2, 12]])
        rows = attention_rows(runner, layer, state, q)
        ref = att[layer].gather(2, q[:, None, :, None].expand(-1, att[layer].shape[1], -1, L))
        keys = mask[:, None, None, :]
        assert torch.allclose(rows * keys, ref * keys, atol=1e-5)
        assert torch.allclose(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-5)
        # mean over heads and every real query row (chunked: 5 rows at a time)
        got = attention_received(runner, layer, state, mask, chunk=5)
        real = mask[:, None, :, None].float()
        want = (att[layer] * real).sum((1, 2)) / (real.sum((1, 2)) * att[layer].shape[1])
        assert torch.allclose(got * mask, want * mask, atol=1e-6)


# ----------------------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("query", ["last", "all"])
def test_fastv_keeps_eager_top_tokens(kind, query):
    lm, elm = lms(kind)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=1)
    K, keep = 2, 0.4
    out = Runner(lm, [FastV(layer=K, keep=keep, query=query, rounding="half_up")]).prefill(emb, mask, vis)
    att, _ = eager_attentions(elm, emb, mask)
    a = att[K - 1].mean(1)  # [B, L, L], averaged over heads
    (layer, ids), = out.state.trace
    assert layer == K
    for b in range(len(LAYOUTS)):
        s = a[b, -1] if query == "last" else a[b][mask[b]].mean(0)
        n = int(vis[b].sum())
        assert kept_visual(ids[b], vis[b]) == top_set(s, vis[b], kept(n, keep))
    # text is never dropped, and the pruned layers hold fewer keys
    assert out.state.token_counts().tolist() == [int(mask[b].sum() - vis[b].sum()) + kept(int(vis[b].sum()), keep)
                                                  for b in range(3)]


def test_pyramiddrop_every_stage_equals_direct_computation():
    lm, elm = lms("qwen3")
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=2)
    before = Recorder()
    pol = PyramidDrop(ratio=0.6, relative_to="remaining", rounding="half_up")
    out = Runner(lm, [before, pol]).prefill(emb, mask, vis)
    assert pol.stages == tuple(pdrop_mod.default_layers(LAYERS)) == (1, 3, 4)
    att, _ = eager_attentions(elm, emb, mask)
    for s, (layer, ids) in enumerate(out.state.trace):
        assert layer == pol.stages[s]
        st = before.seen[layer]  # the state entering the stage, before it drops anything
        if s == 0:  # first decision: the unpruned HF model's eager attention at that layer
            a = att[layer].mean(1)
        else:  # later: HF's eager attention module recomputed on our pruned hidden states
            a = eager_layer_attention(elm, layer, st.hidden, st.position_ids, st.mask).mean(1)
        for b in range(3):
            cand = st.visual[b] & st.mask[b]
            want = {int(st.orig_index[b, j]) for j in top_set(a[b, -1], cand, kept(int(cand.sum()), 0.6))}
            assert kept_visual(ids[b], vis[b]) == want


def dpc_reference(x, c):
    """Per-sample DPC-kNN written out directly (the clustering SparseVLM's code uses)."""
    m, D = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1) / math.sqrt(D)
    density = torch.exp(-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(-1))
    delta = torch.stack([dist[i][density > density[i]].min() if (density > density[i]).any() else dist.max()
                         for i in range(m)])
    centres = (delta * density).argsort(descending=True)[:c]
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(c)
    return assign, centres


def test_dpc_knn_batched_equals_per_sample_reference():
    g = torch.Generator().manual_seed(5)
    sizes, clusters = [9, 14, 3], [2, 4, 1]
    x = torch.randn(3, 14, 16, generator=g)
    valid = torch.arange(14) < torch.tensor(sizes)[:, None]
    assign, centres = svlm_mod.dpc_knn(x, valid, torch.tensor(clusters))
    for b, (m, c) in enumerate(zip(sizes, clusters)):
        ra, rc = dpc_reference(x[b, :m], c)
        assert assign[b, :m].tolist() == ra.tolist() and (assign[b, m:] == -1).all()
        assert centres[b, :c].tolist() == rc.tolist() and (centres[b, c:] == -1).all()
    agg, counts = svlm_mod.aggregate(x, assign, 4)
    assert torch.allclose(agg[1, 2], x[1, :14][assign[1, :14] == 2].mean(0), atol=1e-6)


def rater_reference(emb, vis, mask):
    """SparseVLM's text raters for one sample, computed directly."""
    real = torch.nonzero(mask).flatten()
    first_v = int(torch.nonzero(vis).min())
    text = [int(j) for j in real if not vis[j] and j > first_v]
    V, T = emb[vis], emb[text]
    r = (V @ T.T).softmax(-1).mean(0)
    return {t for t, ok in zip(text, (r > r.mean()).tolist()) if ok}


def test_sparsevlm_raters_scores_and_recycling_equal_direct_computation():
    lm, elm = lms("llama")
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=3)
    before, after = Recorder(), Recorder()
    pol = SparseVLM()
    out = Runner(lm, [before, pol, after]).prefill(emb, mask, vis)
    assert pol.stages == (1, 2, 4)  # the reference's 2, 6, 15 of 32 layers scaled to 6 layers, + 1
    raters = pol._raters[0]
    for b in range(3):
        assert set(torch.nonzero(raters[b]).flatten().tolist()) == rater_reference(emb[b], vis[b], mask[b])
    K = pol.stages[0]
    a = eager_attentions(elm, emb, mask)[0][K - 1].mean(1)  # first stage: scored on layer K-1 of the HF model
    layer, ids = out.state.trace[0]
    record = out.state.signals.recycled[0]
    st, nxt = before.seen[K], after.seen[K]
    for b in range(3):
        s = a[b][raters[b]].mean(0)
        n = int(vis[b].sum())
        k = kept(n, 300 / 576)
        keep = top_set(s, vis[b], k)
        assert kept_visual(ids[b], vis[b]) == keep
        deleted = vis[b] & ~torch.isin(torch.arange(len(s)), torch.tensor(sorted(keep)))
        m = (n - k) * 3 // 10 + 1
        c = m // 10 + 1
        members = top_set(s, deleted, m)
        got = record.members[b]
        assert set(got[got < 2 ** 62].tolist()) == members
        # clustering of the recycled rows, and each recycled token = mean of its members' hidden states
        rows = sorted(members)
        ra, _ = dpc_reference(st.hidden[b, rows], c)
        assert record.assign[b, :m].tolist() == ra.tolist()
        for j in range(c):
            slot = int(torch.nonzero(nxt.orig_index[b] == record.ids[b, j]).flatten())
            want = st.hidden[b, [r for r, a_ in zip(rows, ra.tolist()) if a_ == j]].mean(0)
            assert torch.allclose(nxt.hidden[b, slot], want, atol=1e-6)
            assert bool(nxt.visual[b, slot])
        # recycled tokens sit right after the last visual row: only the trailing text follows them
        trailing = int(mask.shape[1] - 1 - torch.nonzero(vis[b]).max())
        assert nxt.mask.shape[1] - 1 - int(torch.nonzero(nxt.visual[b]).max()) == trailing
        assert int(nxt.visual[b].sum()) == k + c


def test_sparsevlm_replay_rebuilds_the_prefill_exactly():
    lm = tiny_lm("qwen2", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=4)
    runner = Runner(lm, [SparseVLM(retain=64)])
    out = runner.prefill(emb, mask, vis, use_cache=False)
    rep = runner.prefill(emb, mask, vis, use_cache=False, policies=[SparseVLM.replay(out.state, mask.shape[1])])
    assert torch.equal(rep.state.orig_index, out.state.orig_index)
    assert torch.allclose(rep.hidden, out.hidden, atol=1e-6)


# ----------------------------------------------------------------------------------------------- exactness
ALL_KEEP = [FastV(keep=1.0), PyramidDrop(ratio=1.0), SparseVLM(keep=[1.0, 1.0, 1.0])]


@pytest.mark.parametrize("policy", ALL_KEEP, ids=lambda p: p.method)
def test_keep_everything_reproduces_unpruned_logits(policy):
    lm = tiny_lm("qwen3", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=5)
    for position_policy in ("keep", "compact"):
        ref, _ = Runner(lm, position_policy=position_policy).forward_logits(emb, mask, vis)
        got, state = Runner(lm, [policy], position_policy=position_policy).forward_logits(emb, mask, vis)
        assert len(state.trace) == len(policy.stages)
        assert (got - ref).abs().max() <= 1e-5


def make_policies():
    return [FastV(layer=2, keep=0.3), PyramidDrop(ratio=0.5), SparseVLM(retain=96), SparseVLM(retain=96, recycle=False)]


def greedy_uncached(runner, emb, mask, vis, steps, replay):
    """Reference decoding: recompute the whole sequence each step, re-applying the prefill's decisions."""
    out = runner.prefill(emb, mask, vis, use_cache=False)
    rep = replay(out.state, emb.shape[1])
    logits, tokens = runner.logits(out.hidden[:, -1]), []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        emb = torch.cat([emb, runner.embed(nxt[:, None])], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        vis = torch.cat([vis, torch.zeros_like(vis[:, :1])], 1)
        logits = runner.logits(runner.prefill(emb, mask, vis, use_cache=False, policies=[rep]).hidden[:, -1])
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("position_policy", ["keep", "compact"])
@pytest.mark.parametrize("policy_index", range(4), ids=["fastv", "pyramiddrop", "sparsevlm", "sparsevlm-norecycle"])
def test_cached_generation_equals_uncached_recomputation(position_policy, policy_index):
    policy = make_policies()[policy_index]
    lm = tiny_lm("llama", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=6)
    runner = Runner(lm, [policy], position_policy=position_policy)
    with torch.no_grad():
        cached = runner.generate(emb, mask, vis, max_new_tokens=6)
        replay = SparseVLM.replay if isinstance(policy, SparseVLM) else lambda st, n: ReplayPolicy(st.trace, n)
        ref = greedy_uncached(runner, emb, mask, vis, 6, replay)
        assert cached.sequences.tolist() == ref.tolist()
        if not (isinstance(policy, SparseVLM) and policy.recycle):  # the Runner's own uncached path (ReplayPolicy)
            assert runner.generate(emb, mask, vis, max_new_tokens=6, use_cache=False).sequences.tolist() == ref.tolist()
    lengths = cached.cache.lengths()
    assert lengths[0] > lengths[-1]  # the KV cache holds different lengths per layer
    # decoding continues after the largest position: the original one under keep, the renumbered one under compact
    last = cached.state.position_ids.amax(-1)
    expected = (mask.sum(-1) - 1) if position_policy == "keep" else (cached.state.mask.sum(-1) - 1)
    assert last.tolist() == expected.tolist()


@pytest.mark.parametrize("policy_index", range(3), ids=["fastv", "pyramiddrop", "sparsevlm"])
def test_batch_of_one_equals_batch_of_many(policy_index):
    lm = tiny_lm("qwen3", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=7)
    runner = Runner(lm, [make_policies()[policy_index]])
    with torch.no_grad():
        batch = runner.generate(emb, mask, vis, max_new_tokens=6)
        for b, layout in enumerate(LAYOUTS):
            n = len(layout)
            alone = runner.generate(emb[b:b + 1, -n:], None, vis[b:b + 1, -n:], max_new_tokens=6)
            assert alone.sequences[0].tolist() == batch.sequences[b].tolist()
            pad = mask.shape[1] - n
            for (_, ids_b), (_, ids_1) in zip(batch.state.trace, alone.state.trace):
                mine = [i - pad if i >= 0 else i for i in ids_b[b].tolist() if i != -1]
                assert mine == [i for i in ids_1[0].tolist() if i != -1]


@pytest.mark.parametrize("policy_index", range(3), ids=["fastv", "pyramiddrop", "sparsevlm"])
def test_follow_up_turn_on_pruned_cache(policy_index):
    """Turn 2 is appended to the pruned cache (Runner.extend); no policy acts; what turn 1 dropped stays dropped."""
    policy = make_policies()[policy_index]
    lm = tiny_lm("llama", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS[:2], seed=8)
    runner = Runner(lm, [policy])
    with torch.no_grad():
        answer = runner.generate(emb, mask, vis, max_new_tokens=4)
        lengths = answer.cache.lengths()
        follow = lm.get_input_embeddings()(torch.tensor([[40, 41, 42], [50, 51, 52]]))
        turn2 = torch.cat([runner.embed(answer.sequences[:, -1:]), follow], 1)  # last answer token was not fed yet
        ext = runner.extend(turn2, answer.cache)
        assert [n2 - n1 for n1, n2 in zip(lengths, ext.cache.lengths())] == [4] * LAYERS
        convo = torch.cat([emb, runner.embed(answer.sequences), follow], 1)
        T = convo.shape[1] - emb.shape[1]
        cmask = torch.cat([mask, torch.ones(2, T, dtype=torch.bool)], 1)
        cvis = torch.cat([vis, torch.zeros(2, T, dtype=torch.bool)], 1)
        replay = (SparseVLM.replay(answer.state, emb.shape[1]) if isinstance(policy, SparseVLM)
                  else ReplayPolicy(answer.state.trace, emb.shape[1]))
        ref = runner.prefill(convo, cmask, cvis, use_cache=False, policies=[replay])
        assert (runner.logits(ext.hidden) - runner.logits(ref.hidden[:, -4:])).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", [
    {"policy": "fastv", "layer": 3, "keep": 0.25},
    {"policy": "fastv", "layer": 1, "keep": 0.125},
    {"policy": "pyramiddrop", "ratio": 0.5},
    {"policy": "pyramiddrop", "layers": [2, 5], "ratio": 0.3},
    {"policy": "sparsevlm"},
    {"policy": "sparsevlm", "retain": 64},
    {"policy": "sparsevlm", "layers": [2, 6], "keep": [0.5, 0.2], "recycle": False},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_tokens_per_layer_equal_macs_schedule(spec):
    lm = tiny_lm("qwen2", num_hidden_layers=8)
    layouts = ["tt" + "V" * 40 + "tttt", "t" + "V" * 23 + "tt" + "V" * 14 + "ttt", "ttt" + "V" * 9 + "t"]
    emb, mask, vis = make_batch(lm, layouts, seed=9)
    policy, counter = build_policy(spec), CountingPolicy()
    Runner(lm, [policy, counter]).prefill(emb, mask, vis, use_cache=False)
    for b in range(len(layouts)):
        v = int(vis[b].sum())
        sched = schedule_for(spec["policy"], 8, v, int(mask[b].sum()) - v, **policy.schedule_knobs())
        assert [t[b] for t in counter.tokens] == sched.tokens
        assert [t[b] for t in counter.visual] == sched.visual


def test_default_layers_follow_the_papers_and_the_macs_module():
    assert pdrop_mod.default_layers(32) == [8, 16, 24] == schedule_for("pyramiddrop", 32, 576, 40).knobs["layers"]
    assert pdrop_mod.default_layers(28) == schedule_for("pyramiddrop", 28, 576, 40).knobs["layers"] == [7, 14, 21]
    assert svlm_mod.default_layers(32) == [3, 7, 16]  # the reference scores on 2, 6, 15 and drops from the next layer
    assert svlm_mod.default_layers(28) == [3, 6, 14]
    # the reference's "retain 192" table: 576 visual tokens -> 300, 200, 110 (+ recycled cluster tokens)
    s = schedule_for("sparsevlm", 32, 576, 40, recycle=False)
    assert (s.visual[2], s.visual[3], s.visual[7], s.visual[16]) == (576, 300, 200, 110)
    assert s.visual[3] < schedule_for("sparsevlm", 32, 576, 40).visual[3] == 300 + (276 * 3 // 10 + 1) // 10 + 1


def test_kept_counts_equal_macs_rounding():
    n = torch.arange(0, 700)
    for f in (0.001, 0.1, 0.125, 0.25, 0.3, 0.5, 0.7, 300 / 576, 1.0):
        assert kept_counts(n, f).tolist() == [kept(int(i), f) for i in n]


# ----------------------------------------------------------------------------------------------- any score
class NormScore(ScorePolicy):
    """A non-attention score: the L2 norm of the hidden state leaving layer K-1 (the shape a router-saliency
    policy such as VEN-VL's HTE takes: score read after a layer ran, tokens dropped for the later layers)."""

    method = "norm"
    score_offset = 1
    score_after = True

    def score(self, layer_idx, state, runner):
        return state.hidden.norm(dim=-1)


def test_score_policy_takes_any_score_with_threshold_or_count():
    lm = tiny_lm("llama", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=10)
    with torch.no_grad():
        hs = lm(inputs_embeds=emb, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                output_hidden_states=True).hidden_states
    norms = hs[3].norm(dim=-1)  # output of layer 2 = what enters layer 3
    t = float(norms[vis].median())
    out = Runner(lm, [NormScore(layers=[3], threshold=t)]).prefill(emb, mask, vis)
    for b in range(3):
        want = {j for j in range(mask.shape[1]) if vis[b, j] and norms[b, j] >= t}
        assert kept_visual(out.state.trace[0][1][b], vis[b]) == (want or top_set(norms[b], vis[b], 1))
    # a threshold no token reaches keeps the documented minimum (min_keep, default 1) per sample
    out = Runner(lm, [NormScore(layers=[3], threshold=1e9, min_keep=2)]).prefill(emb, mask, vis)
    assert out.state.visual_counts().tolist() == [2, 2, 2]
    out = Runner(lm, [NormScore(layers=[3, 5], count=[5, 3])]).prefill(emb, mask, vis)
    assert out.state.visual_counts().tolist() == [3, 3, 3]
    assert [kept_visual(out.state.trace[0][1][b], vis[b]) for b in range(3)] == [
        top_set(norms[b], vis[b], 5) for b in range(3)]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_knobs_and_layers():
    lm = tiny_lm("llama")  # 4 layers
    with pytest.raises(ConfigError, match=r"fastv: pruning layer 9 is outside .* 4 layers, so use layers 1\.\.3"):
        Runner(lm, [FastV(layer=9)])
    emb = torch.randn(1, 6, lm.config.hidden_size)
    with pytest.raises(ConfigError, match=r"fastv: pruning layer 9 is outside"):  # a per-call policy is checked too
        Runner(lm).prefill(emb, None, torch.tensor([[False, True, True, True, False, False]]), policies=[FastV(layer=9)])
    with pytest.raises(ConfigError, match=r"fastv: layer=0 must be increasing layer indices >= 1 .*layer K-1"):
        FastV(layer=0)
    with pytest.raises(ConfigError, match=r"pyramiddrop: layers=\[0, 2\] must be increasing layer indices >= 1"):
        PyramidDrop(layers=[0, 2])
    with pytest.raises(ConfigError, match=r"pyramiddrop: layers=\[2, 2\] must be increasing"):
        PyramidDrop(layers=[2, 2])
    for bad in (0, 0.0, 1.5, -0.2, True):
        with pytest.raises(ConfigError, match=r"keep=.* is outside \(0, 1\]; give the fraction"):
            FastV(keep=bad)
    with pytest.raises(ConfigError, match=r"ratio=2 is outside \(0, 1\]"):
        PyramidDrop(ratio=2)
    with pytest.raises(ConfigError, match="count=0 must be a whole number of visual tokens >= 1"):
        FastV(count=0)
    with pytest.raises(ConfigError, match="give exactly one of keep .* got keep, count"):
        FastV(keep=0.5, count=3)
    with pytest.raises(ConfigError, match=r"pyramiddrop: pruning layer 7 is outside"):
        Runner(lm, [PyramidDrop(layers=[2, 7])])
    with pytest.raises(ConfigError, match=r"ratio=\[0.5, 0.5\] has 2 entries but the schedule has 3 stage"):
        PyramidDrop(layers=[1, 2, 3], ratio=[0.5, 0.5])
    with pytest.raises(ConfigError, match="retain=100 has no reference table; use one of 192, 128, 96, 64"):
        SparseVLM(retain=100)
    with pytest.raises(ConfigError, match="give retain .* or keep .*, not both"):
        SparseVLM(retain=64, keep=[0.5])
    with pytest.raises(ConfigError, match="query='first'; use 'last'"):
        FastV(query="first")


def test_recipes_build_policies_and_name_their_knobs():
    assert {"fastv", "pyramiddrop", "sparsevlm"} <= set(POLICIES.names())
    p = build_policy({"policy": "fastv", "layer": 3, "keep": 0.25})
    assert isinstance(p, FastV) and p.stages == (3,) and p.keep == [0.25]
    with pytest.raises(ConfigError, match="unknown layer policy 'fastvv'; known: .*fastv, hte, hte_native, .*pyramiddrop, sip, .*sparsevlm"):
        build_policy({"policy": "fastvv"})
    with pytest.raises(ConfigError, match="policy 'fastv' has no knob 'ratio'; its knobs are: layer, keep, count, query, rounding"):
        build_policy({"policy": "fastv", "ratio": 0.5})
    with pytest.raises(ConfigError, match="a layer-policy recipe is a mapping with a 'policy' key"):
        build_policy({"layer": 2})
    assert policy_knobs(PyramidDrop) == ["layers", "ratio", "relative_to", "rounding"]


def test_no_visual_tokens_pass_through_with_one_warning():
    lm = tiny_lm("qwen3", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, ["tttttttt", "tVVVVVVt"], seed=11)
    ref, _ = Runner(lm).forward_logits(emb, mask, vis)
    for policy in (FastV(keep=0.5), PyramidDrop(), SparseVLM()):
        runner = Runner(lm, [policy])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text_only, state = runner.forward_logits(emb[:1], mask[:1], vis[:1])
            runner.forward_logits(emb[:1], mask[:1], vis[:1])
            mixed, mstate = runner.forward_logits(emb, mask, vis)
        # only compactvl's own notices count: a library may add warnings of its own in any release
        msgs = [str(w.message) for w in caught if issubclass(w.category, CompactVLWarning)]
        assert len(msgs) == 1 and f"{policy.method}: sample(s) [0] of the batch have no visual tokens" in msgs[0]
        assert "pass through unpruned" in msgs[0]
        assert (text_only - ref[:1]).abs().max() <= 1e-5
        assert all(ids.shape[1] == 8 for _, ids in state.trace)
        assert int(mstate.mask[0].sum()) == 8  # the text-only sample keeps every token inside a pruned batch
        assert (mixed[0, -8:] - ref[0]).abs().max() <= 1e-4


def test_tiny_keep_fraction_keeps_at_least_one_visual_token():
    lm = tiny_lm("llama", num_hidden_layers=LAYERS)
    emb, mask, vis = make_batch(lm, LAYOUTS, seed=12)
    out = Runner(lm, [FastV(keep=0.001)]).prefill(emb, mask, vis)
    assert out.state.visual_counts().tolist() == [1, 1, 1]
    out = Runner(lm, [PyramidDrop(ratio=0.01)]).prefill(emb, mask, vis)
    assert out.state.visual_counts().tolist() == [1, 1, 1]


# --------------------------------------------------------------------- a forward that also holds the answer
def text_reading_policies():
    from compactvl.policies import DART, LearnPrunerT2V
    return [FastV(layer=2, keep=0.3), FastV(layer=2, keep=0.3, query="all"), PyramidDrop(ratio=0.5),
            SparseVLM(retain=96), DART(layer=2, count=6, pivots_image=2, pivots_text=2), LearnPrunerT2V(keep=0.5)]


def rows_by_sample(state, hidden, pad):
    """{(sample, position in the sample): hidden row} for every real row that reached the last layer."""
    out = {}
    for b in range(hidden.shape[0]):
        for j in range(hidden.shape[1]):
            i = int(state.orig_index[b, j])
            if bool(state.mask[b, j]) and i >= 0:
                out[(b, i - pad[b])] = hidden[b, j]
    return out


@pytest.mark.parametrize("policy_index", range(6),
                         ids=["fastv", "fastv-all", "pyramiddrop", "sparsevlm", "dart", "learnpruner_t2v"])
def test_an_answer_in_the_forward_never_changes_what_the_prompt_rows_see(policy_index):
    """Training and answer scoring run prompt + answer in one forward. With ``signals.prompt_end`` seeded (what
    ``CompactVLM.prepare(with_labels=True)`` and ``CompressedVLM.loglikelihood`` do), every policy that reads the text
    rates the visual tokens with the prompt rows only: each prompt row, the last one included (whose logits score the
    answer's first token), equals the prompt-alone prefill that generation runs, in a batch with answers of different
    lengths. Unseeded, the answer's rows would rate too, and the prompt rows would see other visual tokens."""
    from compactvl.runner import Signals
    policy = text_reading_policies()[policy_index]
    lm = tiny_lm("llama", num_hidden_layers=LAYERS)
    answers = [24, 18, 30]  # long enough that, unseeded, their rows outweigh the prompt's in a mean over rows
    full_emb, full_mask, full_vis = make_batch(lm, [s + "t" * n for s, n in zip(LAYOUTS, answers)], seed=11)
    L, Lp = full_mask.shape[1], max(len(s) for s in LAYOUTS)
    emb, mask, vis = (torch.zeros_like(full_emb[:, :Lp]), torch.zeros_like(full_mask[:, :Lp]),
                      torch.zeros_like(full_vis[:, :Lp]))
    for b, (s, n) in enumerate(zip(LAYOUTS, answers)):  # the same prompt rows, left padded without their answer
        emb[b, Lp - len(s):], mask[b, Lp - len(s):], vis[b, Lp - len(s):] = (
            full_emb[b, L - n - len(s):L - n], full_mask[b, L - n - len(s):L - n], full_vis[b, L - n - len(s):L - n])
    prompt_end = torch.tensor([L - n for n in answers])
    runner = Runner(lm, [policy])
    with torch.no_grad():
        alone = runner.prefill(emb, mask, vis, use_cache=False)
        held = runner.prefill(full_emb, full_mask, full_vis, use_cache=False, signals=Signals(prompt_end=prompt_end))
        unseeded = runner.prefill(full_emb, full_mask, full_vis, use_cache=False)
    ref = rows_by_sample(alone.state, alone.hidden, [Lp - len(s) for s in LAYOUTS])
    pad = [L - n - len(s) for s, n in zip(LAYOUTS, answers)]
    got = rows_by_sample(held.state, held.hidden, pad)
    assert set(ref) <= set(got)  # the same prompt rows survive
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5
    assert {k for k in got if k[1] < len(LAYOUTS[k[0]])} == set(ref)
    bad = rows_by_sample(unseeded.state, unseeded.hidden, pad)  # the answer's rows rated: other tokens kept
    if policy_index != 1:
        assert set(ref) - set(bad) or any(float((bad[k] - ref[k]).abs().max()) > 1e-4 for k in ref)
    else:  # FastV's mean over every row ranks these visual tokens alike either way; the scores themselves differ
        st = RunState(hidden=full_emb, position_ids=positions_from_mask(full_mask), mask=full_mask, visual=full_vis,
                      orig_index=torch.where(full_mask, torch.arange(L), -1), signals=Signals(prompt_end=prompt_end))
        seeded = policy.score(1, st, runner)
        st.signals = Signals()
        assert (seeded[full_vis] - policy.score(1, st, runner)[full_vis]).abs().max() > 1e-4
