"""Structure Information Preservation, SIP — VEN-VL ("A Visual Ensemble MoE Framework for Effective and Efficient
Multi-Modal Understanding"), Sec. 3.4, eqs. 9-12 (restated in /work/shared/papers/README.md).

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
starts from its neighbours — and later ones also semantic, as Z⁽ᵗ⁾ fills with content. ``target="mse"`` regresses
X itself (the paper's "SIP + MSE" ablation).

Design: SIP is a LayerPolicy (``sip``), since it needs the Runner's between-layer view: ``before_layer(0)`` records
the original visual rows X (``state.hidden`` where ``state.visual``), their original indices and grid positions;
``after_layer(layer)`` (default: the last decoder layer) takes the retained visual rows and their hidden states,
matches them to the recorded slots by ``state.orig_index``, propagates, and appends ``weight · L_SIP`` to
``state.signals["aux_losses"]`` (CompactVLM adds those to its loss). It acts only while training (policy in train
mode and grad enabled); prefills for generation or evaluation skip it. It needs a pruning policy listed after it
(a ``ConfigError`` otherwise). The head W_p is created in ``check`` from the LM's hidden size; the VLM must register
its policies as submodules for the head to train and be saved.

Grid positions: ``state.signals["visual_pos"]`` ([B, L, 2] row/col for every input row: the pre-LLM
``Tokens.pos``, merged centres after merging ops such as MKE; ``CompactVLM.forward`` passes it); without it (a bare
Runner) each sample's visual tokens are laid row-major on a ⌈√n⌉-wide grid in sequence order.

Knobs: ``iterations`` T (3), ``alpha`` α (0.8, the paper's best), ``topk`` k (8), ``tau`` τ (√D), ``target``
("fsq" | "mse"), ``levels`` (5, FSQ levels per dimension), ``fsq_dim`` (None: channel-wise), ``weight`` (1.0),
``layer`` (capture layer, default the last).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..measure.macs import register_schedule
from ..registry import POLICIES
from ..runner import LayerPolicy, RunState
from .fsq import FSQ

TARGETS = ("fsq", "mse")


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


def _visual_slots(vis: Tensor) -> tuple[Tensor, Tensor]:
    """Row index ``[B, N]`` of each sample's visual rows in order (N = most visual rows) and their validity."""
    counts = vis.sum(-1)
    N = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~vis).long(), dim=-1, stable=True).indices[:, :N]
    valid = torch.arange(N, device=vis.device) < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


@POLICIES.register("sip")
class SIP(LayerPolicy):
    def __init__(self, iterations: int = 3, alpha: float = 0.8, topk: int = 8, tau: float | None = None,
                 target: str = "fsq", levels: Any = 5, fsq_dim: int | None = None, weight: float = 1.0,
                 layer: int | None = None):
        super().__init__()
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        whole = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        if not whole(iterations) or iterations < 1:
            raise ConfigError(f"sip: iterations={iterations!r} must be a whole number >= 1 (T propagation steps)")
        if not num(alpha) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"sip: alpha={alpha!r} is the propagation factor α, a number in [0, 1] (0.8 is the "
                              f"paper's best)")
        if not whole(topk) or topk < 1:
            raise ConfigError(f"sip: topk={topk!r} must be a whole number >= 1 (retained tokens each slot attends to)")
        if tau is not None and (not num(tau) or tau <= 0):
            raise ConfigError(f"sip: tau={tau!r} must be a number > 0 (or leave it out for √D)")
        if target not in TARGETS:
            raise ConfigError(f"sip: target={target!r}; use 'fsq' (the paper's supervision) or 'mse' (raw features)")
        if not num(weight) or weight < 0:
            raise ConfigError(f"sip: weight={weight!r} must be a number >= 0")
        if layer is not None and (not whole(layer) or layer < 0):
            raise ConfigError(f"sip: layer={layer!r} must be a decoder layer index >= 0 (or leave it out: the last)")
        self.iterations, self.alpha, self.topk, self.tau = iterations, float(alpha), topk, tau
        self.target, self.levels, self.fsq_dim = target, levels, fsq_dim
        self.weight, self.layer = float(weight), layer
        self.head: nn.Linear | None = None
        self.fsq: FSQ | None = None
        self.last_loss: Tensor | None = None
        self.reset()

    # ---- setup
    def check(self, runner) -> None:
        from ..policies.base import ScorePolicy

        mine = [i for i, p in enumerate(runner.policies) if p is self]
        pruners = [i for i, p in enumerate(runner.policies) if isinstance(p, ScorePolicy)]
        if not pruners:
            raise ConfigError("sip reconstructs the visual tokens a pruning policy dropped, but this model has no "
                              "pruning policy; add one after sip (e.g. {policy: hte, threshold: 0.3} with hte "
                              "experts, or fastv / pyramiddrop), or drop sip from the recipe")
        if mine and min(pruners) < mine[0]:
            raise ConfigError("sip must come before the pruning policies in the policy list (it records the original "
                              "visual tokens before layer 0); move {policy: sip} first")
        L = runner.num_layers
        if self.layer is not None and self.layer >= L:
            raise ConfigError(f"sip: layer={self.layer} is outside this LM's decoder layers 0..{L - 1}")
        D = runner.config.hidden_size
        ref = next(runner.lm.parameters())
        out = D if self.target == "mse" or self.fsq_dim is None else self.fsq_dim
        if self.fsq is None and self.target == "fsq":
            self.fsq = FSQ(self.levels, self.fsq_dim, D if self.fsq_dim is not None else None).to(ref.device)
        if self.head is None or self.head.in_features != D:
            self.head = nn.Linear(D, out).to(device=ref.device, dtype=ref.dtype)

    @property
    def active(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def reset(self) -> None:
        self._orig: dict[str, Tensor] | None = None

    # ---- hooks
    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if layer_idx == 0:
            self._orig = None
            if self.active and bool((state.visual & state.mask).any()):
                if self.head is None:
                    self.check(runner)
                if self.head.weight.device != state.hidden.device:  # a VLM moved after the Runner was built
                    self.to(state.hidden.device)  # in place: optimizer references stay valid
                self._orig = self._record(state)
        return state

    def after_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        last = runner.num_layers - 1 if self.layer is None else self.layer
        if layer_idx == last and self._orig is not None:
            loss = self.loss(state)
            self.last_loss = loss.detach()
            state.signals.setdefault("aux_losses", []).append(self.weight * loss)
            self._orig = None
        return state

    # ---- the computation
    def _record(self, state: RunState) -> dict[str, Tensor]:
        vis = state.visual & state.mask
        rows, valid = _visual_slots(vis)
        B, N = rows.shape
        D = state.hidden.shape[-1]
        x = state.hidden.gather(1, rows[..., None].expand(B, N, D)).detach()
        pos = state.signals.get("visual_pos")  # over the input rows: index it by each row's original index
        if pos is not None:
            src = state.orig_index.gather(1, rows).clamp_min(0)
            pos = pos.to(x.device).float().gather(1, src[..., None].expand(B, N, 2))
        else:  # row-major on a ceil(sqrt(n))-wide grid, per sample
            n = valid.sum(-1, keepdim=True)
            side = torch.ceil(torch.sqrt(n.double())).clamp_min(1).long()
            j = torch.arange(N, device=x.device).expand(B, N)
            pos = torch.stack([j // side, j % side], -1).float()
        orig = state.orig_index.gather(1, rows).masked_fill(~valid, -1)
        return {"x": x, "valid": valid, "pos": pos, "orig": orig}

    def reconstruct(self, state: RunState) -> tuple[Tensor, Tensor, Tensor]:
        """(X̂ [B, N, d] for every recorded visual slot, retained mask [B, N], valid mask [B, N])."""
        o = self._orig
        B, N = o["orig"].shape
        D = state.hidden.shape[-1]
        # slot of every surviving visual row, by original index
        vis = state.visual & state.mask
        hit = (state.orig_index[:, :, None] == o["orig"][:, None, :]) & vis[:, :, None] & o["valid"][:, None, :]
        found = hit.any(-1)  # [B, L'] surviving visual rows that map to a slot
        slot = hit.float().argmax(-1)
        retained = torch.zeros(B, N + 1, dtype=torch.bool, device=slot.device).scatter(
            1, torch.where(found, slot, N), found)[:, :N]
        h = F.layer_norm(state.hidden.float(), (D,))
        v = torch.zeros(B, N + 1, D, device=h.device).scatter(
            1, torch.where(found, slot, N)[..., None].expand(-1, -1, D), h * found[..., None])[:, :N]
        pe = sinusoidal_2d(o["pos"], D)
        z = propagate(pe, v + pe, v, retained, self.alpha, self.iterations, self.topk,
                      self.tau if self.tau is not None else math.sqrt(D))
        full = torch.where(retained[..., None], v, z)
        return self.head(full.to(self.head.weight.dtype)), retained, o["valid"]

    def targets(self) -> Tensor:
        x = self._orig["x"]
        return self.fsq(x) if self.target == "fsq" else x.float()

    def loss(self, state: RunState) -> Tensor:
        pred, _, valid = self.reconstruct(state)
        err = (pred.float() - self.targets()).pow(2).mean(-1)
        return (err * valid).sum() / valid.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, alpha={self.alpha}, topk={self.topk}, tau={self.tau}, "
                f"target={self.target}, weight={self.weight}, layer={self.layer}")


@register_schedule("sip", "VEN-VL SIP: a training loss that keeps and drops no token, so alone every layer sees every "
                   "token; count the pruning policy it accompanies")
def _sip_schedule(num_layers: int, visual: int, text: int) -> list[int]:
    return [visual] * num_layers
