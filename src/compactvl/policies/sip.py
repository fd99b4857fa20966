"""The SIP layer policy (``sip``) — VEN-VL's Structure Information Preservation loss (Sec. 3.4, eqs. 9-12) wired
into the Runner. The math (propagation, reconstruction, the loss) is ``compactvl.losses.sip``; read its docstring
for the equations.

Design: SIP is a LayerPolicy since it needs the Runner's between-layer view: ``before_layer(0)`` records the original
visual rows X (``state.hidden`` where ``state.visual``), their original indices and grid positions;
``after_layer(layer)`` (default: the last decoder layer) takes the retained visual rows and their hidden states,
matches them to the recorded slots by ``state.orig_index``, propagates, and appends ``weight · L_SIP`` to
``state.signals.aux_losses`` (CompactVLM adds those to its loss). It acts only while training (policy in train
mode and grad enabled); prefills for generation or evaluation skip it. It needs a pruning policy listed after it
(a ``ConfigError`` otherwise). The head W_p is created in ``check`` from the LM's hidden size; the VLM must register
its policies as submodules for the head to train and be saved. ``target="mse"`` regresses X itself (the paper's
"SIP + MSE" ablation).

Grid positions: ``state.signals.visual_pos`` ([B, L, 2] row/col for every input row: the pre-LLM ``Tokens.pos``,
merged centres after merging ops such as MKE; ``CompactVLM.forward`` seeds it); without it (a bare Runner) each
sample's visual tokens are laid row-major on a ⌈√n⌉-wide grid in sequence order.

Knobs: ``iterations`` T (3), ``alpha`` α (0.8, the paper's best), ``topk`` k (8), ``tau`` τ (√D), ``target``
("fsq" | "mse"), ``levels`` (5, FSQ levels per dimension), ``fsq_dim`` (None: channel-wise), ``weight`` (1.0),
``layer`` (capture layer, default the last).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.fsq import FSQ
from ..losses.sip import reconstruct_slots, row_major_positions, sip_loss, visual_slots
from ..registry import POLICIES
from ..runner import LayerPolicy, RunState
from .base import ScorePolicy

TARGETS = ("fsq", "mse")


@POLICIES.register("sip")
class SIP(LayerPolicy):
    macs_help = ("VEN-VL SIP: a training loss that keeps and drops no token, so alone every layer sees every token; "
                 "count the pruning policy it accompanies")

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int) -> list[int]:
        return [visual] * num_layers

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
            state.signals.aux_losses.append(self.weight * loss)
            self._orig = None
        return state

    # ---- the computation
    def _record(self, state: RunState) -> dict[str, Tensor]:
        vis = state.visual & state.mask
        rows, valid = visual_slots(vis)
        B, N = rows.shape
        D = state.hidden.shape[-1]
        x = state.hidden.gather(1, rows[..., None].expand(B, N, D)).detach()
        pos = state.signals.visual_pos  # over the input rows: index it by each row's original index
        if pos is not None:
            src = state.orig_index.gather(1, rows).clamp_min(0)
            pos = pos.to(x.device).float().gather(1, src[..., None].expand(B, N, 2))
        else:  # row-major on a ceil(sqrt(n))-wide grid, per sample
            pos = row_major_positions(valid)
        orig = state.orig_index.gather(1, rows).masked_fill(~valid, -1)
        return {"x": x, "valid": valid, "pos": pos, "orig": orig}

    def reconstruct(self, state: RunState) -> tuple[Tensor, Tensor, Tensor]:
        """(X̂ [B, N, d] for every recorded visual slot, retained mask [B, N], valid mask [B, N])."""
        o = self._orig
        D = state.hidden.shape[-1]
        full, retained = reconstruct_slots(o["orig"], o["valid"], o["pos"], state.hidden, state.orig_index,
                                           state.visual & state.mask, self.alpha, self.iterations, self.topk,
                                           self.tau if self.tau is not None else math.sqrt(D))
        return self.head(full.to(self.head.weight.dtype)), retained, o["valid"]

    def targets(self) -> Tensor:
        x = self._orig["x"]
        return self.fsq(x) if self.target == "fsq" else x.float()

    def loss(self, state: RunState) -> Tensor:
        pred, _, valid = self.reconstruct(state)
        return sip_loss(pred, self.targets(), valid)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, alpha={self.alpha}, topk={self.topk}, tau={self.tau}, "
                f"target={self.target}, weight={self.weight}, layer={self.layer}")
