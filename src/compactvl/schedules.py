"""Token schedules and budgets: how many tokens enter each decoder layer, and how a budget maps onto a method.

This is core: every layer of compactvl may import it. ``measure.macs`` counts MACs on a :class:`Schedule`; each
pruning method owns its schedule (a ``macs_schedule`` static method on its LayerPolicy class, next to its algorithm)
and its budget mapping (``budget_knobs``), so adding a method never edits this file or ``measure``.

* ``kept(n, f) = ⌊n·f + ½⌋`` (round half up), at least 1 when f > 0 and n > 0, 0 when f = 0: the one rule that
  turns fractions into counts, in schedules and in the policies' real forwards alike.
* :func:`schedule_for` builds the schedule of a method name: one of the method-independent builders registered here
  (``vanilla``, ``keep``, ``threshold``; :func:`register_schedule` adds more) or a registered layer policy whose class
  defines ``macs_schedule`` (FastV, PyramidDrop, SparseVLM, HTE, SIP, and any policy a user registers).
* :class:`Budget` is the one vocabulary for a method's budget: ``keep`` is a fraction of the visual tokens in (0, 1],
  ``tokens`` a count (per image for token ops). A method turns it into its own knobs with ``budget_knobs``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .registry import POLICIES


def kept(n: int, fraction: float) -> int:
    """Tokens left when keeping ``fraction`` of ``n``: round half up, at least 1 if fraction > 0 and n > 0."""
    if n <= 0 or fraction <= 0:
        return 0
    return min(n, max(1, math.floor(n * fraction + 0.5 + 1e-9)))  # 1e-9: 0.7 * 5 is 3.4999… in floats


def is_int(x: Any) -> bool:
    """A whole number that is not a bool."""
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
            if not is_int(n) or n < 1:
                raise ConfigError(f"layer {i} of the schedule gets {n!r} tokens; every layer needs a whole number "
                                  f"of tokens >= 1")
            if not is_int(v) or not 0 <= v <= n:
                raise ConfigError(f"layer {i} of the schedule has {v!r} visual tokens among {n}; visual counts must "
                                  f"be whole numbers between 0 and the layer's tokens")
        if not is_int(self.text) or self.text < 0:
            raise ConfigError(f"text token count {self.text!r} is invalid; give a whole number >= 0")
        if self.visual_input is None:
            self.visual_input = self.visual[0]
        if not is_int(self.visual_input) or self.visual_input < max(self.visual):
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
    """A schedule builder: ``build(num_layers, visual, text, **knobs)`` -> visual counts per layer or a Schedule."""

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


SCHEDULES: dict[str, ScheduleMethod] = {}  # method-independent builders; policies carry theirs (see schedule_methods)


def register_schedule(name: str, help: str, **knobs: str) -> Callable:
    """Register a method-independent builder ``f(num_layers, visual, text, **knobs) -> list[int]`` (visual tokens
    entering each layer; text tokens are never pruned) or ``-> Schedule``. ``knobs`` maps each knob to its help
    text. A layer policy does not need this: it defines ``macs_schedule`` (+ ``macs_help``, ``macs_knobs``)."""

    def deco(fn: Callable) -> Callable:
        if name in SCHEDULES and SCHEDULES[name].build is not fn:
            raise ConfigError(f"schedule method '{name}' is registered twice; pick another name")
        SCHEDULES[name] = ScheduleMethod(name, fn, dict(knobs), help)
        return fn

    return deco


def policy_schedule(name: str) -> ScheduleMethod | None:
    """The schedule a registered layer policy ``name`` declares (its class's ``macs_schedule``), else None."""
    if name not in POLICIES:
        return None
    cls = POLICIES.get(name)
    build = getattr(cls, "macs_schedule", None)
    if build is None:
        return None
    return ScheduleMethod(name, build, dict(getattr(cls, "macs_knobs", {}) or {}),
                          getattr(cls, "macs_help", "") or (cls.__doc__ or name).strip().splitlines()[0])


def schedule_methods() -> dict[str, ScheduleMethod]:
    """Every schedule by name: ``vanilla`` and ``keep`` first, then the other builders and every registered layer
    policy that declares one, alphabetically (loading the policy registry imports the method files)."""
    names = POLICIES.names()  # first: importing the method files may register builders
    found = dict(SCHEDULES)
    for name in names:
        spec = policy_schedule(name)
        if spec is not None and name not in found:
            found[name] = spec
    first = [n for n in ("vanilla", "keep") if n in found]
    return {n: found[n] for n in first + sorted(set(found) - set(first))}


def split_values(x: Any) -> list[Any]:
    if isinstance(x, str):
        return [s for s in x.replace(" ", "").split(",") if s]
    return list(x) if isinstance(x, (list, tuple)) else [x]


def parse_fractions(method: str, knob: str, x: Any) -> list[float]:
    try:
        out = [float(s) for s in split_values(x)]
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: --{knob} {x!r} is not a number; give a fraction between 0 and 1") from None
    if not out or any(not 0.0 <= f <= 1.0 for f in out):
        raise ConfigError(f"{method}: --{knob} {x!r} must be fraction(s) between 0 and 1 (e.g. 0.5)")
    return out


def parse_fraction(method: str, knob: str, x: Any) -> float:
    out = parse_fractions(method, knob, x)
    if len(out) != 1:
        raise ConfigError(f"{method}: --{knob} takes one fraction, got {x!r}")
    return out[0]


def parse_layers(method: str, knob: str, x: Any, lo: int, hi: int) -> list[int]:
    out = []
    for s in split_values(x):
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


def made(method: str, per_layer: list[int], visual: int, text: int, **knobs: Any) -> Schedule:
    """The Schedule of a builder's visual counts per layer, recording the knobs it resolved (defaults included)."""
    return Schedule([v + text for v in per_layer], per_layer, text, method=method, knobs=knobs, visual_input=visual)


@register_schedule("vanilla", "every layer sees every token")
def _vanilla(num_layers: int, visual: int, text: int) -> list[int]:
    return [visual] * num_layers


@register_schedule("keep", "a pre-LLM token op keeps a fraction of the visual tokens; every layer sees them",
                   keep="fraction of visual tokens kept before the LLM, required")
def _keep(num_layers: int, visual: int, text: int, keep: Any) -> Schedule:
    f = parse_fraction("keep", "keep", keep)
    return made("keep", [kept(visual, f)] * num_layers, visual, text, keep=f)


@register_schedule("threshold", "saliency threshold (VEN-VL HTE style): after each listed layer, the given fraction "
                   "of the input visual tokens is left for all later layers",
                   layers="layers after which tokens are dropped, required, e.g. 14,20",
                   keep="fraction of the input visual tokens left after each listed layer, non-increasing, required")
def _threshold(num_layers: int, visual: int, text: int, layers: Any, keep: Any) -> Schedule:
    at = parse_layers("threshold", "layers", layers, 0, num_layers - 2)
    fr = parse_fractions("threshold", "keep", keep)
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
    return made("threshold", out, visual, text, layers=at, keep=fr)


def schedule_for(method: str, num_layers: int, visual: int, text: int, **knobs: Any) -> Schedule:
    """Build the schedule of ``method`` (see :func:`schedule_methods`) for ``visual`` + ``text`` input tokens.

    Knobs may be numbers, sequences or the CLI's strings ("8,16,24"). A knob of another method is an error that
    names this method's knobs.
    """
    spec = SCHEDULES.get(method) or policy_schedule(method)
    if spec is None:
        raise ConfigError(f"unknown schedule method '{method}'; known: {', '.join(schedule_methods())}")
    if not is_int(num_layers) or num_layers < 1:
        raise ConfigError(f"num_layers {num_layers!r} is invalid; give the LLM's decoder layer count (>= 1)")
    for name, n in (("visual", visual), ("text", text)):
        if not is_int(n) or n < 0:
            raise ConfigError(f"{name} token count {n!r} is invalid; give a whole number >= 0")
    if visual + text == 0:
        raise ConfigError("visual and text token counts are both 0; give at least one token")
    for k in knobs:
        if k not in spec.knobs:
            owners = [m.name for m in schedule_methods().values() if k in m.knobs]
            whose = f" (--{k} is a knob of {', '.join(owners)})" if owners else ""
            raise ConfigError(f"--{k} does not apply to method '{method}'{whose}; {spec.describe()}")
    missing = [k for k in spec.required if k not in knobs]
    if missing:
        raise ConfigError(f"method '{method}' needs --{', --'.join(missing)}; {spec.describe()}")
    out = spec.build(num_layers, visual, text, **knobs)
    if isinstance(out, Schedule):
        return out
    return Schedule([v + text for v in out], out, text, method=method, knobs=dict(knobs), visual_input=visual)


# ----------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """A compression budget: ``fraction`` of the visual tokens (``keep=``) or a ``tokens`` count (``tokens=``),
    exactly one of them. Methods map it onto their own knobs with ``budget_knobs(budget, ...)``."""

    fraction: float | None = None
    tokens: int | None = None

    @staticmethod
    def pop(method: str, knobs: Mapping[str, Any]) -> tuple["Budget | None", dict[str, Any]]:
        """Split ``keep`` / ``tokens`` off a knob dict: (the budget or None, the remaining knobs). A list ``keep``
        (per-stage fractions, e.g. SparseVLM's or HTE's) is the method's own knob and stays in the rest."""
        per_stage = isinstance(knobs.get("keep"), (list, tuple))
        rest = {k: v for k, v in knobs.items() if k not in ("keep", "tokens") or (k == "keep" and per_stage)}
        keep, tokens = (None if per_stage else knobs.get("keep")), knobs.get("tokens")
        if keep is None and tokens is None:
            return None, rest
        if keep is not None and tokens is not None:
            raise ConfigError(f"{method}: give keep (a fraction of the visual tokens) or tokens (a count), not both")
        if tokens is not None:
            if not is_int(tokens) or tokens < 1:
                raise ConfigError(f"{method}: tokens={tokens!r}; give a whole number of visual tokens >= 1 "
                                  f"(per image for token ops), or keep=<fraction>")
            return Budget(tokens=tokens), rest
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            hint = f"; for a count of tokens give tokens={keep}" if is_int(keep) and keep > 1 else ""
            raise ConfigError(f"{method}: keep={keep!r}; keep is the fraction of visual tokens kept, in (0, 1]{hint}")
        return Budget(fraction=float(keep)), rest

    def count(self, n: int) -> int:
        """Tokens kept out of ``n``: the count (at most n), or ``kept(n, fraction)``."""
        return min(self.tokens, n) if self.tokens is not None else kept(n, self.fraction)

    def __str__(self) -> str:
        return f"tokens={self.tokens}" if self.tokens is not None else f"keep={self.fraction:g}"


def no_budget(method: str, knobs: Any) -> ConfigError:
    """The error of a method without a budget mapping, naming its own knobs."""
    return ConfigError(f"{method} has no budget knob 'keep' / 'tokens'; use its own knobs: "
                       f"{', '.join(knobs) or '(none)'}")
