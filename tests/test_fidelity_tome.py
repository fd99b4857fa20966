"""Reference fidelity of the merge ops: on the same seeded tensors, the merged features, sizes, token order and counts
of ``bipartite_merge`` and the outputs of ``resampler`` equal an independent transcription of the public reference
code (written from the reference; nothing of it is imported or copied):

* ToMe: facebookresearch/ToMe, ``tome/merge.py``, ``bipartite_soft_matching`` (cosine of the normalised metric, A =
  even / B = odd tokens, ``node_max.argsort(descending=True)``, top-r edges merge, output ``cat([unm, dst])``) and
  ``merge_wavg`` (``merge(x * size, "sum") / merge(size, "sum")``).
* Perceiver Resampler: mlfoundations/open_flamingo, ``open_flamingo/src/helpers.py``, ``PerceiverAttention.forward``
  (keys/values over ``cat(norm_media(x), norm_latents(latents))``, no biases, ``dim_head·heads`` inner width),
  ``FeedForward`` (LN, Linear, GELU, Linear, no biases) and ``PerceiverResampler.forward`` (residual attention then
  residual FFN per layer, final LayerNorm).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compactvl.errors import ConfigError
from compactvl.ops import build_ops
from compactvl.tokens import Tokens


# ----------------------------------------------------------------------------------------------- ToMe
def tome_pass(metric, r):
    """``bipartite_soft_matching(metric, r)`` (no class / distill token): the index tensors its merge closes over."""
    t = metric.shape[1]
    r = min(r, t // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_wavg(merge, x, size=None):
    """``merge_wavg``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_reference(x, rs):
    """Successive ToMe passes (one per ViT block in the reference) with metric = the current tokens."""
    size = None
    for r in rs:
        x, size = tome_wavg(tome_pass(x, r), x, size)
    return x, size[..., 0]


@pytest.mark.parametrize("N,knob,rs", [(21, dict(r=7), [7]), (20, dict(r=10), [10]), (16, dict(ratio=0.25), [4]),
                                       (21, dict(ratio=0.8), [10, 5, 1])])
def test_bipartite_merge_equals_tome_reference(N, knob, rs):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, 8, generator=g, dtype=torch.float64)
    out = build_ops([{"op": "bipartite_merge", **knob}], [8])(Tokens.from_grid(x, (1, N)))
    ref_x, ref_size = tome_reference(x, rs)
    assert out.kept_counts().tolist() == [N - sum(rs)] * 3 == [ref_x.shape[1]] * 3
    torch.testing.assert_close(out.x, ref_x, atol=1e-6, rtol=1e-6)  # same order: cat([unm, dst]); sizes are float32
    torch.testing.assert_close(out.size, ref_size.to(out.size.dtype), atol=1e-12, rtol=0)


def test_bipartite_merge_padded_batch_equals_tome_reference_per_sample():
    """Samples with different counts in one padded batch: each equals the reference run on that sample alone."""
    g = torch.Generator().manual_seed(5)
    counts = [20, 13, 8]
    x = torch.randn(3, 20, 6, generator=g, dtype=torch.float64)
    full = Tokens.from_grid(x, (4, 5))
    batched = full.select(torch.arange(20).expand(3, 20), torch.arange(20) < torch.tensor(counts)[:, None])
    out = build_ops([{"op": "bipartite_merge", "ratio": 0.4}], [6])(batched)
    for b, n in enumerate(counts):
        r = int(0.4 * n)
        ref_x, ref_size = tome_reference(x[b:b + 1, :n], [r])
        k = n - r
        assert int(out.kept_counts()[b]) == k and not out.mask[b, k:].any()
        torch.testing.assert_close(out.x[b, :k], ref_x[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.size[b, :k], ref_size[0].to(out.size.dtype), atol=1e-12, rtol=0)


def test_bipartite_merge_original_order_option_is_a_permutation_of_the_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 15, 4, generator=g, dtype=torch.float64)
    t = Tokens.from_grid(x, (3, 5))
    ref = build_ops([{"op": "bipartite_merge", "r": 6}], [4])(t)
    orig = build_ops([{"op": "bipartite_merge", "r": 6, "order": "original"}], [4])(t)
    for b in range(2):
        # same merged set, different order: the original-order output is sorted by each group's surviving token
        # (its B token when something merged into it, else the group's single token)
        groups = [torch.nonzero(orig.assign[b] == j).flatten().tolist() for j in range(9)]
        survivor = [([m for m in g if m % 2 == 1] or g)[0] for g in groups]
        assert survivor == sorted(survivor)
        perm = [int(ref.assign[b, orig.assign[b] == j][0]) for j in range(9)]
        torch.testing.assert_close(orig.x[b], ref.x[b, perm])
        torch.testing.assert_close(orig.size[b], ref.size[b, perm])
    assert not torch.equal(orig.x, ref.x)  # the two orders really differ on this input
    with pytest.raises(ConfigError, match=r"bipartite_merge: order='sorted'; use 'tome'"):
        build_ops([{"op": "bipartite_merge", "order": "sorted"}], [4])


# ----------------------------------------------------------------------------------------------- resampler
def perceiver_reference(x, latents, layers, final_norm, heads, dim_head):
    """``PerceiverResampler.forward`` for one image (T = F = 1, no frame / media-time embeddings), with the weights
    of compactvl's layers plugged into the reference's modules (``to_kv`` = [k; v] stacked)."""
    for lay in layers:
        # PerceiverAttention.forward
        xm = F.layer_norm(x, x.shape[-1:], lay.ln_x.weight, lay.ln_x.bias, lay.ln_x.eps)
        lt = F.layer_norm(latents, x.shape[-1:], lay.ln_q.weight, lay.ln_q.bias, lay.ln_q.eps)
        q = lt @ lay.q.weight.T
        kv_input = torch.cat((xm, lt), dim=-2)
        to_kv = torch.cat((lay.k.weight, lay.v.weight), dim=0)
        k, v = (kv_input @ to_kv.T).chunk(2, dim=-1)
        q, k, v = (t.view(t.shape[0], heads, dim_head).transpose(0, 1) for t in (q, k, v))
        q = q * dim_head ** -0.5
        sim = q @ k.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(latents.shape[0], heads * dim_head)
        latents = out @ lay.o.weight.T + latents
        # FeedForward: LayerNorm, Linear(bias=False), GELU, Linear(bias=False)
        h = F.layer_norm(latents, x.shape[-1:], lay.ln_f.weight, lay.ln_f.bias, lay.ln_f.eps)
        latents = F.gelu(h @ lay.mlp[0].weight.T) @ lay.mlp[2].weight.T + latents
    return F.layer_norm(latents, x.shape[-1:], final_norm.weight, final_norm.bias, final_norm.eps)


@pytest.mark.parametrize("depth,heads,dim_head", [(1, 2, 5), (3, 4, 64)])
def test_resampler_equals_perceiver_reference(depth, heads, dim_head):
    torch.manual_seed(0)
    counts = [12, 7]
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    full = Tokens.from_grid(x, (3, 4))
    batched = full.select(torch.arange(12).expand(2, 12), torch.arange(12) < torch.tensor(counts)[:, None])
    pipe = build_ops([{"op": "resampler", "num_queries": 5, "heads": heads, "dim_head": dim_head, "depth": depth}],
                     [6]).double()
    op = pipe.ops[0]
    net = op.nets["0"]
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so every norm is exercised
        for p in net.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
        out = pipe(batched)
        assert all(lay.q.bias is None and lay.mlp[0].bias is None for lay in net["layers"])  # reference: no biases
        assert out.kept_counts().tolist() == [5, 5]
        for b, n in enumerate(counts):
            ref = perceiver_reference(x[b, :n], op.queries_0, net["layers"], net["out"], heads, dim_head)
            torch.testing.assert_close(out.x[b], ref, atol=1e-10, rtol=1e-10)
        # the padded batch equals each sample alone
        torch.testing.assert_close(out.size.sum(1), torch.tensor([12.0, 7.0], dtype=out.size.dtype))


def test_resampler_options_change_the_computation_and_bad_knobs():
    torch.manual_seed(1)
    t = Tokens.from_grid(torch.randn(1, 9, 4, dtype=torch.float64), (3, 3))
    spec = {"op": "resampler", "num_queries": 3, "heads": 2, "dim_head": 2}
    ref = build_ops([spec], [4]).double()
    alt = build_ops([{**spec, "kv_latents": False}], [4]).double()
    alt.load_state_dict(ref.state_dict())
    assert not torch.allclose(ref(t).x, alt(t).x)  # attending to the latents too changes the output
    with_bias = build_ops([{**spec, "bias": True}], [4])
    assert with_bias.ops[0].nets["0"]["layers"][0].q.bias is not None
    with pytest.raises(ConfigError, match=r"resampler: kv_latents='yes' must be true or false"):
        build_ops([{**spec, "kv_latents": "yes"}], [4])
    with pytest.raises(ConfigError, match=r"resampler: query_init_std=0 must be a number > 0"):
        build_ops([{**spec, "query_init_std": 0}], [4])
    with pytest.raises(ConfigError, match=r"resampler: heads=3 must divide dim=4 when dim_head is not given"):
        build_ops([{"op": "resampler", "heads": 3, "dim_head": None}], [4])
