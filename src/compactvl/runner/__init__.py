"""The layer-loop Runner, its state and KV cache, and the LayerPolicy interface."""
from .runner import current_layer, GenerateOutput, LayerPolicy, ReplayPolicy, RunOutput, Runner
from .state import POSITION_POLICIES, RunnerCache, RunState, positions_from_mask

__all__ = [
    "Runner", "current_layer", "RunOutput", "GenerateOutput", "LayerPolicy", "ReplayPolicy", "RunState", "RunnerCache",
    "POSITION_POLICIES", "positions_from_mask",
]
