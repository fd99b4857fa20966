"""The functions compactvl's lmms-eval task YAMLs name (``!function compactvl.lmms.taskfns.NAME``).

A document is one exported sample (``compactvl.lmms.export``): ``id``, ``question`` (the user text after the image,
" Answer with one word." included), ``answer``, ``category`` and ``image``. The prompt is the question; the model
puts the image first (``<image>\\n`` + question, the conversation ``compactvl eval`` builds), so both score the same
prompt. Scoring is ``compactvl.data.exact_match``: the same answer normalisation as ``compactvl eval``.
"""
from __future__ import annotations

import ast
from typing import Any

from ..data import exact_match

# the multi-round task's second turn: the model answers the question, then is asked for its answer again
FOLLOW_UP = "Say your answer again. Answer with one word."
ROUNDS = 2


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["answer"]


def _text(results: list) -> str:
    r = results[0] if results else ""
    return (r[-1] if isinstance(r, (list, tuple)) and r else r if isinstance(r, str) else "").strip()


def process_results(doc: dict, results: list) -> dict[str, Any]:
    """``exact_match`` (1.0 / 0.0) of the answer after compactvl's normalisation, and the answer's record."""
    pred = _text(results)
    hit = float(exact_match(pred, doc["answer"]))
    return {"exact_match": hit}


def doc_to_text_multiround(doc: dict, lmms_eval_specific_kwargs: dict | None = None, previous_output=None,
                           round_idx: int | None = None, previous_round_info=None):
    """Round 0: the question. Later rounds (lmms-eval's multi-round protocol): ``(visuals, context, terminal,
    previous_output, round_info)``; round 1 asks :data:`FOLLOW_UP` with no new image; round 2 ends."""
    if round_idx is None:
        return doc["question"]
    if round_idx >= ROUNDS:
        return None, None, True, previous_output, None
    return None, FOLLOW_UP, False, previous_output, None


def process_results_multiround(doc: dict, results: list) -> dict[str, Any]:
    """``exact_match`` of the last round's answer and ``first_round_exact_match`` of the first's."""
    rounds = results[0] if results and isinstance(results[0], (list, tuple)) else results
    rounds = [str(r).strip() for r in rounds] or [""]
    return {"exact_match": float(exact_match(rounds[-1], doc["answer"])),
            "first_round_exact_match": float(exact_match(rounds[0], doc["answer"]))}


def process_results_loglik(doc: dict, results: list) -> dict[str, Any]:
    """``perplexity`` (the answer's log-likelihood, aggregated as exp(-mean)) and ``acc`` (1.0 when greedy decoding
    gives exactly the answer)."""
    r = results
    while isinstance(r, (list, tuple)) and len(r) == 1:  # lmms-eval wraps the (logprob, is_greedy) pair
        r = r[0]
    if isinstance(r, str):  # lmms-eval 0.7.3's unwrap_generation_output turns the pair into its str()
        r = ast.literal_eval(r)
    ll, greedy = r
    return {"perplexity": float(ll), "acc": float(bool(greedy))}
