"""LLaVA-family adapters: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration (anyres) and
LlavaOnevisionForConditionalGeneration (anyres + optional feature downsampling). 1D RoPE.

Visual features follow each model's own path: the vision tower's ``hidden_states[vision_feature_layer]`` (a list of
layers is concatenated on channels), CLS dropped under ``vision_feature_select_strategy="default"``, then the
``multi_modal_projector``. The tower (CLIP in LLaVA / LLaVA-NeXT, SigLIP in OneVision) is read through compactvl's
:class:`~compactvl.encoders.hf_vit.HFViTEncoder`, which computes CLS→patch attention and keys of any block from that
block's own pre-norm and q/k projections, lazily (the tower runs SDPA); SigLIP has no CLS, so attention-based ops get
the documented substitute (mean attention each patch receives) and say so in their notes.

* **LLaVA** (one 24×24 grid per image for CLIP-L/336): token ops run on the tower features *before* the projector
  (as VisionZip / PruMerge do), on the image grid, so grid ops (avgpool, ...) work too; kept tokens are then
  projected. Every image fills ``grid_h · grid_w`` placeholders.
* **LLaVA-NeXT / OneVision** (anyres): an image is a base crop plus a grid of high-resolution crops; the model packs
  their projected features (unpadding, OneVision's bilinear downsampling when the image has more than
  ``anyres_max_N`` crops' worth of tokens, one ``image_newline`` token per row). The number of tokens per image comes
  from that packing — the model's own ``pack_image_features`` is called. For token ops, the attention and keys of each
  crop patch go through the *same* packing (it is linear: reshape, unpad, interpolate), so every packed token gets
  the attention/keys of exactly the features it holds. Ops then run on the packed projected features of each image
  (a token list without a grid: selection / merging ops such as visionzip, prumerge, random, bipartite_merge; grid
  ops raise). The ``image_newline`` row separators carry no image content and no longer delimit rows once tokens are
  dropped, so a token op removes them; with no op (or only in-LLM policies) they stay, exactly as the model has them.
  Attention values of different crops come from different CLS queries; they are compared as they are.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..encoders.hf_vit import DEFAULTS as VIT_TYPES, HFViTEncoder
from ..errors import ConfigError, InputError
from ..tokens import Tokens
from .base import Encoded, OpGroup, VLMAdapter, register_adapter


@register_adapter
class LlavaAdapter(VLMAdapter):
    model_types = ("llava",)
    family = "LlavaForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        vt = getattr(self.tower.config, "model_type", "?")
        if vt not in VIT_TYPES:
            raise ConfigError(f"{type(model).__name__}'s vision tower is '{vt}'; compactvl reads attention from "
                              f"{', '.join(VIT_TYPES)} towers only")
        layer = self.config.vision_feature_layer
        self.layers = [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]
        self.strategy = self.config.vision_feature_select_strategy
        training = self.tower.training
        self.encoder = HFViTEncoder(self.tower, default_layer=self.layers[-1])
        self.tower.train(training)  # HFViTEncoder sets eval(); leave the user's model as it was
        if (self.strategy == "default") != self.encoder.has_cls:
            raise ConfigError(f"vision_feature_select_strategy='{self.strategy}' on a tower "
                              f"{'with' if self.encoder.has_cls else 'without'} a CLS token is not supported: compactvl "
                              f"keeps patch tokens only; use 'default' for CLIP-like towers and 'full' for SigLIP")

    @property
    def op_channels(self) -> int:
        return self.encoder.hidden_size * len(self.layers)

    def tap_layer(self) -> int:
        return self.layers[-1]

    def num_encoder_layers(self) -> int:
        return self.encoder.num_layers

    def nominal_tokens(self) -> int | None:
        g = self.tower.config.image_size // self.encoder.patch_size
        return g * g

    def _tower(self, pixel_values: Tensor, layers: Sequence[int] | None):
        need = list(dict.fromkeys(self.layers + [x for x in (layers or []) if x != 0]))
        out = self.encoder(pixel_values, layers=need)
        return out, torch.cat([out.features[x] for x in self.layers], dim=-1)

    def encode(self, inputs: Mapping[str, Any], layers: Sequence[int] | None = None) -> Encoded:
        pv = inputs["pixel_values"]
        if pv.dim() != 4:
            raise InputError(f"{self.family} takes pixel_values [images, 3, H, W], got shape {tuple(pv.shape)}; "
                             "build them with the model's processor")
        out, feats = self._tower(pv, layers)
        embeds = self.projector(feats)
        I, N, D = embeds.shape
        enc = Encoded(embeds.reshape(I * N, D), torch.full((I,), N, dtype=torch.long, device=embeds.device))
        if layers is not None:
            tokens = Tokens.from_grid(feats, out.grid, layer=self.layers[-1])
            slots = torch.arange(N, device=feats.device).expand(I, N)
            enc.groups = [OpGroup(torch.arange(I, device=feats.device), tokens, out, slots, project=self.projector)]
        return enc


class _PackedContext:
    """EncoderOutput-like view of anyres images: per packed (non-newline) token, the features, and the attention /
    keys of its crop patches sent through the model's own packing."""

    attention_substitute: bool
    cls = None

    def __init__(self, out, pack, where: tuple[Tensor, Tensor, Tensor], shape: tuple[int, int], x: Tensor, layer: int):
        self._out, self._pack, self._where, self._shape = out, pack, where, shape
        self.attention_substitute = out.attention_substitute
        self.features = {layer: x}
        self.grid = (1, shape[1])

    def _packed(self, values: Tensor) -> Tensor:
        """Per-crop-patch ``values [crops, P, C]`` -> ``[images, Nmax, C]`` over the packed real tokens."""
        flat = torch.cat(self._pack(values, values.new_zeros(values.shape[-1])))
        real, img, rank = self._where
        out = values.new_zeros(self._shape + (values.shape[-1],))
        out[img, rank] = flat[real]
        return out

    def attention(self, layer: int) -> Tensor:
        return self._packed(self._out.attention(layer).transpose(1, 2).float()).transpose(1, 2)

    def keys(self, layer: int) -> Tensor:
        return self._packed(self._out.keys(layer))


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    family = "LlavaNextForConditionalGeneration"
    ragged = True

    @property
    def op_channels(self) -> int:
        return self.text_config.hidden_size  # ops run on the packed, projected features

    def nominal_tokens(self) -> int | None:
        return None

    def _num_crops(self, inputs: Mapping[str, Any]) -> list[int]:
        fn = getattr(sys.modules[type(self.model.model).__module__], "image_size_to_num_patches")
        sizes = inputs["image_sizes"]
        patching = [True] * len(sizes)
        bni = inputs.get("batch_num_images")
        if bni is not None and self.model_types[0] == "llava_onevision":
            patching = [int(n) == 1 for n in bni for _ in range(int(n))]
        return [fn(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                   patch_size=self.config.vision_config.image_size) if p else 1 for s, p in zip(sizes, patching)]

    def _pack_fn(self, inputs: Mapping[str, Any], crops: list[int]):
        pack = self.model.model.pack_image_features
        params = inspect.signature(pack).parameters
        kw = {k: v for k, v in dict(vision_feature_select_strategy=self.strategy,
                                     vision_aspect_ratio=getattr(self.config, "vision_aspect_ratio", None)).items()
              if k in params and v is not None}
        sizes = inputs["image_sizes"]

        def run(values: Tensor, newline: Tensor) -> list[Tensor]:
            out = pack(list(torch.split(values, crops, dim=0)), sizes, image_newline=newline, **kw)
            return list(out[0] if isinstance(out, tuple) else out)

        return run

    def encode(self, inputs: Mapping[str, Any], layers: Sequence[int] | None = None) -> Encoded:
        pv, sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if sizes is None:
            raise InputError(f"{self.family} needs image_sizes (the processor returns them with pixel_values)")
        crops = self._num_crops(inputs)
        if pv.dim() == 5:
            pv = torch.cat([p[:n] for p, n in zip(pv, crops)], dim=0)
        elif pv.dim() != 4 or pv.shape[0] != sum(crops):
            raise InputError(f"pixel_values of shape {tuple(pv.shape)} do not hold the {sum(crops)} crops the image "
                             f"sizes imply; build them with the model's processor")
        out, feats = self._tower(pv, layers)
        proj = self.projector(feats)
        pack = self._pack_fn(inputs, crops)
        packed = pack(proj, self.model.model.image_newline)
        counts = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=proj.device)
        enc = Encoded(torch.cat(packed), counts)
        if layers is None:
            return enc
        ones = proj.new_ones(proj.shape[:2] + (1,))
        real = torch.cat(pack(ones, ones.new_zeros(1)))[:, 0] > 0.5  # newline rows are 0
        img = torch.repeat_interleave(torch.arange(len(counts), device=proj.device), counts)
        offsets = counts.cumsum(0) - counts
        slot = torch.arange(len(img), device=proj.device) - offsets[img]
        n_real = torch.bincount(img[real], minlength=len(counts))
        rank = real.long().cumsum(0) - 1 - (torch.cumsum(n_real, 0) - n_real)[img]  # index among the image's real tokens
        I, nmax = len(counts), int(n_real.max())
        x = proj.new_zeros(I, nmax, proj.shape[-1])
        x[img[real], rank[real]] = enc.embeds[real]
        slots = torch.full((I, nmax), -1, dtype=torch.long, device=proj.device)
        slots[img[real], rank[real]] = slot[real]
        mask = slots >= 0
        ar = torch.arange(nmax, device=proj.device)
        tokens = Tokens(x, mask, torch.stack([torch.zeros_like(ar), ar], -1).float().expand(I, nmax, 2),
                        mask.float(), torch.where(mask, ar, -1), (1, nmax), None, layer=self.layers[-1])
        ctx = _PackedContext(out, pack, (real, img[real], rank[real]), (I, nmax), x, self.layers[-1])
        enc.groups = [OpGroup(torch.arange(I, device=proj.device), tokens, ctx, slots.clamp_min(0))]
        return enc


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    family = "LlavaOnevisionForConditionalGeneration"
