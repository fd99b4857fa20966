"""The CUDA paths (skipped without a CUDA device; ``./run gpu-check`` runs them on a GPU machine).

On the GPU, in fp32 (so equality is exact in the same way as on the CPU): the Runner equals transformers' own
forward; cached == uncached generation and batch-1 == batch-N for the in-LLM pruning policies, with SDPA kept (no
padding: no mask at all, so PyTorch may pick its flash / memory-efficient kernels); bf16 runs and agrees with fp32 on
the greedy tokens of most prompts; ``compactvl bench`` on CUDA counts the same tokens per layer as its MACs schedule.
"""
from __future__ import annotations

import pytest
import torch

from compactvl.policies import FastV, PyramidDrop, SparseVLM
from compactvl.runner import Runner
from compactvl.testing import TINY_LM_KINDS, layout_batch, tiny_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (./run gpu-check)")
LAYOUTS = ["ttVVVVVVVVtt", "tVVVVVVVVttttt", "ttttVVVVVVVVt"]
POLICIES = {"fastv": lambda: FastV(layer=2, keep=0.5), "pyramiddrop": lambda: PyramidDrop(layers=[1, 2, 3]),
            "sparsevlm": lambda: SparseVLM(layers=[1, 2], keep=[0.5, 0.25])}


def cuda_lm(kind, dtype=torch.float32, **kw):
    return tiny_lm(kind, num_hidden_layers=4, **kw).to("cuda", dtype)


@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_runner_equals_transformers_on_cuda(kind):
    lm = cuda_lm(kind)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    ours, _ = Runner(lm).forward_logits(lm.get_input_embeddings()(ids))
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("kind", TINY_LM_KINDS)
def test_policies_cached_equals_uncached_and_batch_equals_single_on_cuda(kind, name):
    lm = cuda_lm(kind)
    emb, mask, vis = (t.cuda() for t in layout_batch(lm, LAYOUTS, seed=3))
    runner = Runner(lm, [POLICIES[name]()])
    cached = runner.generate(emb, mask, vis, max_new_tokens=6).sequences.tolist()
    uncached = runner.generate(emb, mask, vis, max_new_tokens=6, use_cache=False).sequences.tolist()
    assert cached == uncached
    for i in range(len(LAYOUTS)):
        keep = mask[i]
        one = runner.generate(emb[i:i + 1, keep], None, vis[i:i + 1, keep], max_new_tokens=6)
        assert one.sequences[0].tolist() == cached[i]


def test_unpadded_sdpa_batch_passes_no_mask_so_flash_kernels_stay_available():
    lm = cuda_lm("llama", torch.bfloat16)
    runner = Runner(lm)
    full = torch.ones(2, 16, dtype=torch.bool, device="cuda")
    assert runner._mask(full, full, 0) is None
    emb = torch.randn(2, 16, lm.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    out = runner.generate(emb, max_new_tokens=4)
    assert out.sequences.shape == (2, 4)


def test_bf16_agrees_with_fp32_on_most_greedy_tokens():
    lm32 = cuda_lm("qwen3")
    lm16 = cuda_lm("qwen3", torch.bfloat16)
    emb, mask, vis = (t.cuda() for t in layout_batch(lm32, LAYOUTS, seed=5))
    a = Runner(lm32, [FastV(layer=2, keep=0.5)]).generate(emb, mask, vis, max_new_tokens=4).sequences
    b = Runner(lm16, [FastV(layer=2, keep=0.5)]).generate(emb.bfloat16(), mask, vis, max_new_tokens=4).sequences
    assert torch.isfinite(emb).all() and b.shape == a.shape
    assert (a[:, 0] == b[:, 0]).float().mean() >= 2 / 3


def test_bench_on_cuda_counts_the_schedule(tmp_path):
    from compactvl.bench import BenchSettings, load_bench_model, parse_method, run_bench

    model = load_bench_model(llm="qwen3-0.6b", device="cuda", dtype="bfloat16")
    methods = [parse_method(m) for m in ("vanilla", "keep:0.25", "fastv:layer=2,keep=0.5")]
    report = run_bench(model, methods, BenchSettings(visual=[64], text=16, batch=[2], warmup=1, repeats=2,
                                                     decode_tokens=2), progress=False)
    assert all(r["schedule"]["matches"] is not False for r in report["results"])
    assert all(r["prefill_ms"]["median"] > 0 for r in report["results"])
