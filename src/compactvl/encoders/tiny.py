"""Tiny random encoders for fast tests: the same classes as the real ones, a few thousand parameters.

``tiny_encoder(kind, image_size=32, seed=0)``: ``kind`` is ``clip`` | ``siglip`` | ``dinov2`` | ``efficientnet``.
ViTs: hidden 32, 4 heads, 3 blocks, patch 8 → a 4×4 grid at 32 px. EfficientNet: 4 small stages, default tap at
stride 8 (also 4×4 at 32 px, 32 channels). Weights are drawn from ``seed`` with unit-gain fan-in scaling and unit
position/CLS embeddings, so attention maps and features are far from uniform (pruning tests see clear winners).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

from ..errors import ConfigError
from .base import VisionEncoder
from .efficientnet_lite import EfficientNetLite
from .hf_vit import HFViTEncoder

KINDS = ("clip", "siglip", "dinov2", "efficientnet")
TINY_STAGES = ((1, 3, 1, 1, 8), (1, 3, 2, 4, 16), (2, 3, 2, 4, 32), (1, 3, 2, 4, 48))


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        done = set()
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * fan_in ** -0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d)):
                done.update(id(p) for p in mod.parameters())
        for name, p in model.named_parameters():  # CLS / position / register embeddings
            if id(p) not in done and "lambda" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def tiny_encoder(kind: str = "clip", image_size: int = 32, seed: int = 0) -> VisionEncoder:
    gen = torch.Generator().manual_seed(seed)
    if kind == "efficientnet":
        enc = EfficientNetLite(name="tiny-efficientnet", stem=8, stages=TINY_STAGES, head=64, num_classes=10,
                               image_size=image_size, default_layer=3)
        _randomize(enc, gen)
        return enc.eval()
    if kind not in KINDS:
        raise ConfigError(f"unknown tiny encoder kind '{kind}'; use one of {', '.join(KINDS)}")

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    conf = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig, "dinov2": Dinov2Config}[kind](**common)
    model = AutoModel.from_config(conf, attn_implementation="sdpa")
    _randomize(model, gen)
    return HFViTEncoder(model, name=f"tiny-{kind}", image_size=image_size).eval()
