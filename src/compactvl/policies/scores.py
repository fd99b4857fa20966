"""Attention scores without eager attention (docs/design.md, "Attention scores without eager attention").

A pruner that ranks tokens by the attention they receive needs a few rows of one layer's attention matrix, not the
whole matrix, and certainly not eager attention in every layer. For decoder layer ``i`` and the state entering it,
this module recomputes exactly what that layer's attention computes for the chosen query rows:

    x = input_layernorm(h);  q = RoPE(q_norm(q_proj(x[rows])));  k = RoPE(k_norm(k_proj(x)))
    A[b, h, r, j] = softmax_j( q[b,h,r]·k[b,h//G,j] · scaling  masked to j <= slot(r) and real keys j )

(``q_norm``/``k_norm`` only where the layer has them, e.g. Qwen3; RoPE in the rotate-half form of the Llama family,
with the (cos, sin) of the state's positions; ``G`` query heads share a key head under GQA; the softmax is taken in
float32 as transformers' eager attention does; multi-axis RoPE such as M-RoPE is refused with a ConfigError). The
model keeps running SDPA (or FlashAttention) in every layer; the cost is one key projection over the sequence plus the query rows asked for. ``tests/
test_policies.py`` checks these rows against ``attn_implementation="eager", output_attentions=True``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..runner import RunState
from ..tokens import mask_to_index


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the rotate-half form every supported family (Llama, Qwen2/3, Mistral) uses; ``x`` is
    ``[B, L, heads, head_dim]`` and ``cos``/``sin`` ``[B, L, head_dim]`` (one pass fewer than transposing first)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def check_attention_layer(runner, layer_idx: int, method: str) -> None:
    layer = runner.layers[layer_idx]
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj")) or not hasattr(layer, "input_layernorm"):
        raise ConfigError(f"{method} scores with decoder layer {layer_idx}'s attention, but that layer has no "
                          f"input_layernorm + self_attn.q_proj/k_proj; use a Llama-family LM (Llama, Qwen2/3, Mistral)")


def position_embeddings(runner, state: RunState) -> tuple[Tensor, Tensor]:
    """RoPE (cos, sin) for the state's positions; cached on the state so the layer reuses them."""
    if state.position_embeddings is None:
        state.position_embeddings = runner.base.rotary_emb(state.hidden, state.position_ids)
    return state.position_embeddings


def last_token_mask(state: RunState) -> Tensor:
    """``[B, L]`` bool marking each sample's last prompt row (``RunState.prompt``: the last real row in a prefill,
    the row before the answer when the forward holds one)."""
    prompt = state.prompt()
    L = prompt.shape[1]
    last = torch.where(prompt, torch.arange(L, device=prompt.device), -1).amax(-1)
    return (torch.arange(L, device=prompt.device) == last[:, None]) & prompt


class _QK:
    """The normed input and roped keys of one layer, from which roped queries for any rows are made."""

    def __init__(self, runner, layer_idx: int, state: RunState):
        layer = runner.layers[layer_idx]
        self.attn = attn = layer.self_attn
        cfg = runner.config
        self.heads = cfg.num_attention_heads
        self.head_dim = (getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
                         or cfg.hidden_size // self.heads)
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.cos, self.sin = position_embeddings(runner, state)
        if self.cos.dim() != 3:
            raise ConfigError(f"attention scores need one position axis (cos of shape [B, L, head_dim]), got cos of "
                              f"shape {tuple(self.cos.shape)}; multi-axis RoPE (M-RoPE) is not supported by the "
                              f"attention-based policies, use a ScorePolicy with another score")
        self.x = layer.input_layernorm(state.hidden)
        B, L, _ = self.x.shape
        k = attn.k_proj(self.x).view(B, L, -1, self.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        self.k = _rope(k, self.cos, self.sin).permute(0, 2, 3, 1)  # [B, KVH, hd, L] (a view: no copy)
        self.kv_heads = self.k.shape[1]
        self.key_mask = state.mask

    def probs(self, index: Tensor, valid: Tensor) -> Tensor:
        """``[B, H, Q, L]`` float32 attention of query slots ``index [B, Q]``; rows with ``valid`` False are 0."""
        B, L, D = self.x.shape
        Q = index.shape[1]
        xq = self.x.gather(1, index[..., None].expand(B, Q, D))
        q = self.attn.q_proj(xq).view(B, Q, -1, self.head_dim)
        if getattr(self.attn, "q_norm", None) is not None:
            q = self.attn.q_norm(q)
        hd = self.cos.shape[-1]
        rows = index[..., None].expand(B, Q, hd)
        q = _rope(q, self.cos.gather(1, rows), self.sin.gather(1, rows))
        G = self.heads // self.kv_heads  # query head h uses key head h // G (transformers' repeat_kv order)
        q = q.view(B, Q, self.kv_heads, G, self.head_dim).permute(0, 2, 3, 1, 4).reshape(B, self.kv_heads, G * Q, -1)
        logits = torch.matmul(q, self.k).view(B, self.heads, Q, L) * self.scaling
        keys = torch.arange(L, device=index.device)
        allowed = (keys <= index[..., None]) & self.key_mask[:, None, :]  # causal + real keys, [B, Q, L]
        allowed = allowed | ~valid[..., None]  # invalid rows: anything finite (zeroed below), no NaN
        p = torch.softmax(logits.float().masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        return p * valid[:, None, :, None]


def attention_rows(runner, layer_idx: int, state: RunState, query_index: Tensor,
                   valid: Tensor | None = None) -> Tensor:
    """Attention probabilities ``[B, heads, Q, L]`` (float32) of layer ``layer_idx`` for the query slots
    ``query_index [B, Q]`` of ``state`` (the state *entering* that layer), exactly what eager attention would give
    for those rows. Rows where ``valid [B, Q]`` is False are all zero."""
    if valid is None:
        valid = torch.ones_like(query_index, dtype=torch.bool)
    return _QK(runner, layer_idx, state).probs(query_index, valid)


def attention_received(runner, layer_idx: int, state: RunState, queries: Tensor, chunk: int = 256) -> Tensor:
    """``[B, L]``: the attention each row of ``state`` receives at layer ``layer_idx``, averaged over heads and over
    the query rows in ``queries [B, L]`` (bool; each sample's own rows). Query rows are processed ``chunk`` at a time,
    so asking for all rows never holds the full ``heads × L × L`` matrix. Samples without query rows get zeros."""
    qk = _QK(runner, layer_idx, state)
    index, valid = mask_to_index(queries & state.mask)
    B, L = state.mask.shape
    total = torch.zeros(B, L, dtype=torch.float32, device=state.hidden.device)
    for start in range(0, index.shape[1], chunk):
        p = qk.probs(index[:, start:start + chunk], valid[:, start:start + chunk])
        total += p.sum(dim=(1, 2))
    n = (valid.sum(-1) * qk.heads).clamp_min(1)
    return total / n[:, None]
