"""EfficientNet-Lite as a convolutional ``VisionEncoder`` (our own compact implementation).

Paper: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (ICML 2019); the Lite variants (TensorFlow TPU
repo, 2020) drop squeeze-excitation, use ReLU6 and keep stem (32) and head (1280) fixed. Lite0:

    stem  conv3x3 s2 → 32, BN, ReLU6                                         stride 2
    MBConv(expand e, depthwise k×k, stride s, project; residual when s=1 and C_in=C_out), BN after every conv:
    stage (repeats, k, s, e, C_out): 1:(1,3,1,1,16) s2  2:(2,3,2,6,24) s4  3:(2,5,2,6,40) s8  4:(3,3,2,6,80) s16
                                     5:(3,5,1,6,112) s16  6:(4,5,2,6,192) s32  7:(1,3,1,6,320) s32
    head  conv1x1 → 1280, BN, ReLU6                                          stride 32
    classifier: global average pool → dropout → linear (ImageNet: 1000 classes)
Convolutions pad like TensorFlow's 'SAME' (extra pixel bottom/right), so grids are ceil(S / stride) and the
TF-trained weights reproduce. BatchNorm eps 1e-3. Drop-connect (training regulariser) is not implemented.

Layers: 0 = stem, i = stage i (1..7), 8 = head (-1); ``features[L]`` is the feature map flattened row-major to
[B, h*w, C_L]. The default tap is stage 5 (stride 16: 14×14 tokens of 112 channels at 224 px); ``-1`` gives
7×7 tokens of 1280 channels. Taps in one call must share a stride. There is no attention: ``attention()`` /
``keys()`` raise ConfigError. Preprocessing: TF-Lite's (x·255 − 127) / 128.
Knobs: ``stem``, ``stages``, ``head``, ``num_classes`` (0 = no classifier), ``image_size``, ``default_layer``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..registry import ENCODERS
from .base import ENCODER_CONFIG, EncoderOutput, VisionEncoder, read_encoder_config

LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # (repeats, kernel, stride, expand, out channels)
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
WEIGHTS = "model.safetensors"


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (output = ceil(input / stride))."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    conv = SameConv2d(c_in, c_out, k, stride, groups=groups, bias=False)
    bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01)
    return nn.Sequential(conv, bn, nn.ReLU6(inplace=True)) if act else nn.Sequential(conv, bn)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: 1×1 expand → k×k depthwise → 1×1 project (linear)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = conv_bn(c_in, mid, 1) if expand != 1 else nn.Identity()
        self.dw = conv_bn(mid, mid, k, stride, groups=mid)
        self.project = conv_bn(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


@ENCODERS.register("efficientnet_lite")
class EfficientNetLite(VisionEncoder):
    def __init__(self, *, name: str = "efficientnet-lite0", stem: int = 32,
                 stages: Sequence[Sequence[int]] = LITE0_STAGES, head: int = 1280, num_classes: int = 0,
                 dropout: float = 0.2, image_size: int = 224, image_mean: Sequence[float] = LITE_MEAN,
                 image_std: Sequence[float] = LITE_STD, default_layer: int = 5):
        super().__init__()
        self.name, self.image_size = name, int(image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._arch = {"stem": stem, "stages": [list(s) for s in stages], "head": head, "num_classes": num_classes,
                      "dropout": dropout}
        self.stem = conv_bn(3, stem, 3, 2)
        blocks, c_in = [], stem
        self._dims, self._steps = [stem], [2]  # channels and stride of each layer (0 = stem .. last = head)
        for repeats, k, s, e, c_out in stages:
            blocks.append(nn.Sequential(*[MBConv(c_in if j == 0 else c_out, c_out, k, s if j == 0 else 1, e)
                                          for j in range(repeats)]))
            c_in = c_out
            self._dims.append(c_out)
            self._steps.append(s)
        self.stages = nn.ModuleList(blocks)
        self.head = conv_bn(c_in, head, 1)
        self._dims.append(head)
        self._steps.append(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes) if num_classes else None
        self.num_layers = len(stages) + 1
        self.has_cls = False
        self.default_layer = int(default_layer)
        d = self.resolve_layer(self.default_layer)
        self.hidden_size, self.patch_size = self._dims[d], math.prod(self._steps[: d + 1])
        self.eval()

    def feature_dim(self, layer: int | None = None) -> int:
        return self._dims[self.resolve_layer(self.default_layer if layer is None else layer)]

    def _grid(self, hw: Sequence[int], layer: int) -> tuple[int, int]:
        h, w = hw
        for s in self._steps[: layer + 1]:
            h, w = math.ceil(h / s), math.ceil(w / s)
        return h, w

    def grid_for(self, layer: int | None = None) -> tuple[int, int]:
        return self._grid((self.image_size,) * 2, self.resolve_layer(self.default_layer if layer is None else layer))

    def forward(self, pixel_values: Tensor, layers: Sequence[int] | int | None = None) -> EncoderOutput:
        layers = self._layers(layers)
        self._check_pixels(pixel_values, 1)
        idx = [self.resolve_layer(layer) for layer in layers]
        grids = {self._grid(pixel_values.shape[-2:], i) for i in idx}
        if len(grids) > 1:
            strides = [self.patch_for(i) for i in range(self.num_layers + 1)]
            raise ConfigError(f"encoder '{self.name}' taps {layers} have different grids {sorted(grids)}; tap layers "
                              f"of one stride per call (stride of layers 0..{self.num_layers}: {strides})")
        modules = [self.stem, *self.stages, self.head]
        ref = self.stem[0].weight
        x, maps = pixel_values.to(ref.device, ref.dtype), {}
        for i in range(max(idx) + 1):
            x = modules[i](x)
            maps[i] = x
        return EncoderOutput(features={layer: maps[i].flatten(2).transpose(1, 2) for layer, i in zip(layers, idx)},
                             grid=grids.pop(), encoder=self.name)

    def patch_for(self, layer: int) -> int:
        """Total stride of ``layer``."""
        return math.prod(self._steps[: self.resolve_layer(layer) + 1])

    def classify(self, pixel_values: Tensor) -> Tensor:
        """[B, num_classes] logits: head → global average pool → dropout → linear."""
        if self.classifier is None:
            raise ConfigError(f"encoder '{self.name}' was built without a classifier (num_classes=0); load "
                              "'efficientnet-lite0' from compactvl.sources or build with num_classes=1000")
        return self.classifier(self.dropout(self.forward(pixel_values, [-1]).features[-1].mean(1)))

    # ---- config / persistence ------------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {"type": "efficientnet_lite", "name": self.name, **self._arch, "image_size": self.image_size,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "default_layer": self.default_layer}

    @classmethod
    def from_config(cls, cfg: dict) -> "EfficientNetLite":
        return cls(**{k: v for k, v in cfg.items() if k != "type"})

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        (path / ENCODER_CONFIG).write_text(json.dumps(self.to_config(), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "EfficientNetLite":
        enc = cls.from_config({**read_encoder_config(path), **overrides})
        try:
            enc.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot load {Path(path) / WEIGHTS} into '{enc.name}': {e}; re-create the "
                                  "directory with encoder.save_pretrained(dir)") from e
        return enc
