"""Scoring overhead of pre-LLM token ops in ``compactvl bench --op``: the op grammar (:func:`parse_op`), synthetic
but complete op inputs (:func:`synthetic_op_inputs`), one timed op cell (:class:`OpMeasurement`) and its share of the
uncompressed LM prefill (:func:`add_op_shares`).

Grammar (repeat ``--op``): ``NAME:knob=value,...`` for any registered token op (``compactvl.ops``), with the budget
``tokens=K`` (count per image) or ``keep=F`` (fraction) mapped through the op's ``budget_knobs`` for the visual count
being measured, exactly as ``compress`` and ``eval`` do (``cdpruner:tokens=64`` is CDPruner with count 64); values
are JSON, lists as ``[7,14,21]`` or ``7/14/21``. A JSON recipe — one entry ``{"op": "divprune", "tokens": 64}`` or a
list ``[{"op": "pixel_shuffle", "k": 2}, {"op": "divprune", "keep": 0.5}]`` — times a whole pipeline; a ``"label"``
key (in the entry, or the first entry of a list) names it.

Inputs, per (visual count V, batch B): a √V×√V grid (a 1×V strip where V is no square) of V tokens of width C (``BenchSettings.op_width``, default
1024: CLIP ViT-L/14-336's 24×24 grid at V = 576) taken from a synthetic encoder output (``EncoderOutput``) with
random features at every layer the recipe reads (``TokenPipeline.required_layers``, default tap: the penultimate of
24 layers), CLS→patch attention of 16 heads (a softmax over CLS + V keys, the CLS column dropped), keys [B, V, C]
and a CLS token; and prompt text embeddings ``OpContext.text`` [B, T, C] (T = the bench's ``text``) of the tokens'
width, so that text-conditioned ops (cdpruner, mmtok, cotr) run their full relevance path rather than their
text-free fallback (in a compactvl model the prompt is the LLM's input embeddings, so cdpruner / mmtok fall back
where the LLM's width differs from the encoder's; the fallback skips work, so this is the upper bound). Recipes
with a fusion op get two such streams. Everything is on the LM's device and dtype. The encoder's own forward (which
makes the attention and keys) is not timed: it runs with or without the op.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..compression import op_spec
from ..encoders.base import EncoderOutput
from ..errors import ConfigError, InputError
from ..ops import OpContext, build_ops
from ..registry import TOKEN_OPS
from ..tokens import Tokens
from .measurement import BenchSettings, stats
from .methods import _split_top, _value

ENCODER_LAYERS = 24  # CLIP ViT-L/14: 24 blocks, LLaVA's tap is the penultimate one
DEFAULT_TAP = -2
HEADS = 16


@dataclass(frozen=True)
class OpSpec:
    """A token-op recipe to time: its label and the entries as given (budgets still as keep/tokens)."""

    label: str
    entries: tuple[dict, ...]  # {"op": NAME, knobs...}; keep=/tokens= mapped per visual count by recipe()

    @property
    def name(self) -> str:
        return "+".join(e["op"] for e in self.entries)

    def recipe(self, visual: int) -> list[dict]:
        """The ``build_ops`` recipe for images of ``visual`` tokens (budgets through each op's ``budget_knobs``)."""
        out = []
        for e in self.entries:
            knobs = {k: v for k, v in e.items() if k != "op"}
            out.append(op_spec(e["op"], knobs, visual))
        return out

    def streams(self) -> int:
        """Encoder streams the recipe takes: 2 when it fuses streams, else 1."""
        return 2 if any(TOKEN_OPS.get(e["op"]).fusion for e in self.entries) else 1

    def to_dict(self) -> dict:
        return dict(label=self.label, name=self.name, entries=[dict(e) for e in self.entries])


def known_ops() -> list[str]:
    return TOKEN_OPS.names()


def _check_entry(entry: Any, label: str) -> dict:
    if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
        raise ConfigError(f"op recipe {label!r}: entry {entry!r} is not a mapping with an 'op' name; write e.g. "
                          f"'{{\"op\": \"divprune\", \"tokens\": 64}}'")
    if entry["op"] not in TOKEN_OPS:
        raise ConfigError(f"unknown token op '{entry['op']}'; known: {', '.join(known_ops())}. Write "
                          f"NAME:knob=value,... e.g. --op cdpruner:tokens=64")
    return dict(entry)


def parse_op(spec: str | dict | list) -> OpSpec:
    """Parse an op spec (grammar in the module docstring). Knob values are checked when the op is built
    (:func:`check_ops`)."""
    if isinstance(spec, str) and spec.strip()[:1] in ("{", "["):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ConfigError(f"op {spec!r} starts like JSON but is not valid JSON ({e}); write e.g. "
                              f"'{{\"op\": \"divprune\", \"tokens\": 64}}' or NAME:knob=value") from None
    if isinstance(spec, (dict, list)):
        items = [spec] if isinstance(spec, dict) else list(spec)
        if not items:
            raise ConfigError("op recipe [] is empty; give at least one {\"op\": NAME, ...} entry")
        label = str(items[0].get("label", "") if isinstance(items[0], dict) else "")
        items = [{k: v for k, v in e.items() if k != "label"} if isinstance(e, dict) else e for e in items]
        label = label or json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return OpSpec(label, tuple(_check_entry(e, label) for e in items))
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise ConfigError("empty op; give e.g. --op cdpruner:tokens=64 or --op divprune:keep=0.25")
    name, _, body = text.partition(":")
    entry: dict[str, Any] = {"op": name}
    for item in _split_top(body):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"op '{text}': '{item}' is not knob=value; write e.g. {name}:tokens=64 "
                              f"(a budget: tokens=<count> or keep=<fraction>; other knobs as knob=value)")
        entry[key] = _value(value)
    return OpSpec(text, (_check_entry(entry, text),))


def op_grid(visual: int) -> tuple[int, int]:
    """The token grid of ``visual`` tokens: √V×√V when V is a square, else a 1×V strip (as ``CompressedVLM.budget``
    assumes), where ops with 2-D windows say that their window does not fit."""
    if visual < 1:
        raise ConfigError(f"--op needs at least one visual token, got --visual {visual}")
    side = math.isqrt(visual)
    return (side, side) if side * side == visual else (1, visual)


def check_ops(ops: list[OpSpec], settings: BenchSettings) -> None:
    """Build every op for every visual count before anything is timed, so a bad knob fails at once."""
    if ops and (not isinstance(settings.op_width, int) or settings.op_width < 1):
        raise ConfigError(f"--op-width must be a whole number >= 1 (the visual tokens' channels), got "
                          f"{settings.op_width!r}")
    if ops and not (isinstance(settings.op_limit, (int, float)) and settings.op_limit > 0):
        raise ConfigError(f"--op-limit must be a percentage > 0, got {settings.op_limit!r}")
    labels = [o.label for o in ops]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"op(s) {dup} are given twice; give each once (labels must be unique)")
    for o in ops:
        for v in settings.visual:
            op_grid(v)
            try:
                build_ops(o.recipe(v), [settings.op_width] * o.streams(), text_dim=settings.op_width)
            except ConfigError as e:
                raise ConfigError(f"--op {o.label}: {e}") from None


def synthetic_op_inputs(streams: int, visual: int, batch: int, width: int, text: int, required: list[list[int]],
                        device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[list[Tokens], OpContext]:
    """(one Tokens per stream, the OpContext) as described in the module docstring; ``required``: per stream, the
    encoder layers to give features for (normalised, from ``TokenPipeline.required_layers``)."""
    grid = op_grid(visual)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    tap = ENCODER_LAYERS + DEFAULT_TAP
    encs, toks = [], []
    for s in range(streams):
        feats = {layer: rand(batch, visual, width) for layer in sorted({tap, *required[s]})}
        logits = torch.randn(batch, HEADS, visual + 1, generator=gen) * 2
        att = logits.softmax(-1)[..., 1:].to(device=device, dtype=dtype)  # CLS column dropped: rows sum below 1
        keys = rand(batch, visual, width)
        enc = EncoderOutput(features=feats, grid=grid, cls=rand(batch, width), encoder="synthetic",
                            attention_fn=lambda layer, a=att: a, keys_fn=lambda layer, k=keys: k)
        encs.append(enc)
        toks.append(Tokens.from_encoder(enc, tap, source=s))
    ctx = OpContext(encoders=encs, text=rand(batch, text, width),
                    text_mask=torch.ones(batch, text, dtype=torch.bool, device=device))
    return toks, ctx


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OpMeasurement:
    """One op cell (op recipe, visual count, batch): the built pipeline on the LM's device and dtype, its synthetic
    inputs, untimed warm-ups and timed forwards (``perf_counter``, CUDA synchronised before and after)."""

    def __init__(self, op: OpSpec, visual: int, batch: int, settings: BenchSettings, device: torch.device,
                 dtype: torch.dtype):
        self.op, self.visual, self.batch, self.settings, self.device = op, visual, batch, settings, device
        width, n = settings.op_width, op.streams()
        self.pipe = build_ops(op.recipe(visual), [width] * n, text_dim=width).to(device=device, dtype=dtype).eval()
        required = self.pipe.required_layers(DEFAULT_TAP, ENCODER_LAYERS)
        self.streams, self.ctx = synthetic_op_inputs(n, visual, batch, width, settings.text, required, device, dtype,
                                                     settings.seed)
        self.op_ms: list[float] = []
        self.out: Tokens | None = None

    @torch.inference_mode()
    def warmup(self) -> None:
        try:
            self.out = self.pipe(self.streams, self.ctx)
        except (ConfigError, InputError) as e:
            raise type(e)(f"--op {self.op.label} (visual {self.visual} = {self.streams[0].grid[0]}x"
                          f"{self.streams[0].grid[1]} grid, batch {self.batch}): {e}") from None

    @torch.inference_mode()
    def timed(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.pipe(self.streams, self.ctx)
        _sync(self.device)
        self.op_ms.append((time.perf_counter() - t0) * 1e3)
        self.out = out

    def result(self) -> dict:
        """The op row; ``prefill_ms`` / ``share`` / ``over_limit`` are filled by :func:`add_op_shares`."""
        counts = self.out.kept_counts().tolist() if self.out is not None else []
        return dict(op=self.op.label, name=self.op.name, recipe=self.op.recipe(self.visual),
                    visual_input=self.visual, batch=self.batch, width=self.settings.op_width,
                    streams=len(self.streams), tokens_out=max(counts) if counts else 0,
                    op_ms=stats(self.op_ms), prefill_ms=None, share=None, limit=self.settings.op_limit / 100,
                    over_limit=None, notes=list(self.out.notes) if self.out is not None else [])


def add_op_shares(op_rows: list[dict], rows: list[dict]) -> None:
    """Fill each op row's ``prefill_ms`` (the vanilla prefill median with the same visual count and batch), ``share``
    (op median / that prefill median) and ``over_limit`` (share > limit); left None where vanilla was skipped."""
    base = {(r["visual_input"], r["batch"]): r for r in rows if r["kind"] == "vanilla"}
    for r in op_rows:
        v = base.get((r["visual_input"], r["batch"]))
        if v is None:
            continue
        r["prefill_ms"] = v["prefill_ms"]["median"]
        r["share"] = r["op_ms"]["median"] / r["prefill_ms"]
        r["over_limit"] = r["share"] > r["limit"]
