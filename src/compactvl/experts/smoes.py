"""SMoES — Soft Modality-guided Expert Specialization (Bo et al., "SMoES: Soft Modality-Guided Expert Specialization
in MoE-VLMs", arXiv:2604.23996, CVPR 2026): soft modality scores, expert bins aligned with the expert-parallel (EP)
placement, and an inter-bin mutual-information regulariser on the router, for the MoE LMs compactvl runs (Qwen2-MoE /
Qwen3-MoE style sparse blocks with a router ``mlp.gate``, and compactvl's ``hte`` visual experts).

Per regularised MoE layer, over its N routed rows (probabilities g_n ∈ Δ^E, router input x_n):

    bins       β(e) = ⌊e·M/E⌋                     (M bins = M EP devices; contiguous expert shards, the placement
                                                   Megatron / DeepSpeed EP use: experts [r·E/M, (r+1)·E/M) on rank r)
    bin probs  q_n(b) = Σ_{e: β(e)=b} g_n(e)
    modality   s_n ∈ [0, 1] (soft "visual-ness"), r_n = (s_n, 1 − s_n)
    joint      p(b, m) = 1/N Σ_n q_n(b) r_n(m),  p(b) = Σ_m p(b, m),  p(m) = Σ_b p(b, m)
    MI         I(B; M) = Σ_{b,m} p(b, m) log( p(b, m) / (p(b) p(m)) )
    loss       L_SMoES = −λ · I(B; M)             (added to the task loss in training; maximising the MI makes
                                                   each bin — each device — specialise in one modality)

Soft modality scores (``score``): ``"gaussian"`` (default) — the paper's Gaussian-statistics score, read as: fit a
diagonal Gaussian to the layer's visual rows and one to its text rows (the batch's real rows of the router input),
and s_n = σ((ℓ_v(x_n) − ℓ_t(x_n)) / τ) with ℓ the per-dimension *mean* log-likelihood (a mean, not a sum, so the
score stays soft in high dimension; τ = ``temperature``); a batch without text (or without visual) rows falls back to
the hard labels. ``"hard"``: s_n = 1 for visual rows, 0 for text (the hard-routing prior, an ablation). The scores
are statistics, not learned: they carry no gradient, the MI's gradient goes to the router. The paper's attention-based
score and its exact Gaussian form are not in the public text; this is the simplest faithful reading. On ``hte``
experts only visual rows are routed (VEN-VL's m(x)), so there the MI is over visual rows whose soft scores differ.

Expert-parallel check without a cluster: :func:`dispatches` counts, for a simulated placement (expert → device), the
token copies an EP all-to-all sends (a token goes once to each device holding one of its top-k experts), and
:func:`cross_bin_dispatches` those beyond a token's first device (or beyond its ``home`` device); the policy records
both for the binned (``placement(E, M, "contiguous")``, aligned with the bins) and a bin-unaware placement
(``"round_robin"``, e ↦ e mod M) in ``policy.report()``, with the MI per layer.

The policy ``smoes`` (``policies: [{policy: smoes, ...}]``) hooks the chosen routers during each prefill (like
``hte_native``'s ``RouterTap``; nothing is replaced) and appends L_SMoES to ``state.signals.aux_losses`` when grad is
enabled and the router is in training mode. Knobs: ``layers`` (None = every MoE / hte layer, or a list of 0-based
indices), ``num_bins`` M (2; must divide E), ``weight`` λ (0.01), ``score`` ("gaussian" | "hard"), ``temperature``
τ (1.0). Unsupported LMs (no MoE router, e.g. a dense Llama) get a ConfigError naming what is supported.
MACs: the forward is unchanged (0 MACs at inference: the router's own logits are reused); in training the
regulariser adds N·E·M (bin sums) + 2·N·M (joint) matrix-product MACs per layer (:func:`smoes_macs`).
Batches: I(B; M) and the Gaussian statistics are batch statistics (like the load-balancing loss), so they are not
per sample; the forward and the per-token dispatch counts are, and the counts add up over a batch.
"""
from __future__ import annotations

import math
import weakref
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import POLICIES
from ..runner import LayerPolicy, RunState
from .hte import HTEMoE
from .moe import decoder_layers
from .native_moe import native_top_k, router_module

SCORES = ("gaussian", "hard")
PLACEMENTS = ("contiguous", "round_robin")


# ----------------------------------------------------------------------------------------------- binning
def check_bins(num_experts: int, num_bins: Any) -> int:
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
        raise ConfigError(f"smoes: num_bins={num_bins!r} must be a whole number >= 1 (the expert-parallel devices)")
    if num_experts % num_bins:
        ok = [m for m in range(1, num_experts + 1) if num_experts % m == 0]
        raise ConfigError(f"smoes: num_bins={num_bins} does not divide the {num_experts} experts; expert-parallel "
                          f"placement puts E/M experts on each device, use one of {ok}")
    return num_bins


def placement(num_experts: int, num_bins: int, kind: str = "contiguous") -> Tensor:
    """``[E]`` long: the bin (device) of each expert. ``contiguous``: e·M // E (SMoES's bins = EP shards);
    ``round_robin``: e mod M (a placement that ignores the bins)."""
    check_bins(num_experts, num_bins)
    e = torch.arange(num_experts)
    if kind == "contiguous":
        return e * num_bins // num_experts
    if kind == "round_robin":
        return e % num_bins
    raise ConfigError(f"smoes: placement {kind!r}; use one of {', '.join(PLACEMENTS)}")


def bin_probs(probs: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """``[N, M]`` q_n(b) = Σ_{e in bin b} g_n(e) for ``probs [N, E]`` and ``bins [E]``."""
    onehot = torch.nn.functional.one_hot(bins.to(probs.device), num_bins).to(probs.dtype)
    return probs @ onehot


# ----------------------------------------------------------------------------------------------- MI
def mutual_information(q: Tensor, s: Tensor, eps: float = 1e-9) -> Tensor:
    """I(B; M) in nats for bin probabilities ``q [N, M]`` and soft modality scores ``s [N]`` (module docstring)."""
    if q.shape[0] == 0:
        return q.sum() * 0.0
    r = torch.stack([s, 1 - s], -1).to(q.dtype)  # [N, 2]
    joint = q.transpose(0, 1) @ r / q.shape[0]  # [M, 2]
    pb, pm = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return (joint * (torch.log(joint + eps) - torch.log(pb * pm + eps))).sum()


def smoes_loss(probs: Tensor, s: Tensor, bins: Tensor, num_bins: int, weight: float) -> tuple[Tensor, Tensor]:
    """(−λ·I(B; M), I(B; M)) for router probabilities ``probs [N, E]`` and scores ``s [N]``."""
    mi = mutual_information(bin_probs(probs, bins, num_bins), s.detach())
    return -weight * mi, mi


def smoes_macs(rows: int, num_experts: int, num_bins: int) -> int:
    """Matrix-product MACs the regulariser adds per layer in training (bin sums + joint); 0 at inference."""
    return rows * num_experts * num_bins + 2 * rows * num_bins


# ----------------------------------------------------------------------------------------------- modality scores
def gaussian_modality_scores(x: Tensor, visual: Tensor, rows: Tensor | None = None, temperature: float = 1.0,
                             eps: float = 1e-5) -> Tensor:
    """Soft modality scores of ``x [N, D]`` (``visual [N]`` bool labels; ``rows [N]`` bool: the rows to score,
    default all): σ((ℓ_v − ℓ_t)/τ), ℓ the per-dimension mean diagonal-Gaussian log-likelihood under the visual / text
    rows' statistics. Without rows of one modality: the hard labels."""
    rows = torch.ones_like(visual) if rows is None else rows
    text = ~visual
    if not bool(visual.any()) or not bool(text.any()):
        return visual[rows].float()
    x = x.detach().float()

    def loglik(sel: Tensor) -> Tensor:
        mu = x[sel].mean(0)
        var = x[sel].var(0, unbiased=False) + eps
        return -0.5 * (((x[rows] - mu) ** 2 / var) + var.log() + math.log(2 * math.pi)).mean(-1)

    return torch.sigmoid((loglik(visual) - loglik(text)) / temperature)


# ----------------------------------------------------------------------------------------------- dispatch counts
def devices_per_token(index: Tensor, place: Tensor) -> Tensor:
    """``[N]``: distinct devices holding the top-k experts ``index [N, k]`` of each token under ``place [E]``."""
    dev = place.to(index.device)[index].sort(-1).values
    return 1 + (dev[:, 1:] != dev[:, :-1]).sum(-1)


def dispatches(index: Tensor, place: Tensor) -> int:
    """Token copies an EP all-to-all sends: each token once to each device holding one of its experts."""
    return int(devices_per_token(index, place).sum()) if index.shape[0] else 0


def cross_bin_dispatches(index: Tensor, place: Tensor, home: Tensor | None = None) -> int:
    """Dispatches that cross a bin boundary: per token, the devices beyond its first one (0 when all its experts
    share a device); with ``home [N]`` (each token's own device), the devices other than its home."""
    if index.shape[0] == 0:
        return 0
    if home is None:
        return int((devices_per_token(index, place) - 1).sum())
    dev = place.to(index.device)[index]  # [N, k]
    E = int(place.max()) + 1
    hit = torch.zeros(index.shape[0], max(E, int(home.max()) + 1), dtype=torch.bool, device=index.device)
    hit.scatter_(1, dev, torch.ones_like(dev, dtype=torch.bool))
    hit[torch.arange(index.shape[0], device=index.device), home.to(index.device)] = False
    return int(hit.sum())


# ----------------------------------------------------------------------------------------------- the policy
def smoes_layers(lm: nn.Module) -> dict[int, str]:
    """Decoder layers with a router SMoES can regularise: ``{layer: "native" | "hte"}``."""
    out = {}
    for i, layer in enumerate(decoder_layers(lm, "smoes")):
        if isinstance(layer.mlp, HTEMoE):
            out[i] = "hte"
        elif router_module(layer.mlp) is not None:
            out[i] = "native"
    return out


def num_experts_of(lm: nn.Module, layer: int, kind: str) -> int:
    mlp = decoder_layers(lm, "smoes")[layer].mlp
    if kind == "hte":
        return mlp.num_experts
    gate = router_module(mlp)
    n = getattr(gate, "num_experts", None) or getattr(lm.config, "num_experts", None)
    n = n or getattr(lm.config, "num_local_experts", None) or getattr(getattr(gate, "weight", None), "shape", [0])[0]
    return int(n)


@POLICIES.register("smoes")
class SMoES(LayerPolicy):
    method = "smoes"
    macs_help = ("SMoES: a router regulariser that keeps and drops no token and reuses the router's logits, so every "
                 "layer sees every token (its training-only MACs: experts.smoes.smoes_macs)")

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int) -> list[int]:
        return [visual] * num_layers

    def __init__(self, layers: Any = None, num_bins: int = 2, weight: float = 0.01, score: str = "gaussian",
                 temperature: float = 1.0):
        super().__init__()
        if layers is not None:
            seq = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(seq, (list, tuple)) or not seq or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in seq):
                raise ConfigError(f"smoes: layers={layers!r} must be a list of 0-based MoE layer indices (or leave it "
                                  f"out: every MoE layer)")
            layers = sorted(set(seq))
        if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
            raise ConfigError(f"smoes: num_bins={num_bins!r} must be a whole number >= 1 (the expert-parallel devices)")
        for knob, v in (("weight", weight), ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    knob == "temperature" and v == 0):
                raise ConfigError(f"smoes: {knob}={v!r} must be a number {'> 0' if knob == 'temperature' else '>= 0'}")
        if score not in SCORES:
            raise ConfigError(f"smoes: score={score!r}; use one of {', '.join(SCORES)}")
        self.layers, self.num_bins, self.weight = layers, num_bins, float(weight)
        self.score, self.temperature = score, float(temperature)
        self._handles: list[Any] = []
        self._runner = None
        self.chosen: dict[int, str] = {}
        self.reset()

    def reset(self) -> None:
        self.detach()
        self._inputs: dict[int, Tensor] = {}
        self.mi: dict[int, float] = {}
        self.counts: dict[int, dict[str, int]] = {}

    def check(self, runner) -> None:
        found = smoes_layers(runner.lm)
        if not found:
            kinds = sorted({type(layer.mlp).__name__ for layer in decoder_layers(runner.lm, "smoes")})
            raise ConfigError(f"smoes regularises MoE routers: Qwen2-MoE / Qwen3-MoE (Mixtral-style) sparse blocks "
                              f"with a router 'gate' and 'experts', or compactvl's hte visual experts; this "
                              f"{type(runner.lm).__name__} has only {', '.join(kinds)} MLPs: use an MoE LM or add "
                              f"experts: [{{expert: hte}}]")
        chosen = list(found) if self.layers is None else self.layers
        bad = [i for i in chosen if i not in found]
        if bad:
            raise ConfigError(f"smoes: layers {bad} have no MoE router; the MoE layers of this LM are {sorted(found)}")
        self.chosen = {i: found[i] for i in chosen}
        self.experts = {i: num_experts_of(runner.lm, i, k) for i, k in self.chosen.items()}
        for i in self.chosen:
            check_bins(self.experts[i], self.num_bins)
        self.top_k = {i: (decoder_layers(runner.lm, "smoes")[i].mlp.top_k if k == "hte" else native_top_k(runner.lm, i))
                      for i, k in self.chosen.items()}
        self._runner = weakref.ref(runner)

    # ---- hooks
    def attach(self, runner) -> None:
        self.detach()
        blocks = decoder_layers(runner.lm, "smoes")
        for i, kind in self.chosen.items():
            mlp = blocks[i].mlp
            router = mlp.router if kind == "hte" else router_module(mlp)
            self._handles.append(mlp.register_forward_pre_hook(partial(self._stash, i)))
            self._handles.append(router.register_forward_hook(partial(self._hook, i)))

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def _active(self, layer: int) -> RunState | None:
        runner = None if self._runner is None else self._runner()
        ctx = None if runner is None else runner.active
        return None if ctx is None or ctx.layer_idx != layer else ctx.state

    def _stash(self, layer: int, module: nn.Module, args: Any) -> None:
        if self._active(layer) is not None:
            self._inputs[layer] = args[0]

    def _hook(self, layer: int, module: nn.Module, args: Any, output: Any) -> None:
        state = self._active(layer)
        x = self._inputs.pop(layer, None)
        if state is None or x is None:
            return
        logits = output[0] if isinstance(output, (tuple, list)) else output
        real = state.mask
        routed = real & state.visual if self.chosen[layer] == "hte" else real
        logits = logits.reshape(-1, logits.shape[-1])
        if self.chosen[layer] == "native":  # the gate saw every row of the batch (padding too)
            logits = logits[routed.reshape(-1)]
        if logits.shape[0] != int(routed.sum()):
            raise ConfigError(f"smoes: the router of layer {layer} returned {logits.shape[0]} rows but "
                              f"{int(routed.sum())} were routed; only routers whose output (or its first element) "
                              f"is the logits [rows, experts] are supported")
        if self.score == "gaussian":
            s = gaussian_modality_scores(x[real], state.visual[real], routed[real], self.temperature)
        else:
            s = state.visual[routed].float()
        probs = torch.softmax(logits.float(), dim=-1)
        bins = placement(self.experts[layer], self.num_bins)
        loss, mi = smoes_loss(probs, s, bins, self.num_bins, self.weight)
        index = probs.detach().topk(self.top_k[layer], dim=-1).indices
        self.mi[layer] = float(mi.detach())
        self.counts[layer] = {
            "tokens": int(index.shape[0]),
            "binned": cross_bin_dispatches(index, bins),
            "round_robin": cross_bin_dispatches(index, placement(self.experts[layer], self.num_bins, "round_robin"))}
        if module.training and torch.is_grad_enabled() and self.weight > 0:
            state.signals.aux_losses.append(loss)

    def before_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if layer_idx == 0:
            if self._runner is None or self._runner() is not runner:
                self.check(runner)
            self.attach(runner)
        return state

    def after_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if layer_idx == runner.num_layers - 1:
            self.detach()
        return state

    def report(self) -> list[dict]:
        """Per regularised layer of the latest prefill: I(B; M) and the cross-bin dispatches of its top-k routing
        under the binned (contiguous) and a bin-unaware (round-robin) expert placement."""
        return [{"layer": i, "mi": self.mi[i], **self.counts[i]} for i in sorted(self.mi)]

    def extra_repr(self) -> str:
        return (f"layers={self.layers or 'all MoE'}, num_bins={self.num_bins}, weight={self.weight}, "
                f"score={self.score}, temperature={self.temperature}")
