"""Cost of the training-free token ops relative to LLM prefill on the tokens they keep.

For each op: median wall time of the op on ``--tokens`` tokens x ``--channels`` channels (a 48x60 grid for 2880),
at ``--batch`` and at batch 1, then the median prefill time of a Qwen3-0.6B-shaped ``Qwen3ForCausalLM`` (random
weights; hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, intermediate 3072, vocab 151936) on
``inputs_embeds`` of (kept tokens + ``--text``) at ``--lm-batch`` (default 1: a batch of 8 takes minutes per forward
on a 2-core CPU). Ratios: op(batch 1) / LM(batch 1), both measured; and op(batch B) / (B x LM(batch 1)), which
assumes prefill time linear in batch (compute-bound CPU prefill). Attention-guided ops read precomputed attention and
keys from a fake encoder output (computing them is the encoder's cost, not the op's). Kept count for the LM = the
largest kept count in the batch (what a padded batch feeds the LM).

    python benchmarks/bench_token_ops.py --threads 1        # full run, ~15 min on a 2-core CPU
    python benchmarks/bench_token_ops.py --ops avgpool --lm-repeats 1   # quick look
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from compactvl.ops import OpContext, build_ops
from compactvl.tokens import Tokens

RECIPES = {
    "avgpool": ([{"op": "avgpool", "k": 2}], 1),
    "pixel_shuffle": ([{"op": "pixel_shuffle", "k": 2}], 1),
    "bipartite_merge": ([{"op": "bipartite_merge", "ratio": 0.5}], 1),
    "mke": ([{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.5, "cross_ratio": 0.4}], 2),
    "prumerge": ([{"op": "prumerge"}], 1),
    "prumerge_plus": ([{"op": "prumerge_plus"}], 1),
    "visionzip": ([{"op": "visionzip", "dominant": 54, "contextual": 10}], 1),
    "random": ([{"op": "random", "ratio": 0.25}], 1),
}


@dataclass
class FakeEncoderOutput:
    features: dict
    grid: tuple
    att: torch.Tensor
    k: torch.Tensor
    cls: torch.Tensor | None = None
    attention_substitute: bool = False

    def attention(self, layer: int) -> torch.Tensor:
        return self.att

    def keys(self, layer: int) -> torch.Tensor:
        return self.k


def encoder_output(B: int, grid: tuple[int, int], C: int, heads: int = 16, seed: int = 0) -> FakeEncoderOutput:
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    att = (torch.randn(B, heads, N, generator=g) * 2).softmax(-1)  # heavy-tailed, like CLS attention
    return FakeEncoderOutput({22: torch.randn(B, N, C, generator=g)}, grid, att, torch.randn(B, N, C, generator=g))


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def qwen3_like():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                      max_position_embeddings=40960)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lm-batch", type=int, default=1)
    ap.add_argument("--grid", type=int, nargs=2, default=[48, 60])
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lm-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid, C = tuple(args.grid), args.channels
    rows, lm_cache = [], {}
    lm = None
    for name in args.ops:
        spec, streams = RECIPES[name]
        pipe = build_ops(spec, [C] * streams)
        res = {"op": name, "recipe": pipe.describe()}
        for B in (args.batch, 1):
            encs = [encoder_output(B, grid, C, seed=s) for s in range(streams)]
            ctx = OpContext(encoders=encs)
            toks = [Tokens.from_encoder(e, 22, source=s) for s, e in enumerate(encs)]
            with torch.inference_mode():
                out = pipe(toks, ctx)
                res[f"op_ms_b{B}"] = 1e3 * median_time(lambda: pipe(toks, ctx), args.repeats)
            res[f"kept_b{B}"] = int(out.kept_counts().max())
        for B in (args.batch, 1):
            n = res[f"kept_b{B}"] + args.text
            if n not in lm_cache:
                lm = lm or qwen3_like()
                e = torch.randn(args.lm_batch, n, 1024)
                with torch.inference_mode():
                    lm_cache[n] = median_time(lambda: lm(inputs_embeds=e, logits_to_keep=1), args.lm_repeats) * 1e3
            res[f"lm_ms_b{B}"] = lm_cache[n]
        res["ratio_b1"] = res["op_ms_b1"] / res["lm_ms_b1"]
        B = args.batch
        res[f"ratio_b{B}"] = res[f"op_ms_b{B}"] / (B / args.lm_batch * res[f"lm_ms_b{B}"])
        rows.append(res)
        print(json.dumps(res), flush=True)
    B = args.batch
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {grid[0]}x{grid[1]}={grid[0] * grid[1]} tokens x {C} ch; LM prefill at batch {args.lm_batch}")
    print(f"| op | kept (of {grid[0] * grid[1]}) | op ms, batch {B} | op ms, batch 1 | LM prefill ms, batch 1 "
          f"(kept + {args.text}) | op / LM, batch 1 | op / ({B} x LM), batch {B} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['kept_b1']} | {r[f'op_ms_b{B}']:.1f} | {r['op_ms_b1']:.2f} | {r['lm_ms_b1']:.0f} | "
              f"{100 * r['ratio_b1']:.3f}% | {100 * r[f'ratio_b{B}']:.3f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
