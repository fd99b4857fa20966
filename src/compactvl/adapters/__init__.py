"""Adapters for transformers VLM families (issue 8): where a model's visual tokens are, how its positions work.

One adapter per family, registered by ``config.model_type``: ``llava``, ``llava_next``, ``llava_onevision``
(``llava.py``), ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe`` (``qwen_vl.py``), ``internvl``
(``internvl.py``). Use them through
``compactvl.compress(model, method=..., **knobs)`` (defined in ``compactvl.compression``); see docs/adapters.md.

``base`` holds the shared machinery and the ``ADAPTERS`` table the family modules register into; it never imports
them. This package imports every family (so the table is complete once it is loaded) and looks adapters up.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from . import internvl, llava, qwen_vl  # noqa: F401  (registers the families)
from .base import ADAPTERS, LMView, VLMAdapter, register_adapter
from .qwen_vl import DeepstackInjection


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values compactvl has an adapter for."""
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> VLMAdapter:
    """The adapter of a loaded transformers VLM (``...ForConditionalGeneration``), chosen by ``config.model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise ConfigError(f"compactvl has no adapter for model type {mt!r} ({type(model).__name__}); supported model "
                          f"types: {', '.join(supported_model_types())}. Load one of those (e.g. with "
                          f"AutoModelForImageTextToText), or add an adapter in compactvl/adapters/ (one class + "
                          f"register_adapter)")
    return ADAPTERS[mt](model)


__all__ = ["ADAPTERS", "LMView", "VLMAdapter", "adapter_for", "register_adapter", "supported_model_types",
           "DeepstackInjection"]
