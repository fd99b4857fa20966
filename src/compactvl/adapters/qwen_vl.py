"""Qwen-VL adapters: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (``...ForConditionalGeneration``). M-RoPE.

Visual features: the model's own vision tower (``model.model.visual``) on the processor's flattened patches and
``image_grid_thw``; its output is already merged 2×2 by the patch merger and projected to the LM width, one token per
merged cell, row-major over the merged grid ``(h/2, w/2)`` of each image. Token ops run on these merged tokens (the
merger is not per token, so there is nothing earlier to prune); images are grouped by grid so each group is one
``Tokens`` batch and grid ops (avgpool, ...) work too.

Attention for attention-based ops: the Qwen ViTs have no CLS token, so the documented substitute is used — the mean
attention each patch receives from the queries that can see it (its image; its window in Qwen2.5's windowed blocks),
averaged over those queries, computed lazily from the block's own ``norm1`` + ``qkv`` + vision RoPE on the block
input recorded by a forward pre-hook attached to that block of *this* tower for the one call (no eager attention, no
patching). A merged token receives the sum over its 2×2 patches; its key is the mean of their keys (before RoPE,
so cosine similarity compares content). Qwen2.5's window reordering is undone with the model's own window index.
Ops that read attention add a note saying the substitute was used.

Positions: the model's own ``get_rope_index`` on the full prompt gives ``[3, B, L]`` (temporal, height, width).
Under the ``keep`` policy (the default for M-RoPE) kept visual tokens keep their original 3D positions and text keeps
its own, so the text after an image starts exactly where it did uncompressed; decoding continues at the largest
position + 1 on all three axes (what ``rope_deltas`` do in the model's own ``generate``). Under ``compact`` every row
is renumbered 0..n-1 on all three axes: the 2D layout of the image is lost and M-RoPE acts as 1D RoPE — offered for
parity with methods whose reference renumbers, not recommended for Qwen-VL.

Qwen3-VL DeepStack: the tower also returns features of early ViT blocks that the LM adds to the visual rows after its
first decoder layers. :class:`DeepstackInjection` (a LayerPolicy that runs in every prefill, including uncached
replays) adds them after layer ``i`` at the visual rows still present, found by original index; a token op carries
them along (a kept token gets the mean deepstack feature of the patches it holds — the token's own for selection).

Qwen3-VL-MoE: HTE-style training-free pruning by the LM's own router saliency (VEN-VL eq. 7, max routing probability)
is the ``hte`` method here, i.e. the ``hte_native`` policy: forward hooks on this model instance's router (``mlp.gate``)
modules, attached for the prefill only.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..runner import LayerPolicy, RunState
from ..tokens import Tokens
from .base import Encoded, OpGroup, VLMAdapter, attention_mask_of, register_adapter

QUERY_CHUNK = 256  # query rows per softmax in the substitute (bounds memory at [G, heads, 256, patches])


class _BlockInputs:
    """Forward pre-hooks on some blocks of ONE vision tower for one call: each block's input and attention kwargs."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int]):
        self.blocks, self.indices = blocks, sorted(set(indices))
        self.seen: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_BlockInputs":
        for i in self.indices:
            def hook(module, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                self.seen[i] = (h, dict(kwargs, **({"cu_seqlens": args[1]} if len(args) > 1 else {})))
            self._handles.append(self.blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _ViTState:
    """What one tower call left behind to compute attention/keys of any recorded block for any group of images."""

    def __init__(self, visual: nn.Module, grid_thw: Tensor, seen: dict, window_index: Tensor | None):
        self.visual, self.seen, self.window_index = visual, seen, window_index
        self.unit = visual.spatial_merge_size ** 2
        n = grid_thw.prod(-1)
        self.patch_start = n.cumsum(0) - n  # [I] first patch of each image (block order keeps images contiguous)
        self.unit_start = self.patch_start // self.unit
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _qk(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(roped q, roped k, raw k [S, H, d], segment id [S]) of block ``layer`` (1-based: the block whose output
        is hidden_states[layer])."""
        key = ("qk", layer)
        if key in self._cache:
            return self._cache[key]
        if layer - 1 not in self.seen:
            raise ConfigError(f"encoder block {layer} was not recorded; ask for its attention through the op's "
                              f"layer knob (TokenPipeline.required_layers lists what is recorded)")
        h, kw = self.seen[layer - 1]
        blk = self.visual.blocks[layer - 1]
        attn = blk.attn
        x = blk.norm1(h)
        S = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if kw.get("position_embeddings") is not None:
            cos, sin = kw["position_embeddings"]
        elif kw.get("rotary_pos_emb") is not None:  # older transformers pass the raw frequencies
            emb = torch.cat((kw["rotary_pos_emb"], kw["rotary_pos_emb"]), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        else:
            raise ConfigError(f"cannot read the rotary embeddings {type(blk).__name__} receives; this transformers "
                              f"version's Qwen vision blocks are not supported for attention-based ops")
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")
        qr, kr = rope(q, k, cos, sin)
        cu = kw["cu_seqlens"].to(h.device).long()
        seg = torch.searchsorted(cu[1:], torch.arange(S, device=h.device), right=True)
        self._cache[key] = (qr, kr, k, seg)
        return self._cache[key]

    def _to_natural(self, units: Tensor, images: Tensor) -> Tensor:
        """``units [G, m, ...]`` in block order -> natural (row-major merged grid) order, per image."""
        if self.window_index is None:
            return units
        m = units.shape[1]
        start = self.unit_start[images][:, None]
        rel = self.window_index.to(units.device)[start + torch.arange(m, device=units.device)] - start  # [G, m]
        return torch.zeros_like(units).scatter_(1, rel.view(rel.shape + (1,) * (units.dim() - 2)).expand_as(units), units)

    def _rows(self, images: Tensor, n: int) -> Tensor:
        return self.patch_start[images][:, None] + torch.arange(n, device=images.device)  # [G, n] block positions

    def received(self, layer: int, images: Tensor, n: int) -> Tensor:
        """[G, heads, n / unit] attention received per merged token (the no-CLS substitute), natural order."""
        q, k, _, seg = self._qk(layer)
        rows = self._rows(images, n)
        qg, kg = q[rows].transpose(1, 2).float(), k[rows].transpose(1, 2).float()  # [G, H, n, d]
        sg = seg[rows]  # [G, n]
        scale = getattr(self.visual.blocks[layer - 1].attn, "scaling", qg.shape[-1] ** -0.5)
        total = qg.new_zeros(qg.shape[:3])
        for c in range(0, n, QUERY_CHUNK):
            logits = qg[:, :, c:c + QUERY_CHUNK] @ kg.transpose(-1, -2) * scale  # [G, H, C, n]
            same = sg[:, c:c + QUERY_CHUNK, None] == sg[:, None, :]
            total += torch.softmax(logits.masked_fill(~same[:, None], float("-inf")), dim=-1).sum(2)
        per_segment = torch.bincount(seg)[sg].to(total.dtype)  # queries that see each key
        recv = total / per_segment[:, None, :]
        G, H = recv.shape[:2]
        units = recv.view(G, H, n // self.unit, self.unit).sum(-1).transpose(1, 2)  # [G, m, H]
        return self._to_natural(units, images).transpose(1, 2)

    def keys(self, layer: int, images: Tensor, n: int) -> Tensor:
        """[G, n / unit, H·d] mean raw (pre-RoPE) key of each merged token, natural order."""
        _, _, k, _ = self._qk(layer)
        kg = k[self._rows(images, n)].flatten(2)  # [G, n, C]
        G, _, C = kg.shape
        return self._to_natural(kg.view(G, n // self.unit, self.unit, C).mean(2), images)


class _QwenGroupContext:
    """EncoderOutput-like context of one group of same-grid images (no CLS: attention is the substitute)."""

    cls = None
    attention_substitute = True

    def __init__(self, state: _ViTState | None, images: Tensor, patches: int, grid: tuple[int, int], layer: int,
                 x: Tensor):
        self._state, self._images, self._n = state, images, patches
        self.grid, self.features = grid, {layer: x}

    def _need(self) -> _ViTState:
        if self._state is None:
            raise ConfigError("no encoder block was recorded for attention/keys; build the op groups with the layers "
                              "the ops read")
        return self._state

    def attention(self, layer: int) -> Tensor:
        return self._need().received(self._layer(layer), self._images, self._n)

    def keys(self, layer: int) -> Tensor:
        return self._need().keys(self._layer(layer), self._images, self._n)

    def _layer(self, layer: int) -> int:
        depth = len(self._need().visual.blocks)
        if not -depth - 1 <= layer <= depth or layer % (depth + 1) == 0:
            raise ConfigError(f"attention/keys of the Qwen vision tower are indexed by block 1..{depth} (or -{depth}..-1)"
                              f", got {layer}")
        return layer % (depth + 1)


class DeepstackInjection(LayerPolicy):
    """Qwen3-VL DeepStack inside compactvl's Runner: after decoder layer ``i`` (``i`` < number of deepstack levels),
    add deepstack feature ``i`` to every visual row still present (rows found by original index), as the model's
    ``_deepstack_process`` does for all visual rows. ``features [levels, B, L, D]`` (zeros at text rows)."""

    def __init__(self, features: Tensor):
        super().__init__()
        self.features = features

    def after_layer(self, layer_idx: int, state: RunState, runner) -> RunState:
        if layer_idx >= self.features.shape[0]:
            return state
        L, D = self.features.shape[2:]
        idx = state.orig_index
        rows = state.visual & state.mask & (idx >= 0) & (idx < L)
        add = self.features[layer_idx].gather(1, idx.clamp(0, L - 1)[..., None].expand(-1, -1, D))
        state.hidden = state.hidden + (add * rows[..., None].to(add.dtype)).to(state.hidden.dtype)
        return state


@register_adapter
class QwenVLAdapter(VLMAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    mrope = True

    FAMILIES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

    @classmethod
    def class_name(cls, model_type: str) -> str:
        return cls.FAMILIES[model_type]

    def __init__(self, model):
        super().__init__(model)
        self.family = self.FAMILIES[self.config.model_type]
        self.has_native_moe = self.config.model_type == "qwen3_vl_moe"
        self.visual = model.model.visual
        self.video_token_id = getattr(self.config, "video_token_id", None)

    @property
    def op_channels(self) -> int:
        return self.text_config.hidden_size

    def tap_layer(self) -> int:
        return len(self.visual.blocks)

    def num_encoder_layers(self) -> int:
        return len(self.visual.blocks)

    def _window_index(self, grid_thw: Tensor) -> Tensor | None:
        if getattr(self.visual, "fullatt_block_indexes", None) is None:
            return None  # Qwen2-VL / Qwen3-VL: no windowed blocks, no reordering
        try:
            from transformers.vision_utils import get_vision_window_index  # newer transformers only
        except ImportError:  # older transformers: the tower's own method
            return self.visual.get_window_index(grid_thw)[0]
        v = self.visual
        return get_vision_window_index(grid_thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                       patch_size=v.patch_size)[0]

    def encode(self, inputs: Mapping[str, Any], layers: Sequence[int] | None = None) -> Encoded:
        pv, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
        if grid is None:
            raise InputError(f"{self.family} needs image_grid_thw (the processor returns it with pixel_values)")
        grid = grid.to(pv.device).long()
        if bool((grid[:, 0] != 1).any()):
            raise InputError("image_grid_thw has a temporal size other than 1; compactvl compresses images, not videos")
        m = self.visual.spatial_merge_size
        if bool(((grid[:, 1:] % m) != 0).any()):
            raise InputError(f"image_grid_thw {grid.tolist()} is not divisible by the spatial merge size {m}; build "
                             f"the inputs with the model's processor")
        blocks = [x - 1 for x in (layers or []) if x > 0]
        with _BlockInputs(self.visual.blocks, blocks if layers is not None else []) as tap:
            out = self.visual(pv.type(self.visual.dtype), grid_thw=grid)
        if isinstance(out, tuple):  # older transformers: (merged, deepstack) or merged
            merged, deepstack = (out[0], out[1]) if len(out) > 1 else (out[0], None)
        elif isinstance(out, Tensor):
            merged, deepstack = out, None
        else:
            merged, deepstack = out.pooler_output, getattr(out, "deepstack_features", None)
        counts = grid.prod(-1) // (m * m)
        extras = {"deepstack": torch.stack(list(deepstack), 1)} if deepstack else {}  # [T, levels, D]
        enc = Encoded(merged, counts, extras)
        if layers is None:
            return enc
        state = _ViTState(self.visual, grid, tap.seen, self._window_index(grid)) if tap.seen else None
        offsets = counts.cumsum(0) - counts
        keys = grid[:, 1] * 100003 + grid[:, 2]
        for key in torch.unique(keys).tolist():  # one group per distinct grid (a loop over grid sizes, not tokens)
            images = torch.nonzero(keys == key).flatten()
            h, w = int(grid[images[0], 1]) // m, int(grid[images[0], 2]) // m
            rows = offsets[images][:, None] + torch.arange(h * w, device=merged.device)
            x = merged[rows]
            tokens = Tokens.from_grid(x, (h, w), layer=self.tap_layer())
            ctx = _QwenGroupContext(state, images, h * w * m * m, (h, w), self.tap_layer(), x)
            extra = {k: v[rows] for k, v in extras.items()}
            enc.groups.append(OpGroup(images, tokens, ctx, torch.arange(h * w, device=x.device).expand(len(images), -1),
                                      extras=extra))
        return enc

    def positions(self, inputs: Mapping[str, Any]) -> Tensor:
        ids = inputs["input_ids"]
        mask = attention_mask_of(inputs)
        fn = self.model.model.get_rope_index
        params = inspect.signature(fn).parameters
        kw: dict[str, Any] = {"image_grid_thw": inputs.get("image_grid_thw"), "attention_mask": mask.long()}
        if "mm_token_type_ids" in params:
            mm = inputs.get("mm_token_type_ids")
            if mm is None:
                mm = (ids == self.image_token_id).int()
                if self.video_token_id is not None:
                    mm = mm + 2 * (ids == self.video_token_id).int()
            kw["mm_token_type_ids"] = mm
        if kw["image_grid_thw"] is None:
            kw.pop("image_grid_thw")
            if not bool((ids == self.image_token_id).any()):  # text only: 0..n-1 on every axis
                pos = ((mask.long().cumsum(-1) - 1) * mask).clamp_min(0)
                return pos.expand(3, *pos.shape)
        pos, _ = fn(ids, **{k: v for k, v in kw.items() if k in params})
        return pos.to(ids.device)

    def persistent_policies(self, extras: Mapping[str, Tensor], visual: Tensor) -> list[LayerPolicy]:
        ds = extras.get("deepstack")
        if ds is None:
            return []
        return [DeepstackInjection(ds.movedim(2, 0))]  # [B, L, levels, D] -> [levels, B, L, D]
