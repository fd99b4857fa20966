"""Properties every registered token op must have: it runs in bfloat16, and its announced token count
(``expected_tokens``, used for MACs schedules before any data) is the count it actually keeps."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from compactvl.compression import op_spec
from compactvl.errors import ConfigError
from compactvl.ops import OpContext, build_ops
from compactvl.ops.base import CountOrRatioOp
from compactvl.registry import TOKEN_OPS
from compactvl.tokens import Tokens

C, GRID, LAYER = 8, (8, 12), 9
SPECS = {
    "avgpool": [{"op": "avgpool", "k": 2}],
    "divprune": [{"op": "divprune", "ratio": 0.2}],
    "vispruner": [{"op": "vispruner", "count": 20}],
    "cdpruner": [{"op": "cdpruner", "count": 20}],
    "mmtok": [{"op": "mmtok", "count": 20}],
    "holov": [{"op": "holov", "count": 20, "overflow": "refill"}],
    "pixel_shuffle": [{"op": "pixel_shuffle", "k": 2}],
    "token_concat": [{"op": "token_concat", "k": 4}],
    "stf": [{"op": "stf", "k": 2, "n": 2}],
    "mbtf": [{"op": "mbtf", "count": 3, "hidden": 16}],
    "bipartite_merge": [{"op": "bipartite_merge", "ratio": 0.7}],
    "self_merge": [{"op": "self_merge", "r": 20}],
    "mke": [{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.8, "cross_ratio": 0.6}],
    "cross_merge": [{"op": "cross_merge", "ratio": 0.3}],
    "cotr": [{"op": "cotr", "num_queries": 16}],
    "resampler": [{"op": "resampler", "num_queries": 5, "heads": 2}, {"op": "concat_channels"}],
    "prumerge": [{"op": "prumerge"}],
    "prumerge_plus": [{"op": "prumerge_plus"}],
    "visionzip": [{"op": "visionzip", "dominant": 20, "contextual": 6}],
    "random": [{"op": "random", "ratio": 0.3}],
    "concat_channels": [{"op": "concat_channels"}],
    "concat_tokens": [{"op": "concat_tokens"}],
    "qmop": [{"op": "qmop", "num_queries": 9, "heads": 2, "dim_head": 4}],
    "learnpruner": [{"op": "learnpruner", "ratio": 0.2}],
}


@dataclass
class FakeEncoder:
    features: dict
    grid: tuple
    att: torch.Tensor
    k: torch.Tensor
    cls: torch.Tensor | None = None
    attention_substitute: bool = False

    def attention(self, layer):
        return self.att

    def keys(self, layer):
        return self.k


def streams(n, dtype):
    g = torch.Generator().manual_seed(0)
    N = GRID[0] * GRID[1]
    encs = [FakeEncoder({l: torch.randn(2, N, C, generator=g).to(dtype) for l in (3, 6, LAYER)}, GRID,
                        (torch.randn(2, 2, N, generator=g) * 2).softmax(-1).to(dtype),
                        torch.randn(2, N, 4, generator=g).to(dtype)) for _ in range(n)]
    return [Tokens.from_encoder(e, LAYER, source=i) for i, e in enumerate(encs)], OpContext(encoders=encs)


def test_every_registered_op_is_covered():
    assert sorted(SPECS) == TOKEN_OPS.names()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_op_runs_in_bf16_and_keeps_the_expected_count(name):
    spec = SPECS[name]
    n = 2 if any(TOKEN_OPS.get(s["op"]).fusion for s in spec) else 1
    pipe = build_ops(spec, [C] * n)
    expected = pipe.expected_tokens([GRID[0] * GRID[1]] * n, [GRID] * n)
    for dtype in (torch.float32, torch.bfloat16):
        toks, ctx = streams(n, dtype)
        out = pipe.to(dtype)(toks, ctx)
        assert out.x.dtype == dtype and torch.isfinite(out.x).all() and out.x.shape[-1] == pipe.out_channels
        assert (out.assign < out.x.shape[1]).all() and out.mask.any(1).all()
        if expected is not None:
            assert out.kept_counts().tolist() == [expected, expected], dtype
        else:  # data-dependent (PruMerge): between 1 and all tokens
            assert (out.kept_counts() >= 1).all() and (out.kept_counts() < GRID[0] * GRID[1]).all()


COUNT_OR_RATIO = ["divprune", "cdpruner", "mmtok", "holov", "learnpruner"]  # the ops built on ops.base.CountOrRatioOp


def test_count_or_ratio_ops_are_the_listed_ones():
    names = sorted({TOKEN_OPS.get(n).name for n in TOKEN_OPS.names() if issubclass(TOKEN_OPS.get(n), CountOrRatioOp)})
    assert names == sorted(COUNT_OR_RATIO)


@pytest.mark.parametrize("op", COUNT_OR_RATIO)
def test_count_or_ratio_budget_and_knobs(op):
    """One budget for the count-or-ratio selection ops: tokens=k -> count (at most n); keep=f -> count=kept(n, f)
    (round half up), or ratio=f when n varies inside a batch; the op then keeps that many; the shared knob errors."""
    assert op_spec(op, {"tokens": 8}, 36) == {"op": op, "count": 8}
    assert op_spec(op, {"keep": 0.25}, 36) == {"op": op, "count": 9}
    assert op_spec(op, {"keep": 0.1}, 576) == {"op": op, "count": 58}
    assert op_spec(op, {"keep": 0.25}, None) == {"op": op, "ratio": 0.25}
    assert op_spec(op, {"tokens": 8}, None) == {"op": op, "count": 8}
    assert op_spec(op, {"tokens": 50}, 36) == {"op": op, "count": 36}
    extra = {"overflow": "refill"} if op == "holov" else {}  # holov's default keeps a data-dependent count
    assert build_ops([{**op_spec(op, {"tokens": 8}, 36), **extra}], [6]).expected_tokens([36], [(6, 6)]) == 8
    for knobs, match in [({"ratio": 0}, "ratio=0"), ({"ratio": 1.5}, r"ratio=1.5 .* \(0, 1\]"),
                         ({"count": 0}, "count=0 must be an integer >= 1"), ({"count": 2.5}, "count=2.5"),
                         ({"ratio": 0.2, "count": 3}, f"{op}: ratio=0.2 and count=3 .* give one")]:
        with pytest.raises(ConfigError, match=match):
            build_ops([{"op": op, **knobs}], [6])

