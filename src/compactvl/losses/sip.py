"""Structure Information Preservation, SIP — VEN-VL ("A Visual Ensemble MoE Framework for Effective and Efficient
Multi-Modal Understanding"), Sec. 3.4, eqs. 9-12 (restated in /work/shared/papers/README.md): the loss math.

After in-LLM pruning (HTE or any other pruning policy), the visual tokens that survive reconstruct the pruned ones by
parameter-free propagation, and the reconstruction of the whole visual grid is supervised against the original
visual features after FSQ quantization:

    Z⁽⁰⁾ = P(pos)                                      pruned slots: structural embedding of their grid position
    K = V + P(pos_R),  V = LN(H_R)                     retained tokens: hidden states (layer norm, no affine) at
                                                       the capture layer, keys carry their own position embedding
    A⁽ᵗ⁾ = softmax(topk_k(Z⁽ᵗ⁾ Kᵀ / τ))                 (9)  over the retained tokens of the same sample
    Z⁽ᵗ⁺¹⁾ = α · A⁽ᵗ⁾ V + (1 − α) · Z⁽⁰⁾                (10) t = 0..T−1
    X̂ = W_p [V at retained slots, Z⁽ᵀ⁾ at pruned slots]   (11) the only learned part (Linear D → D, or → FSQ dims)
    L_SIP = mean over visual slots of ‖X̂ − FSQ(X)‖² / d   (12) X = the LM's input visual features (detached)

P is a 2-D sinusoidal embedding (row and column each take a quarter of the channels as sin and a quarter as cos of
position · 10000^(−i/(D/4)); the paper says "RoPE": RoPE applied to a constant vector is such a sinusoid). Keys
carrying P(pos_R) is our reading (the text leaves K unspecified): it makes the first affinity spatial — a pruned slot
starts from its neighbours — and later ones also semantic, as Z⁽ᵗ⁾ fills with content.

This module is the math only, on tensors: the layer policy that records the original visual rows before layer 0 and
computes the loss after the capture layer (registered as ``sip``) is ``compactvl.policies.sip.SIP``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tokens import mask_to_index


def sinusoidal_2d(pos: Tensor, dim: int) -> Tensor:
    """``[..., 2]`` (row, col) → ``[..., dim]``: [sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)], ω_i = 10000^(−i/q),
    q = dim // 4 (zero-padded to ``dim``)."""
    q = dim // 4
    omega = 10000.0 ** (-torch.arange(q, device=pos.device, dtype=torch.float32) / max(q, 1))
    r = pos[..., :1].float() * omega
    c = pos[..., 1:2].float() * omega
    out = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1)
    return F.pad(out, (0, dim - 4 * q))


def propagate(z0: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, alpha: float, iterations: int,
              topk: int, tau: float) -> Tensor:
    """Eqs. 9-10, batched: ``z0 [B, P, D]`` queries, ``keys``/``values [B, R, D]`` with ``key_mask [B, R]``.
    Rows of a sample without any valid key get A = 0 (Z = (1 − α) Z⁽⁰⁾)."""
    z = z0
    k = min(int(topk), keys.shape[1])
    for _ in range(iterations):
        s = (z @ keys.transpose(1, 2) / tau).masked_fill(~key_mask[:, None, :], float("-inf"))
        top, idx = s.topk(k, dim=-1)
        w = torch.softmax(top, dim=-1)
        w = torch.where(torch.isfinite(top).any(-1, keepdim=True), w, torch.zeros_like(w))
        a = torch.zeros_like(s).scatter(-1, idx, w)
        z = alpha * (a @ values) + (1 - alpha) * z0
    return z


visual_slots = mask_to_index  # [B, N] row index of each sample's visual rows in order (N = most), and validity


def row_major_positions(valid: Tensor) -> Tensor:
    """``[B, N, 2]`` (row, col) of each sample's ``valid [B, N]`` slots laid row-major on a ⌈√n⌉-wide grid: the
    positions used when no grid position is known."""
    B, N = valid.shape
    n = valid.sum(-1, keepdim=True)
    side = torch.ceil(torch.sqrt(n.double())).clamp_min(1).long()
    j = torch.arange(N, device=valid.device).expand(B, N)
    return torch.stack([j // side, j % side], -1).float()


def reconstruct_slots(slot_orig: Tensor, slot_valid: Tensor, slot_pos: Tensor, hidden: Tensor, orig_index: Tensor,
                      visual: Tensor, alpha: float, iterations: int, topk: int, tau: float) -> tuple[Tensor, Tensor]:
    """Eqs. 9-11 before the head W_p: ``[V at retained slots, Z⁽ᵀ⁾ at pruned slots]`` (``[B, N, D]`` float32) and
    the retained mask ``[B, N]``.

    The N recorded visual slots of each sample are given by their original index ``slot_orig [B, N]`` (-1 where
    ``slot_valid`` is False) and grid position ``slot_pos [B, N, 2]``; the surviving rows at the capture layer by
    ``hidden [B, L', D]``, ``orig_index [B, L']`` and ``visual [B, L']`` (real visual rows). Survivors are matched to
    their slots by original index."""
    B, N = slot_orig.shape
    D = hidden.shape[-1]
    hit = (orig_index[:, :, None] == slot_orig[:, None, :]) & visual[:, :, None] & slot_valid[:, None, :]
    found = hit.any(-1)  # [B, L'] surviving visual rows that map to a slot
    slot = hit.float().argmax(-1)
    retained = torch.zeros(B, N + 1, dtype=torch.bool, device=slot.device).scatter(
        1, torch.where(found, slot, N), found)[:, :N]
    h = F.layer_norm(hidden.float(), (D,))
    v = torch.zeros(B, N + 1, D, device=h.device).scatter(
        1, torch.where(found, slot, N)[..., None].expand(-1, -1, D), h * found[..., None])[:, :N]
    pe = sinusoidal_2d(slot_pos, D)
    z = propagate(pe, v + pe, v, retained, alpha, iterations, topk, tau)
    return torch.where(retained[..., None], v, z), retained


def sip_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Eq. 12: mean over the valid slots of ‖pred − target‖² / d (``pred``, ``target [B, N, d]``, ``valid [B, N]``)."""
    err = (pred.float() - target).pow(2).mean(-1)
    return (err * valid).sum() / valid.sum().clamp_min(1)
