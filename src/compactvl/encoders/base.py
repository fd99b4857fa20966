"""The vision-encoder contract every method builds on: ``VisionEncoder`` → ``EncoderOutput``.

Layer convention (one for all encoders, the Hugging Face ``hidden_states`` index): ``0`` is the embeddings output
(for CLIP after its pre-LayerNorm), ``i`` is the output of block ``i`` (1-based), negative indices count from the
end (``-1`` = last block). Convolutional encoders use stages as blocks (see ``efficientnet_lite.py``).

``EncoderOutput.attention(L)`` / ``keys(L)`` describe the self-attention *inside* block ``L`` — the block whose
output is ``features[L]``. Its input is ``hidden_states[L-1]``; the scores come from that block's own pre-norm and
q/k projections, recomputed lazily for the query rows needed, so the encoder itself always runs with SDPA.
``attention(L)`` equals Hugging Face's eager ``attentions[L-1]`` (``attentions[L]`` for negative ``L``) restricted to
the CLS query row and the patch columns: softmax over *all* keys (CLS and register columns included, no
renormalisation after dropping them). Encoders without a CLS token (SigLIP) return the documented substitute: the
mean attention each patch receives over all patch queries, and set ``attention_substitute=True``.
An ``EncoderOutput`` keeps references to the hidden states it needs for that; drop it to free them.
``forward`` moves ``pixel_values`` to the encoder's device and dtype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, InputError
from ..images import to_rgb
from ..registry import ENCODERS

ENCODER_CONFIG = "compactvl_encoder.json"


@dataclass
class EncoderOutput:
    features: dict[int, Tensor]  # requested layer (as given) -> [B, N, C] patch tokens, row-major over the grid
    grid: tuple[int, int]  # (h, w), N == h * w
    cls: Tensor | None = None  # [B, C] CLS token at the last requested tap; None without a CLS token
    attention_substitute: bool = False  # attention() returns the no-CLS substitute (mean attention received)
    encoder: str = ""
    attention_fn: Callable[[int], Tensor] | None = field(default=None, repr=False)
    keys_fn: Callable[[int], Tensor] | None = field(default=None, repr=False)

    def _need(self, fn: Callable[[int], Tensor] | None, what: str) -> Callable[[int], Tensor]:
        if fn is None:
            raise ConfigError(
                f"encoder '{self.encoder}' has no self-attention, so it cannot give {what}; pick a token method "
                "that does not need attention scores or keys (e.g. pooling, pixel shuffle, STF, ToMe on features), "
                "or use a ViT encoder (CLIP / SigLIP / DINOv2)"
            )
        return fn

    def attention(self, layer: int) -> Tensor:
        """[B, heads, N] CLS→patch attention of block ``layer`` (or the no-CLS substitute, see module doc)."""
        return self._need(self.attention_fn, "attention scores")(layer)

    def keys(self, layer: int) -> Tensor:
        """[B, N, C_k] key vectors of block ``layer`` for the patch tokens, heads concatenated."""
        return self._need(self.keys_fn, "attention keys")(layer)


class VisionEncoder(nn.Module):
    """Base class: preprocessing, layer bookkeeping, config round trip and save/load. Subclasses set the
    attributes below in ``__init__`` and implement ``forward``, ``to_config`` and ``from_config``."""

    name: str
    hidden_size: int  # channels of features[default_layer]
    num_layers: int  # number of blocks; valid layers are -num_layers-1 .. num_layers
    patch_size: int  # total stride of the default layer
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    has_cls: bool
    default_layer: int

    # ---- preprocessing -------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """[B, 3, S, S] float32, S = image_size: resize the shorter side to S (bicubic), centre-crop S×S, scale to
        [0, 1] and normalise with this encoder's mean/std. (CLIP's processor does exactly this; SigLIP's squashes
        the whole image to S×S and DINOv2's resizes to 256/224·S first — we use one rule for every encoder so that
        token grids of several encoders cover the same pixels.)

        The crop is taken in the source image and resampled straight to S×S (PIL's ``resize(box=...)``, the same
        output pixel centres and filter support as resizing everything and cropping after, up to rounding), so the
        cost is O(S²) plus the source's size whatever the aspect ratio: a 1×20000 strip no longer becomes a
        224×4,480,000 intermediate. Modes are converted by ``compactvl.images.to_rgb`` (the loader's rules); an
        empty image is an InputError."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise InputError("preprocess() takes a non-empty list of PIL images; open files with PIL.Image.open")
        s = self.image_size
        arrays = []
        for i, im in enumerate(images):
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InputError(f"preprocess(): image {i} is empty ({w}x{h}); load images with "
                                 "compactvl.images.load_image, which refuses empty ones")
            im = to_rgb(im, f"image {i}")
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))  # the size a full resize would have
            left, top = (nw - s) // 2, (nh - s) // 2
            sx, sy = w / nw, h / nh  # source pixels per resized pixel
            box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
            arrays.append(np.asarray(im.resize((s, s), Image.BICUBIC, box=box), dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    # ---- layers --------------------------------------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        """Map a (possibly negative) layer index to 0..num_layers, or raise ConfigError."""
        n = self.num_layers
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not -n - 1 <= layer <= n:
            raise ConfigError(
                f"layer {layer!r} is out of range for encoder '{self.name}' with {n} blocks; use 0..{n} "
                f"(0 = embeddings, i = output of block i) or -{n + 1}..-1 counting from the end"
            )
        return int(layer) % (n + 1)

    def _layers(self, layers: Sequence[int] | int | None) -> list[int]:
        if layers is None:
            return [self.default_layer]
        layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        if not layers:
            raise ConfigError(f"encoder '{self.name}' got an empty layer list; pass layers=None for the default")
        for layer in layers:
            self.resolve_layer(layer)
        return layers

    def feature_dim(self, layer: int | None = None) -> int:
        """Channels of features[layer] (all layers share hidden_size for a ViT)."""
        return self.hidden_size

    def grid_for(self, layer: int | None = None) -> tuple[int, int]:
        """(h, w) token grid at image_size for ``layer`` (default layer if None)."""
        g = self.image_size // self.patch_size
        return (g, g)

    def _check_pixels(self, pixel_values: Tensor, multiple: int) -> None:
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise InputError(f"encoder '{self.name}' expects pixel_values [B, 3, H, W], got {shape}; "
                             "build them with encoder.preprocess(images)")
        h, w = pixel_values.shape[-2:]
        if h % multiple or w % multiple:
            raise InputError(f"encoder '{self.name}' needs H and W divisible by {multiple}, got {h}x{w}; "
                             f"use encoder.preprocess(images) (image_size={self.image_size})")

    # ---- config / persistence ------------------------------------------------------------------------------
    def to_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict) -> "VisionEncoder":
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``compactvl_encoder.json`` (to_config) and the weights into ``path``."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "VisionEncoder":
        raise NotImplementedError


def build_encoder(cfg: dict) -> VisionEncoder:
    """Rebuild the architecture described by ``VisionEncoder.to_config()`` with random weights."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError("build_encoder needs the dict from encoder.to_config() with a 'type' key "
                          f"(one of: {', '.join(ENCODERS.names())})")
    return ENCODERS.get(cfg["type"]).from_config(cfg)


def read_encoder_config(path: str | Path) -> dict:
    p = Path(path) / ENCODER_CONFIG
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}; re-save the encoder with encoder.save_pretrained(dir)") from e


def load_encoder_dir(path: str | Path, **overrides) -> VisionEncoder:
    """Load an encoder saved with ``save_pretrained`` (a directory holding ``compactvl_encoder.json``)."""
    cfg = read_encoder_config(path)
    return ENCODERS.get(cfg.get("type", "?")).from_pretrained(path, **overrides)
