"""Measurement: analytic MACs under one definition (``macs``), weight-free architecture presets (``presets``) and
the tokens a real forward let into each layer (``counted``).

Names resolve on first use, so ``compactvl.measure.presets`` (the preset names a ``--help`` lists) loads without
torch or transformers."""
from __future__ import annotations

import importlib

_WHERE = {
    **{name: "macs" for name in (
        "DEFINITION", "SCHEDULES", "LayerMacs", "LMShape", "MacsReport", "Schedule", "ScheduleMethod",
        "get_encoder_config", "get_lm_config", "kept", "llm_macs", "lm_shape", "register_schedule", "schedule_for",
        "vision_macs", "vision_tokens")},
    **{name: "presets" for name in ("ENCODER_PRESETS", "LM_PRESETS", "encoder_preset", "lm_preset",
                                     "preset_source")},
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
