"""Prefill speed of in-LLM pruning (FastV, PyramidDrop, SparseVLM) against the MACs each saves.

A random-weight LM of a real shape (default: the ``qwen3-0.6b`` preset — hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128, MLP 3072, vocab 151936) runs one prefill (the whole prompt through the Runner with its KV cache, plus
the last token's logits: time to first token) on inputs of ``text`` text tokens around ``visual`` visual tokens.
Configurations of one cell (visual tokens × batch) are timed round-robin: one warm-up round, then ``repeats`` rounds
each running every configuration once. A row reports its median time, its speedup (median over rounds of the
unpruned time / its time in the same round, robust to a shared machine's drifting load), the LLM MACs ratio of the
method's schedule (``measure.macs``, full-square attention as the papers count), their product (speedup × ratio: the
share of the MACs saving turned into time; the target is >= 0.8), the same with attention counted causally (what
SDPA's causal kernel computes; it matters at 2880 visual tokens) and the scoring overhead (time the policy spent
computing attention rows, selecting and recycling, as a share of its prefill). Every time is reported as wall clock
and as process CPU time (user + system, all threads).

    .venv/bin/python benchmarks/bench_pruning.py --threads 1          # the grids in docs/pruning.md (also --threads 2)
    .venv/bin/python benchmarks/bench_pruning.py --visual 576 --batch 1 --repeats 2 --lm tiny   # smoke run

Cells listed in ``--skip`` (e.g. 2880x8) are not measured; ``--repeats-large`` applies to cells whose
batch × tokens exceeds ``--large``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from compactvl.measure.macs import llm_macs, schedule_for
from compactvl.measure.presets import lm_preset
from compactvl.policies import build_policy
from compactvl.runner import Runner
from compactvl.testing import tiny_lm_config


def methods(keeps: list[float], extra: bool) -> list[dict]:
    out = [{"policy": "fastv", "layer": 2, "keep": k} for k in keeps]
    if extra:
        out += [{"policy": "pyramiddrop", "ratio": 0.5}, {"policy": "pyramiddrop", "ratio": 0.25},
                {"policy": "sparsevlm", "retain": 192}, {"policy": "sparsevlm", "retain": 64}]
    return out


def make_inputs(lm, batch: int, visual: int, text: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    before = text // 2
    ids = torch.randint(10, lm.config.vocab_size, (batch, text), generator=g)
    emb_t = lm.get_input_embeddings()(ids)
    emb_v = torch.randn(batch, visual, lm.config.hidden_size, generator=g) * emb_t.std()
    emb = torch.cat([emb_t[:, :before], emb_v, emb_t[:, before:]], 1)
    vis = torch.zeros(batch, visual + text, dtype=torch.bool)
    vis[:, before:before + visual] = True
    return emb, vis


def causal_ratio(cfg, sched) -> float:
    """The MACs ratio with attention counted causally (n²·d_attn instead of the definition's full-square
    2·n²·d_attn): closer to what a causal SDPA kernel computes, so to the achievable speedup when attention is large."""
    count = lambda rep: sum(r.linear + r.attention // 2 for r in rep.layers)  # noqa: E731
    return count(llm_macs(cfg, sched)) / count(llm_macs(cfg, sched.vanilla()))


def run_once(runner: Runner, emb, vis) -> tuple[float, float]:
    """Wall and process-CPU seconds of one prefill + last-token logits (time to first token)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = runner.prefill(emb, visual_mask=vis)
    runner.logits(out.hidden[:, -1])
    return time.perf_counter() - t0, time.process_time() - c0


def measure_cell(configs: list[tuple[Runner, object]], emb, vis, repeats: int) -> list[dict]:
    """Round-robin timing: each round runs every config once (round 0 is the warm-up and is dropped). Speedups are
    medians over rounds of (unpruned time / the config's time) within the same round, for wall-clock time and for
    process CPU time (all threads; on a shared machine CPU time is what preemption does not inflate)."""
    wall = [[] for _ in configs]
    cpu = [[] for _ in configs]
    score_wall = [[] for _ in configs]
    score_cpu = [[] for _ in configs]
    for r in range(repeats + 1):
        for j, (runner, policy) in enumerate(configs):
            w, c = run_once(runner, emb, vis)
            if r:
                wall[j].append(w)
                cpu[j].append(c)
                score_wall[j].append(getattr(policy, "score_seconds", 0.0))
                score_cpu[j].append(getattr(policy, "score_cpu_seconds", 0.0))
    med = statistics.median
    return [dict(seconds=med(wall[j]), cpu_seconds=med(cpu[j]), runs=wall[j], cpu_runs=cpu[j],
                 speedup=med(b / t for b, t in zip(wall[0], wall[j])),
                 cpu_speedup=med(b / t for b, t in zip(cpu[0], cpu[j])),
                 scoring=med(s / t for s, t in zip(score_wall[j], wall[j])),
                 scoring_cpu=med(s / t for s, t in zip(score_cpu[j], cpu[j])))
            for j in range(len(configs))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", default="qwen3-0.6b", help="LM preset (measure.presets) or 'tiny'")
    ap.add_argument("--visual", type=int, nargs="+", default=[576, 2880])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--text", type=int, default=64, help="text tokens per prompt (half before, half after the image)")
    ap.add_argument("--extra", choices=["none", "batch1", "all"], default="batch1",
                    help="also run PyramidDrop (λ 0.5, 0.25) and SparseVLM (retain 192, 64): nowhere, at batch 1, "
                         "everywhere")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=2)
    ap.add_argument("--large", type=int, default=4000, help="batch × tokens above which --repeats-large applies")
    ap.add_argument("--skip", nargs="*", default=["2880x8"], help="cells VISUALxBATCH not measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = tiny_lm_config("qwen3", num_hidden_layers=8, max_position_embeddings=8192) if args.lm == "tiny" \
        else lm_preset(args.lm)
    dtype = getattr(torch, args.dtype)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(args.device).eval()
    L = cfg.num_hidden_layers
    print(f"# {args.lm}: {L} layers, hidden {cfg.hidden_size}; device {args.device} {args.dtype}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {platform.processor() or platform.machine()}",
          flush=True)
    print("| visual | batch | method | knobs | MACs ratio | causal MACs ratio | wall s | CPU s | wall speedup | "
          "CPU speedup | CPU speedup × ratio | CPU speedup × causal ratio | scoring % CPU | scoring % wall | runs | "
          "load 1-min (start/end) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with torch.no_grad():
        for visual in args.visual:
            for batch in args.batch:
                if f"{visual}x{batch}" in args.skip:
                    print(f"| {visual} | {batch} | (skipped: --skip) |" + " |" * 13, flush=True)
                    continue
                emb, vis = make_inputs(lm, batch, visual, args.text)
                emb, vis = emb.to(args.device, dtype), vis.to(args.device)
                reps = args.repeats_large if batch * (visual + args.text) > args.large else args.repeats
                use_extra = args.extra == "all" or (args.extra == "batch1" and batch == 1)
                specs = methods(args.keep, use_extra)
                configs = [(Runner(lm), None)]
                ratios, causal = [1.0], [1.0]
                for spec in specs:
                    policy = build_policy(spec)
                    configs.append((Runner(lm, [policy]), policy))
                    sched = schedule_for(spec["policy"], L, visual, args.text, **policy.schedule_knobs())
                    ratios.append(llm_macs(cfg, sched).ratio)
                    causal.append(causal_ratio(cfg, sched))
                load0 = os.getloadavg()[0]
                results = measure_cell(configs, emb, vis, reps)
                load = f"{load0:.1f}/{os.getloadavg()[0]:.1f}"
                for spec, ratio, cr, res in zip([{"policy": "none"}] + specs, ratios, causal, results):
                    knobs = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
                    sp, cs = res["speedup"], res["cpu_speedup"]
                    print(f"| {visual} | {batch} | {spec['policy']} | {knobs} | {ratio:.3f} | {cr:.3f} | "
                          f"{res['seconds']:.2f} | {res['cpu_seconds']:.2f} | {sp:.2f} | {cs:.2f} | {cs * ratio:.2f} | "
                          f"{cs * cr:.2f} | {100 * res['scoring_cpu']:.2f} | {100 * res['scoring']:.2f} | {reps} | "
                          f"{load} |", flush=True)
                    rows.append(dict(visual=visual, batch=batch, method=spec["policy"], knobs=spec, ratio=ratio,
                                     causal_ratio=cr, load=load, **res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, lm=args.lm, threads=args.threads, device=args.device, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
