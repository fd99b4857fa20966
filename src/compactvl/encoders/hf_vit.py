"""Hugging Face ViT encoders — CLIP, SigLIP, DINOv2 (with or without registers) — as one ``VisionEncoder``.

Papers: CLIP (Radford et al. 2021), SigLIP (Zhai et al. 2023), DINOv2 (Oquab et al. 2023). LLaVA taps CLIP's
penultimate block (``default_layer=-2``); the others default to the last block (``-1``).

Features: ``features[L] = hidden_states[L][:, P:]`` with ``P`` prefix tokens (CLS + registers; 0 for SigLIP),
without the model's final LayerNorm unless ``post_norm=True`` (then it is applied to the last block's output, as
PaliGemma does for SigLIP and DINOv2's ``last_hidden_state``). The wrapped model runs with SDPA.

Attention of block ``L`` (input ``h = hidden_states[L-1]``, pre-norm ``LN``, projections ``W_q, W_k``):
    q = W_q LN(h)_cls,  K = W_k LN(h),  a = softmax(q Kᵀ / sqrt(d_head)) per head  → a[..., P:]   (CLS models)
    a_j = mean_i softmax(Q_i Kᵀ / sqrt(d_head))_j over patch queries i            (SigLIP: no CLS, substitute)
``keys(L) = W_k LN(h)[:, P:]`` with heads concatenated.

Knobs: ``image_size`` (default: the hub image processor's crop size — CLIP/SigLIP ``config.image_size``, DINOv2 224;
other sizes interpolate the position embeddings), ``image_mean``/``image_std`` (CLIP's, 0.5/0.5 for SigLIP, ImageNet
for DINOv2, or ``preprocessor_config.json`` when present), ``default_layer``, ``post_norm``.
"""
from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import transformers
from huggingface_hub import hf_hub_download
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel

from ..errors import CheckpointError, ConfigError
from ..registry import ENCODERS
from .base import ENCODER_CONFIG, EncoderOutput, VisionEncoder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# vision model_type -> (mean, std, image_size or None for config.image_size, default_layer)
DEFAULTS = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD, None, -2),
    "siglip_vision_model": (HALF, HALF, None, -1),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, 224, -1),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD, 224, -1),
}
# checkpoint model_type -> vision model_type (full CLIP / SigLIP checkpoints hold a vision_config)
CHECKPOINT_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", **{t: t for t in DEFAULTS}}
QUERY_CHUNK = 256  # query rows per softmax in the no-CLS substitute (bounds memory at [B, H, 256, T])


def _model_class(vision_type: str):
    name = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES[vision_type]
    return getattr(transformers, name)


def _read_json(path_or_id: str, filename: str) -> dict:
    """A json file from a local dir or the hub cache; {} when absent (offline, or no such file)."""
    p = Path(path_or_id) / filename
    if not p.is_file():
        if Path(path_or_id).is_dir():
            return {}
        try:
            p = Path(hf_hub_download(path_or_id, filename))
        except Exception:  # noqa: BLE001 — absent or offline: fall back to defaults
            return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _processor_knobs(pp: dict) -> dict:
    """image_size / mean / std from a Hugging Face preprocessor_config.json."""
    out = {}
    for key, flag in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        v = pp.get(key) if pp.get(flag, True) else None
        if isinstance(v, dict):
            v = v.get("height") or v.get("shortest_edge")
        if isinstance(v, int):
            out["image_size"] = v
            break
    if "image_mean" in pp and "image_std" in pp:
        out["image_mean"], out["image_std"] = tuple(pp["image_mean"]), tuple(pp["image_std"])
    return out


@ENCODERS.register("hf_vit")
class HFViTEncoder(VisionEncoder):
    def __init__(self, model: nn.Module, *, name: str | None = None, image_size: int | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 default_layer: int | None = None, post_norm: bool = False):
        super().__init__()
        cfg = model.config
        if cfg.model_type not in DEFAULTS:
            raise ConfigError(f"hf_vit wraps {', '.join(DEFAULTS)} models, got model_type '{cfg.model_type}'; "
                              "load CLIPVisionModel / SiglipVisionModel / Dinov2Model checkpoints")
        mean, std, size, layer = DEFAULTS[cfg.model_type]
        self.model = model.eval()
        self.name = name or getattr(cfg, "_name_or_path", "") or cfg.model_type
        self.hidden_size, self.num_layers = cfg.hidden_size, cfg.num_hidden_layers
        self.patch_size = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.image_size = int(image_size or size or cfg.image_size)
        self.image_mean, self.image_std = tuple(image_mean or mean), tuple(image_std or std)
        self.num_heads = cfg.num_attention_heads
        self.num_prefix = 0 if cfg.model_type.startswith("siglip") else 1 + getattr(cfg, "num_register_tokens", 0)
        self.has_cls = self.num_prefix > 0
        self.default_layer = layer if default_layer is None else int(default_layer)
        self.resolve_layer(self.default_layer)
        self.post_norm = bool(post_norm)
        self._interpolate_kw = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    # ---- module layout (CLIP/SigLIP: encoder.layers[i].layer_norm1/self_attn.q_proj; DINOv2: encoder.layer[i].norm1/
    #      attention.q_proj, or attention.attention.query in older transformers) ---------------------------------
    @property
    def _root(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)

    def _block(self, i: int) -> nn.Module:
        enc = self._root.encoder
        return (enc.layers if hasattr(enc, "layers") else enc.layer)[i]

    def _final_norm(self) -> nn.Module:
        root = self._root
        return root.post_layernorm if hasattr(root, "post_layernorm") else root.layernorm

    def _block_qk(self, i: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        b = self._block(i)
        norm = b.layer_norm1 if hasattr(b, "layer_norm1") else b.norm1
        attn = b.self_attn if hasattr(b, "self_attn") else b.attention
        if hasattr(attn, "q_proj"):
            return norm, attn.q_proj, attn.k_proj
        return norm, attn.attention.query, attn.attention.key

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, pixel_values: Tensor, layers: Sequence[int] | int | None = None) -> EncoderOutput:
        layers = self._layers(layers)
        self._check_pixels(pixel_values, self.patch_size)
        h, w = (s // self.patch_size for s in pixel_values.shape[-2:])
        kw = {}
        if self._interpolate_kw and (h * self.patch_size, w * self.patch_size) != (self.model.config.image_size,) * 2:
            kw["interpolate_pos_encoding"] = True
        ref = next(self.model.parameters())
        pixel_values = pixel_values.to(ref.device, ref.dtype)
        hs = self.model(pixel_values=pixel_values, output_hidden_states=True, **kw).hidden_states
        taps: dict[int, Tensor] = {}
        for layer in layers:
            i = self.resolve_layer(layer)
            if i not in taps:
                taps[i] = self._final_norm()(hs[i]) if self.post_norm and i == self.num_layers else hs[i]
        p = self.num_prefix
        return EncoderOutput(
            features={layer: taps[self.resolve_layer(layer)][:, p:] for layer in layers},
            grid=(h, w),
            cls=taps[self.resolve_layer(layers[-1])][:, 0] if self.has_cls else None,
            attention_substitute=not self.has_cls,
            encoder=self.name,
            attention_fn=partial(self._attention, hs),
            keys_fn=partial(self._keys, hs),
        )

    def _block_input(self, hs: Sequence[Tensor], layer: int) -> tuple[int, Tensor]:
        i = self.resolve_layer(layer)
        if i == 0:
            raise ConfigError(f"attention/keys of encoder '{self.name}' are indexed by block 1..{self.num_layers} "
                              "(block L produces features[L]); layer 0 is the embeddings and has no attention")
        return i - 1, hs[i - 1]

    def _keys(self, hs: Sequence[Tensor], layer: int) -> Tensor:
        b, x = self._block_input(hs, layer)
        norm, _, k_proj = self._block_qk(b)
        return k_proj(norm(x[:, self.num_prefix:]))

    def _attention(self, hs: Sequence[Tensor], layer: int) -> Tensor:
        b, x = self._block_input(hs, layer)
        norm, q_proj, k_proj = self._block_qk(b)
        x = norm(x)
        B, T, _ = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2).float()  # noqa: E731
        k = heads(k_proj(x))  # [B, H, T, d]
        scale = k.shape[-1] ** -0.5
        p = self.num_prefix
        if self.has_cls:
            q = heads(q_proj(x[:, :1]))  # [B, H, 1, d]
            return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[:, :, 0, p:]
        q = heads(q_proj(x[:, p:]))  # patch queries
        total = sum(torch.softmax(qc @ k.transpose(-1, -2) * scale, dim=-1).sum(2) for qc in q.split(QUERY_CHUNK, 2))
        return total[..., p:] / q.shape[2]

    # ---- config / persistence ------------------------------------------------------------------------------
    def _knobs(self) -> dict:
        return {"type": "hf_vit", "name": self.name, "image_size": self.image_size, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "default_layer": self.default_layer, "post_norm": self.post_norm}

    def to_config(self) -> dict:
        return {**self._knobs(), "hf_config": json.loads(self.model.config.to_json_string())}

    @classmethod
    def from_config(cls, cfg: dict) -> "HFViTEncoder":
        hf = dict(cfg["hf_config"])
        conf = AutoConfig.for_model(hf.pop("model_type"), **hf)
        model = AutoModel.from_config(conf, attn_implementation="sdpa")
        return cls(model, **{k: v for k, v in cfg.items() if k not in ("type", "hf_config")})

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        (path / ENCODER_CONFIG).write_text(json.dumps(self._knobs(), indent=1))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype: torch.dtype | None = None,
                        **overrides) -> "HFViTEncoder":
        """Load a CLIP / SigLIP (full or vision-only) / DINOv2 checkpoint from a local dir or hub id."""
        src = str(path_or_id)
        raw = _read_json(src, "config.json")
        if "radio" in f"{raw.get('model_type', '')} {raw.get('auto_map', '')}".lower():
            raise ConfigError(
                f"'{src}' is a RADIO checkpoint: its model code is remote (trust_remote_code) and its blocks use "
                "timm's fused-qkv layout, which hf_vit does not map; use a CLIP / SigLIP / DINOv2 checkpoint, or add "
                "a RADIO encoder file (one registration in compactvl.encoders)")
        try:
            conf = AutoConfig.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read a model config from '{src}': {e}; pass a directory holding "
                                  "config.json + weights, or a hub id this machine can download") from e
        mt = conf.model_type
        if mt not in CHECKPOINT_TYPES:
            raise ConfigError(f"'{src}' has model_type '{mt}'; hf_vit loads {', '.join(CHECKPOINT_TYPES)} checkpoints")
        knobs = _processor_knobs(_read_json(src, "preprocessor_config.json"))
        knobs.update({k: v for k, v in _read_json(src, ENCODER_CONFIG).items() if k != "type"})
        knobs.update(overrides)
        try:
            model = _model_class(CHECKPOINT_TYPES[mt]).from_pretrained(src, attn_implementation="sdpa", dtype=dtype)
        except OSError as e:
            raise CheckpointError(f"cannot load weights from '{src}': {e}; the directory needs model.safetensors "
                                  "(or pytorch_model.bin) next to config.json") from e
        knobs.setdefault("name", Path(src).name if Path(src).is_dir() else src)
        return cls(model, **knobs)
