"""compress() on transformers VLMs: LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE.

Every family is a tiny random config saved to disk and loaded back with from_pretrained. Checked: nothing pruned
reproduces the model's own logits and greedy output (batched, left padded, against its own ``generate``); with
compression, batch-1 == batch-N and cached == uncached; the visual tokens entering the LM equal the method's
budget and the MACs schedule equals the tokens each layer saw; kept tokens keep their original M-RoPE positions;
DeepStack features are injected; a compressed model leaves other models (and itself, called directly) unchanged;
bad inputs raise errors that name the fix. Also the Runner additions this needed (multi-axis decoding positions,
prompt positions and persistent policies in ``generate``, a policy's own replay).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, InternVLConfig, InternVLForConditionalGeneration, LlamaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration, SiglipVisionConfig)

from compactvl.adapters import DeepstackInjection, adapter_for, supported_model_types
from compactvl.compression import compress, load_compressed
from compactvl.errors import CompactVLWarning, ConfigError, InputError
from compactvl.measure.macs import llm_macs
from compactvl.runner import LayerPolicy, Runner
from compactvl.testing import emulate_no_cache_rename, tiny_lm, tiny_llava, tiny_llava_processor

IMG, VID, VS, VE = 100, 101, 102, 103
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=8)
QWEN_TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
QWEN3_TEXT = dict(TEXT, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [4, 2, 2], "mrope_interleaved": True})
QWEN3_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=8,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                    deepstack_visual_indexes=[0, 1])


def _build(family: str):
    if family == "llava":
        return tiny_llava()
    if family == "llava_next":
        return LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT), image_token_index=IMG,
            image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]]))
    if family == "llava_onevision":  # anyres_max_1: the high-resolution grid is downsampled (bilinear) by the model
        return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**CLIP), text_config=Qwen2Config(**TEXT), image_token_index=IMG,
            video_token_index=VID, image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]],
            vision_aspect_ratio="anyres_max_1"))
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision,
                                                             text_config=dict(TEXT, rope_parameters=MROPE), **QWEN_TOKENS))
    if family == "qwen2_5_vl":  # block 0 windowed (2x2 merged cells per window), block 1 full attention
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=dict(
            TEXT, rope_parameters=MROPE), **QWEN_TOKENS))
    if family == "qwen3_vl":
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=QWEN3_VISION, text_config=QWEN3_TEXT,
                                                             **QWEN_TOKENS))
    if family == "qwen3_vl_moe":
        text = dict(QWEN3_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(vision_config=QWEN3_VISION, text_config=text,
                                                                   **QWEN_TOKENS))
    if family == "internvl":  # 32 px tiles, 4 px patches: 8x8 patches -> pixel shuffle 0.5 -> 4x4 = 16 tokens
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=[32, 32], patch_size=[4, 4])
        return InternVLForConditionalGeneration(InternVLConfig(vision_config=vision, text_config=Qwen2Config(**TEXT),
                                                               image_token_id=IMG, image_seq_length=16,
                                                               tie_word_embeddings=False))
    raise ValueError(family)


FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl"]
ANYRES = ("llava_next", "llava_onevision")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of a tiny random model saved with save_pretrained."""
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        path = tmp_path_factory.mktemp(family)
        _build(family).save_pretrained(path)
        out[family] = path
    return out


_LOADED: dict = {}


def load(saved, family):
    """The saved model loaded back through from_pretrained (one instance per family, reused by tests that do not
    compare instances)."""
    if family not in _LOADED:
        _LOADED[family] = fresh(saved, family)
    return _LOADED[family]


CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
           "llava_onevision": LlavaOnevisionForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
           "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration, "internvl": InternVLForConditionalGeneration}


def fresh(saved, family):
    return CLASSES[family].from_pretrained(saved[family]).eval()


# ----------------------------------------------------------------------------------------------- inputs
def left_pad(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids, mask


def make_inputs(model, family, seed=0):
    """(batch of 2 samples, [each sample alone]) as the family's processor would build them."""
    g = torch.Generator().manual_seed(seed)
    texts = [([1, 5, 6], [7, 8, 9, 10]), ([1, 11], [12, 13, 14, 15, 16, 17])]
    if family in ("llava", "internvl"):
        size, n = (48, 36) if family == "llava" else (32, 16)
        pv = torch.randn(2, 3, size, size, generator=g)
        counts, extra, per = [n, n], {"pixel_values": pv}, lambda i: {"pixel_values": pv[i:i + 1]}
    elif family in ANYRES:
        sizes = torch.tensor([[60, 90], [90, 40]])
        pv = torch.randn(2, 5, 3, 48, 48, generator=g)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes)
        counts = [f.shape[0] for f in feats.pooler_output]  # the model's own count (base + unpadded grid + newlines)
        extra = {"pixel_values": pv, "image_sizes": sizes}
        per = lambda i: {"pixel_values": pv[i:i + 1], "image_sizes": sizes[i:i + 1]}  # noqa: E731
    else:
        grids = [(1, 8, 8), (1, 4, 8)]
        pvs = [torch.randn(t * h * w, 3 * 2 * 8 * 8, generator=g) for t, h, w in grids]
        counts = [t * h * w // 4 for t, h, w in grids]
        extra = {"pixel_values": torch.cat(pvs), "image_grid_thw": torch.tensor(grids)}
        per = lambda i: {"pixel_values": pvs[i], "image_grid_thw": torch.tensor([grids[i]])}  # noqa: E731
    wrap = (lambda n: [VS] + [IMG] * n + [VE]) if family in QWEN else (lambda n: [IMG] * n)
    seqs = [pre + wrap(n) + post for (pre, post), n in zip(texts, counts)]
    ids, mask = left_pad(seqs)
    batch = {"input_ids": ids, "attention_mask": mask, **extra}
    singles = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long), **per(i)}
               for i, s in enumerate(seqs)]
    if family in QWEN:
        for d in [batch, *singles]:
            d["mm_token_type_ids"] = (d["input_ids"] == IMG).int()
    return batch, singles, counts


def hf_generate(model, inputs, n=6):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------- nothing pruned
@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_reproduces_the_model(saved, family):
    model = load(saved, family)
    batch, singles, _ = make_inputs(model, family)
    vlm = compress(model)
    with torch.no_grad():
        ref = model(**singles[0]).logits
    logits, state, _ = vlm.logits(singles[0])
    assert state.orig_index.tolist() == [list(range(ref.shape[1]))]
    assert (logits - ref).abs().max() <= 1e-5
    greedy = hf_generate(model, batch)
    assert vlm.generate_ids(batch, 6).sequences.tolist() == greedy  # batched, left padded
    # a policy / op that keeps everything takes its own code path and still changes nothing
    same = [compress(model, "fastv", layer=2, keep=1.0)]
    if family not in ANYRES:  # (anyres: a token op drops the image_newline separators, by design)
        same.append(compress(model, "random", keep=1.0))
    for v in same:
        assert (v.logits(singles[0])[0] - ref).abs().max() <= 1e-5
        assert v.generate_ids(batch, 6).sequences.tolist() == greedy


# ----------------------------------------------------------------------------------------------- compressed
METHODS = {  # family -> (a pre-LLM token op, an in-LLM policy)
    "llava": [("visionzip", dict(tokens=8)), ("pyramiddrop", dict(layers=[1, 2], keep=0.5))],
    "llava_next": [("visionzip", dict(tokens=12)), ("fastv", dict(layer=2, keep=0.25))],
    "llava_onevision": [("prumerge_plus", {}), ("sparsevlm", dict(layers=[2], keep=[0.5]))],
    "qwen2_vl": [("visionzip", dict(tokens=6)), ("fastv", dict(layer=1, tokens=3))],
    "qwen2_5_vl": [("bipartite_merge", dict(keep=0.5)), ("pyramiddrop", dict(layers=[2], keep=0.5))],
    "qwen3_vl": [("visionzip", dict(tokens=6)), ("fastv", dict(layer=2, keep=0.5))],
    "qwen3_vl_moe": [("avgpool", dict(k=2)), ("hte", dict(keep=0.5, layers=[2, 3]))],
    "internvl": [("bipartite_merge", dict(keep=0.5)), ("fastv", dict(layer=2, keep=0.5))],
}


@pytest.mark.parametrize("family,which", [(f, w) for f in FAMILIES for w in (0, 1)])
def test_compressed_batch_equals_single_and_cached_equals_uncached(saved, family, which):
    model = load(saved, family)
    batch, singles, _ = make_inputs(model, family, seed=1)
    method, knobs = METHODS[family][which]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the no-CLS substitute note (tested below)
        vlm = compress(model, method, **knobs)
        cached = vlm.generate_ids(batch, 6)
        uncached = vlm.generate_ids(batch, 6, use_cache=False)
        alone = [vlm.generate_ids(s, 6).sequences[0].tolist() for s in singles]
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    assert cached.sequences.tolist() == alone
    assert cached.sequences.tolist() != hf_generate(model, batch)  # compression really changed something


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl"])
def test_cached_equals_uncached_when_transformers_stops_renaming_the_cache_keyword(saved, family):
    """The language models of LLaVA (Llama), Qwen-VL and InternVL (Qwen2) under an emulated transformers release that
    no longer renames ``past_key_values`` -> ``cache``: compressed cached == uncached == each sample alone."""
    model = fresh(saved, family)
    batch, singles, _ = make_inputs(model, family, seed=1)
    method, knobs = METHODS[family][1]  # the in-LLM policy: it exercises per-layer cache lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompactVLWarning)
        before = compress(model, method, **knobs).generate_ids(batch, 6).sequences.tolist()
        emulate_no_cache_rename(model)
        vlm = compress(model, method, **knobs)
        cached = vlm.generate_ids(batch, 6).sequences.tolist()
        uncached = vlm.generate_ids(batch, 6, use_cache=False).sequences.tolist()
        alone = [vlm.generate_ids(s, 6).sequences[0].tolist() for s in singles]
    assert cached == uncached == alone == before


@pytest.mark.filterwarnings("ignore:visionzip. the encoder has no CLS token")
@pytest.mark.filterwarnings("ignore:cdpruner. no prompt text")  # through compress: plain DPP, documented
@pytest.mark.parametrize("family,method,knobs,per_image", [
    ("llava", "visionzip", dict(tokens=8), [8, 8]),
    ("llava", "avgpool", dict(k=2), [9, 9]),  # 6x6 grid -> 3x3
    ("llava_next", "visionzip", dict(tokens=10), [10, 10]),
    ("llava_onevision", "random", dict(tokens=5), None),  # count needs a fixed size: error below
    ("qwen2_vl", "visionzip", dict(keep=0.5), [8, 4]),  # a fraction of each image's own 16 / 8 tokens
    ("qwen2_5_vl", "random", dict(keep=0.25), [4, 2]),
    ("qwen3_vl", "bipartite_merge", dict(tokens=5), [5, 5]),
    ("internvl", "avgpool", dict(k=2), [4, 4]),  # 4x4 pixel-shuffled grid -> 2x2
    ("llava", "divprune", dict(tokens=8), [8, 8]),
    ("qwen2_vl", "divprune", dict(keep=0.5), [8, 4]),
    ("llava_next", "vispruner", dict(tokens=10), [10, 10]),
    ("llava", "cdpruner", dict(tokens=7), [7, 7]),
    ("internvl", "divprune", dict(tokens=5), [5, 5]),
    ("internvl", "cdpruner", dict(tokens=5), [5, 5]),
])
def test_visual_tokens_entering_the_lm_equal_the_budget(saved, family, method, knobs, per_image):
    model = load(saved, family)
    batch, _, counts = make_inputs(model, family)
    if per_image is None:  # caught when compressing, before any batch
        with pytest.raises(ConfigError, match="needs a fixed token count per image; give a fraction"):
            compress(model, method, **knobs)
        return
    vlm = compress(model, method, **knobs)
    p = vlm.prepare(batch)
    assert p.lm.visual_counts.tolist() == per_image  # one image per sample here
    assert p.lm.image_counts.tolist() == per_image and p.lm.full_image_counts.tolist() == counts
    assert vlm.last["visual_tokens"] == per_image
    text = batch["attention_mask"].sum(-1) - torch.tensor(counts)
    assert p.lm.attention_mask.sum(-1).tolist() == (text + torch.tensor(per_image)).tolist()
    if family not in ANYRES:
        grid = (4, 4) if family in QWEN + ("internvl",) else (6, 6)
        assert vlm.budget(counts[0], grid) == per_image[0]


@pytest.mark.parametrize("family,method,knobs", [
    ("llava", "visionzip", dict(tokens=8)),
    ("llava", "fastv", dict(layer=2, keep=0.5)),
    ("llava", None, {}),
    ("qwen2_vl", "pyramiddrop", dict(layers=[1, 3], keep=0.5)),
    ("qwen2_vl", "avgpool", dict(k=2)),
    ("internvl", "random", dict(keep=0.25)),
    ("internvl", "pyramiddrop", dict(layers=[1, 3], keep=0.5)),
    ("llava", "dart", dict(layer=2, count=8, pivots_image=2, pivots_text=2)),
    ("qwen2_vl", "dart", dict(layer=1, keep=0.5, pivots_image=2, pivots_text=2)),
    ("llava", "divprune", dict(tokens=6)),
])
def test_macs_schedule_matches_the_tokens_each_layer_saw(saved, family, method, knobs):
    model = load(saved, family)
    _, singles, counts = make_inputs(model, family)
    vlm = compress(model, method, **knobs)
    out, p = vlm.prefill(singles[0])
    text = int(singles[0]["attention_mask"].sum()) - counts[0]
    grid = (4, 4) if family in QWEN + ("internvl",) else (6, 6)
    sched = vlm.schedule(counts[0], text, grid=grid)
    assert out.cache.lengths() == sched.tokens
    assert sched.visual_input == counts[0]
    report = llm_macs(vlm.adapter.text_config, sched)
    assert (report.ratio < 1.0) == (method is not None)


def test_policy_on_top_of_a_token_op_composes_budget_and_schedule(saved):
    model = load(saved, "llava")
    _, singles, counts = make_inputs(model, "llava")
    vlm = compress(model, "visionzip", tokens=8, policies=[{"policy": "fastv", "layer": 2, "keep": 0.5}])
    out, p = vlm.prefill(singles[0])
    text = int(singles[0]["attention_mask"].sum()) - 36
    assert out.cache.lengths() == [8 + text] * 2 + [4 + text] * 2
    assert vlm.schedule(36, text).tokens == out.cache.lengths()


# ----------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_keep_policy_keeps_original_3d_positions(saved, family):
    model = load(saved, family)
    batch, _, _ = make_inputs(model, family)
    vlm = compress(model, "random", keep=0.25)
    assert vlm.positions == "keep"
    enc, kept = vlm.encode(batch)
    p = vlm.prepare(batch)
    full = vlm.adapter.positions(batch)  # [3, B, L] the model's own get_rope_index
    ph = batch["input_ids"] == IMG
    for b in range(2):
        vis = p.lm.visual_mask[b]
        # find each kept token's original placeholder by its features (random keeps tokens unchanged)
        x = p.lm.inputs_embeds[b, vis]
        orig_rows = torch.nonzero(ph[b]).flatten()
        start = int(ph[:b].sum())
        feats = enc.embeds[start:start + len(orig_rows)]
        src = orig_rows[(x[:, None] - feats[None]).abs().amax(-1).argmin(-1)]
        assert torch.equal(p.lm.position_ids[:, b, vis], full[:, b, src])
        # text keeps its own positions: the last prompt token is where it was
        assert p.lm.position_ids[:, b, -1].tolist() == full[:, b, -1].tolist()
    compact = compress(model, "random", keep=0.25, positions="compact").prepare(batch)
    n = compact.lm.attention_mask.sum(-1)
    assert compact.lm.position_ids[0, 0, -1] == n[0] - 1 and torch.equal(compact.lm.position_ids[0],
                                                                          compact.lm.position_ids[2])


def test_text_positions_after_a_pruned_image_are_unchanged_under_keep(saved):
    model = load(saved, "llava")
    _, singles, _ = make_inputs(model, "llava")
    keep = compress(model, "visionzip", tokens=8, positions="keep").prepare(singles[0])
    compact = compress(model, "visionzip", tokens=8).prepare(singles[0])  # default for a 1D-RoPE token op
    L = int(singles[0]["attention_mask"].sum())
    assert keep.lm.position_ids[0, -4:].tolist() == list(range(L - 4, L))
    assert compact.lm.position_ids[0].tolist() == list(range(compact.lm.attention_mask.shape[1]))


# ----------------------------------------------------------------------------------------------- qwen specifics
def test_deepstack_is_injected_at_the_visual_rows_still_present(saved):
    model = load(saved, "qwen3_vl")
    _, singles, _ = make_inputs(model, "qwen3_vl")
    vlm = compress(model, "fastv", layer=1, keep=0.5)
    p = vlm.prepare(singles[0])
    assert len(p.persistent) == 1 and isinstance(p.persistent[0], DeepstackInjection)
    ds = p.persistent[0].features
    assert ds.shape[0] == 2 and bool((ds[:, 0, ~p.lm.visual_mask[0]] == 0).all())
    assert bool((ds[:, 0, p.lm.visual_mask[0]].abs().sum(-1) > 0).all())
    with_ds = vlm.runner.prefill(p.lm.inputs_embeds, p.lm.attention_mask, p.lm.visual_mask, p.lm.position_ids,
                                 policies=p.persistent + vlm.policies)
    without = vlm.runner.prefill(p.lm.inputs_embeds, p.lm.attention_mask, p.lm.visual_mask, p.lm.position_ids,
                                 policies=vlm.policies)
    assert with_ds.cache.lengths()[0] > with_ds.cache.lengths()[1]  # FastV dropped tokens before layer 1 ...
    assert (with_ds.hidden - without.hidden).abs().max() > 1e-3  # ... and deepstack level 1 still reached the rest


def test_qwen_attention_substitute_is_a_distribution_per_image_and_per_window(saved):
    model = load(saved, "qwen2_5_vl")
    batch, _, _ = make_inputs(model, "qwen2_5_vl")
    adapter = adapter_for(model)
    enc = adapter.encode(batch, layers=[1, 2])
    assert len(enc.groups) == 2  # two grid sizes
    for g in enc.groups:
        h, w = g.tokens.grid
        full = g.encoder.attention(2)  # block 2: full attention inside each image
        assert full.shape == (1, 4, h * w) and torch.allclose(full.sum(-1), torch.ones(1, 4), atol=1e-5)
        win = g.encoder.attention(1)  # block 1: windows of 2x2 merged cells, in the natural (row-major) grid
        per_window = win.view(1, 4, h // 2, 2, w // 2, 2).sum((3, 5))
        assert torch.allclose(per_window, torch.ones_like(per_window), atol=1e-5)
        assert g.encoder.keys(2).shape == (1, h * w, 32)
        assert g.encoder.attention_substitute
    with pytest.raises(ConfigError, match="indexed by block 1..2"):
        enc.groups[0].encoder.attention(0)


def test_hte_prunes_by_the_moe_router_with_instance_hooks_only(saved):
    model = load(saved, "qwen3_vl_moe")
    _, singles, counts = make_inputs(model, "qwen3_vl_moe")
    vlm = compress(model, "hte", keep=0.5, layers=[2])
    out, p = vlm.prefill(singles[0])
    lengths = out.cache.lengths()
    assert lengths[1] - lengths[2] == counts[0] - 8  # kept(16, 0.5) = 8 visual tokens from layer 2 on
    gates = [layer.mlp.gate for layer in model.model.language_model.layers]
    assert all(not g._forward_hooks for g in gates)  # hooks live for the prefill only
    with pytest.raises(ConfigError, match="dense LM"):
        compress(load(saved, "qwen3_vl"), "hte", keep=0.5)


# ----------------------------------------------------------------------------------------------- isolation
def test_two_models_in_one_process(saved):
    a, b = fresh(saved, "qwen3_vl_moe"), fresh(saved, "qwen3_vl_moe")
    batch, singles, _ = make_inputs(a, "qwen3_vl_moe")
    with torch.no_grad():
        before_a, before_b = a(**singles[0]).logits, b(**singles[0]).logits
    ref_b = hf_generate(b, batch)
    for method, knobs in [("visionzip", dict(tokens=4)), ("hte", dict(keep=0.5))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            va = compress(a, method, **knobs)
            va.generate_ids(batch, 4)
        with torch.no_grad():
            assert torch.equal(b(**singles[0]).logits, before_b)
            assert torch.equal(a(**singles[0]).logits, before_a)  # the compressed model itself, called directly
        assert hf_generate(b, batch) == ref_b
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in a.modules())
    # two wrappers of one model do not see each other
    llava = load(saved, "llava")
    lb, ls, _ = make_inputs(llava, "llava")
    zip_alone = compress(llava, "visionzip", tokens=8).generate_ids(lb, 5).sequences
    fast, zipped = compress(llava, "fastv", keep=0.5), compress(llava, "visionzip", tokens=8)
    fast.generate_ids(lb, 5)
    assert torch.equal(zipped.generate_ids(lb, 5).sequences, zip_alone)


# ----------------------------------------------------------------------------------------------- text API
def _llava_with_processor(saved, tmp_path):
    """The saved tiny LLaVA copied to ``tmp_path/llava`` with its processor beside it (what load_compressed reads)."""
    import shutil

    path = tmp_path / "llava"
    shutil.copytree(saved["llava"], path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llava_processor().save_pretrained(path)
    return path


def test_load_compressed_and_text_generation(saved, tmp_path):
    path = _llava_with_processor(saved, tmp_path)
    vlm = load_compressed(str(path), "visionzip", tokens=8)
    assert vlm.processor is not None and vlm.describe().startswith("LlavaForConditionalGeneration")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts = ["What is it?", "Count the dots."]
    answers = vlm.generate(prompts, images, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert vlm.last["visual_tokens"] == [8, 8]
    # the same thing by hand: the processor's chat template, its outputs, decoded (EOS = 2 stops a sample)
    proc = vlm.processor
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                      add_generation_prompt=True, tokenize=False) for p in prompts]
    assert texts[0] == "user: <image>What is it?\nassistant:"
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    ids = vlm.generate_ids(inputs, 5, eos_token_id=2).token_lists(2)
    assert answers == [s.strip() for s in proc.batch_decode(ids, skip_special_tokens=True)]
    # compactvl conversations (what compactvl.evaluate.predict passes), chat messages, raw strings: one rendering
    conv = [[("What is <image> it?", None)], [("Hi", "Hello"), ("<image>Count the dots.", None)]]
    msgs = [[{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image", "image": images[0]},
                                          {"type": "text", "text": "it?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
             {"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "Count the dots."}]}]]
    raw = ["user: What is<image>it?\nassistant:", "user: Hi\nassistant: Hello\nuser: <image>Count the dots.\nassistant:"]
    by_conv = vlm.generate(conv, images, max_new_tokens=4)
    assert vlm.generate(messages=msgs, max_new_tokens=4) == by_conv
    assert vlm.generate(raw, images, max_new_tokens=4, raw=True) == by_conv
    with pytest.raises(InputError, match="either prompts"):
        vlm.generate(prompts, images, messages=msgs)
    with pytest.raises(InputError, match="2 '<image>' placeholder\\(s\\) but 1 image"):
        vlm.generate(["<image><image> twice"], [images[0]])
    with pytest.raises(ConfigError, match="needs the model's processor"):
        compress(vlm.model).generate(prompts, images)


@torch.no_grad()
def test_loglikelihood_of_answers_equals_transformers_forward(saved, tmp_path):
    """``CompressedVLM.loglikelihood`` with nothing pruned: per sample, the sum of transformers' own log-softmax over
    the answer's characters (the template renders 'user: <image>Q\\nassistant: A\\n'; the end-of-turn '\\n' is not
    scored), computed here one sample at a time without padding; the batch of 2 is right padded by the processor.
    With VisionZip: batch 2 == batch 1, and a one-token answer scores what generation's first step gives it."""
    path = _llava_with_processor(saved, tmp_path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((50, 70, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts, answers = ["What is it?", "Count the dots, please."], ["red", "42 dots"]
    plain = load_compressed(str(path))
    hf, proc = plain.model, plain.processor
    scores = plain.loglikelihood(prompts, images, answers)
    for p, im, a, (lp, greedy) in zip(prompts, images, answers, scores):
        text = f"user: <image>{p}\nassistant: {a}\n"
        assert proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": a}]}],
                                        tokenize=False) == text
        inputs = proc(text=[text], images=[im], return_tensors="pt")
        logp = torch.log_softmax(hf(**inputs).logits[0].float(), -1)
        ids = inputs["input_ids"][0]
        L, k = len(ids), len(a)  # one token per character; the last token is the end-of-turn '\n'
        assert proc.tokenizer.decode(ids[L - 1 - k:L - 1]) == a
        rows = torch.arange(L - 2 - k, L - 2)  # the logits before each answer token
        assert lp == pytest.approx(float(logp[rows, ids[rows + 1]].sum()), abs=1e-4)
        assert greedy == bool((logp[rows].argmax(-1) == ids[rows + 1]).all())
    zipped = load_compressed(str(path), "visionzip", tokens=8)
    both = zipped.loglikelihood(prompts, images, answers)
    alone = [zipped.loglikelihood([p], [im], [a])[0] for p, im, a in zip(prompts, images, answers)]
    assert [lp for lp, _ in both] == pytest.approx([lp for lp, _ in alone], abs=1e-4)
    assert [g for _, g in both] == [g for _, g in alone]
    assert zipped.last["visual_tokens"] == [8] and both[0][0] != pytest.approx(scores[0][0], abs=1e-3)
    texts = [f"user: <image>{p}\nassistant: " for p in prompts]  # up to the answer's first character
    first = zipped.generate_ids(proc(text=texts, images=images, return_tensors="pt", padding=True), 1).first_logprobs
    one = zipped.loglikelihood(prompts, images, ["x", "4"])
    for b, c in enumerate("x4"):
        assert one[b][0] == pytest.approx(float(first[b, proc.tokenizer.convert_tokens_to_ids(c)]), abs=1e-4)
    with pytest.raises(InputError, match="2 prompts but 1 answers"):
        zipped.loglikelihood(prompts, images, ["red"])
    with pytest.raises(InputError, match="empty answer"):
        zipped.loglikelihood(prompts, images, ["red", " "])


@pytest.mark.parametrize("method,knobs", [("fastv", {"layer": 1, "keep": 0.25}), ("pyramiddrop", {}),
                                          ("sparsevlm", {"keep": 0.5})])
def test_loglikelihood_under_a_text_reading_policy_scores_what_generation_sees(saved, tmp_path, method, knobs):
    """Policies that rate the visual tokens by the text (FastV's last row, PyramidDrop, SparseVLM's raters) run on the
    prompt alone when generating. Scoring an answer runs prompt + answer in one forward, and rates with the prompt
    rows only (``RunState.prompt``), so a one-token answer scores exactly what generation's first step gives it (the
    answer's own row and the end of turn would otherwise rate and change which tokens the prompt's last row sees)."""
    path = _llava_with_processor(saved, tmp_path)
    rng = np.random.default_rng(2)
    images = [Image.fromarray((rng.random((50, 70, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts = ["What is it?", "Count the dots, please."]
    vlm = load_compressed(str(path), method, **knobs)
    proc = vlm.processor
    texts = [f"user: <image>{p}\nassistant: " for p in prompts]  # up to the answer's first character
    first = vlm.generate_ids(proc(text=texts, images=images, return_tensors="pt", padding=True), 1).first_logprobs
    for answers in ("x4", "q7"):
        one = vlm.loglikelihood(prompts, images, list(answers))
        for b, c in enumerate(answers):
            assert one[b][0] == pytest.approx(float(first[b, proc.tokenizer.convert_tokens_to_ids(c)]), abs=1e-4)


def test_compactvl_evaluate_runs_a_compressed_transformers_vlm(saved, tmp_path):
    """``compactvl.evaluate.predict`` (what ``compactvl eval`` runs) takes a CompressedVLM like its own model."""
    from compactvl.data import get_dataset
    from compactvl.evaluate import predict
    from compactvl.train.collate import collate

    path = _llava_with_processor(saved, tmp_path)
    vlm = load_compressed(str(path), "fastv", layer=1, keep=0.5)
    samples = [get_dataset("synthvqa", n=3)[i] for i in range(3)]
    answers = predict(vlm, samples, batch_size=2, max_new_tokens=3)
    b = collate(samples, for_generation=True)
    assert answers == vlm.generate(b.conversations, b.images, max_new_tokens=3)  # batch 2 + 1 == batch 3
    assert vlm.last["visual_tokens"] == [36, 36, 36]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_say_what_to_do(saved, tmp_path):
    with pytest.raises(ConfigError, match="no adapter for model type 'llama'.*llava, llava_next, llava_onevision, "
                                          "qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe"):
        compress(tiny_lm("llama"), "visionzip", tokens=8)
    assert supported_model_types() == sorted(FAMILIES)
    tiny_lm("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="compactvl compresses these model types"):
        load_compressed(str(tmp_path / "llama"))
    model = load(saved, "llava")
    with pytest.raises(ConfigError, match="has no language-model head"):
        compress(model.model)
    with pytest.raises(ConfigError, match="unknown method 'visionzap'"):
        compress(model, "visionzap")
    with pytest.raises(ConfigError, match="has learned weights"):
        compress(model, ops=[{"op": "resampler", "num_queries": 4}])
    with pytest.raises(ConfigError, match="changes the channels"):
        compress(model, "pixel_shuffle", k=2)
    with pytest.raises(ConfigError, match="has no budget knob 'keep'"):
        compress(model, "prumerge", tokens=8)
    with pytest.raises(ConfigError, match="keep=0"):
        compress(model, "visionzip", keep=0)
    with pytest.raises(ConfigError, match=r"keep is the fraction of visual tokens kept, in \(0, 1\]; for a count of "
                                          r"tokens give tokens=8"):
        compress(model, "visionzip", keep=8)  # keep=1 (all) vs keep=8 (a count) was ambiguous
    with pytest.raises(ConfigError, match="give keep .* or tokens .*, not both"):
        compress(model, "fastv", keep=0.5, tokens=8)
    with pytest.raises(ConfigError, match="knobs \\['keep'\\] given without a method"):
        compress(model, keep=8)
    # images whose token count differs from what the prompt was built for
    batch, singles, _ = make_inputs(model, "llava")
    short = dict(singles[0], input_ids=singles[0]["input_ids"][:, 4:], attention_mask=singles[0]["attention_mask"][:, 4:])
    with pytest.raises(InputError, match="hold 35 image placeholder tokens \\(id 100\\) but the 1 image\\(s\\) give 36"):
        compress(model, "visionzip", tokens=8).generate_ids(short, 2)
    with pytest.raises(InputError, match="hold 72 image placeholder tokens \\(id 100\\) but the 1 image"):
        compress(model).prepare(dict(batch, pixel_values=batch["pixel_values"][:1]))


def test_cls_methods_on_encoders_without_cls_use_the_substitute_and_say_so(saved):
    for family in ("qwen2_vl", "llava_onevision"):  # Qwen ViT and SigLIP: no CLS token
        model = load(saved, family)
        batch, _, _ = make_inputs(model, family)
        vlm = compress(model, "visionzip", tokens=4)
        with pytest.warns(CompactVLWarning, match="no CLS token; ranked by the mean attention each patch receives"):
            vlm.prepare(batch)
        assert len(vlm.notes) == 1
    clip = compress(load(saved, "llava"), "visionzip", tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompactVLWarning)  # compactvl's own notices only
        clip.prepare(make_inputs(load(saved, "llava"), "llava")[0])
    assert clip.notes == []


# ----------------------------------------------------------------------------------------------- Runner additions
class _AddAfterLayer0(LayerPolicy):
    """Adds a constant to the visual rows after layer 0 (a stand-in for features a model injects, like deepstack)."""

    def after_layer(self, i, state, runner):
        if i == 0:
            state.hidden = state.hidden + 0.5 * state.visual[..., None].to(state.hidden.dtype)
        return state


class _DropFirstVisual(LayerPolicy):
    def before_layer(self, i, state, runner):
        if i != 2:
            return state
        first = state.visual & (state.visual.long().cumsum(-1) == 1)
        return state.select(~first, layer=i)


def test_runner_generate_takes_prompt_positions_and_persistent_policies():
    lm = tiny_lm("llama")
    runner = Runner(lm, [_DropFirstVisual()])
    emb = lm.get_input_embeddings()(torch.tensor([[5, 9, 17, 33, 4, 8], [7, 8, 21, 22, 23, 24]]))
    vis = torch.zeros(2, 6, dtype=torch.bool)
    vis[:, 1:4] = True
    pos = torch.tensor([[0, 1, 2, 3, 10, 11], [0, 1, 2, 3, 4, 5]])  # gaps are allowed (keep policy)
    persistent = [_AddAfterLayer0()]
    cached = runner.generate(emb, None, vis, max_new_tokens=5, position_ids=pos, persistent=persistent)
    uncached = runner.generate(emb, None, vis, max_new_tokens=5, position_ids=pos, persistent=persistent,
                               use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    assert cached.cache.next_pos[0].tolist() == [12 + 4, 6 + 4]  # decoding continued after the largest position
    plain = runner.generate(emb, None, vis, max_new_tokens=5, position_ids=pos)
    assert plain.sequences.tolist() != cached.sequences.tolist()  # the persistent policy did act


def test_runner_uncached_path_uses_a_policys_own_replay():
    from compactvl.policies import SparseVLM

    lm = tiny_lm("llama", num_hidden_layers=6)
    torch.manual_seed(0)
    emb = torch.randn(2, 20, 64)
    vis = torch.zeros(2, 20, dtype=torch.bool)
    vis[:, 2:16] = True
    runner = Runner(lm, [SparseVLM(layers=[2], keep=[0.3])])
    cached = runner.generate(emb, None, vis, max_new_tokens=6)
    assert cached.state.signals.recycled  # recycled tokens were inserted
    assert runner.generate(emb, None, vis, max_new_tokens=6, use_cache=False).sequences.tolist() == \
        cached.sequences.tolist()


def test_qwen_decoding_positions_continue_from_the_largest_3d_position(saved):
    model = load(saved, "qwen2_vl")
    _, singles, _ = make_inputs(model, "qwen2_vl")
    vlm = compress(model, "visionzip", tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = vlm.generate_ids(singles[0], 3)
        p = vlm.prepare(singles[0])
    full = vlm.adapter.positions(singles[0])
    assert out.cache.position_axes == 3
    # image 8x8 patches -> 4x4 merged: the text after it starts at start + 4, far below the placeholder count
    assert out.cache.next_pos[0].tolist() == [int(full.max()) + 1 + 2]
    assert int(p.lm.position_ids.max()) == int(full.max())


def test_compactvl_eval_cli_takes_a_transformers_vlm(saved, tmp_path, capsys):
    """``compactvl eval PATH --method M --knob k=v`` scores a compressed transformers VLM like a compactvl model."""
    import json

    from compactvl.cli import main

    path = _llava_with_processor(saved, tmp_path)
    out = tmp_path / "ev"
    rc = main(["eval", str(path), "--set", "synthvqa", "--n", "3", "--batch-size", "2", "--max-new-tokens", "3",
               "--method", "visionzip", "--knob", "tokens=8", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["correct"] == sum(r["correct"] for r in rows)
    assert metrics["lm_seconds"] > 0 and metrics["prepare_seconds"] > 0  # the LM's time, apart from encoding
    assert "visionzip" in capsys.readouterr().out
    assert main(["eval", str(path), "--method", "fastv"]) == 2  # no --set: a clear error, not a traceback
    assert "name one with --set" in capsys.readouterr().err
    # --paired: the same items uncompressed too; the paired difference, agreement and first-token KL
    out2 = tmp_path / "ev2"
    assert main(["eval", str(path), "--set", "synthvqa", "--n", "3", "--batch-size", "2", "--max-new-tokens", "3",
                 "--method", "visionzip", "--knob", "tokens=8", "--out", str(out2), "--no-progress", "--paired"]) == 0
    paired = json.loads((out2 / "paired.json").read_text())
    assert paired["n"] == 3 and paired["kl_first_token"] >= 0 and 0 <= paired["agreement"] <= 1
    assert json.loads((out2 / "uncompressed" / "metrics.json").read_text())["n"] == 3
    assert "visionzip vs uncompressed on the same 3 items" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl_moe", "internvl"])
def test_compactvl_bench_cli_takes_a_transformers_vlm(saved, tmp_path, family, capsys):
    """``compactvl bench --vlm PATH``: the model's own language model (loaded weights; M-RoPE positions for Qwen-VL)
    timed under each method, with a valid report whose counted schedule matches the MACs schedule."""
    import json

    from compactvl.cli import main
    from compactvl.bench import validate_report

    out = tmp_path / "bench"
    rc = main(["bench", "--vlm", str(saved[family]), "--visual", "12", "--text", "6", "--prefix", "2", "--batch", "1,2",
               "--method", "vanilla", "--method", "keep:0.5", "--method", "fastv:layer=1,keep=0.25",
               "--repeats", "1", "--decode-tokens", "2", "--threads", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "bench.json").read_text())
    validate_report(rep)
    text_config = CLASSES[family].from_pretrained(saved[family]).config.get_text_config()
    assert rep["model"]["source"] == "transformers" and rep["model"]["weights"] == "loaded"
    assert rep["model"]["model_type"] == text_config.model_type
    assert rep["model"]["num_layers"] == text_config.num_hidden_layers
    rows = {(r["method"], r["batch"]): r for r in rep["results"]}
    assert rows[("keep:0.5", 2)]["visual_entering"] == 6
    fastv = rows[("fastv:layer=1,keep=0.25", 2)]["schedule"]
    assert fastv["matches"] is True and fastv["counted_visual"] == [12, 3, 3, 3]
    assert rows[("keep:0.5", 1)]["macs"]["ratio"] < 1
    if family == "llava":  # bad input: a clear error, not a traceback
        assert main(["bench", "--vlm", str(tmp_path / "missing")]) == 2
        assert "no such model directory" in capsys.readouterr().err  # at once, not after the hub's retries


def test_internvl_ops_that_read_encoder_attention_say_which_ops_work(saved):
    model = load(saved, "internvl")
    batch, _, _ = make_inputs(model, "internvl")
    with pytest.raises(ConfigError, match="does not give compactvl its CLS attention.*random, avgpool"):
        compress(model, "visionzip", tokens=4).generate_ids(batch, 2)

