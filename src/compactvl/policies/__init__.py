"""In-LLM pruning LayerPolicies (registered in ``compactvl.registry.POLICIES``): FastV, PyramidDrop, SparseVLM,
DART, LearnPruner's text-to-vision stage, HTE router-saliency pruning (VEN-VL) and the SIP reconstruction loss, on
the ``ScorePolicy`` base any per-token score (attention, router saliency, ...) plugs into; the SMoES router
regulariser (``smoes``) lives with the experts (``compactvl.experts.smoes``). See docs/pruning.md and
docs/experts.md."""
from ..experts.smoes import SMoES  # noqa: F401  (registers the smoes policy)
from . import base, scores
from .base import ScorePolicy, build_policy, kept_counts, policy_knobs, topk_mask
from .dart import DART
from .fastv import FastV
from .hte import HTENative, HTEPruning
from .learnpruner import LearnPrunerT2V
from .pyramiddrop import PyramidDrop
from .scores import attention_received, attention_rows, last_token_mask
from .sip import SIP
from .sparsevlm import SparseVLM, SparseVLMReplay

__all__ = [
    "ScorePolicy", "build_policy", "policy_knobs", "kept_counts", "topk_mask", "attention_rows", "attention_received",
    "last_token_mask", "DART", "FastV", "HTEPruning", "HTENative", "LearnPrunerT2V", "PyramidDrop", "SIP", "SparseVLM",
    "SparseVLMReplay",
]
