"""``./run gpu-check``: the checks and figures that need a CUDA machine, in one command that fits in 10 minutes.

Steps (each bounded in time; a step that fails or runs out of time is recorded with its reason and the rest go on):

1. **tests**: ``pytest tests/test_cuda.py`` — the CUDA paths (Runner == transformers, cached == uncached and
   batch-1 == batch-N under FastV / PyramidDrop / SparseVLM, SDPA without a mask, bf16, bench on CUDA).
2. **bench**: ``compactvl bench`` at real sizes, bf16, SDPA: Qwen3-0.6B and the Llama-2-7B shape (LLaVA-1.5-7B's LM),
   576 and 2880 visual tokens (LLaVA-1.5 and LLaVA-NeXT's 5 tiles), batch 1 and 8; vanilla, keep 25 %, FastV,
   PyramidDrop (+ SparseVLM on the small model). Random weights: speed does not depend on the values.
3. **train**: a training-throughput probe — forward + backward + AdamW steps of the Qwen3-0.6B-shaped LM through the
   Runner (fp32 master weights, bf16 autocast), batch 8 × (576 visual + 64 text) tokens; tokens/s and MFU =
   achieved FLOP/s / the GPU's dense bf16 peak, with FLOPs per token = 6 · N + 12 · layers · L · d_attn (N = the
   weights of every linear layer incl. the LM head; the attention term over the full square, as compactvl's MACs).

It writes ``gpu-check.md`` (paste into docs/benchmarks.md) and ``gpu-check.json`` under ``--out``, plus each bench's
own report. ``--tiny`` runs the same steps with tiny shapes on any device (how the test suite checks this script on
a CPU). Without CUDA (and without ``--device cpu``) it prints that it skipped and exits 0.

    ./run gpu-check                      # installs with COMPACTVL_SKIP_TORCH=1 (the image's torch), then this
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # the script itself, anywhere
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12),
             ("L40S", 362.05e12), ("A10G", 70.0e12), ("L4", 121.0e12)]
BENCH_METHODS = ["vanilla", "keep:0.25", "fastv:layer=2,keep=0.5", "pyramiddrop:ratio=0.5"]
TINY_LM = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               rms_norm_eps=1e-6, tie_word_embeddings=False)


def environment(device: str) -> dict:
    import torch
    import transformers

    import compactvl

    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               compactvl=compactvl.__version__, device=device, cuda=torch.version.cuda, gpu=None, gpu_memory_gb=None)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def peak_flops(gpu: str | None) -> float | None:
    for key, peak in PEAK_BF16:
        if gpu and key in gpu:
            return peak
    return None


def _run(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run ``cmd``; returns status, seconds and the output's tail, keeping the whole output in ``log``."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1))
        out, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timed out after {timeout:.0f} s"
    log.write_text(out)
    return dict(status=status, seconds=round(time.perf_counter() - t0, 1), command=shlex.join(cmd),
                tail=out[-1500:], log=log.name)


def step_tests(out: Path, timeout: float) -> dict:
    res = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], timeout,
               out / "tests.log")
    summary = [ln for ln in res["tail"].splitlines() if " passed" in ln or " failed" in ln or " skipped" in ln]
    res["summary"] = summary[-1] if summary else None
    return res


def step_bench(out: Path, device: str, tiny: bool, deadline: float) -> dict:
    if tiny:
        cfg = out / "tiny-lm.json"
        cfg.write_text(json.dumps(TINY_LM))
        plans = [("tiny", str(cfg), ["16"], ["1", "2"], BENCH_METHODS, 1)]
    else:
        plans = [("qwen3-0.6b", "qwen3-0.6b", ["576", "2880"], ["1", "8"], BENCH_METHODS + ["sparsevlm"], 5),
                 ("llama-2-7b", "llama-2-7b", ["576", "2880"], ["1", "8"], BENCH_METHODS, 3)]
    runs = {}
    for i, (name, llm, visual, batch, methods, repeats) in enumerate(plans):
        left = deadline - time.perf_counter()
        if left < 20:
            runs[name] = dict(status="not run: out of time", seconds=0)
            continue
        cmd = [sys.executable, "-c", "import sys; from compactvl.cli import main; sys.exit(main())", "bench",
               "--llm", llm, "--visual", ",".join(visual), "--batch", ",".join(batch), "--text", "64",
               "--device", device, "--dtype", "bfloat16" if device.startswith("cuda") else "float32",
               "--repeats", str(repeats), "--decode-tokens", "8", "--no-progress", "--out", str(out / f"bench-{name}")]
        for m in methods:
            cmd += ["--method", m]
        runs[name] = _run(cmd, left / (len(plans) - i), out / f"bench-{name}.log")
        md = out / f"bench-{name}" / "bench.md"
        runs[name]["markdown"] = md.read_text() if md.is_file() else None
    return runs


def step_train(device: str, tiny: bool, steps: int = 10, warmup: int = 3) -> dict:
    import torch

    from compactvl.bench import load_bench_model, make_inputs
    from compactvl.runner import Runner

    t0 = time.perf_counter()
    batch, visual, text = (2, 16, 16) if tiny else (8, 576, 64)
    llm = TINY_LM if tiny else "qwen3-0.6b"
    if tiny:
        from transformers import AutoConfig

        llm = AutoConfig.for_model(**TINY_LM)
    model = load_bench_model(llm=llm, device=device, dtype="float32")
    lm = model.lm.train()
    cuda = device.startswith("cuda")
    runner = Runner(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=cuda)
    embeds, vmask = make_inputs(lm, visual, text, 8, batch)
    L = embeds.shape[1]
    targets = torch.randint(0, lm.config.vocab_size, (batch, L), generator=torch.Generator().manual_seed(0))
    targets = targets.to(embeds.device)
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            logits, _ = runner.forward_logits(embeds, None, vmask)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    step_s = times[len(times) // 2]
    cfg = lm.config
    n_linear = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    flops_per_token = 6 * n_linear + 12 * cfg.num_hidden_layers * L * d_attn
    tokens_per_s = batch * L / step_s
    peak = peak_flops(environment(device).get("gpu")) if cuda else None
    achieved = flops_per_token * tokens_per_s
    return dict(status="ok", seconds=round(time.perf_counter() - t0, 1), model="tiny qwen3 (random)" if tiny else f"{llm} (random weights)", batch=batch,
                tokens_per_sample=L, steps=steps, warmup=warmup, step_ms_median=round(step_s * 1e3, 2),
                tokens_per_s=round(tokens_per_s, 1), linear_params=n_linear, flops_per_token=flops_per_token,
                achieved_tflops=round(achieved / 1e12, 2), peak_tflops=None if peak is None else peak / 1e12,
                mfu=None if peak is None else round(achieved / peak, 4), loss_finite=bool(torch.isfinite(loss)),
                precision="fp32 weights + bf16 autocast" if cuda else "fp32",
                peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def report_markdown(rep: dict) -> str:
    env = rep["environment"]
    where = f"{env['gpu']} ({env['gpu_memory_gb']} GiB), CUDA {env['cuda']}" if env["gpu"] else env.get("cpu", "cpu")
    lines = [f"## GPU check: {where}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, compactvl {env['compactvl']}, "
             f"Python {env['python']}; {rep['created']}; total {rep['seconds']:.0f} s.", "",
             f"Command: `{rep['command']}`", ""]
    t = rep["steps"].get("tests")
    if t:
        lines += ["### CUDA tests", "", f"`{t['command']}`: {t['status']}, {t.get('summary') or ''} ({t['seconds']} s)",
                  ""]
    for name, b in (rep["steps"].get("bench") or {}).items():
        lines += [f"### bench {name}: {b['status']} ({b['seconds']} s)", ""]
        if b.get("command"):
            lines += [f"`{b['command']}`", ""]
        if b.get("markdown"):
            lines += [b["markdown"], ""]
    tr = rep["steps"].get("train")
    if tr:
        lines += ["### Training throughput", ""]
        if tr.get("status") != "ok":
            lines += [tr["status"], ""]
        else:
            mfu = "n/a (unknown peak)" if tr["mfu"] is None else f"{tr['mfu']:.1%} of {tr['peak_tflops']:.0f} TFLOP/s"
            lines += ["| model | batch × tokens | precision | step (median) | tokens/s | TFLOP/s | MFU | peak memory |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {tr['model']} | {tr['batch']} × {tr['tokens_per_sample']} | {tr['precision']} | "
                      f"{tr['step_ms_median']} ms | {tr['tokens_per_s']:.0f} | {tr['achieved_tflops']} | {mfu} | "
                      f"{tr['peak_memory_gb']} GiB |", "",
                      f"FLOPs per token = 6 × {tr['linear_params']:,} (linear weights) + 12 × layers × L × d_attn = "
                      f"{tr['flops_per_token']:,}; {tr['steps']} timed steps after {tr['warmup']} warm-up.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu-check", help="report directory (default runs/gpu-check)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script itself, on any device")
    ap.add_argument("--skip", action="append", default=[], choices=["tests", "bench", "train"], help="skip a step")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for all steps together (default 540, inside a 10-minute lease)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device; skipped")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    rep = dict(created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), environment=environment(args.device),
               command="./run gpu-check " + shlex.join(argv if argv is not None else sys.argv[1:]), steps={})
    if "tests" not in args.skip:
        rep["steps"]["tests"] = step_tests(out, min(180.0, 0.3 * args.budget))
        print(f"tests: {rep['steps']['tests']['status']} {rep['steps']['tests'].get('summary') or ''}", flush=True)
    if "train" not in args.skip:  # before the benches, which take what time is left
        try:
            rep["steps"]["train"] = step_train(args.device, args.tiny)
        except Exception as e:  # recorded, and the benches still run
            rep["steps"]["train"] = dict(status=f"failed: {type(e).__name__}: {e}")
        print(f"train: {rep['steps']['train']['status']}", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "bench" not in args.skip:
        rep["steps"]["bench"] = step_bench(out, args.device, args.tiny, deadline)
        for name, b in rep["steps"]["bench"].items():
            print(f"bench {name}: {b['status']}", flush=True)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu-check.json").write_text(json.dumps(rep, indent=2))
    (out / "gpu-check.md").write_text(report_markdown(rep))
    print(f"wrote {out / 'gpu-check.md'} and {out / 'gpu-check.json'} ({rep['seconds']:.0f} s)")
    failed = [k for k, v in rep["steps"].items()
              if (v.get("status", "ok") != "ok" if k != "bench" else any(b["status"] != "ok" for b in v.values()))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
