"""What the Runner hands a decoder layer besides the hidden states: the KV cache under the keyword the layer
declares (``cache_keyword``), and, for modules inside the layer that need the Runner's view of the rows, the
:class:`LayerContext` of the call (bound to a :class:`LayerStateModule` ``mlp`` for the duration of the layer call;
see ``Runner._layer``). Explicit, per call: no global state, nothing patched in transformers' classes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .state import RunState


@dataclass(frozen=True)
class LayerContext:
    """The decoder layer the Runner is running and the state it runs on (rows: ``state.mask``, ``state.visual``,
    ``state.orig_index``; per-forward record: ``state.signals``)."""

    layer_idx: int
    state: RunState


class LayerStateModule(nn.Module):
    """Base of a module installed as a decoder layer's ``mlp`` (expert surgeries) that needs to know which rows it is
    called on. The Runner sets ``layer_context`` for the duration of that layer's call; it is None otherwise (a plain
    ``lm(...)`` call), and the module must then act on every row as plain text."""

    layer_context: LayerContext | None = None


CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def cache_keyword(layer: nn.Module) -> str:
    """The keyword under which ``layer.forward`` takes the KV cache: the first of ``CACHE_KEYWORDS`` its signature
    declares (``inspect.signature`` follows ``functools.wraps``, so a deprecation wrapper shows the new name)."""
    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to read
        params = {}
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise ConfigError(
        f"{type(layer).__name__}.forward declares none of the cache keywords {CACHE_KEYWORDS}; the Runner cannot "
        "pass it a KV cache. Use a Llama-family decoder layer from transformers >= 5.0"
    )
