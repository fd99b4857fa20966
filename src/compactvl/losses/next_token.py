"""The language-model loss of a VLM whose layer policies may drop rows: each surviving row is scored against the label
of the next *input* token by its original index (``RunState.orig_index``), so pruning never shifts the targets."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..processor import IGNORE_INDEX


def next_token_targets(orig_index: Tensor, labels: Tensor) -> Tensor:
    """The target of each surviving row ([B, L'] like ``orig_index``): the label of the *next input token* (by
    original index), IGNORE_INDEX where there is none."""
    L = labels.shape[1]
    nxt = orig_index + 1
    valid = (orig_index >= 0) & (nxt < L)
    return labels.gather(1, nxt.clamp(0, L - 1)).masked_fill(~valid, IGNORE_INDEX)


def answer_start(labels: Tensor) -> Tensor:
    """``[B]`` long: each row's first labelled slot (where its answer starts; ``L`` for a row without one), the
    ``prompt_end`` a forward that holds the answer seeds (``RunState.prompt``)."""
    L = labels.shape[1]
    slots = torch.arange(L, device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, slots, L).amin(-1)


def next_token_loss(logits: Tensor, orig_index: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each surviving row against the label of the *next input token* (by original index), so
    the loss stays right when layer policies drop rows. Mean over labelled targets (``forward``'s CE, from logits)."""
    target = next_token_targets(orig_index, labels)
    if not bool((target != IGNORE_INDEX).any()):
        raise InputError("no answer tokens to train on in this batch; every record needs an assistant answer")
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)


def answer_logprobs(logits: Tensor, target: Tensor) -> list[tuple[float, bool]]:
    """Per row: the summed log-probability of its targets (``next_token_targets``; IGNORE_INDEX rows unscored) and
    whether greedy decoding (the argmax at every scored row) gives exactly them: lmms-eval's ``loglikelihood`` pair."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    sel = target != IGNORE_INDEX
    tok_lp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(~sel, 0.0)
    greedy = (logp.argmax(-1) == target) | ~sel
    return [(float(tok_lp[b].sum()), bool(greedy[b].all())) for b in range(target.shape[0])]
