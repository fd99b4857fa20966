"""Analytic multiply-accumulates (MACs) of an LLM prefill under one definition, for any token schedule.

Definition (DESIGN.md, "Measured, not claimed"; quoted in docs/benchmarks.md and in every JSON report):

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

A :class:`Schedule` lists the tokens entering each decoder layer and how many of them are visual; builders registered
in :data:`SCHEDULES` (``vanilla``, ``keep``, ``fastv``, ``pyramiddrop``, ``threshold``; add more with
:func:`register_schedule`) make one from a method's knobs, so every pruning method is comparable by the same count.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from transformers import AutoConfig, PretrainedConfig

from ..errors import CheckpointError, ConfigError
from .presets import ENCODER_PRESETS, LM_PRESETS, encoder_preset, lm_preset

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
        if str(spec).lower() in LM_PRESETS:
            config = lm_preset(str(spec))
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path} has no config.json; pass the directory a model was saved to "
                                      f"(save_pretrained) or an LLM preset: {', '.join(LM_PRESETS)}")
            config = _load_config_file(path / "config.json")
        elif path.is_file():
            config = _load_config_file(path)
        else:
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


# ----------------------------------------------------------------------------------------------- schedules
def kept(n: int, fraction: float) -> int:
    """Tokens left when keeping ``fraction`` of ``n``: round half up, at least 1 if fraction > 0 and n > 0."""
    if n <= 0 or fraction <= 0:
        return 0
    return min(n, max(1, math.floor(n * fraction + 0.5 + 1e-9)))  # 1e-9: 0.7 * 5 is 3.4999… in floats


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Schedule:
    """Tokens entering each decoder layer, and how many of them are visual.

    ``visual_input`` is the visual count before any reduction (the vanilla model's; defaults to ``visual[0]``);
    ``text`` the text tokens of the prompt. ``method``/``knobs`` record how it was built.
    """

    tokens: list[int]
    visual: list[int]
    text: int
    notes: str = ""
    method: str = "custom"
    knobs: dict[str, Any] = field(default_factory=dict)
    visual_input: int | None = None

    def __post_init__(self) -> None:
        self.tokens, self.visual = list(self.tokens), list(self.visual)
        if not self.tokens:
            raise ConfigError("a schedule needs the tokens entering each decoder layer; got an empty list")
        if len(self.tokens) != len(self.visual):
            raise ConfigError(f"schedule lists tokens for {len(self.tokens)} layers but visual counts for "
                              f"{len(self.visual)}; give one visual count per layer")
        for i, (n, v) in enumerate(zip(self.tokens, self.visual)):
            if not _is_int(n) or n < 1:
                raise ConfigError(f"layer {i} of the schedule gets {n!r} tokens; every layer needs a whole number "
                                  f"of tokens >= 1")
            if not _is_int(v) or not 0 <= v <= n:
                raise ConfigError(f"layer {i} of the schedule has {v!r} visual tokens among {n}; visual counts must "
                                  f"be whole numbers between 0 and the layer's tokens")
        if not _is_int(self.text) or self.text < 0:
            raise ConfigError(f"text token count {self.text!r} is invalid; give a whole number >= 0")
        if self.visual_input is None:
            self.visual_input = self.visual[0]
        if not _is_int(self.visual_input) or self.visual_input < max(self.visual):
            raise ConfigError(f"visual_input {self.visual_input!r} is below the visual tokens some layer sees "
                              f"({max(self.visual)}); it is the count before any reduction")

    @property
    def num_layers(self) -> int:
        return len(self.tokens)

    def vanilla(self) -> Schedule:
        """The same input with nothing pruned: every layer sees visual_input + text tokens."""
        n = self.visual_input + self.text
        return Schedule([n] * self.num_layers, [self.visual_input] * self.num_layers, self.text, method="vanilla")

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method, knobs=self.knobs, visual_input=self.visual_input, text=self.text,
                    tokens=self.tokens, visual=self.visual, notes=self.notes)


@dataclass(frozen=True)
class ScheduleMethod:
    """A registered schedule builder: ``build(num_layers, visual, text, **knobs)`` -> visual counts or a Schedule."""

    name: str
    build: Callable[..., "list[int] | Schedule"]
    knobs: dict[str, str]
    help: str

    @property
    def required(self) -> list[str]:
        params = list(inspect.signature(self.build).parameters.values())[3:]
        return [p.name for p in params if p.default is inspect.Parameter.empty]

    def describe(self) -> str:
        if not self.knobs:
            return f"{self.name} takes no knobs"
        return f"{self.name} takes: " + "; ".join(f"--{k} ({h})" for k, h in self.knobs.items())


SCHEDULES: dict[str, ScheduleMethod] = {}


def register_schedule(name: str, help: str, **knobs: str) -> Callable:
    """Register a builder ``f(num_layers, visual, text, **knobs) -> list[int]`` (visual tokens entering each
    layer; text tokens are never pruned) or ``-> Schedule``. ``knobs`` maps each knob to its help text."""

    def deco(fn: Callable) -> Callable:
        if name in SCHEDULES and SCHEDULES[name].build is not fn:
            raise ConfigError(f"schedule method '{name}' is registered twice; pick another name")
        SCHEDULES[name] = ScheduleMethod(name, fn, dict(knobs), help)
        return fn

    return deco


def _split(x: Any) -> list[Any]:
    if isinstance(x, str):
        return [s for s in x.replace(" ", "").split(",") if s]
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _fractions(method: str, knob: str, x: Any) -> list[float]:
    try:
        out = [float(s) for s in _split(x)]
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: --{knob} {x!r} is not a number; give a fraction between 0 and 1") from None
    if not out or any(not 0.0 <= f <= 1.0 for f in out):
        raise ConfigError(f"{method}: --{knob} {x!r} must be fraction(s) between 0 and 1 (e.g. 0.5)")
    return out


def _fraction(method: str, knob: str, x: Any) -> float:
    out = _fractions(method, knob, x)
    if len(out) != 1:
        raise ConfigError(f"{method}: --{knob} takes one fraction, got {x!r}")
    return out[0]


def _layers(method: str, knob: str, x: Any, lo: int, hi: int) -> list[int]:
    out = []
    for s in _split(x):
        try:
            f = float(s)
        except (TypeError, ValueError):
            f = math.nan
        if not f.is_integer():
            raise ConfigError(f"{method}: --{knob} {x!r} must be whole layer indices, e.g. 8,16,24")
        out.append(int(f))
    if not out or any(not lo <= k <= hi for k in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ConfigError(f"{method}: --{knob} {x!r} must be increasing 0-based layer indices between {lo} and {hi} "
                          f"for this model")
    return out


def _made(method: str, per_layer: list[int], visual: int, text: int, **knobs: Any) -> Schedule:
    """The Schedule of a builder's visual counts per layer, recording the knobs it resolved (defaults included)."""
    return Schedule([v + text for v in per_layer], per_layer, text, method=method, knobs=knobs, visual_input=visual)


@register_schedule("vanilla", "every layer sees every token")
def _vanilla(num_layers: int, visual: int, text: int) -> list[int]:
    return [visual] * num_layers


@register_schedule("keep", "a pre-LLM token op keeps a fraction of the visual tokens; every layer sees them",
                   keep="fraction of visual tokens kept before the LLM, required")
def _keep(num_layers: int, visual: int, text: int, keep: Any) -> Schedule:
    f = _fraction("keep", "keep", keep)
    return _made("keep", [kept(visual, f)] * num_layers, visual, text, keep=f)


@register_schedule("fastv", "FastV (Chen et al. 2024): layers before K see every token; layers K.. see the kept "
                   "fraction of visual tokens", layer="K, the first pruned layer (default 2)",
                   keep="fraction of visual tokens kept from layer K on (default 0.5)")
def _fastv(num_layers: int, visual: int, text: int, layer: Any = 2, keep: Any = 0.5) -> Schedule:
    ks = _layers("fastv", "layer", layer, 1, num_layers - 1)
    if len(ks) != 1:
        raise ConfigError(f"fastv: --layer takes one layer index K, got {layer!r}")
    k = ks[0]
    f = _fraction("fastv", "keep", keep)
    return _made("fastv", [visual] * k + [kept(visual, f)] * (num_layers - k), visual, text, layer=k, keep=f)


@register_schedule("pyramiddrop", "PyramidDrop (Xing et al. 2024): each listed layer starts a stage keeping "
                   "ratio of the visual tokens the previous stage had",
                   layers="first layer of each stage (default: quarters of the depth, 8,16,24 for 32 layers)",
                   ratio="λ, fraction of the remaining visual tokens each stage keeps (default 0.5)")
def _pyramiddrop(num_layers: int, visual: int, text: int, layers: Any = None, ratio: Any = 0.5) -> Schedule:
    if layers is None:
        layers = sorted({num_layers * q // 4 for q in (1, 2, 3)} - {0})
    starts = _layers("pyramiddrop", "layers", layers, 1, num_layers - 1)
    lam = _fraction("pyramiddrop", "ratio", ratio)
    out, v = [], visual
    for i in range(num_layers):
        if i in starts:
            v = kept(v, lam)
        out.append(v)
    return _made("pyramiddrop", out, visual, text, layers=starts, ratio=lam)


@register_schedule("threshold", "saliency threshold (VEN-VL HTE style): after each listed layer, the given fraction "
                   "of the input visual tokens is left for all later layers",
                   layers="layers after which tokens are dropped, required, e.g. 14,20",
                   keep="fraction of the input visual tokens left after each listed layer, non-increasing, required")
def _threshold(num_layers: int, visual: int, text: int, layers: Any, keep: Any) -> Schedule:
    at = _layers("threshold", "layers", layers, 0, num_layers - 2)
    fr = _fractions("threshold", "keep", keep)
    if len(fr) != len(at):
        raise ConfigError(f"threshold: --layers has {len(at)} entries but --keep has {len(fr)}; give one kept "
                          f"fraction per layer")
    if any(a < b for a, b in zip(fr, fr[1:])):
        raise ConfigError(f"threshold: --keep {keep!r} must not increase: dropped tokens do not come back")
    out, v = [], visual
    for i in range(num_layers):
        out.append(v)
        if i in at:
            v = kept(visual, fr[at.index(i)])
    return _made("threshold", out, visual, text, layers=at, keep=fr)


def load_schedules() -> dict[str, ScheduleMethod]:
    """Every schedule, including those a method file registers beside its policy (``hte``, ``sparsevlm``, ...):
    loading the layer-policy registry imports those files. Returns :data:`SCHEDULES`."""
    from ..registry import POLICIES  # core registry; it imports the policy package once, on first use

    POLICIES.names()
    return SCHEDULES


def schedule_for(method: str, num_layers: int, visual: int, text: int, **knobs: Any) -> Schedule:
    """Build the schedule of ``method`` (a key of :data:`SCHEDULES`) for ``visual`` + ``text`` input tokens.

    Knobs may be numbers, sequences or the CLI's strings ("8,16,24"). A knob of another method is an error that
    names this method's knobs.
    """
    if method not in SCHEDULES:
        load_schedules()
    if method not in SCHEDULES:
        raise ConfigError(f"unknown schedule method '{method}'; known: {', '.join(SCHEDULES)}")
    spec = SCHEDULES[method]
    if not _is_int(num_layers) or num_layers < 1:
        raise ConfigError(f"num_layers {num_layers!r} is invalid; give the LLM's decoder layer count (>= 1)")
    for name, n in (("visual", visual), ("text", text)):
        if not _is_int(n) or n < 0:
            raise ConfigError(f"{name} token count {n!r} is invalid; give a whole number >= 0")
    if visual + text == 0:
        raise ConfigError("visual and text token counts are both 0; give at least one token")
    for k in knobs:
        if k not in spec.knobs:
            owners = [m.name for m in SCHEDULES.values() if k in m.knobs]
            whose = f" (--{k} is a knob of {', '.join(owners)})" if owners else ""
            raise ConfigError(f"--{k} does not apply to method '{method}'{whose}; {spec.describe()}")
    missing = [k for k in spec.required if k not in knobs]
    if missing:
        raise ConfigError(f"method '{method}' needs --{', --'.join(missing)}; {spec.describe()}")
    out = spec.build(num_layers, visual, text, **knobs)
    if isinstance(out, Schedule):
        return out
    return Schedule([v + text for v in out], out, text, method=method, knobs=dict(knobs), visual_input=visual)


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
        if str(spec).lower() in ENCODER_PRESETS:
            config = encoder_preset(str(spec))
        elif path.is_dir() and (path / "config.json").is_file():
            config = _load_config_file(path / "config.json")
        elif path.is_file():
            config = _load_config_file(path)
        else:
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
    if not _is_int(size) or size < c.patch_size:
        raise ConfigError(f"image size {size!r} is smaller than one {c.patch_size}-pixel patch; give a larger size")
    layers = c.num_hidden_layers if num_layers is None else num_layers
    if not _is_int(layers) or not 0 <= layers <= c.num_hidden_layers:
        raise ConfigError(f"num_layers {num_layers!r} must be between 0 and the encoder's {c.num_hidden_layers}")
    d, n, patches = c.hidden_size, vision_tokens(c, size), (size // c.patch_size) ** 2
    if c.model_type.startswith("dinov2"):
        hidden = int(d * c.mlp_ratio)
        mlp = 3 * d * ((int(hidden * 2 / 3) + 7) // 8 * 8) if c.use_swiglu_ffn else 2 * d * hidden
    else:
        mlp = 2 * d * c.intermediate_size
    block = n * (4 * d * d + mlp) + 2 * n * n * d
    return patches * c.num_channels * c.patch_size**2 * d + layers * block
