"""Token-op plumbing: the op base classes, the op context, recipes (``build_ops``) and :class:`TokenPipeline`.

A pipeline state is a list of streams (one :class:`~compactvl.tokens.Tokens` per encoder) plus an
:class:`OpContext`. Single-stream ops (:class:`StreamOp`) map over the streams (knob ``streams`` restricts them);
fusion ops (``fusion = True``: mke, cross_merge, cotr, concat_channels, concat_tokens) turn all streams into one.
A recipe is a list of dicts, ``[{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.5}]``; the keys
besides ``op`` are the op's knobs (its keyword-only constructor arguments).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..registry import TOKEN_OPS
from ..schedules import Budget, kept, no_budget
from ..tokens import EncoderOutputLike, Grid, Tokens

NOT_KNOBS = {"self", "in_channels", "text_dim"}


@dataclass
class OpContext:
    """What ops may read besides the tokens: the encoder outputs (indexed by ``Tokens.source``) and the prompt."""

    encoders: list[EncoderOutputLike] = field(default_factory=list)
    text: Tensor | None = None  # [B, T, D] prompt embeddings (CoTR)
    text_mask: Tensor | None = None  # [B, T] bool

    def encoder(self, t: Tokens, op: str) -> EncoderOutputLike:
        if t.source >= len(self.encoders):
            raise InputError(f"{op} reads encoder attention/keys/features but OpContext has no encoder output for "
                             f"stream {t.source}; pass OpContext(encoders=[...]) with one EncoderOutput per stream")
        return self.encoders[t.source]


def register(*names: str):
    """Register a TokenOp class under one or more names (the first is its canonical name)."""

    def deco(cls: type["TokenOp"]) -> type["TokenOp"]:
        cls.name = names[0]
        for n in names:
            TOKEN_OPS.register(n)(cls)
        return cls

    return deco


def check_ratio(value: float, knob: str, op: str, *, low_open: bool, high_open: bool) -> float:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise ConfigError(f"{op}: {knob}={value!r} is out of range; use a number in {lo}0, 1{hi}")
    return float(value)


def budget_count(op: str, budget: Budget, n: int | None, fixed: bool = False) -> int:
    """Tokens per image of ``budget`` for images of ``n`` tokens (None: unknown, only a count works there).
    ``fixed``: the op's knob is relative to n, so even a count needs n."""
    if n is None and (budget.tokens is None or fixed):
        give = "give a fraction (keep=<fraction>)" if fixed else "give a count (tokens=<count>)"
        raise ConfigError(f"{op}: {budget} needs a fixed token count per image; {give}: this model's images have "
                          f"different token counts inside one batch")
    return budget.tokens if n is None else budget.count(n)


def check_int(value: int, knob: str, op: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{op}: {knob}={value!r} must be an integer >= {low}")
    return value


class TokenOp(nn.Module):
    """Base class. Subclasses take ``in_channels: list[int]`` then keyword-only knobs (stored as attributes)."""

    name: ClassVar[str] = "token_op"
    fusion: ClassVar[bool] = False

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        raise NotImplementedError

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        """This op's knobs for ``budget`` (``keep`` fraction or ``tokens`` count, per image) on images of ``n``
        tokens (None: the count varies inside a batch). Default: the op has no budget knob."""
        raise no_budget(cls.name, cls.knobs())

    @classmethod
    def knobs(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in NOT_KNOBS]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return list(in_channels)

    def expected_tokens(self, n_in: list[int], grids: list[Grid | None]) -> list[int | None]:
        """Token count per output stream for full inputs of ``n_in`` tokens (None: data dependent)."""
        return list(n_in)

    def out_grids(self, grids: list[Grid | None]) -> list[Grid | None]:
        return [None] * (1 if self.fusion else len(grids))

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        """Encoder layers this op reads (features, attention or keys) for input stream ``stream``."""
        return []

    def describe(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={getattr(self, k, None)!r}" for k in self.knobs()) + ")"

    def extra_repr(self) -> str:
        return self.describe()


class StreamOp(TokenOp):
    """An op applied to each stream independently (``streams``: which stream indices, default all)."""

    def __init__(self, in_channels: list[int], streams: Sequence[int] | None = None):
        super().__init__()
        n = len(in_channels)
        self.streams = None if streams is None else list(streams)
        targets = range(n) if streams is None else streams
        bad = [s for s in targets if not isinstance(s, int) or not 0 <= s < n]
        if bad:
            raise ConfigError(f"{self.name}: streams={list(targets)} names streams {bad} but only {n} exist at "
                              f"this point of the recipe; use indices 0..{n - 1}")
        self.targets = sorted(set(targets))

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        raise NotImplementedError

    def channels(self, c: int, i: int) -> int:
        return c

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return n

    def grid_out(self, grid: Grid | None) -> Grid | None:
        return None

    def forward(self, streams: list[Tokens], ctx: OpContext) -> list[Tokens]:
        return [self.apply(t, ctx, i) if i in self.targets else t for i, t in enumerate(streams)]

    def out_channels(self, in_channels: list[int]) -> list[int]:
        return [self.channels(c, i) if i in self.targets else c for i, c in enumerate(in_channels)]

    def expected_tokens(self, n_in: list[int], grids: list[Grid | None]) -> list[int | None]:
        return [None if n is None else self.tokens_out(n, g) if i in self.targets else n
                for i, (n, g) in enumerate(zip(n_in, grids))]

    def out_grids(self, grids: list[Grid | None]) -> list[Grid | None]:
        return [self.grid_out(g) if i in self.targets else g for i, g in enumerate(grids)]


# ---- grid helpers shared by avgpool / pixel_shuffle / stf ---------------------------------------------------
class CountOrRatioOp(StreamOp):
    """A selection op that keeps ``count`` tokens per image or a ``ratio`` of each image's tokens (one of the two;
    ``kept(n, ratio)`` per image), with the budget mapping every such op shares: ``tokens=k`` → ``count=k``,
    ``keep=f`` → ``count=kept(n, f)`` for images of n tokens, or ``ratio=f`` when n varies inside a batch."""

    def set_budget(self, count: int | None, ratio: float | None, default_count: int | None = None,
                   default_ratio: float | None = None) -> None:
        """Check and store the knobs; with neither given, ``default_count`` (or ``default_ratio``) applies."""
        if ratio is not None and count is not None:
            raise ConfigError(f"{self.name}: ratio={ratio!r} and count={count!r} both set the kept tokens; give one "
                              "(count: tokens kept per image, ratio: fraction kept per image)")
        if count is None and ratio is None:
            count, ratio = default_count, default_ratio
        self.ratio = None if ratio is None else check_ratio(ratio, "ratio", self.name, low_open=True, high_open=False)
        self.count = None if count is None else check_int(count, "count", self.name)

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        if budget.fraction is not None and n is None:
            return {"ratio": budget.fraction}
        return {"count": budget_count(cls.name, budget, n)}

    def counts(self, n: Tensor) -> Tensor:
        """Tokens kept per sample with ``n [B]`` valid tokens."""
        if self.count is not None:
            return n.clamp(max=self.count)
        k = torch.floor(n.double() * self.ratio + 0.5 + 1e-9).long()  # schedules.kept, per sample
        return torch.minimum(k.clamp_min(1), n)

    def tokens_out(self, n: int, grid: Grid | None) -> int | None:
        return min(self.count, n) if self.count is not None else kept(n, self.ratio)


def no_text_note(op: str, fallback: str) -> str:
    return f"{op}: no prompt text in OpContext.text; {fallback}"


def empty_prompt_note(op: str, fallback: str) -> str:
    return f"{op}: a sample had an empty prompt; {fallback} for that sample"


def prompt_text(op: str, ctx: OpContext, batch: int, width: int, device: Any,
                fallback: str) -> tuple[Tensor | None, Tensor | None, str | None]:
    """The prompt embeddings a text-conditioned op reads: (``ctx.text`` [B,T,C] on ``device``, its mask [B,T], a
    note or None). Without text, or text of another width than the tokens', (None, None, a note saying so and what
    the op does instead: ``fallback``); a sample with an empty prompt gets a note too. A text batch that does not
    match the tokens' is an InputError."""
    text = ctx.text
    if text is None:
        return None, None, no_text_note(op, fallback)
    if text.shape[-1] != width:
        return None, None, (f"{op}: the prompt embeddings are {text.shape[-1]} wide but the visual tokens {width}; "
                            f"{fallback}")
    if text.dim() != 3 or text.shape[0] != batch:
        raise InputError(f"{op}: prompt embeddings have shape {tuple(text.shape)}, expected [{batch}, T, {width}] "
                         f"(one prompt per image of the batch)")
    tm = ctx.text_mask
    tm = torch.ones(text.shape[:2], dtype=torch.bool, device=device) if tm is None else tm.to(device).bool()
    return text.to(device), tm, None if bool(tm.any(1).all()) else empty_prompt_note(op, fallback)


def check_grid(t: Tokens, k: int, pad: bool, op: str) -> tuple[Grid, Grid]:
    """(grid, output grid) for a k×k window op; errors when tokens are no grid or k does not divide it."""
    if t.grid is None:
        raise InputError(f"{op} needs tokens that still form a grid, but an earlier op merged, pruned or "
                         f"resampled them; put {op} before such ops in the recipe")
    h, w = t.grid
    if (h % k or w % k) and not pad:
        raise InputError(f"{op}: the token grid {h}x{w} is not divisible by k={k}; use a k that divides both "
                         f"sides, change the image size, or set pad: true (zero-pads bottom/right to a multiple "
                         f"of k)")
    return (h, w), (-(-h // k), -(-w // k))


def window_dest(grid: Grid, k: int, per_window: int = 1, device: Any = None) -> Tensor:
    """[h*w]: output slot of each cell when k×k windows become ``per_window`` tokens (row-major windows,
    the j-th of the k² cells in a window, in row-major order, going to token j*per_window // k²)."""
    h, w = grid
    r = torch.arange(h, device=device).view(-1, 1)
    c = torch.arange(w, device=device).view(1, -1)
    win = (r // k) * (-(-w // k)) + c // k
    sub = ((r % k) * k + c % k) * per_window // (k * k)
    return (win * per_window + sub).reshape(-1)


def to_map(t: Tokens, grid: Grid, k: int) -> Tensor:
    """[B,C,h',w'] feature map of a grid stream, zero-padded bottom/right to multiples of k."""
    B, _, C = t.x.shape
    h, w = grid
    m = t.x.transpose(1, 2).reshape(B, C, h, w)
    return nn.functional.pad(m, (0, -w % k, 0, -h % k)) if h % k or w % k else m


# ---- pipeline -----------------------------------------------------------------------------------------------
def fusion_op_names() -> list[str]:
    return sorted(n for n in TOKEN_OPS.names() if TOKEN_OPS.get(n).fusion)


class TokenPipeline(nn.Module):
    """Runs token ops in order: list of streams (one per encoder) -> one :class:`Tokens`."""

    def __init__(self, ops: Sequence[TokenOp], in_channels: Sequence[int]):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.in_channels = list(in_channels)
        n = len(self.in_channels)
        for op in self.ops:
            n = 1 if op.fusion else n
        if n != 1:
            raise ConfigError(f"the token recipe ends with {n} streams but the projector takes one; add a fusion op "
                              f"({', '.join(fusion_op_names())}) after the per-encoder ops")
        self.last_counts: list[tuple[str, list[Tensor]]] = []

    @property
    def out_channels(self) -> int:
        ch = self.in_channels
        for op in self.ops:
            ch = op.out_channels(ch)
        return ch[0]

    def expected_tokens(self, n_in: Sequence[int], grids: Sequence[Grid | None]) -> int | None:
        n, g = list(n_in), list(grids)
        for op in self.ops:
            n, g = op.expected_tokens(n, g), op.out_grids(g)
        return n[0]

    def required_layers(self, default_layer: int | Sequence[int], num_layers: int | Sequence[int]) -> list[list[int]]:
        """Per input stream: the encoder layers to tap, always including ``default_layer``. Negative layers count
        from ``num_layers`` and are returned normalised (build the Tokens with the normalised default layer)."""
        m = len(self.in_channels)
        dl = [default_layer] * m if isinstance(default_layer, int) else list(default_layer)
        nl = [num_layers] * m if isinstance(num_layers, int) else list(num_layers)
        dl = [d + n if d < 0 else d for d, n in zip(dl, nl)]
        need = [{d} for d in dl]
        sources = list(range(m))
        for op in self.ops:
            for i, s in enumerate(sources):
                need[s].update(x + nl[s] if x < 0 else x for x in op.required_layers(i, dl[s], nl[s]))
            sources = sources[:1] if op.fusion else sources
        return [sorted(x) for x in need]

    def forward(self, streams: list[Tokens] | Tokens, ctx: OpContext | None = None) -> Tokens:
        streams = [streams] if isinstance(streams, Tokens) else list(streams)
        ctx = OpContext() if ctx is None else ctx
        if len(streams) != len(self.in_channels):
            raise InputError(f"the token recipe was built for {len(self.in_channels)} encoder streams but got "
                             f"{len(streams)}; pass one Tokens per encoder, in the recipe's order")
        sizes = [s.x.shape[0] for s in streams]
        if min(sizes) == 0:
            raise InputError("empty batch: the token pipeline got 0 samples; pass at least one image")
        if len(set(sizes)) > 1:
            raise InputError(f"encoder streams disagree on the batch size ({sizes}); run every encoder on the "
                             "same images")
        got = [s.x.shape[-1] for s in streams]
        if got != self.in_channels:
            raise InputError(f"the token recipe was built for channels {self.in_channels} but the streams have "
                             f"{got}; build it with build_ops(spec, in_channels={got})")
        self.last_counts = [("input", [s.kept_counts() for s in streams])]
        for op in self.ops:
            streams = op(streams, ctx)
            self.last_counts.append((op.describe(), [s.kept_counts() for s in streams]))
        return streams[0]

    def describe(self) -> str:
        return " -> ".join(op.describe() for op in self.ops) or "identity"


def build_ops(spec: Sequence[dict], in_channels: Sequence[int], text_dim: int | None = None) -> TokenPipeline:
    """Build a :class:`TokenPipeline` from recipe dicts for encoders with ``in_channels`` (one per stream)."""
    if not in_channels:
        raise ConfigError("build_ops needs the channel width of at least one encoder stream (in_channels=[...])")
    ops: list[TokenOp] = []
    ch = list(in_channels)
    for i, item in enumerate(spec or []):
        if not isinstance(item, dict) or "op" not in item:
            raise ConfigError(f"token recipe entry {i} is {item!r}; write each entry as a mapping like "
                              "{'op': 'pixel_shuffle', 'k': 2}")
        name = item["op"]
        cls = TOKEN_OPS.get(name)  # unknown name -> ConfigError listing the known ops
        knobs = {k: v for k, v in item.items() if k != "op"}
        allowed = cls.knobs()
        unknown = sorted(set(knobs) - set(allowed))
        if unknown:
            raise ConfigError(f"token op '{name}' has no knob {', '.join(map(repr, unknown))}; its knobs are: "
                              f"{', '.join(allowed) or '(none)'}")
        extra = {"text_dim": text_dim} if "text_dim" in inspect.signature(cls.__init__).parameters else {}
        op = cls(list(ch), **knobs, **extra)
        ops.append(op)
        ch = op.out_channels(ch)
    return TokenPipeline(ops, in_channels)
