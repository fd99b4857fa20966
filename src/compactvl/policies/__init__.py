"""In-LLM pruning LayerPolicies (registered in ``compactvl.registry.POLICIES``): FastV, PyramidDrop, SparseVLM,
DART, HTE router-saliency pruning (VEN-VL) and the SIP reconstruction loss, on the ``ScorePolicy`` base any per-token score
(attention, router saliency, ...) plugs into. See docs/pruning.md and docs/experts.md."""
from . import base, scores
from .base import ScorePolicy, build_policy, kept_counts, policy_knobs, topk_mask
from .dart import DART
from .fastv import FastV
from .hte import HTENative, HTEPruning
from .pyramiddrop import PyramidDrop
from .scores import attention_received, attention_rows, last_token_mask
from .sip import SIP
from .sparsevlm import SparseVLM, SparseVLMReplay

__all__ = [
    "ScorePolicy", "build_policy", "policy_knobs", "kept_counts", "topk_mask", "attention_rows", "attention_received",
    "last_token_mask", "DART", "FastV", "HTEPruning", "HTENative", "PyramidDrop", "SIP", "SparseVLM",
    "SparseVLMReplay",
]
