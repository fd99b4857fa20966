"""InternVL adapter: InternVLForConditionalGeneration (InternVL2.5 / InternVL3 in their transformers ``-hf`` form).
1D RoPE (a Qwen2 / Llama text decoder).

Visual features follow the model's own path (``InternVLModel.get_image_features``): the vision tower's output at
``vision_feature_layer`` (``last_hidden_state`` for -1), the CLS token dropped under
``vision_feature_select_strategy="default"``, the patch grid folded by the model's own ``pixel_shuffle``
(``downsample_ratio`` 0.5: a g×g grid becomes (g/2)×(g/2) tokens of 4× the channels), then the
``multi_modal_projector``. Every image (tile) fills ``(g·ratio)²`` placeholders; a high-resolution image arrives as
several tiles (the processor's crops, each its own ``pixel_values`` row), each tile a contiguous run of placeholders.

Token ops run on the pixel-shuffled features *before* the projector, on the (g/2)×(g/2) grid of each tile, so grid
ops (avgpool, pixel_shuffle), selection (random) and merging ops (bipartite_merge) work, and kept tokens are then
projected. InternViT's attention is not read by compactvl: ops that score tokens by encoder attention or keys
(visionzip, prumerge, ...) raise a ConfigError naming the ops that work; every in-LLM policy (fastv, pyramiddrop,
sparsevlm) works, since those read the LM's own attention.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..tokens import Tokens
from .base import Encoded, OpGroup, VLMAdapter, register_adapter


class _FeatureContext:
    """EncoderOutput-like context of InternVL features: features and grid, no encoder attention."""

    attention_substitute = False
    cls = None

    def __init__(self, features: dict[int, Tensor], grid: tuple[int, int]):
        self.features, self.grid = features, grid

    def _unsupported(self, what: str) -> ConfigError:
        return ConfigError(f"InternVL's vision tower does not give compactvl its {what}; use a token op that does not "
                           f"score by encoder attention (random, avgpool, pixel_shuffle, bipartite_merge, divprune, "
                           f"cdpruner) or an in-LLM policy (fastv, pyramiddrop, sparsevlm, dart)")

    def attention(self, layer: int) -> Tensor:
        raise self._unsupported("CLS attention")

    def keys(self, layer: int) -> Tensor:
        raise self._unsupported("attention keys")


@register_adapter
class InternVLAdapter(VLMAdapter):
    model_types = ("internvl",)
    family = "InternVLForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        self.inner = model.model
        self.tower = self.inner.vision_tower
        self.projector = self.inner.multi_modal_projector
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer={layer!r}: compactvl's InternVL adapter takes one layer index")
        self.layer = layer
        self.strategy = self.config.vision_feature_select_strategy
        self.ratio = float(self.config.downsample_ratio)
        fold = round(1 / self.ratio)
        if abs(fold * self.ratio - 1) > 1e-6:
            raise ConfigError(f"downsample_ratio={self.ratio}: compactvl supports ratios 1/k (0.5, 0.25, ...)")
        self.fold = fold
        vc = self.tower.config
        size, patch = vc.image_size, vc.patch_size
        self.patch_grid = (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))

    @property
    def op_channels(self) -> int:
        return self.tower.config.hidden_size * self.fold * self.fold

    def tap_layer(self) -> int:
        return self.layer if self.layer >= 0 else self.num_encoder_layers() + 1 + self.layer

    def num_encoder_layers(self) -> int:
        return self.tower.config.num_hidden_layers

    def nominal_tokens(self) -> int | None:
        return (self.patch_grid[0] // self.fold) * (self.patch_grid[1] // self.fold)

    def features(self, pixel_values: Tensor) -> Tensor:
        """Pixel-shuffled tower features ``[tiles, N, C·k²]`` (the projector's input), by the model's own steps."""
        out = self.tower(pixel_values=pixel_values.to(self.inner.dtype), output_hidden_states=self.layer != -1,
                         return_dict=True)
        x = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if self.strategy == "default":
            x = x[:, 1:, :]
        n, side = x.shape[0], int(x.shape[1] ** 0.5)
        if side * side != x.shape[1]:
            raise InputError(f"InternVL tiles must give a square patch grid; got {x.shape[1]} patches. Build "
                             f"pixel_values with the model's processor ({self.tower.config.image_size} px tiles)")
        x = self.inner.pixel_shuffle(x.reshape(n, side, side, -1), scale_factor=self.ratio)
        return x.reshape(n, -1, x.shape[-1])

    def encode(self, inputs: Mapping[str, Any], layers: Sequence[int] | None = None) -> Encoded:
        pv = inputs["pixel_values"]
        if pv.dim() != 4:
            raise InputError(f"{self.family} takes pixel_values [tiles, 3, H, W], got shape {tuple(pv.shape)}; "
                             "build them with the model's processor")
        feats = self.features(pv)
        embeds = self.projector(feats)
        I, N, D = embeds.shape
        enc = Encoded(embeds.reshape(I * N, D), torch.full((I,), N, dtype=torch.long, device=embeds.device))
        if layers is not None:
            side = int(N ** 0.5)
            tap = self.tap_layer()
            ctx = _FeatureContext({tap: feats}, (side, side))
            tokens = Tokens.from_grid(feats, (side, side), layer=tap)
            slots = torch.arange(N, device=feats.device).expand(I, N)
            enc.groups = [OpGroup(torch.arange(I, device=feats.device), tokens, ctx, slots, project=self.projector)]
        return enc
