"""CompactVLM end to end on tiny random parts: interleaving, batching, caching, save/load, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import compactvl.model as model_mod
from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import CheckpointError, ConfigError, InputError
from compactvl.model import CONFIG_NAME, WEIGHTS_NAME, CompactVLM
from compactvl.testing import tiny_lm, tiny_tokenizer


def images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_vlm(kind="llama", encoders=("clip",), token_ops=(), **kw):
    encs = [tiny_encoder(k, image_size=32) for k in encoders]
    return CompactVLM.build(lm=tiny_lm(kind), tokenizer=tiny_tokenizer(), encoders=encs, token_ops=token_ops,
                            **kw).eval()


def test_visual_tokens_fill_image_slots_and_logits_match_the_lm():
    model = tiny_vlm()
    ims = images(1)
    inputs = model.prepare([[("<image>\nWhat is it?", None)]], [ims])
    n = model.encoders[0].grid_for()[0] * model.encoders[0].grid_for()[1]
    assert inputs.visual_counts == [[n]]
    assert int(inputs.visual_mask.sum()) == n
    visual, mask, _ = model.encode_images(ims)
    assert torch.allclose(inputs.inputs_embeds[inputs.visual_mask], visual[mask])
    ref = model.lm(inputs_embeds=inputs.inputs_embeds).logits
    out = model(inputs)
    assert (out.logits - ref).abs().max() <= 1e-4


def test_batch_with_different_image_counts_equals_each_sample_alone():
    model = tiny_vlm()
    ims = images(3, seed=1)
    prompts = ["<image>\nDescribe.", "Compare <image> and <image> please", "No image here, just text."]
    per = [[ims[0]], [ims[1], ims[2]], []]
    batch = model.prepare([[(p, None)] for p in prompts], per)
    logits_b = model(batch).logits
    answers_b = model.generate(prompts, per, max_new_tokens=6)
    for i, (p, ims_i) in enumerate(zip(prompts, per)):
        one = model.prepare([[(p, None)]], [ims_i])
        n = int(one.attention_mask.sum())
        assert (model(one).logits[0] - logits_b[i, -n:]).abs().max() <= 1e-4
        assert model.generate([p], [ims_i], max_new_tokens=6) == [answers_b[i]]


def test_cached_generation_equals_uncached_through_the_vlm():
    model = tiny_vlm("qwen3")
    inputs = model.prepare([[("<image>\nHi", None)], [("Hello <image>", None)]], [images(1), images(1, seed=4)])
    a = model.runner.generate(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask, max_new_tokens=8)
    b = model.runner.generate(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask, max_new_tokens=8,
                              use_cache=False)
    assert a.sequences.tolist() == b.sequences.tolist()


def test_labels_cover_only_the_answer_and_loss_learns():
    model = tiny_vlm()
    conv = [("<image>\nColor?", "red")]
    inputs = model.prepare([conv], [images(1)], with_labels=True)
    labelled = inputs.labels[inputs.labels != -100].tolist()
    assert model.tokenizer.decode(labelled).strip().startswith("red")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(model.prepare([conv], [images(1)], with_labels=True)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in model.encoders.parameters())  # encoders frozen by default


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_vlm("qwen2")
    torch.nn.init.normal_(model.projector.net[0].weight)
    model.save_pretrained(tmp_path / "m")
    loaded = CompactVLM.from_pretrained(tmp_path / "m")
    conv = [[("<image>\nWhat?", None)]]
    ims = [images(1, seed=7)]
    assert torch.equal(model(model.prepare(conv, ims)).logits, loaded(loaded.prepare(conv, ims)).logits)
    assert loaded.generate(["<image> x"], ims, max_new_tokens=5) == model.generate(["<image> x"], ims, max_new_tokens=5)


def test_save_overwrites_atomically_and_missing_files_are_named(tmp_path):
    model = tiny_vlm()
    target = tmp_path / "m"
    model.save_pretrained(target)
    model.save_pretrained(target)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (target / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"missing {WEIGHTS_NAME}"):
        CompactVLM.from_pretrained(target)
    with pytest.raises(CheckpointError, match="model directory not found"):
        CompactVLM.from_pretrained(tmp_path / "nowhere")
    (target / CONFIG_NAME).write_text("{")
    model.save_pretrained(tmp_path / "n")
    (tmp_path / "n" / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} is damaged: 10 bytes, manifest.json says"):
        CompactVLM.from_pretrained(tmp_path / "n")  # the manifest finds it first (tests/test_artifacts.py: all damage)


def test_a_full_disk_while_saving_keeps_the_previous_model_and_says_so(tmp_path, monkeypatch):
    """safetensors raises SafetensorError, not OSError, when the disk fills: save_pretrained names the directory and
    the free space, and an earlier save at the same path stays whole."""
    model = tiny_vlm()
    target = tmp_path / "m"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_mod, "save_model", full)
    with pytest.raises(CheckpointError, match=rf"could not write the model to {target}: .*No space left on device.* "
                                              r"\([0-9,]+ MiB free on its disk\); check the directory"):
        model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or moved-aside directory left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_placeholder_count_mismatch_names_both_counts():
    model = tiny_vlm()
    with pytest.raises(InputError, match=r"sample 0: the prompt has 1 image placeholder\(s\) .* but 2 image\(s\)"):
        model.generate(["<image> what?"], [images(2)])
    with pytest.raises(InputError, match=r"has 2 image placeholder\(s\) .* but 0 image\(s\)"):
        model.generate(["<image> and <image>"], [[]])


def test_prompt_longer_than_context_is_an_error_not_truncation():
    model = CompactVLM.build(lm=tiny_lm("llama", max_position_embeddings=64), tokenizer=tiny_tokenizer(),
                             encoders=[tiny_encoder("clip", image_size=32)])
    with pytest.raises(InputError, match="the LM's context is 64"):
        model.generate(["<image>" + "x" * 80], [images(1)])


def test_bad_image_file_is_named(tmp_path):
    model = tiny_vlm()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        model.chat(bad, "what?")
    with pytest.raises(InputError, match="image file not found: .*gone.png"):
        model.chat(tmp_path / "gone.png", "what?")


def test_visual_rows_carry_their_grid_positions_into_the_runner():
    """``prepare`` gives every visual row its token's (row, col) — merged centres after a merging op, not a √n grid —
    and ``forward`` hands them to the Runner as ``state.signals.visual_pos`` (what SIP reads)."""
    from compactvl.runner import LayerPolicy

    class Record(LayerPolicy):
        def before_layer(self, i, state, runner):
            if i == 0:
                self.pos = state.signals.visual_pos
            return state

    rec = Record()
    model = tiny_vlm(token_ops=[{"op": "bipartite_merge", "r": 5}])
    model.runner.policies.append(rec)
    ims = images(3, seed=4)
    inputs = model.prepare([[("<image>\nWhat is it?", None)], [("Compare <image> and <image>.", None)]],
                           [ims[:1], ims[1:]])
    _, mask, tokens = model.encode_images(ims)
    assert torch.equal(inputs.visual_pos[inputs.visual_mask], tokens.pos[mask].float())
    assert not torch.equal(tokens.pos[mask], tokens.pos[mask].round())  # merged centres are off the integer grid
    assert (inputs.visual_pos[~inputs.visual_mask] == 0).all()
    model(inputs)
    assert rec.pos is inputs.visual_pos
    rec.pos = None  # the training loss path (labels, logits only where there is a target) hands over the same
    labelled = model.prepare([[("<image>\nWhat is it?", "a cat")]], [ims[:1]], with_labels=True)
    model(labelled, return_logits=False)
    assert rec.pos is labelled.visual_pos


def test_a_variant_equals_reloading_with_the_override_and_restores_the_model(tmp_path):
    """``model.variant(...)`` (what the demo's evaluation uses instead of reading the model again per variant) gives
    the same answers as ``from_pretrained(dir, **override)``, and afterwards the model is as it was."""
    torch.manual_seed(0)
    model = tiny_vlm(token_ops=[{"op": "avgpool", "k": 2}], policies=[{"policy": "fastv", "layer": 1, "keep": 0.5}])
    model.save_pretrained(tmp_path / "m")
    prompts, ims = ["<image>\nWhat is it?", "<image>\nAnd the colour?"], [images(1), images(1, seed=3)]
    before = model.generate(prompts, ims, max_new_tokens=4)
    overrides = [dict(token_ops=[{"op": "avgpool", "k": 2}, {"op": "random", "ratio": 0.5}]),
                 dict(policies=[{"policy": "pyramiddrop", "layers": [1, 2], "ratio": 0.5}]),
                 dict(policies=[], position_policy="compact"),
                 dict(token_ops=[{"op": "avgpool", "k": 2}], position_policy="compact")]
    for over in overrides:
        reloaded = CompactVLM.from_pretrained(tmp_path / "m", **over)
        with model.variant(**over) as v:
            assert v.generate(prompts, ims, max_new_tokens=4) == reloaded.generate(prompts, ims, max_new_tokens=4)
            for key in ("token_ops", "policies", "position_policy"):
                assert getattr(v.config, key) == getattr(reloaded.config, key)
    assert model.generate(prompts, ims, max_new_tokens=4) == before
    assert model.config.policies == [{"policy": "fastv", "layer": 1, "keep": 0.5}]
    with pytest.raises(ConfigError, match="it is trained on"):
        model.reconfigure(token_ops=[{"op": "pixel_shuffle", "k": 2}])


def test_a_run_directory_names_the_model_inside_it(tmp_path):
    """`compactvl demo` writes RUN/train/model, `compactvl train` RUN/model: loading either run finds the model."""
    from compactvl.model import find_model_dir

    model = tiny_vlm()
    model.save_pretrained(tmp_path / "demo" / "train" / "model")
    model.save_pretrained(tmp_path / "train" / "model")
    assert find_model_dir(tmp_path / "demo") == tmp_path / "demo" / "train" / "model"
    assert find_model_dir(tmp_path / "train") == tmp_path / "train" / "model"
    assert find_model_dir(tmp_path / "train" / "model") == tmp_path / "train" / "model"
    (tmp_path / "empty").mkdir()
    assert find_model_dir(tmp_path / "empty") is None
    loaded = CompactVLM.from_pretrained(tmp_path / "demo")
    assert loaded.generate(["<image>\nWhat?"], [images(1)], max_new_tokens=3) == \
        model.generate(["<image>\nWhat?"], [images(1)], max_new_tokens=3)


def test_the_position_policy_defaults_to_the_policies_reference():
    """model.position_policy 'auto': PyramidDrop's and SparseVLM's references renumber (compact); FastV keeps the
    original positions (keep); an explicit choice wins."""
    from compactvl.config import load_config
    from compactvl.demo import tiny_model

    def runner_positions(**model):
        cfg = load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], **model}})
        return tiny_model(cfg).runner.position_policy

    assert load_config()["model"]["position_policy"] == "auto"
    assert runner_positions(policies=[{"policy": "pyramiddrop", "layers": [1], "ratio": 0.5}]) == "compact"
    assert runner_positions(policies=[{"policy": "fastv", "layer": 1, "keep": 0.5}]) == "keep"
    assert runner_positions() == "keep"
    assert runner_positions(policies=[{"policy": "pyramiddrop", "layers": [1]}], position_policy="keep") == "keep"
    m = tiny_model(load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}]}}))
    with m.variant(policies=[{"policy": "sparsevlm", "layers": [1], "keep": [0.5]}]):
        assert m.runner.position_policy == "compact"
    assert m.runner.position_policy == "keep"


@pytest.mark.parametrize("policy", [{"policy": "fastv", "layer": 1, "keep": 0.25},
                                    {"policy": "learnpruner_t2v", "layer": 2, "keep": 0.25}])
def test_a_labelled_forward_rates_the_visual_tokens_with_the_prompt_only(policy):
    """Training (and lmms-eval's answer scoring) runs prompt + answer in one labelled forward. ``prepare`` records
    where each answer starts (``prompt_end``: the first labelled slot), and text-reading policies rate with the rows
    before it: the row that predicts each answer's first token equals the last row of the generation prefill."""
    model = tiny_vlm(policies=[policy])
    ims = images(2, seed=5)
    prompts, answers = ["<image>\nWhat is it?", "<image>\nCount the dots, please."], ["a red circle", "3"]
    full = model.prepare([[(p, a)] for p, a in zip(prompts, answers)], [[im] for im in ims], with_labels=True)
    first = torch.where(full.labels != -100, torch.arange(full.labels.shape[1]), full.labels.shape[1]).amin(-1)
    assert full.prompt_end.tolist() == first.tolist()
    assert model.prepare([[(prompts[0], None)]], [ims[:1]]).prompt_end is None
    out = model(full)
    for b in range(2):
        alone = model(model.prepare([[(prompts[b], None)]], [ims[b:b + 1]]))
        row = (out.state.orig_index[b] == full.prompt_end[b] - 1).nonzero().item()
        assert (out.logits[b, row] - alone.logits[0, -1]).abs().max() <= 1e-4
