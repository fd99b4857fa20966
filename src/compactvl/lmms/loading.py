"""lmms-eval model args -> a loaded model, its compression and its run settings (no lmms-eval needed here).

``pretrained`` is what ``compactvl eval`` takes: a saved CompactVLM (a model directory or a ``compactvl train`` /
``demo`` run), the name ``reference``, or a transformers VLM compactvl's adapters support (a directory or hub id).
``method`` is a token op or layer policy name; every other model arg is one of its knobs (``keep`` a fraction,
``tokens`` a count, or the method's own, e.g. ``layer``). On a CompactVLM the method is added to the saved recipe
(the op appended to its token ops, the policy to its policies: what ``compactvl study`` and ``compactvl serve`` do);
a transformers VLM is wrapped by ``compactvl.compression.load_compressed``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compression import load_compressed
from ..device import resolve_precision
from ..errors import CompactVLError, ConfigError
from ..model import CompactVLM, find_model_dir
from ..reference import resolve
from ..registry import POLICIES, TOKEN_OPS
from ..variants import compression_variant, load_model, visual_tokens_per_image

# model args that are not knobs of the method (max_batch_size: lmms-eval's CLI passes it to every model)
SETTINGS = ("pretrained", "method", "batch_size", "device", "dtype", "max_new_tokens", "max_batch_size")
DTYPES = ("float32", "bfloat16", "auto")
NO_METHOD = (None, "", "none", "vanilla")


@dataclass
class Loaded:
    model: Any  # a CompactVLM or a compactvl.compression.CompressedVLM
    kind: str  # "compactvl" | "transformers"
    variant: dict = field(default_factory=dict)  # CompactVLM.variant(**variant) for the method; {}: as saved
    method: str | None = None
    knobs: dict = field(default_factory=dict)
    amp: torch.dtype | None = None  # autocast dtype for a CompactVLM (None: fp32)

    def context(self):
        """``with loaded.context() as model:`` the model under its method."""
        if self.kind == "compactvl" and self.variant:
            return self.model.variant(**self.variant)
        return nullcontext(self.model)

    def autocast(self):
        dev = self.model.device
        return torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)


def _names() -> str:
    return (f"token ops: {', '.join(sorted({TOKEN_OPS.get(n).name for n in TOKEN_OPS.names()}))}; layer policies: "
            f"{', '.join(POLICIES.names())}")


def parse_int(name: str, value: Any, minimum: int = 1) -> int:
    """A whole-number model arg (lmms-eval passes numbers as int, or str from --batch_size)."""
    try:
        v = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        v = None
    if v is None or v < minimum:
        raise ConfigError(f"model arg {name}={value!r}: give a whole number >= {minimum}, e.g. {name}={max(minimum, 8)}")
    return v


def compactvl_variant(model: CompactVLM, method: str, knobs: dict) -> dict:
    """The ``CompactVLM.variant`` kwargs that add ``method`` with ``knobs`` to the saved recipe (the check
    ``compactvl serve`` and ``compactvl ui`` make: ``compactvl.variants``), then built once, so a knob only the model
    can check (a layer it lacks) fails here and not at the first batch."""
    if method not in TOKEN_OPS and method not in POLICIES:
        raise ConfigError(f"model arg method={method!r} is not a compression method; use one of the {_names()}; or "
                          "leave method out for the model as saved")
    try:
        spec = compression_variant(model, {"method": method, **knobs}, visual_tokens_per_image(model))
        with model.variant(**spec):
            pass
    except (CompactVLError, TypeError, ValueError) as e:
        raise ConfigError(f"model args method={method} {knobs or '(no knobs)'}: {e}") from e
    return spec


def load(pretrained: str | None, method: str | None = None, knobs: dict | None = None, device: str | None = None,
         dtype: str = "float32") -> Loaded:
    """Load ``pretrained`` and set ``method`` up with ``knobs`` (see the module docstring)."""
    knobs = dict(knobs or {})
    if not pretrained:
        raise ConfigError("model arg pretrained is missing; give pretrained=reference, a saved compactvl model or run "
                          "directory, or a transformers VLM directory (e.g. --model_args pretrained=reference)")
    if dtype not in DTYPES:
        raise ConfigError(f"model arg dtype={dtype!r}: use one of {', '.join(DTYPES)} (auto: bf16 where it is fast)")
    method = None if method in NO_METHOD else str(method)
    if method is None and knobs:
        raise ConfigError(f"model args {sorted(knobs)} are not settings ({', '.join(SETTINGS)}) and no method was "
                          f"given to take them as knobs; add method=NAME ({_names()})")
    path = resolve(str(pretrained))  # the name "reference": the committed reference model, rebuilt once
    if find_model_dir(path) is not None:
        model = load_model(path, device)
        amp = resolve_precision({"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype), model.device)
        variant = compactvl_variant(model, method, knobs) if method else {}
        return Loaded(model, "compactvl", variant, method, knobs, amp)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[dtype]
    vlm = load_compressed(path, method, dtype=torch_dtype, device=device, **knobs)
    return Loaded(vlm, "transformers", {}, method, knobs, None)
