"""Analytic multiply-accumulates (MACs) of an LLM prefill under one definition, for any token schedule.

Definition (docs/design.md, "Measured, not claimed"; quoted in docs/benchmarks.md and in every JSON report):

* **LLM MACs** = Σ over decoder layers i of  n_i · P_i + 2 · n_i² · d_attn, where n_i is the number of tokens
  entering layer i, P_i the weights of the layer's linear projections (q, k, v, o, gate, up, down; an MoE layer
  counts its router, its *activated* experts (top-k) and any shared expert with its gate), and
  d_attn = num_attention_heads · head_dim. The 2 · n² · d_attn term is QKᵀ plus AV over the full square: no causal
  halving, no sliding-window discount, as the papers' tables count. Biases, norms, RoPE, softmax, activations and
  residual adds are not counted.
* **LM head MACs** = hidden_size · vocab_size for ONE token: the last prefill position, which is all that generation
  computes (transformers' ``logits_to_keep=1``). Reported separately, never folded into LLM MACs.
* **Vision MACs** (:func:`vision_macs`) = the encoder's patch-embedding convolution plus its blocks counted the same
  way (q, k, v, o + 2-layer MLP, or 3 matrices for SwiGLU, + 2 · n² · d). Pooling heads are not counted (a VLM reads
  patch features). Reported separately; ``None`` when no encoder is given.
* **Fractions → counts**: ``kept(n, f) = ⌊n·f + ½⌋`` (round half up), at least 1 when f > 0 and n > 0, 0 when f = 0.
  Every schedule builder uses it.

A :class:`Schedule` (``compactvl.schedules``, re-exported here) lists the tokens entering each decoder layer and how
many of them are visual. :func:`schedule_for` makes one from a method's knobs: the method-independent builders
(``vanilla``, ``keep``, ``threshold``) or the ``macs_schedule`` each pruning policy declares in its own file (FastV,
PyramidDrop, SparseVLM, HTE, ...), so every pruning method is comparable by the same count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..errors import CheckpointError, ConfigError
from ..schedules import (SCHEDULES, Schedule, ScheduleMethod, is_int, kept, register_schedule, schedule_for,
                         schedule_methods)
from .presets import ENCODER_PRESETS, LM_PRESETS, encoder_preset, lm_preset, preset_key

__all__ = ["DEFINITION", "SCHEDULES", "Schedule", "ScheduleMethod", "kept", "register_schedule", "schedule_for",
           "schedule_methods", "load_schedules", "LMShape", "LayerMacs", "MacsReport", "get_lm_config", "lm_shape",
           "llm_macs", "get_encoder_config", "vision_macs", "vision_tokens"]


def load_schedules() -> dict[str, ScheduleMethod]:
    """Every schedule by name (``compactvl.schedules.schedule_methods``): the method-independent builders and the
    schedule each registered layer policy declares in its own file."""
    return schedule_methods()

DEFINITION = (
    "LLM MACs = sum over decoder layers i of n_i * P_i + 2 * n_i^2 * d_attn, where n_i = tokens entering layer i, "
    "P_i = weights of its linear projections (q, k, v, o, gate, up, down; an MoE layer counts its router, its "
    "activated top-k experts and any shared expert with its gate), d_attn = num_attention_heads * head_dim "
    "(QK^T and AV over the full square: no causal halving). Biases, norms, RoPE, softmax and activations are not "
    "counted. LM head = hidden_size * vocab_size for one token (the last prefill position, as generation computes "
    "it), reported separately. Vision MACs (patch embedding + encoder blocks, same rules) are reported separately. "
    "Kept counts: round(n * f) half up, at least 1 when f > 0."
)

# Llama-family decoders whose layers are exactly: attention (q, k, v, o) + gated MLP (gate, up, down) or MoE.
SUPPORTED_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral",
                      "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text")


# ----------------------------------------------------------------------------------------------- configs
def _load_config_file(path: Path) -> PretrainedConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read model config {path}: {e}; pass a readable config.json") from e
    if "model_type" not in data:
        raise CheckpointError(f"{path} has no 'model_type'; pass the config.json a transformers model was saved with")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot build a config from {path}: {e}") from e


def _config_at(path: Path, kind: str, presets: dict) -> PretrainedConfig | None:
    """The config of a directory holding config.json or of a .json file; None when ``path`` does not exist."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; pass the directory a model was saved to "
                                  f"(save_pretrained) or an {kind} preset: {', '.join(presets)}")
        return _load_config_file(path / "config.json")
    return _load_config_file(path) if path.is_file() else None


def get_lm_config(spec: str | Path | PretrainedConfig | dict) -> PretrainedConfig:
    """The decoder config of ``spec``: a preset name (``LM_PRESETS``), a directory holding config.json, a .json
    file, a dict with ``model_type``, or a transformers config. A multimodal config yields its text config."""
    if isinstance(spec, dict):
        if "model_type" not in spec:
            raise ConfigError("a config dict needs 'model_type' (e.g. 'llama'); add it or pass a preset name")
        config = AutoConfig.for_model(**spec)
    elif isinstance(spec, PretrainedConfig):
        config = spec
    elif isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        config = lm_preset(str(spec)) if preset_key(spec, LM_PRESETS) else _config_at(path, "LLM", LM_PRESETS)
        if config is None:
            raise ConfigError(f"unknown LLM '{spec}': not a preset and not an existing path; known presets: "
                              f"{', '.join(LM_PRESETS)}. Pick one, or pass a directory holding config.json")
    else:
        raise ConfigError(f"cannot read an LLM config from a {type(spec).__name__}; pass a preset name, "
                          f"a path or a transformers PretrainedConfig")
    text = config.get_text_config(decoder=True)
    return text if text is not None else config


@dataclass(frozen=True)
class LMShape:
    """The numbers of an LM config that MACs depend on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # qwen2_moe's always-on shared expert (0: none)
    sparse_layers: frozenset[int] = frozenset()

    @property
    def d_attn(self) -> int:
        return self.heads * self.head_dim

    def linear_per_token(self, layer: int) -> int:
        """Weights of layer ``layer``'s linear projections that one token passes through (MACs per token)."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        attn = d * self.d_attn + 2 * d * kv + self.d_attn * d
        if layer not in self.sparse_layers:
            return attn + 3 * d * self.intermediate
        moe = d * self.num_experts + self.top_k * 3 * d * self.expert_intermediate
        if self.shared_intermediate:
            moe += 3 * d * self.shared_intermediate + d  # shared expert + its sigmoid gate Linear(d, 1)
        return attn + moe


def lm_shape(config: PretrainedConfig) -> LMShape:
    """Read an LM config (see :func:`get_lm_config`) into an :class:`LMShape`."""
    config = get_lm_config(config)
    mt = getattr(config, "model_type", "")
    if mt not in SUPPORTED_LM_TYPES:
        raise ConfigError(f"model_type '{mt}' is not supported by the MACs counter; supported: "
                          f"{', '.join(SUPPORTED_LM_TYPES)}. Use a Llama-family decoder config")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    common = dict(model_type=mt, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                  kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                  intermediate=config.intermediate_size, vocab=config.vocab_size)
    if mt in ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe_text"):
        skip = set(getattr(config, "mlp_only_layers", None) or [])
        step = config.decoder_sparse_step
        sparse = frozenset(i for i in range(config.num_hidden_layers)
                           if i not in skip and config.num_experts > 0 and (i + 1) % step == 0)
        return LMShape(**common, num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                       expert_intermediate=config.moe_intermediate_size,
                       shared_intermediate=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                       sparse_layers=sparse)
    if mt == "mixtral":
        return LMShape(**common, num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                       expert_intermediate=config.intermediate_size,
                       sparse_layers=frozenset(range(config.num_hidden_layers)))
    return LMShape(**common)


# ----------------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class LayerMacs:
    layer: int
    tokens: int
    visual: int
    linear: int
    attention: int
    sparse: bool = False

    @property
    def total(self) -> int:
        return self.linear + self.attention


@dataclass(frozen=True)
class MacsReport:
    """Per-layer and total MACs of one schedule (see the module docstring for the definition)."""

    model: str
    shape: LMShape
    schedule: Schedule
    layers: list[LayerMacs]
    lm_head_macs: int
    vanilla_llm_macs: int
    vision_macs: int | None = None
    encoder: str | None = None
    vision_tokens: int | None = None

    @property
    def llm_macs(self) -> int:
        return sum(r.total for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.llm_macs / self.vanilla_llm_macs

    @property
    def total_macs(self) -> int:
        return self.llm_macs + self.lm_head_macs + (self.vision_macs or 0)

    def with_vision(self, encoder: Any, image_size: int | None = None) -> MacsReport:
        """This report plus the MACs of ``encoder`` (anything :func:`get_encoder_config` takes) on one image."""
        name = str(encoder) if isinstance(encoder, (str, Path)) else getattr(encoder, "model_type", "encoder")
        return replace(self, vision_macs=vision_macs(encoder, image_size), encoder=name,
                       vision_tokens=vision_tokens(encoder, image_size))

    def to_dict(self) -> dict[str, Any]:
        s = self.schedule
        return dict(
            llm=self.model, model_type=self.shape.model_type, num_layers=self.shape.layers,
            method=s.method, knobs=s.knobs, visual_input=s.visual_input, text=s.text,
            llm_macs=self.llm_macs, lm_head_macs=self.lm_head_macs, lm_head_tokens=1,
            vision_macs=self.vision_macs, encoder=self.encoder, vision_tokens=self.vision_tokens, total_macs=self.total_macs,
            vanilla_llm_macs=self.vanilla_llm_macs, ratio_vs_vanilla=self.ratio,
            schedule=[dict(layer=r.layer, tokens=r.tokens, visual=r.visual, linear_macs=r.linear,
                           attention_macs=r.attention, macs=r.total, moe=r.sparse) for r in self.layers],
            notes=s.notes, definition=DEFINITION,
        )

    def table(self) -> str:
        """A readable per-layer table with totals in GMACs."""
        sh, s, g = self.shape, self.schedule, 1e9
        knobs = ", ".join(f"{k}={v}" for k, v in s.knobs.items())
        moe = f", MoE {sh.num_experts} experts top-{sh.top_k} in {len(sh.sparse_layers)} layers" if sh.sparse_layers else ""
        lines = [
            f"{self.model} ({sh.model_type}): {sh.layers} decoder layers, hidden {sh.hidden}, attention "
            f"{sh.heads}x{sh.head_dim} ({sh.kv_heads} KV heads), MLP {sh.intermediate}, vocab {sh.vocab}{moe}",
            f"method {s.method}{f' ({knobs})' if knobs else ''}; input {s.visual_input} visual + {s.text} text tokens",
            "",
            f"{'layer':>5} {'tokens':>7} {'visual':>7} {'linear GMACs':>13} {'attention GMACs':>16} {'GMACs':>10}",
        ]
        lines += [f"{r.layer:>5} {r.tokens:>7} {r.visual:>7} {r.linear / g:>13.3f} {r.attention / g:>16.3f} "
                  f"{r.total / g:>10.3f}" for r in self.layers]
        vision = (f"{self.vision_macs / g:12.3f} GMACs  ({self.encoder}, {self.vision_tokens} tokens)" if self.vision_macs is not None
                  else f"{'not counted':>12}        (no --encoder)")
        lines += [
            "",
            f"LLM decoder layers {self.llm_macs / g:12.3f} GMACs  (vanilla {self.vanilla_llm_macs / g:.3f}, "
            f"ratio {self.ratio:.4f})",
            f"LM head (1 token)  {self.lm_head_macs / g:12.3f} GMACs",
            f"vision             {vision}",
            f"total              {self.total_macs / g:12.3f} GMACs",
        ]
        return "\n".join(lines)


def _layer_rows(shape: LMShape, schedule: Schedule) -> list[LayerMacs]:
    return [LayerMacs(i, n, v, n * shape.linear_per_token(i), 2 * n * n * shape.d_attn, i in shape.sparse_layers)
            for i, (n, v) in enumerate(zip(schedule.tokens, schedule.visual))]


def llm_macs(config: Any, schedule: Schedule, name: str | None = None) -> MacsReport:
    """MACs of the decoder layers of ``config`` (anything :func:`get_lm_config` takes) on ``schedule``."""
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"llm_macs needs a Schedule, got {type(schedule).__name__}; build one with schedule_for()")
    if name is None:
        name = str(config) if isinstance(config, (str, Path)) else getattr(config, "name_or_path", "") or "custom"
    shape = lm_shape(get_lm_config(config))
    if schedule.num_layers != shape.layers:
        raise ConfigError(f"the schedule covers {schedule.num_layers} layers but {name} has {shape.layers} decoder "
                          f"layers; give one token count per layer (schedule_for(..., num_layers={shape.layers}))")
    vanilla = sum(r.total for r in _layer_rows(shape, schedule.vanilla()))
    return MacsReport(name, shape, schedule, _layer_rows(shape, schedule), shape.hidden * shape.vocab, vanilla)


# ----------------------------------------------------------------------------------------------- vision side
VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers")


def get_encoder_config(spec: str | Path | PretrainedConfig) -> PretrainedConfig:
    """A vision config from an encoder preset (``ENCODER_PRESETS``), a path to config.json or its directory, or a
    config (a CLIP / SigLIP dual config yields its vision config)."""
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        config = (encoder_preset(str(spec)) if preset_key(spec, ENCODER_PRESETS)
                  else _config_at(path, "encoder", ENCODER_PRESETS))
        if config is None:
            raise ConfigError(f"unknown encoder '{spec}': not a preset and not a config path; known presets: "
                              f"{', '.join(ENCODER_PRESETS)}")
    elif isinstance(spec, PretrainedConfig):
        config = spec
    else:
        raise ConfigError(f"cannot read an encoder config from a {type(spec).__name__}; pass a preset or a config")
    vision = getattr(config, "vision_config", None)
    return vision if isinstance(vision, PretrainedConfig) else config


def vision_tokens(config: Any, image_size: int | None = None) -> int:
    """Tokens the encoder's blocks see: patches, plus CLS (CLIP, DINOv2) and register tokens."""
    config = get_encoder_config(config)
    size = image_size or config.image_size
    n = (size // config.patch_size) ** 2
    if config.model_type in ("clip_vision_model", "dinov2", "dinov2_with_registers"):
        n += 1
    return n + (getattr(config, "num_register_tokens", 0) if config.model_type == "dinov2_with_registers" else 0)


def vision_macs(encoder_config: Any, image_size: int | None = None, num_layers: int | None = None) -> int:
    """MACs of a ViT-style encoder (CLIP / SigLIP / DINOv2) on one image: patch-embedding convolution plus
    ``num_layers`` blocks (default all) of q, k, v, o + MLP + 2·n²·d. Pooling heads are not counted."""
    c = get_encoder_config(encoder_config)
    if c.model_type not in VISION_TYPES:
        raise ConfigError(f"encoder model_type '{c.model_type}' is not supported; supported: {', '.join(VISION_TYPES)}")
    size = image_size or c.image_size
    if not is_int(size) or size < c.patch_size:
        raise ConfigError(f"image size {size!r} is smaller than one {c.patch_size}-pixel patch; give a larger size")
    layers = c.num_hidden_layers if num_layers is None else num_layers
    if not is_int(layers) or not 0 <= layers <= c.num_hidden_layers:
        raise ConfigError(f"num_layers {num_layers!r} must be between 0 and the encoder's {c.num_hidden_layers}")
    d, n, patches = c.hidden_size, vision_tokens(c, size), (size // c.patch_size) ** 2
    if c.model_type.startswith("dinov2"):
        hidden = int(d * c.mlp_ratio)
        mlp = 3 * d * ((int(hidden * 2 / 3) + 7) // 8 * 8) if c.use_swiglu_ffn else 2 * d * hidden
    else:
        mlp = 2 * d * c.intermediate_size
    block = n * (4 * d * d + mlp) + 2 * n * n * d
    return patches * c.num_channels * c.patch_size**2 * d + layers * block
