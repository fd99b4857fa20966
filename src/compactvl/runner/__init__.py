"""The layer-loop Runner, its state, the typed signals and KV cache, and the LayerPolicy interface."""
from .layer import LayerContext, LayerStateModule
from .runner import GenerateOutput, LayerPolicy, ReplayPolicy, RunOutput, Runner
from .state import (POSITION_POLICIES, RecycledTokens, RouterSignal, RunnerCache, RunState, Signals,
                    positions_from_mask)

__all__ = [
    "Runner", "LayerContext", "LayerStateModule", "RunOutput", "GenerateOutput", "LayerPolicy", "ReplayPolicy",
    "RunState", "RunnerCache", "Signals", "RouterSignal", "RecycledTokens", "POSITION_POLICIES", "positions_from_mask",
]
