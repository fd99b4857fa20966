"""The vLLM contract (compactvl.serve.vllm_contract; docs/serving.md, "Past one machine: vLLM").

vLLM sizes an item's placeholders before its embeddings exist and then needs exactly that many embeddings (vLLM's
``vllm/multimodal/evs.py``: ``compute_retained_tokens_count`` then ``compute_retention_mask``; Qwen2.5-VL's
``_get_prompt_updates`` and ``_postprocess_video_embeds_evs`` in ``vllm/model_executor/models/qwen2_5_vl.py``). So
for every qualifying method: the count known in advance equals the mask's sum on real features, one item alone
gets the mask it gets in a batch, and the mask keeps what the registered op keeps when it runs in a compactvl token
pipeline (built with ``build_ops``, its context from the real ``EncoderOutput``) on the same tensors.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from compactvl.encoders.base import EncoderOutput
from compactvl.errors import ConfigError, InputError
from compactvl.ops.base import OpContext, build_ops
from compactvl.registry import TOKEN_OPS
from compactvl.schedules import Budget
from compactvl.serve.vllm_contract import CONTRACT, contract_methods, retained_count, retention_mask
from compactvl.tokens import Tokens

C = 8
GRIDS = [(3, 5), (4, 4)]
BUDGETS = [Budget(tokens=4), Budget(fraction=0.3), Budget(tokens=99)]  # 99 > n: every token


def pipeline_keeps(method: str, x, grid, budget, att=None, text=None):
    """[B, k, C]: the op's output tokens from a compactvl pipeline (recipe dict, the real EncoderOutput)."""
    knobs = {k: v for k, (v, _) in CONTRACT[method].pinned.items()}
    knobs.update(TOKEN_OPS.get(method).budget_knobs(budget, grid[0] * grid[1]))
    pipe = build_ops([{"op": method, **knobs}], [C])
    enc = EncoderOutput({0: x}, grid, attention_fn=lambda layer: att, keys_fn=lambda layer: x)
    out = pipe(Tokens.from_encoder(enc, 0), OpContext(encoders=[enc], text=text))
    assert bool(out.mask.all())
    return out.x


@pytest.mark.parametrize("method", contract_methods())
def test_count_in_advance_equals_the_mask_and_the_op_keeps_those_tokens(method):
    g = torch.Generator().manual_seed(7)
    reads_attention = CONTRACT[method].attention
    for grid in GRIDS:
        n = grid[0] * grid[1]
        x = torch.randn(3, n, C, generator=g, dtype=torch.float64)
        att = torch.rand(3, 2, n, generator=g, dtype=torch.float64).softmax(-1) * 0.9 if reads_attention else None
        text = torch.randn(3, 4, C, generator=g, dtype=torch.float64) if CONTRACT[method].text else None
        for budget in BUDGETS:
            k = retained_count(method, budget, grid)
            assert 1 <= k <= n and (budget.tokens is None or k == min(budget.tokens, n))
            mask = retention_mask(method, x, grid, budget, attention=att, text=text)
            assert mask.dtype == torch.bool and mask.shape == (3, n)
            assert mask.sum(1).tolist() == [k] * 3, (grid, budget)
            kept = pipeline_keeps(method, x, grid, budget, att, text)
            assert torch.equal(x[mask].view(3, k, C), kept), (grid, budget)
            for b in range(3):  # one item alone, as vLLM hands them over: the same mask as in the batch
                alone = retention_mask(method, x[b], grid, budget, attention=None if att is None else att[b],
                                       text=None if text is None else text[b])
                assert alone.shape == (n,) and torch.equal(alone, mask[b])


def test_the_qualifying_methods_are_the_fixed_count_selections():
    assert contract_methods() == ["cdpruner", "divprune", "holov", "mmtok", "random", "vispruner"]


def test_a_count_budget_is_the_count_and_a_fraction_follows_each_ops_rule():
    assert retained_count("divprune", Budget(tokens=64), (24, 24)) == 64
    assert retained_count("divprune", Budget(fraction=0.25), (24, 24)) == 144  # kept(576, 0.25)
    assert retained_count("holov", Budget(tokens=64), (4, 4)) == 16  # at most the image's tokens
    assert retained_count("random", Budget(fraction=0.3), (5, 5)) == 7  # RandomKeep: floor(0.3·25)
    assert retained_count("divprune", Budget(fraction=0.3), (5, 5)) == 8  # kept(25, 0.3) = ⌊7.5 + ½⌋
    assert retained_count("vispruner", Budget(tokens=10), (4, 4), knobs={"important_ratio": 0.75}) == 10


@pytest.mark.parametrize("method, why", [
    ("visionzip", "merges the remaining tokens"),
    ("self_merge", "merges tokens"),
    ("prumerge", "data-dependent count"),
    ("avgpool", "averages k×k windows"),
    ("cotr", "learned queries"),
    ("mke", "fuses two encoder streams"),
])
def test_methods_that_cannot_map_are_refused_naming_those_that_can(method, why):
    with pytest.raises(ConfigError, match=f"{why}.*fit .*: cdpruner, divprune, holov, mmtok, random, vispruner"):
        retained_count(method, Budget(tokens=4), (4, 4))
    with pytest.raises(ConfigError, match="cannot map onto vLLM's placeholder contract"):
        retention_mask(method, torch.randn(16, C), (4, 4), Budget(tokens=4))


def test_layer_policies_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="'fastv' is a layer policy.*divprune"):
        retained_count("fastv", Budget(tokens=4), (4, 4))
    with pytest.raises(ConfigError, match="unknown method 'nope'.*divprune"):
        retained_count("nope", Budget(tokens=4), (4, 4))


def test_knobs_that_break_the_contract_are_refused():
    with pytest.raises(ConfigError, match="order='score' breaks the vLLM contract.*order='grid'"):
        retained_count("holov", Budget(tokens=4), (4, 4), knobs={"order": "score"})
    with pytest.raises(ConfigError, match="overflow='drop' breaks.*data-dependent count"):
        retained_count("holov", Budget(tokens=4), (4, 4), knobs={"overflow": "drop"})
    with pytest.raises(ConfigError, match="random: seed=None .*give seed=<int>"):
        retained_count("random", Budget(tokens=4), (4, 4), knobs={"seed": None})
    with pytest.raises(ConfigError, match="count set the kept count.*budget=tokens=4"):
        retained_count("divprune", Budget(tokens=4), (4, 4), knobs={"count": 3})
    with pytest.raises(ConfigError, match="knob 'layer' does not apply"):
        retained_count("vispruner", Budget(tokens=4), (4, 4), knobs={"layer": 3})
    with pytest.raises(ConfigError, match="divprune has no knob 'alpha'"):
        retained_count("divprune", Budget(tokens=4), (4, 4), knobs={"alpha": 1.0})
    with pytest.raises(ConfigError, match="give a compactvl.schedules.Budget"):
        retained_count("divprune", 0.25, (4, 4))


def test_bad_inputs_say_what_to_pass():
    x = torch.randn(16, C)
    with pytest.raises(InputError, match=r"grid=\(4, 0\)"):
        retained_count("divprune", Budget(tokens=4), (4, 0))
    with pytest.raises(InputError, match="grid 3x5 has 15 cells but the features hold 16"):
        retention_mask("divprune", x, (3, 5), Budget(tokens=4))
    with pytest.raises(InputError, match="vispruner ranks tokens by the encoder's CLS attention; pass attention="):
        retention_mask("vispruner", x, (4, 4), Budget(tokens=4))
    with pytest.raises(InputError, match="divprune does not read attention"):
        retention_mask("divprune", x, (4, 4), Budget(tokens=4), attention=torch.rand(2, 16))
    with pytest.raises(InputError, match="attention covers 15 tokens but the features hold 16"):
        retention_mask("holov", x, (4, 4), Budget(tokens=4), attention=torch.rand(2, 15))
    with pytest.raises(InputError, match=r"text has shape \(3, 4, 8\); expected \[T, C\] per item"):
        retention_mask("mmtok", x, (4, 4), Budget(tokens=4), text=torch.randn(3, 4, C))


def test_the_contract_imports_without_vllm_or_the_serve_extra():
    code = ("import sys, compactvl.serve.vllm_contract; "
            "print(sorted(m for m in ('vllm', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
