"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models").

Selection as a max–min diversity problem (paper Sec. 3, eqs. 4–6), solved greedily: with d(i, j) = 1 − cos(x_i, x_j)
over a sample's valid tokens,

1. the first token is argmax_j min_{i≠j} d(i, j) (the token farthest from its nearest neighbour; the reference
   takes each column's second-smallest distance, the smallest being the token's distance to itself);
2. then, k − 1 times, add argmax_{j∉S} min_{i∈S} d(i, j) (the token farthest from the selected set S).

The kept tokens stay in their original order (the reference sorts the kept indices). Reference:
github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.DivPrune`` (and
``pairwise_cosine_similarity``; called from ``prepare_inputs_labels_for_multimodal`` with ``SUBSET_RATIO``).
Documented differences:

- features: the reference measures distances between the *projected* visual embeddings (LLM input space, after the
  mm_projector); compactvl's token ops run before the projector, so distances are between the tokens' own features
  (the encoder's selected layer, or what earlier ops produced). The greedy rule itself is the reference's.
- count: the reference keeps ``int(round(ratio·n))`` (Python's round: half to even); compactvl keeps
  ``kept(n, ratio)`` (round half up, at least 1), the project's one fraction→count rule. They differ only when
  ratio·n ends in exactly .5.
- a token already selected is never picked again (the reference can re-pick one when every remaining token
  duplicates a selected one, since its self-distance ≈ 0 is not excluded); so exactly k distinct tokens are kept.
- padding (``mask``) is excluded from both the candidates and the minima; argmax ties break toward the lower index,
  as ``torch.argmax`` in the reference.

Batched: one [B, N, N] distance matrix, a running minimum per sample, one loop over the k selection steps; samples
with different valid counts (and so different k) are handled by masks.
Knobs: ``ratio`` (fraction kept per sample, (0, 1]; default 0.098, the reference's ``SUBSET_RATIO``) or ``count``
(tokens kept per sample, ≥ 1, at most the sample's tokens) — give one; ``streams``. No parameters.
Expected tokens: ``min(count, n)`` or ``kept(n, ratio)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tokens import Tokens
from .base import CountOrRatioOp, OpContext, register

DEFAULT_RATIO = 0.098  # the reference's SUBSET_RATIO (run_Divprune.sh, README: "default retained ratio")


def divprune_keep(x: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """[B,N] bool: the ``k [B]`` tokens per sample chosen by DivPrune's greedy max–min rule on ``x [B,N,C]``."""
    B, N, _ = x.shape
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xn = F.normalize(xf, dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # [B, N(selected / reference rows i), N(candidate columns j)]
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    dist = torch.where(mask[:, :, None], dist, inf)  # padding rows never count in a minimum
    if N > 1:  # step 1: each column's second-smallest distance (the smallest is the token itself)
        mind = dist.topk(2, dim=1, largest=False).values[:, 1]
    else:
        mind = dist[:, 0]
    chosen = torch.zeros_like(mask)
    rows = torch.arange(B, device=x.device)
    for step in range(int(k.max()) if k.numel() else 0):
        score = mind.masked_fill(~mask | chosen, float("-inf"))
        pick = score.argmax(1)  # first maximum: ties toward the lower index
        active = step < k
        chosen[rows[active], pick[active]] = True
        mind = torch.minimum(mind, dist[rows, pick]) if step else dist[rows, pick]
    return chosen


@register("divprune")
class DivPrune(CountOrRatioOp):
    def __init__(self, in_channels: list[int], *, ratio: float | None = None, count: int | None = None,
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.set_budget(count, ratio, default_ratio=DEFAULT_RATIO)

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        return t.keep(divprune_keep(t.x, t.mask, self.counts(t.kept_counts())))

