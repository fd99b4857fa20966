"""The method grammar of ``compactvl bench``: ``parse_method`` turns a spec into a :class:`MethodSpec`.

``vanilla``; ``keep:F`` (a pre-LLM token op keeping fraction F of the visual tokens: the LM simply receives
``kept(V, F)`` visual tokens); ``NAME:knob=value,...`` for any registered LayerPolicy (``fastv``, ``pyramiddrop``,
``sparsevlm``, ...; values are JSON, lists as ``[7,14,21]`` or ``7/14/21``); a JSON recipe
``{"policy": "fastv", "layer": 2, "keep": 0.5}``; and with a loaded CompactVLM, ``model`` (its configured policies).
A policy's budget, ``keep=F`` (a fraction) or ``tokens=K`` (a count), goes through the policy's ``budget_knobs``
as in ``compress`` and ``eval``: ``fastv:tokens=64`` is FastV with count 64, ``pyramiddrop:keep=0.5`` ratio 0.5.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from ..compression import policy_spec
from ..errors import ConfigError
from ..measure.macs import kept
from ..policies import build_policy
from ..registry import POLICIES


@dataclass(frozen=True)
class MethodSpec:
    """One method to benchmark: a pre-LLM keep fraction and/or in-LLM policy recipes."""

    label: str
    name: str  # vanilla | keep | model | a registered policy name
    keep: float | None = None  # pre-LLM fraction of visual tokens (None: all)
    policies: tuple[dict, ...] = ()  # build_policy recipes

    @property
    def kind(self) -> str:
        return "vanilla" if self.name == "vanilla" else "pre_llm" if not self.policies else "in_llm"

    def visual_entering(self, visual: int) -> int:
        """Visual tokens the LM receives for ``visual`` input tokens (after the pre-LLM keep)."""
        return visual if self.keep is None else kept(visual, self.keep)

    def build_policies(self) -> list:
        return [build_policy(dict(p)) for p in self.policies]

    def to_dict(self) -> dict:
        return dict(label=self.label, name=self.name, kind=self.kind, keep=self.keep,
                    policies=[dict(p) for p in self.policies])


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "/" in text:
        return [_value(t) for t in text.split("/") if t]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def known_methods() -> list[str]:
    """The method names the grammar accepts (besides ``model``): vanilla, keep and every registered layer policy."""
    return ["vanilla", "keep", *POLICIES.names()]


def parse_method(spec: str | dict, model_policies: Sequence[dict] | None = None) -> MethodSpec:
    """Parse a method spec (grammar in the module docstring). ``model_policies``: the loaded model's recipes, which
    the name ``model`` stands for."""
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ConfigError(f"method {spec!r} starts with '{{' but is not valid JSON ({e}); write e.g. "
                              f"'{{\"policy\": \"fastv\", \"layer\": 2, \"keep\": 0.5}}'") from None
    if isinstance(spec, dict):
        d = dict(spec)
        label = str(d.pop("label", "") or json.dumps(spec, sort_keys=True, separators=(",", ":")))
        if "policy" in d:
            return MethodSpec(label=label, name=str(d["policy"]), policies=(d,))
        name = d.pop("method", None)
        if name == "vanilla" and not d:
            return MethodSpec(label=label, name="vanilla")
        if name == "keep" and set(d) == {"keep"}:
            return MethodSpec(label=label, name="keep", keep=_keep_fraction(d["keep"], label))
        raise ConfigError(f"method recipe {spec!r} is not understood; give {{'policy': NAME, knobs...}}, "
                          f"{{'method': 'keep', 'keep': 0.25}} or {{'method': 'vanilla'}}")
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise ConfigError("empty method; give e.g. vanilla, keep:0.25 or fastv:layer=2,keep=0.5")
    name, _, body = text.partition(":")
    if name == "vanilla":
        if body:
            raise ConfigError(f"vanilla takes no knobs, got '{body}'")
        return MethodSpec(label=text, name="vanilla")
    if name == "keep":
        value = body.split("=", 1)[1] if body.startswith("keep=") else body
        return MethodSpec(label=text, name="keep", keep=_keep_fraction(_value(value) if value else None, text))
    if name == "model":
        if model_policies is None:
            raise ConfigError("method 'model' (the loaded model's own layer policies) needs --model DIR")
        if body:
            raise ConfigError(f"method 'model' takes no knobs, got '{body}'; give the policy as NAME:knob=value")
        if not model_policies:
            raise ConfigError("method 'model' times the loaded model's own layer policies, and this model has none; "
                              "name a method instead, e.g. --method fastv:layer=2,keep=0.5 or --method keep:0.25")
        return MethodSpec(label="model", name="model", policies=tuple(dict(p) for p in model_policies))
    known = known_methods()
    if name not in known:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(known)}"
                          + (", model" if model_policies is not None else "")
                          + ". Write NAME:knob=value,... e.g. fastv:layer=2,keep=0.5")
    knobs: dict[str, Any] = {}
    for item in _split_top(body):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"method '{text}': '{item}' is not knob=value; write e.g. {name}:layer=2,keep=0.5 "
                              f"(lists as [7,14,21] or 7/14/21)")
        knobs[key] = _value(value)
    # the budget (keep=fraction / tokens=count) becomes the method's own knobs, as in compress() and eval
    return MethodSpec(label=text, name=name, policies=(policy_spec(name, knobs),))


def _keep_fraction(x: Any, label: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < float(x) <= 1:
        raise ConfigError(f"method '{label}': the keep fraction must be a number in (0, 1], e.g. keep:0.25")
    return float(x)
