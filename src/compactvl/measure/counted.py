"""Measured token schedules: count the tokens that really enter each decoder layer during a forward.

The analytic MACs of a method (``measure.macs``) rest on a :class:`~compactvl.measure.macs.Schedule`, the tokens
entering each layer, built from the method's knobs. ``CountingPolicy`` records, during a real Runner prefill, how many
real tokens (and how many visual ones) each sample carries into each layer; ``counted_schedule`` turns that record
into a ``Schedule`` for one sample, so a benchmark (``compactvl bench``) and the tests can assert that the schedule the
MACs were computed on is the one the model actually ran.

Place the counter LAST in the policy list: the Runner applies ``before_layer`` hooks in order, so the last policy
sees exactly the state the layer receives (after every drop, merge or recycled token the others made)::

    counter = CountingPolicy()
    runner.prefill(embeds, mask, visual_mask, policies=[*policies, counter])
    measured = counted_schedule(counter, sample=0, visual_input=576)
    assert_same_schedule(measured, schedule_for("fastv", L, 576, 64, layer=2, keep=0.5))

``measured_schedule(model, sample)`` does this for a CompactVLM on one sample and adds the LLM MACs.

Counting costs two small reductions per layer (one host sync per layer on CUDA), so benchmarks count on a warm-up
run, never on a timed one.
"""
from __future__ import annotations

import torch

from ..data.collate import collate
from ..errors import ConfigError
from ..experts import extra_macs
from ..runner import LayerPolicy, RunState
from .macs import Schedule, llm_macs


class CountingPolicy(LayerPolicy):
    """Records, for every decoder layer of each prefill, the real and the visual tokens per sample entering it.

    ``tokens[i]`` and ``visual[i]`` are lists of ints (one per sample) for layer ``i`` of the latest prefill.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[list[int]] = []
        self.visual: list[list[int]] = []

    def reset(self) -> None:
        self.tokens, self.visual = [], []

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if layer_idx != len(self.tokens):
            raise ConfigError(f"CountingPolicy saw layer {layer_idx} after {len(self.tokens)} layers; it counts a "
                              f"prefill from layer 0 on (the Runner calls reset() at the start of each prefill)")
        self.tokens.append(state.token_counts().tolist())
        self.visual.append(state.visual_counts().tolist())
        return state

    @property
    def batch_size(self) -> int:
        return len(self.tokens[0]) if self.tokens else 0


def counted_schedule(counter: CountingPolicy, sample: int = 0, visual_input: int | None = None,
                     method: str = "counted") -> Schedule:
    """The schedule sample ``sample`` ran through in the counter's latest prefill.

    ``text`` is the non-visual tokens entering layer 0 (text tokens are never pruned by the policies here).
    ``visual_input`` is the visual count before any reduction (default: the count entering layer 0); give it when a
    pre-LLM op already reduced the tokens, so the schedule's vanilla (and its MACs ratio) refers to the full input.
    """
    if not counter.tokens:
        raise ConfigError("the CountingPolicy has recorded nothing; pass it (last) in the Runner's policies and run a "
                          "prefill first")
    if not 0 <= sample < counter.batch_size:
        raise ConfigError(f"sample {sample} is outside the counted batch of {counter.batch_size}")
    tokens = [int(t[sample]) for t in counter.tokens]
    visual = [int(v[sample]) for v in counter.visual]
    return Schedule(tokens, visual, text=tokens[0] - visual[0], method=method,
                    visual_input=visual[0] if visual_input is None else int(visual_input))


def schedule_mismatch(measured: Schedule, expected: Schedule) -> str | None:
    """``None`` when both schedules have the same tokens and visual tokens per layer, else a message naming the
    first layer where they differ."""
    if measured.num_layers != expected.num_layers:
        return f"measured {measured.num_layers} layers, expected {expected.num_layers}"
    for i, (a, b, va, vb) in enumerate(zip(measured.tokens, expected.tokens, measured.visual, expected.visual)):
        if a != b or va != vb:
            return (f"layer {i}: measured {a} tokens ({va} visual), the analytic schedule '{expected.method}' says "
                    f"{b} ({vb} visual)")
    return None


def assert_same_schedule(measured: Schedule, expected: Schedule) -> None:
    """Raise ``ConfigError`` when ``measured`` differs from ``expected`` (see :func:`schedule_mismatch`)."""
    diff = schedule_mismatch(measured, expected)
    if diff is not None:
        raise ConfigError(f"the tokens that entered the layers differ from the MACs schedule: {diff}; the method's "
                          f"schedule builder and its policy disagree (report this as a bug)")


def per_sample_schedules(counter: CountingPolicy, visual_input: int | list[int] | None = None) -> list[Schedule]:
    """``counted_schedule`` for every sample of the latest prefill (``visual_input``: one count for all, or one per
    sample)."""
    n = counter.batch_size
    vin = visual_input if isinstance(visual_input, list) else [visual_input] * n
    if len(vin) != n:
        raise ConfigError(f"visual_input has {len(vin)} entries for a batch of {n}; give one per sample")
    return [counted_schedule(counter, b, vin[b]) for b in range(n)]


def measured_schedule(model, sample) -> dict:
    """Visual tokens entering the LM and per layer, and LLM MACs, measured by one prefill of ``sample``: a
    :class:`~compactvl.measure.counted.CountingPolicy`, last after the model's own policies, counts the tokens that
    really enter each layer."""
    b = collate([sample], for_generation=True)
    counter = CountingPolicy()
    with torch.no_grad():
        x = model.prepare(b.conversations, b.images)
        model.runner.prefill(x.inputs_embeds, x.attention_mask, x.visual_mask, use_cache=False,
                             policies=[*model.runner.policies, counter])
    sched = counted_schedule(counter, method="measured")
    report = llm_macs(model.lm.config, sched, name="lm")
    experts = extra_macs(model.lm, sched)  # HTE / MMoE modules on top of the dense layers (0 without experts)
    return {"visual_tokens": sched.visual_input, "tokens_per_layer": sched.tokens, "visual_per_layer": sched.visual,
            "prompt_tokens": x.inputs_embeds.shape[1], "llm_gmacs": (report.llm_macs + experts) / 1e9,
            "expert_gmacs": experts / 1e9}
