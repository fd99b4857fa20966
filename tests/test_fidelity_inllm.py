"""Reference fidelity of the in-LLM pruners: on the same seeded tiny models and inputs, the kept visual indices, the
kept counts and the final logits of FastV / PyramidDrop / SparseVLM equal an independent transcription of each method's public
reference code (written from the reference, batch 1 and unpadded as the reference runs; no reference code is
imported or copied):

* FastV: pkunlp-icler/FastV, ``src/FastV/lmms-eval-with-kvcache/fastv_kvcache.py``, ``FastVLlamaModel.forward``
  (token-drop variant: ``self.last_attention.mean(dim=1)[0][-1][image span]``, ``topk(int(n * ratio))``,
  ``keep_indexs.sort()``, ``position_ids = keep_indexs``) and ``src/transformers/.../llama/modeling_llama.py``,
  ``LlamaModel.forward`` (``fast_v_attention_rank`` count, attention of layer ``AGG_LAYER - 1``).
* SparseVLM: Gumpest/SparseVLMs (v1.0), ``llava/model/language_model/modelling_sparse_llama.py``,
  ``LlamaDynamicvitModel.forward`` (raters ``m_v_t = (V Tᵀ).softmax(2).mean(1) > mean``, scoring at
  ``pruning_loc`` with that layer's attention, recycling of the top 30% deleted tokens into ``int(m / 10) + 1``
  clusters inserted after the kept visual tokens, positions renumbered), ``score.py`` ``attn_postprocess_topk``
  (``topk(min(table[stage], v_token_num - 1))`` of the head- and rater-mean attention) and ``utils.py``
  ``cluster_and_merge`` (DPC-kNN).
* PyramidDrop: Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``, ``forward`` (``rank_layer =
  layer_idx + 1``) and ``pdrop_rank_drop`` (layer ``rank_layer``'s projections on its input, last instruction token
  as query, full-width float32 softmax, head mean, ``keep_length = int(n_0 * ratio_list[s + 1])``, sorted kept
  indices, positions renumbered 0..len-1).
"""
import math

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from compactvl.errors import ConfigError
from compactvl.measure.macs import schedule_for
from compactvl.policies import FastV, PyramidDrop, SparseVLM
from compactvl.policies.sparsevlm import RETAIN
from compactvl.runner import Runner
from compactvl.runner.state import resolve_position_policy
from compactvl.testing import TINY_LM_KINDS, layout_batch, tiny_lm

LAYERS = 6
# one contiguous image per sample (the references' layout); visual counts 13, 9, 17 make n·f non-integral
LAYOUTS = ["ttt" + "V" * 13 + "tttttt", "t" + "V" * 9 + "ttttttttt", "tt" + "V" * 17 + "ttttt"]


def lms(kind, seed=0, **overrides):
    """The same random weights twice: SDPA for the Runner, eager for the transcription."""
    return (tiny_lm(kind, seed=seed, num_hidden_layers=LAYERS, **overrides),
            tiny_lm(kind, seed=seed, attn="eager", num_hidden_layers=LAYERS, **overrides))


def causal(L):
    return torch.zeros(L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), torch.finfo(torch.float32).min
                                         )[None, None]


def run_layer(elm, i, h, pos):
    """HF's eager decoder layer ``i`` on ``h [1, L, D]`` at positions ``pos [1, L]`` (causal)."""
    with torch.no_grad():
        out = elm.model.layers[i](h, attention_mask=causal(h.shape[1]), position_ids=pos,
                                  position_embeddings=elm.model.rotary_emb(h, pos))
    return out[0] if isinstance(out, tuple) else out


def layer_attention(elm, i, h, pos):
    """``output_attentions`` of eager layer ``i``: ``[1, heads, L, L]``."""
    lay = elm.model.layers[i]
    with torch.no_grad():
        _, w = lay.self_attn(hidden_states=lay.input_layernorm(h), attention_mask=causal(h.shape[1]),
                             position_embeddings=elm.model.rotary_emb(h, pos))
    return w


def logits_last(elm, h):
    with torch.no_grad():
        return elm.lm_head(elm.model.norm(h[:, -1]))[0]


# ----------------------------------------------------------------------------------------------- FastV
def fastv_reference(elm, emb, K, start, length, ratio=None, rank=None):
    """fastv_kvcache.py ``FastVLlamaModel.forward`` for one sample: (kept image indices, last-token logits)."""
    L = emb.shape[1]
    h, pos = emb, torch.arange(L)[None]
    keep_indexs = None
    for i in range(LAYERS):
        if i == K:
            image_attention_score = last_attention.mean(dim=1)[0][-1][start:start + length]
            k = rank if rank is not None else int(length * ratio)
            top = image_attention_score.topk(k).indices + start
            keep_indexs = torch.cat((torch.arange(start), top, torch.arange(start + length, L))).sort().values
            h = h[:, keep_indexs, :]
            pos = keep_indexs.unsqueeze(0)
        if i == K - 1:
            last_attention = layer_attention(elm, i, h, pos)
        h = run_layer(elm, i, h, pos)
    kept = [j for j in keep_indexs.tolist() if start <= j < start + length]
    return kept, logits_last(elm, h)


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("knobs", [dict(layer=2, keep=0.5), dict(layer=3, keep=0.3), dict(layer=1, count=5)],
                         ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_fastv_equals_reference_transcription(kind, knobs):
    lm, elm = lms(kind)
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=1)
    policy = FastV(**knobs)  # defaults: query="last", rounding="floor" (the reference's)
    assert resolve_position_policy("auto", [policy]) == "keep"  # the reference's position policy
    out = Runner(lm, [policy], position_policy="keep").prefill(emb, mask, vis, use_cache=False)
    (layer, ids), = out.state.trace
    assert layer == knobs["layer"]
    for b, layout in enumerate(LAYOUTS):
        pad = mask.shape[1] - len(layout)
        start, length = layout.index("V"), layout.count("V")
        ref_kept, ref_logits = fastv_reference(elm, emb[b:b + 1, pad:], knobs["layer"], start, length,
                                               ratio=knobs.get("keep"), rank=knobs.get("count"))
        mine = sorted(i - pad for i in ids[b].tolist() if i >= 0 and vis[b, i])
        assert mine == sorted(ref_kept)
        assert len(mine) == (knobs["count"] if "count" in knobs else int(length * knobs["keep"]))
        # kept rows: original order, original positions (position_ids = keep_indexs)
        rows = [i for i in ids[b].tolist() if i >= 0]
        assert rows == sorted(rows)
        got = runner_logits(lm, out, b)
        torch.testing.assert_close(got, ref_logits, atol=1e-5, rtol=1e-5)


def runner_logits(lm, out, b):
    with torch.no_grad():
        return lm.lm_head(out.hidden[b, -1])


def test_fastv_rounding_option_and_schedule():
    """floor (reference) and half_up differ where n·keep has a fraction >= ½; the MACs schedule follows the knob."""
    lm, _ = lms("llama")
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=1)
    for rounding, want in (("floor", [int(n * 0.3) for n in (13, 9, 17)]),
                           ("half_up", [math.floor(n * 0.3 + 0.5) for n in (13, 9, 17)])):
        out = Runner(lm, [FastV(layer=2, keep=0.3, rounding=rounding)]).prefill(emb, mask, vis, use_cache=False)
        assert out.state.visual_counts().tolist() == want
        assert [schedule_for("fastv", LAYERS, n, 5, layer=2, keep=0.3, rounding=rounding).visual[-1]
                for n in (13, 9, 17)] == want
    assert int(13 * 0.3) != math.floor(13 * 0.3 + 0.5)  # the two rules really differ on this input
    with pytest.raises(ConfigError, match=r"fastv: rounding='round'; use 'floor'"):
        FastV(rounding="round")


# ----------------------------------------------------------------------------------------------- PyramidDrop
def pdrop_reference(elm, emb, layer_list, ratio_list, start, length):
    """modeling_llama_pdrop.py ``forward`` + ``pdrop_rank_drop`` for one sample (eval mode, last instruction token
    = the last prompt token): (kept original image indices per stage, last-token logits)."""
    ratio_list = [1.0] + list(ratio_list)  # the eval scripts' image_token_ratio_list.insert(0, 1.0)
    L = emb.shape[1]
    h, pos = emb, torch.arange(L)[None]
    orig = torch.arange(L)  # original index of every row (bookkeeping for the comparison only)
    image_index, kept_per_stage = start, []
    for layer_idx in range(LAYERS):
        h = run_layer(elm, layer_idx, h, pos)
        rank_layer = layer_idx + 1
        if rank_layer in layer_list and rank_layer < LAYERS:
            stage = layer_list.index(rank_layer)
            image_tokens = int(length * ratio_list[stage])
            keep_length = int(length * ratio_list[stage + 1])
            lay = elm.model.layers[rank_layer]
            attn = lay.self_attn
            x = lay.input_layernorm(h)
            n, hd = x.shape[1], attn.head_dim
            with torch.no_grad():
                q = attn.q_proj(x).view(1, n, -1, hd)
                k = attn.k_proj(x).view(1, n, -1, hd)
                if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head norms, part of its attention
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = q.transpose(1, 2), k.transpose(1, 2)
                cos, sin = elm.model.rotary_emb(x, pos)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                q, k = q[0], k[0]
                k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                prompt_total_len = n  # prompt_len + image_tokens: the whole prompt in eval
                text_q = q[:, prompt_total_len - 1, :].unsqueeze(1)
                w = torch.matmul(text_q, k.transpose(1, 2)) / math.sqrt(hd)
                w = nn.functional.softmax(w, dim=-1, dtype=torch.float32)  # the last row: every key is causal
                avg = torch.mean(w, dim=0)[:, image_index:image_index + image_tokens]
                avg_text = torch.mean(avg, dim=0)
            top = (avg_text.topk(keep_length).indices + image_index).sort().values
            end = image_index + image_tokens
            sel = torch.cat([torch.arange(image_index), top, torch.arange(end, n)])
            h, orig = h[:, sel], orig[sel]
            pos = torch.arange(h.shape[1])[None]
            kept_per_stage.append(sorted(int(orig[image_index + j]) for j in range(keep_length)))
    return kept_per_stage, logits_last(elm, h)


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
@pytest.mark.parametrize("layers,ratio", [([1, 3, 4], 0.5), ([2, 4], 0.6), ([1, 2, 5], 0.7)])
def test_pyramiddrop_equals_reference_transcription(kind, layers, ratio):
    lm, elm = lms(kind)
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=2)
    policy = PyramidDrop(layers=layers, ratio=ratio)  # defaults: relative_to="input", rounding="floor"
    assert resolve_position_policy("auto", [policy]) == "compact"  # the reference renumbers
    out = Runner(lm, [policy], position_policy="compact").prefill(emb, mask, vis, use_cache=False)
    assert [layer for layer, _ in out.state.trace] == layers
    ratio_list, f = [], 1.0
    for _ in layers:
        f = f * ratio
        ratio_list.append(f)
    for b, layout in enumerate(LAYOUTS):
        pad = mask.shape[1] - len(layout)
        start, length = layout.index("V"), layout.count("V")
        ref_kept, ref_logits = pdrop_reference(elm, emb[b:b + 1, pad:], layers, ratio_list, start, length)
        for s, (_, ids) in enumerate(out.state.trace):
            mine = sorted(i - pad for i in ids[b].tolist() if i >= 0 and vis[b, i])
            assert mine == ref_kept[s]
            assert len(mine) == max(1, int(length * ratio_list[s]))
        torch.testing.assert_close(runner_logits(lm, out, b), ref_logits, atol=1e-5, rtol=1e-5)


def test_pyramiddrop_count_options_and_schedule():
    """relative_to / rounding options: the reference's int(n_0·λ^s) by default, the previous per-stage half-up rule
    on request; the MACs schedule follows the knobs."""
    lm, _ = lms("qwen2")
    emb, mask, vis = layout_batch(lm, LAYOUTS, seed=2)
    ns = (13, 9, 17)
    cases = {("input", "floor"): lambda n: [int(n * 0.6), int(n * (0.6 * 0.6))],
             ("remaining", "half_up"): lambda n: [math.floor(n * 0.6 + 0.5),
                                                 math.floor(math.floor(n * 0.6 + 0.5) * 0.6 + 0.5)]}
    for (rel, rnd), want in cases.items():
        policy = PyramidDrop(layers=[2, 4], ratio=0.6, relative_to=rel, rounding=rnd)
        out = Runner(lm, [policy], position_policy="compact").prefill(emb, mask, vis, use_cache=False)
        assert out.state.visual_counts().tolist() == [want(n)[-1] for n in ns]
        for n in ns:
            sched = schedule_for("pyramiddrop", LAYERS, n, 5, **policy.schedule_knobs())
            assert [sched.visual[2], sched.visual[4]] == want(n)
    assert [int(n * 0.36) for n in ns] != [math.floor(math.floor(n * 0.6 + 0.5) * 0.6 + 0.5) for n in ns]
    with pytest.raises(ConfigError, match=r"pyramiddrop: rounding='up'; use 'floor'"):
        PyramidDrop(rounding="up")
    with pytest.raises(ConfigError, match=r"pyramiddrop: relative_to='all'"):
        PyramidDrop(relative_to="all")


# ----------------------------------------------------------------------------------------------- SparseVLM
def sparsevlm_reference(elm, emb, pruning_loc, table, v_token_start, image_shape=576):
    """Gumpest/SparseVLMs v1.0, ``llava/model/language_model/modelling_sparse_llama.py``,
    ``LlamaDynamicvitModel.forward`` (inference branch) with ``score.py`` ``attn_postprocess_topk`` and ``utils.py``
    ``cluster_and_merge`` (its tie-breaking noise ``torch.rand(...) * 1e-6`` left out: random inputs have no ties),
    for one sample. Returns (per stage: kept visual ids, original index or ("r", stage, k) for the k-th recycled
    token of an earlier stage), the last-token logits."""
    h = emb
    text_token_start = v_token_start + image_shape
    v_token_num = image_shape
    ids = list(range(emb.shape[1]))  # identity of every row (bookkeeping for the comparison only)
    # text raters, on the input embeddings
    v_t = h[:, v_token_start:text_token_start, :]
    t_t = h[:, text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    pos = torch.arange(h.shape[1])[None]
    kept_per_stage = []
    for layer_idx in range(LAYERS):
        if layer_idx not in pruning_loc:
            h = run_layer(elm, layer_idx, h, pos)
            continue
        stage = pruning_loc.index(layer_idx)
        attn = layer_attention(elm, layer_idx, h, pos)  # the sparse layer's softmax(qkᵀ/√d + causal)
        out = run_layer(elm, layer_idx, h, pos)
        # attn_postprocess_topk
        w = attn.mean(1)
        rows = t_token_idx[1] + text_token_start
        relation_vis_text = w[:, rows, v_token_start:v_token_start + v_token_num].mean(1)
        mask = torch.zeros_like(relation_vis_text, dtype=torch.bool)
        _, indices = torch.topk(relation_vis_text, min(table[stage], v_token_num - 1), dim=1)
        mask[0][indices] = 1
        vis_ids = ids[v_token_start:v_token_start + v_token_num]
        kept_per_stage.append(sorted((i for i, k in zip(vis_ids, mask[0].tolist()) if k), key=str))
        deleted = torch.where(mask[0] == 0)[0]
        select_vis_token_num = int(mask.sum())
        keep_rows = list(range(v_token_start)) + [v_token_start + int(j) for j in torch.where(mask[0])[0]] + \
            list(range(v_token_start + v_token_num, out.shape[1]))
        select = out[:, keep_rows]
        new_ids = [ids[j] for j in keep_rows]
        if len(deleted) > 0:
            total_sparse_token = out[:, v_token_start + deleted]
            merge_token_stage1 = relation_vis_text[0][deleted]
            merge_token_num_stage1 = int(deleted.shape[0] * 0.3) + 1
            merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
            merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
            cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
            merged = dpc_cluster_and_merge(merge_token_stage2, cluster_num)
            cut = v_token_start + select_vis_token_num
            h = torch.cat((select[:, :cut], merged, select[:, cut:]), dim=1)
            ids = new_ids[:cut] + [("r", stage, k) for k in range(cluster_num)] + new_ids[cut:]
            v_token_num = select_vis_token_num + cluster_num
        else:
            h, ids, v_token_num = select, new_ids, select_vis_token_num
        text_token_start = v_token_start + v_token_num
        pos = torch.arange(h.shape[1])[None]  # position_ids[:, :new length]: renumbered
    return kept_per_stage, logits_last(elm, h)


def dpc_cluster_and_merge(x, cluster_num):
    """utils.py ``cluster_and_merge`` (B = 1), without the tie-breaking noise."""
    B, N, C = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (C ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    d_centres = dist_matrix[0][index_down[0]][None]  # index_points(dist_matrix, index_down)
    idx_cluster = d_centres.argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1, dtype=x.dtype).index_add_(0, idx_cluster[0], x.new_ones(N, 1)) + 1e-6
    norm_weight = 1.0 / all_weight[idx_cluster[0]]
    return torch.zeros(cluster_num, C, dtype=x.dtype).index_add_(0, idx_cluster[0], x[0] * norm_weight)[None]


SVLM_LAYOUTS = ["ttt" + "V" * 576 + "tttttttttttt", "tttttt" + "V" * 576 + "ttttttttt"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("retain", [192, 128])
def test_sparsevlm_equals_reference_transcription(kind, retain):
    """Kept sets per stage (recycled tokens included), counts and final logits. The tables 192 / 128 give >= 3
    clusters at every stage: with exactly 2 clusters (e.g. retain=64's second stage) the two densest tokens are
    mutual nearest neighbours with EQUAL density, and the reference breaks that tie with ``torch.rand`` noise, so
    the order of its two recycled tokens is random there; the kept sets still match."""
    lm, elm = lms(kind, max_position_embeddings=1024)  # 576 visual tokens, as the reference's tables assume
    emb, mask, vis = layout_batch(lm, SVLM_LAYOUTS, seed=3)
    scoring = [1, 2, 4]  # the reference's pruning_loc (2, 6, 15 in 32 layers): score there, drop from the next
    policy = SparseVLM(layers=[k + 1 for k in scoring], retain=retain)
    assert resolve_position_policy("auto", [policy]) == "compact"
    out = Runner(lm, [policy], position_policy="compact").prefill(emb, mask, vis, use_cache=False)
    table = RETAIN[retain]
    for b, layout in enumerate(SVLM_LAYOUTS):
        pad = mask.shape[1] - len(layout)
        ref_kept, ref_logits = sparsevlm_reference(elm, emb[b:b + 1, pad:], scoring, table, layout.index("V"))
        earlier = {}  # our recycled row ids (-2, -3, ...) of earlier stages -> ("r", stage, k)
        for s, (layer, ids) in enumerate(out.state.trace):
            assert layer == scoring[s] + 1
            record = [r for r in out.state.signals.recycled if r.layer == layer][0]
            mine = [i - pad if i >= 0 else earlier[i] for i in ids[b].tolist()
                    if (i >= 0 and vis[b, i]) or i in earlier]  # rows recycled at this stage are not "kept"
            assert sorted(mine, key=str) == ref_kept[s]
            assert len(mine) == table[s]
            earlier.update({i: ("r", s, k) for k, i in enumerate(record.ids[b].tolist())})
        torch.testing.assert_close(runner_logits(lm, out, b), ref_logits, atol=1e-5, rtol=1e-5)
