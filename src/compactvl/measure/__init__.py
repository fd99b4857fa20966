"""Measurement: analytic MACs under one definition (``macs``) and weight-free architecture presets (``presets``)."""
from .macs import (
    DEFINITION,
    SCHEDULES,
    LayerMacs,
    LMShape,
    MacsReport,
    Schedule,
    ScheduleMethod,
    get_encoder_config,
    get_lm_config,
    kept,
    llm_macs,
    lm_shape,
    register_schedule,
    schedule_for,
    vision_macs,
    vision_tokens,
)
from .presets import ENCODER_PRESETS, LM_PRESETS, encoder_preset, lm_preset, preset_source

__all__ = [
    "DEFINITION", "SCHEDULES", "LayerMacs", "LMShape", "MacsReport", "Schedule", "ScheduleMethod",
    "get_encoder_config", "get_lm_config", "kept", "llm_macs", "lm_shape", "register_schedule", "schedule_for",
    "vision_macs", "vision_tokens", "ENCODER_PRESETS", "LM_PRESETS", "encoder_preset", "lm_preset", "preset_source",
]
