"""Fitting the projector's ``Standardize`` layers (``projector.standardize: true``) on training features before
training: per-channel mean / std of the projector inputs (real tokens only), saved with the weights."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..projectors import Standardize


@torch.no_grad()
def fit_standardization(model, data, chosen: Sequence[int], autocast: Callable[[], ContextManager] =
                        contextlib.nullcontext, log: Callable[[str], None] = print, chunk: int = 32) -> int:
    """Fit the projector's not-yet-fitted ``Standardize`` layers on the projector inputs of samples ``data[i]`` for
    ``chosen`` (in fixed chunks of ``chunk`` samples, under ``autocast()``: the same statistics on every run and every
    process). Returns the number of tokens used (0 when nothing needed fitting)."""
    layers = [m for m in model.projector.modules() if isinstance(m, Standardize) and not bool(m.fitted)]
    if not layers:
        return 0
    captured: list[Tensor] = []
    hook = model.projector.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    rows = []
    try:
        for start in range(0, len(chosen), chunk):
            images = [im for i in chosen[start:start + chunk] for im in data[i].load_images()]
            if not images:
                continue
            with autocast():
                _, mask, _ = model.encode_images(images)
            x = captured.pop()
            rows.append(x[mask.to(x.device)].float() if mask is not None else x.flatten(0, 1).float())
    finally:
        hook.remove()
    if not rows:
        raise InputError(f"projector.standardize needs training samples with images; the first {len(chosen)} "
                         "samples have none")
    feats = torch.cat(rows)
    for layer in layers:
        layer.fit(feats)
    log(f"projector input standardized on {feats.shape[0]} tokens of {len(chosen)} training samples")
    return feats.shape[0]
