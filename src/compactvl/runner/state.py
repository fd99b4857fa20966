"""What the Runner carries between decoder layers, and the KV cache it fills.

``RunState`` holds, for a (left-padded) batch, the hidden states and for each slot its position id, whether it is a
real token, whether it is visual, and the index it had in the original input sequence. Pruning is
``state.select(keep)``: kept tokens stay in their original order, each sample's kept tokens are right-aligned and the
batch is re-padded on the left to the longest sample (so appended decode tokens line up). Nothing here loops over
samples or tokens in Python.

``RunnerCache`` is the KV cache: one key/value tensor per layer (layers may hold different lengths once tokens are
dropped), the matching key-validity mask per layer, and per layer the next position id of each sample (the largest
position in that layer plus one, so decoding continues correctly under both position policies). With multi-axis
positions (M-RoPE, ``[k, B, L]``) the largest position over all axes is taken and appended tokens get it on every
axis — what Qwen-VL's ``rope_deltas`` do in transformers' own generation.

``Signals`` is the typed per-forward record the modules and policies of one prefill share besides the hidden states
(router probabilities, auxiliary losses, grid positions, kept fractions, recycled tokens): every producer writes, and
every consumer reads, a named field.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

POSITION_POLICIES = ("keep", "compact")


def check_position_policy(policy: str) -> str:
    if policy not in POSITION_POLICIES:
        raise ConfigError(f"unknown position policy '{policy}'; use one of {', '.join(POSITION_POLICIES)}")
    return policy


def resolve_position_policy(policy: str, policies: Sequence[Any] = ()) -> str:
    """``"auto"``: the reference position policy of the policies (``LayerPolicy.reference_positions``: ``compact``
    when any of them renumbers, as PyramidDrop's and SparseVLM's references do; else ``keep``, FastV's in-place
    reference). ``"keep"`` / ``"compact"``: as given."""
    if policy == "auto":
        return "compact" if any(getattr(p, "reference_positions", None) == "compact" for p in policies) else "keep"
    return check_position_policy(policy)


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids 0..n-1 over the real tokens of each row (pads get 0)."""
    return ((mask.long().cumsum(-1) - 1) * mask).clamp_min(0)


@dataclass
class RouterSignal:
    """Routing distribution of one MoE layer, over the rows that layer saw (written by ``hte`` / ``mmoe`` expert
    modules and by ``experts.native_moe.RouterTap``; scored by the ``hte`` / ``hte_native`` pruning policies)."""

    probs: Tensor  # [B, L, E] float32 routing probabilities (0 on rows the router did not see), detached
    top_k: int  # experts each routed token selects
    orig_index: Tensor  # [B, L] original index of each row ``probs`` is over (``RunState.orig_index`` at that layer)
    source: str  # who routed: "hte" | "mmoe" | "native"


@dataclass
class RecycledTokens:
    """Tokens a pruning stage built from rows it deleted (SparseVLM's recycling), enough to rebuild them in a replay
    (``policies.sparsevlm.SparseVLMReplay``)."""

    layer: int  # the stage layer (first layer that sees the new tokens)
    members: Tensor  # [B, m] original index of each recycled row (a padding id where none)
    assign: Tensor  # [B, m] cluster of each member
    ids: Tensor  # [B, c] original index given to each new token (<= -2)
    valid: Tensor  # [B, c] bool: cluster exists
    centres: Tensor  # [B, c] original index of each cluster's centre row (a padding id where none)


@dataclass
class Signals:
    """What the modules and policies of one forward share besides the hidden states.

    Seeded by the caller of ``Runner.prefill(signals=...)`` (``visual_pos``), filled during the layer loop. ``select``
    shares one ``Signals`` between the old and the new state, so what is written before a drop is still there after.
    """

    visual_pos: Tensor | None = None  # [B, L, 2] (row, col) grid position of every input row (seeded; read by SIP)
    router: dict[int, RouterSignal] = field(default_factory=dict)  # per MoE layer: its routing distribution
    aux_losses: list[Tensor] = field(default_factory=list)  # training losses added to the task loss (balance, SIP)
    kept_fraction: dict[int, Tensor] = field(default_factory=dict)  # per hte stage layer: [B] kept visual fraction
    recycled: list[RecycledTokens] = field(default_factory=list)  # SparseVLM recycled tokens, in stage order
    # [B] long (seeded): the input slot where each sample's answer starts, when the forward also holds the answer
    # (training, scoring an answer); None: every row is prompt. Read through RunState.prompt().
    prompt_end: Tensor | None = None

    def copy(self) -> "Signals":
        """A record for a new forward holding what this one holds (new containers, the same tensors), so a forward
        never writes into its caller's seed."""
        return replace(self, router=dict(self.router), aux_losses=list(self.aux_losses),
                       kept_fraction=dict(self.kept_fraction), recycled=list(self.recycled))


@dataclass
class RunState:
    hidden: Tensor  # [B, L, D]
    position_ids: Tensor  # [B, L] (or [k, B, L] for multi-axis RoPE such as M-RoPE)
    mask: Tensor  # [B, L] bool: real token
    visual: Tensor  # [B, L] bool: visual token
    orig_index: Tensor  # [B, L] long: index in the input sequence, -1 for padding
    position_policy: str = "keep"
    position_embeddings: tuple[Tensor, Tensor] | None = None  # RoPE (cos, sin) for position_ids; None = stale
    signals: Signals = field(default_factory=Signals)  # per-forward record shared by modules and policies
    trace: list[tuple[int, Tensor]] = field(default_factory=list)  # (layer, orig indices kept [B, L']) per select

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def visual_counts(self) -> Tensor:
        return (self.visual & self.mask).sum(-1)

    def token_counts(self) -> Tensor:
        return self.mask.sum(-1)

    def prompt(self) -> Tensor:
        """``[B, L]`` bool: the real rows of the prompt. A forward that also holds the answer (training, or scoring
        an answer) seeds ``signals.prompt_end``; rows from it on are the answer, not prompt. Policies that read the
        text (which rows rate the visual tokens) read only these rows, so they choose what they choose when
        generating from the prompt, and no row's prediction depends, through that choice, on the tokens it
        predicts."""
        end = self.signals.prompt_end
        return self.mask if end is None else self.mask & (self.orig_index < end.to(self.orig_index.device)[:, None])

    def select(self, keep: Tensor, layer: int | None = None) -> "RunState":
        """Drop every slot where ``keep`` is False (pads are always dropped) for all later layers.

        Order is preserved; each sample is right-aligned and the batch left-padded to the longest sample. Under the
        ``compact`` policy, positions are renumbered 0..n-1; under ``keep``, tokens keep their original positions.
        """
        keep = keep & self.mask
        counts = keep.sum(-1)
        new_len = int(counts.max().item()) if counts.numel() else 0
        length = keep.shape[1]
        # Stable order: dropped slots first, then kept slots in their original order; take the last new_len.
        arange = torch.arange(length, device=keep.device)
        order = torch.argsort(keep.long() * length + arange, dim=-1)[:, length - new_len:]
        new_mask = torch.arange(new_len, device=keep.device) >= (new_len - counts)[:, None]

        def take(t: Tensor) -> Tensor:  # [B, L] or [k, B, L]
            return t.gather(-1, order.expand(t.shape[:-2] + order.shape))

        hidden = self.hidden.gather(1, order[..., None].expand(-1, -1, self.hidden.shape[-1]))
        if self.position_policy == "compact":
            pos = positions_from_mask(new_mask)
            pos = pos.expand(self.position_ids.shape[:-2] + pos.shape) if self.position_ids.dim() > 2 else pos
        else:
            pos = take(self.position_ids)
        orig = torch.where(new_mask, take(self.orig_index), torch.full_like(new_mask, -1, dtype=torch.long))
        new = replace(
            self,
            hidden=hidden,
            position_ids=pos,
            mask=new_mask,
            visual=take(self.visual) & new_mask,
            orig_index=orig,
            position_embeddings=None,
        )
        if layer is not None:
            new.trace = self.trace + [(layer, orig)]
        return new


class RunnerCache:
    """KV cache with per-layer lengths and key masks.

    It implements ``update(key, value, layer_idx, ...)``, the one cache method transformers' attention modules call,
    so the library's own attention code (SDPA, eager) runs unchanged.
    """

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.key_mask: list[Tensor | None] = [None] * num_layers  # [B, Lk] bool
        self.next_pos: list[Tensor | None] = [None] * num_layers  # [B] long
        self.position_axes = 0  # k when the prompt had multi-axis positions [k, B, L] (M-RoPE), else 0

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def lengths(self) -> list[int]:
        """Key length held by each layer (differs across layers once tokens are dropped)."""
        return [self.get_seq_length(i) for i in range(len(self.keys))]

    def record(self, layer_idx: int, state: RunState) -> None:
        """Remember the key mask and next position of the tokens that just entered ``layer_idx``."""
        prev = self.key_mask[layer_idx]
        self.key_mask[layer_idx] = state.mask if prev is None else torch.cat([prev, state.mask], dim=-1)
        if state.position_ids.dim() == 3:
            self.position_axes = state.position_ids.shape[0]
        pos = state.position_ids if state.position_ids.dim() == 2 else state.position_ids.amax(0)
        nxt = torch.where(state.mask, pos + 1, torch.zeros_like(pos)).amax(-1)
        self.next_pos[layer_idx] = nxt if self.next_pos[layer_idx] is None else torch.maximum(self.next_pos[layer_idx], nxt)
