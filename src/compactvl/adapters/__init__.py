"""Adapters for transformers VLM families (issue 8): where a model's visual tokens are, how its positions work.

One adapter per family, registered by ``config.model_type``: ``llava``, ``llava_next``, ``llava_onevision``
(``llava.py``), ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe`` (``qwen_vl.py``), ``internvl``
(``internvl.py``). Use them through
``compactvl.compress(model, method=..., **knobs)`` (defined in ``compactvl.compression``); see docs/adapters.md.
"""
from . import internvl, llava, qwen_vl  # noqa: F401  (registers the families)
from .base import ADAPTERS, LMView, VLMAdapter, adapter_for, register_adapter, supported_model_types
from .qwen_vl import DeepstackInjection

__all__ = ["ADAPTERS", "LMView", "VLMAdapter", "adapter_for", "register_adapter", "supported_model_types",
           "DeepstackInjection"]
