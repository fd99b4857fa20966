"""What compactvl needs to know about a transformers VLM family, and the machinery every family shares (issue 8).

An adapter wraps ONE loaded model instance — nothing class-level is read-modified-written, so a compressed and an
untouched model live in one process — and declares:

* **visual features**: ``encode(inputs)`` runs the model's own vision tower and projector (its own feature path) and
  returns the LM-ready embedding of every image placeholder, in order (``Encoded.embeds``), and how many placeholders
  each image fills (``Encoded.counts``). When a token op will run, it also returns ``OpGroup``s: the ``Tokens`` the
  op reads (a batch of images sharing one grid) and an EncoderOutput-like context whose ``attention(layer)`` /
  ``keys(layer)`` are computed lazily from the tower's own q/k (no eager attention; encoders without CLS give the
  documented substitute, the mean attention each patch receives).
* **where the image tokens sit**: the model's image placeholder id; each image fills a contiguous run of
  placeholders, images in row-major order over the batch (as the models' own ``masked_scatter`` assigns them).
* **the LM**: ``language_model`` (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``), ``lm_head`` and the text
  config, wrapped by :class:`LMView` for compactvl's Runner.
* **positions**: ``positions(inputs)`` — the model's own position ids for the full prompt, ``[B, L]`` (1D RoPE) or
  ``[3, B, L]`` (M-RoPE, from the model's own ``get_rope_index``).

Assembly (:func:`assemble`): each image keeps ``k_i`` of its ``n_i`` placeholder slots (the first ``k_i``; the rest
are removed and the batch is re-packed with left padding, no per-token Python loop), filled with the kept tokens in
the op's output order. Under the ``keep`` position policy a kept visual token takes the original position of the
placeholder slot it stands for (its representative patch: the grid cell nearest the size-weighted centre of the
patches it holds — the patch itself for selection ops) and text keeps its original positions (gaps allowed);
under ``compact`` every row is renumbered 0..n-1 (on every axis for M-RoPE, which then degenerates to 1D RoPE).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..runner import LayerPolicy
from ..tokens import Tokens

ADAPTERS: dict[str, type["VLMAdapter"]] = {}  # model_type -> adapter class; filled as the family modules load


def register_adapter(cls: type["VLMAdapter"]) -> type["VLMAdapter"]:
    for mt in cls.model_types:
        if mt in ADAPTERS and ADAPTERS[mt] is not cls:
            raise ConfigError(f"two adapters claim model_type '{mt}'; register one adapter per model type")
        ADAPTERS[mt] = cls
    return cls


# ----------------------------------------------------------------------------------------------- LM view
class LMView(nn.Module):
    """A causal-LM view (``.model``, ``.lm_head``, ``.config``) of a VLM's language model, for the Runner.

    It holds references to the VLM's own modules (no copy, no new weights): ``model`` is the text decoder with
    ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``; ``config`` its text config."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, config: Any):
        super().__init__()
        self.model = language_model
        self.lm_head = lm_head
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


# ----------------------------------------------------------------------------------------------- encoded images
@dataclass
class OpGroup:
    """Images that share one token grid, ready for a token op."""

    images: Tensor  # [G] long: image indices (global image order)
    tokens: Tokens  # [G, N, C] what the op reads
    encoder: Any  # EncoderOutput-like context (features, grid, attention(layer), keys(layer), attention_substitute)
    slots: Tensor  # [G, N] long: placeholder slot (within the image's run) of each token of ``tokens``; -1 = none
    project: Callable[[Tensor], Tensor] | None = None  # op output -> LM embeddings (None: already LM embeddings)
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-token values carried through ops, [G, N, ...]


@dataclass
class Encoded:
    """The images of one batch, as the model itself would feed them to its LM."""

    embeds: Tensor  # [T, D] LM embedding of every image placeholder, images in order
    counts: Tensor  # [I] long: placeholders filled by each image
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-placeholder values, [T, ...] (e.g. deepstack)
    groups: list[OpGroup] = field(default_factory=list)  # filled only when a token op will run


@dataclass
class Kept:
    """The visual tokens that enter the LM, images in order, each image's tokens in the order they take its slots."""

    x: Tensor  # [T', D]
    counts: Tensor  # [I] kept tokens per image
    slots: Tensor  # [T'] placeholder slot (within its image's run) whose original position the token takes
    extras: dict[str, Tensor] = field(default_factory=dict)  # [T', ...]
    notes: tuple[str, ...] = ()

    @classmethod
    def everything(cls, enc: Encoded) -> "Kept":
        offsets = enc.counts.cumsum(0) - enc.counts
        image = torch.repeat_interleave(torch.arange(len(enc.counts), device=enc.counts.device), enc.counts)
        rank = torch.arange(int(enc.counts.sum()), device=enc.counts.device) - offsets[image]
        return cls(enc.embeds, enc.counts, rank, dict(enc.extras))


# ----------------------------------------------------------------------------------------------- adapter base
class VLMAdapter:
    """One transformers VLM family. Subclasses set ``model_types`` / ``mrope`` and implement the methods below."""

    model_types: ClassVar[tuple[str, ...]] = ()
    mrope: ClassVar[bool] = False  # True: position ids are [3, B, L] (Qwen-VL M-RoPE)
    family: ClassVar[str] = ""
    has_native_moe: ClassVar[bool] = False
    ragged: ClassVar[bool] = False  # True: images of one op group hold different token counts (anyres packing)

    def __init__(self, model: nn.Module):
        self.model = model
        if not hasattr(model, "lm_head") or not hasattr(model, "model"):
            raise ConfigError(f"{type(model).__name__} has no language-model head; load the generation class "
                              f"(e.g. {self.family or 'LlavaForConditionalGeneration'} / AutoModelForImageTextToText), "
                              f"not the bare backbone")
        self.config = model.config
        self.text_config = self.config.get_text_config(decoder=True)
        self.image_token_id = int(getattr(self.config, "image_token_id", None) if getattr(
            self.config, "image_token_id", None) is not None else self.config.image_token_index)

    @classmethod
    def class_name(cls, model_type: str) -> str:
        """The transformers class (with LM head) to load a checkpoint of ``model_type`` with."""
        return cls.family

    # ---- LM
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def lm_view(self) -> LMView:
        return LMView(self.language_model, self.model.lm_head, self.text_config)

    # ---- to implement
    @property
    def op_channels(self) -> int:
        """Channels of the features token ops see."""
        raise NotImplementedError

    def nominal_tokens(self) -> int | None:
        """Placeholders one image fills when it is the same for every image (None: depends on the image)."""
        return None

    def encode(self, inputs: Mapping[str, Any], layers: Sequence[int] | None = None) -> Encoded:
        """The model's own visual embeddings; with ``layers`` (encoder layers ops read), also the op groups."""
        raise NotImplementedError

    def tap_layer(self) -> int:
        """Encoder layer (hidden_states index convention) the op tokens come from."""
        raise NotImplementedError

    def num_encoder_layers(self) -> int:
        raise NotImplementedError

    def positions(self, inputs: Mapping[str, Any]) -> Tensor:
        """Position ids of the full (uncompressed) prompt: [B, L] or [3, B, L]."""
        mask = attention_mask_of(inputs)
        return ((mask.long().cumsum(-1) - 1) * mask).clamp_min(0)

    def persistent_policies(self, extras: Mapping[str, Tensor], visual: Tensor) -> list[LayerPolicy]:
        """Policies that are part of the model's own forward (Qwen3-VL deepstack); none by default."""
        return []

    def image_inputs(self, inputs: Mapping[str, Any]) -> bool:
        return inputs.get("pixel_values") is not None


def attention_mask_of(inputs: Mapping[str, Any]) -> Tensor:
    """``[B, L]`` bool real-token mask of processor outputs (all True when there is no attention_mask)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()


# ----------------------------------------------------------------------------------------------- ops on groups
def representative(tokens: Tokens) -> Tensor:
    """[B, K] index (in ``tokens.grid0`` row-major cells) of the cell nearest each token's size-weighted centre."""
    h, w = tokens.grid0
    rc = tokens.pos.round().long()
    return rc[..., 0].clamp(0, h - 1) * w + rc[..., 1].clamp(0, w - 1)


def apply_ops(enc: Encoded, run_group: Callable[[OpGroup], Tokens]) -> Kept:
    """Run a token op on every group and gather the kept tokens per image, in image order (one loop over groups,
    none over tokens)."""
    xs, imgs, ranks, slots, notes = [], [], [], [], []
    extras: dict[str, list[Tensor]] = {k: [] for k in enc.extras}
    kmax = 0
    for g in enc.groups:
        out = run_group(g)
        x = out.x if g.project is None else g.project(out.x)
        valid = out.mask
        rank = valid.long().cumsum(1) - 1
        rep = g.slots.gather(1, representative(out).clamp_max(g.slots.shape[1] - 1))
        xs.append(x[valid])
        imgs.append(g.images[:, None].expand_as(valid)[valid])
        ranks.append(rank[valid])
        slots.append(rep[valid])
        for k, v in g.extras.items():
            extras[k].append(out.pool_patches(v.float(), "mean").to(v.dtype)[valid])
        notes.extend(out.notes)
        kmax = max(kmax, valid.shape[1])
    img, rank = torch.cat(imgs), torch.cat(ranks)
    order = torch.argsort(img * (kmax + 1) + rank)
    counts = torch.bincount(img, minlength=len(enc.counts))
    return Kept(torch.cat(xs)[order], counts, torch.cat(slots)[order],
                {k: torch.cat(v)[order] for k, v in extras.items()}, tuple(dict.fromkeys(notes)))


# ----------------------------------------------------------------------------------------------- assembly
@dataclass
class Assembled:
    """The LM input after compression (left padded)."""

    inputs_embeds: Tensor  # [B, L', D]
    attention_mask: Tensor  # [B, L'] bool
    visual_mask: Tensor  # [B, L'] bool
    position_ids: Tensor  # [B, L'] or [3, B, L']
    input_ids: Tensor  # [B, L'] (placeholder id at visual rows)
    extras: dict[str, Tensor]  # name -> [B, L', ...] (zeros at text rows)
    visual_counts: Tensor  # [B] visual tokens entering the LM per sample
    image_counts: Tensor  # [I] visual tokens per image (after compression)
    full_image_counts: Tensor  # [I] before compression


def placeholder_layout(input_ids: Tensor, mask: Tensor, image_token_id: int, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For every placeholder slot of the batch: ``(image [B, L], rank [B, L], start [I])`` — the image it belongs to
    and its index within that image's run (-1 at other slots), and the column where each image's run starts.
    Raises InputError when the placeholders do not match the images."""
    ph = (input_ids == image_token_id) & mask
    total, expected = int(ph.sum()), int(counts.sum())
    if total != expected:
        per = counts.tolist()
        raise InputError(
            f"the prompts hold {total} image placeholder tokens (id {image_token_id}) but the {len(per)} image(s) give "
            f"{expected} visual tokens ({per} per image); the images' token count differs from what the prompt was "
            f"built for: build input_ids and pixel values together with the model's own processor (same image size, "
            f"patch size and image_seq_length as the model's config)")
    image = torch.full_like(input_ids, -1)
    rank = torch.full_like(input_ids, -1)
    if total == 0:
        return image, rank, counts.new_zeros(0)
    b, c = ph.nonzero(as_tuple=True)  # row-major: images in order, ranks ascending
    ends = counts.cumsum(0)
    offsets = ends - counts
    img = torch.searchsorted(ends, torch.arange(total, device=ends.device), right=True)
    rk = torch.arange(total, device=ends.device) - offsets[img]
    start_b, start_c = b[offsets], c[offsets]
    if not (torch.equal(b, start_b[img]) and torch.equal(c, start_c[img] + rk)):
        raise InputError("an image's placeholder tokens are not one contiguous run inside one prompt; put each image's "
                         "placeholders together (the model's processor does this) and give images in prompt order")
    image[b, c] = img
    rank[b, c] = rk
    return image, rank, start_c


def pack_left(keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(order [B, L'], mask [B, L'])``: gather indices that keep the True slots of ``keep`` in order, right-aligned
    (left padding), and which output slots are real."""
    counts = keep.sum(-1)
    new_len = int(counts.max()) if counts.numel() else 0
    L = keep.shape[1]
    order = torch.argsort(keep.long() * L + torch.arange(L, device=keep.device), dim=-1)[:, L - new_len:]
    return order, torch.arange(new_len, device=keep.device) >= (new_len - counts)[:, None]


def assemble(inputs: Mapping[str, Any], enc: Encoded, kept: Kept, embed: nn.Module, image_token_id: int,
             positions: Tensor, position_policy: str) -> Assembled:
    """The LM input with each image's first ``kept.counts[i]`` placeholder slots holding its kept tokens, the other
    placeholders removed, re-packed with left padding; positions by ``position_policy`` (see the module docstring)."""
    ids = inputs["input_ids"]
    mask = attention_mask_of(inputs)
    image, rank, start = placeholder_layout(ids, mask, image_token_id, enc.counts)
    ph = image >= 0
    keep = mask & (~ph | (rank < kept.counts[image.clamp_min(0)])) if len(kept.counts) else mask & ~ph
    order, new_mask = pack_left(keep)
    take = lambda t: t.gather(-1, order.expand(t.shape[:-2] + order.shape))  # noqa: E731  [..., B, L] -> [..., B, L']
    new_ids = torch.where(new_mask, take(ids), torch.zeros_like(order))
    visual = take(ph) & new_mask
    x = embed(torch.where(visual, torch.zeros_like(new_ids), new_ids))
    if kept.x.shape[0]:
        x = x.masked_scatter(visual[..., None], kept.x.to(x.dtype))
    if position_policy == "compact":
        pos = ((new_mask.long().cumsum(-1) - 1) * new_mask).clamp_min(0)
        pos = pos.expand(positions.shape[:-2] + pos.shape) if positions.dim() == 3 else pos
    else:
        # source column of every kept row: itself for text; for a visual row, the slot its token stands for
        src = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).clone()
        if kept.x.shape[0]:
            vis_src = start.gather(0, torch.repeat_interleave(torch.arange(len(kept.counts), device=ids.device),
                                                              kept.counts)) + kept.slots
            new_src = take(src).masked_scatter(visual, vis_src)
        else:
            new_src = take(src)
        pos = positions.gather(-1, new_src.expand(positions.shape[:-2] + new_src.shape))
        pos = torch.where(new_mask, pos, torch.zeros_like(pos))
    extras = {}
    for k, v in kept.extras.items():
        full = v.new_zeros(new_mask.shape + v.shape[1:])
        extras[k] = full.masked_scatter(visual.view(visual.shape + (1,) * (v.dim() - 1)), v) if v.shape[0] else full
    return Assembled(x, new_mask, visual, pos, new_ids, extras, visual.sum(-1), kept.counts, enc.counts)
