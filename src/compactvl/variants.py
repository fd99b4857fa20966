"""A saved CompactVLM and its compression variants, as the interactive front ends take them: ``compactvl serve`` (per
request, ``compression`` in the body) and ``compactvl ui`` (a method and a budget picked in the page). Both load the
model the same way and check a ``{"method": name, **knobs}`` override the same way before running it.

    model = load_model("runs/demo")                                   # or reference.resolve("reference")
    n = visual_tokens_per_image(model)                                # what the saved recipe hands the LM per image
    spec = compression_variant(model, {"method": "visionzip", "keep": 0.25}, n)   # -> {"token_ops": [...]}
    with model.variant(**spec):
        ...

A token op is appended to the saved recipe's token ops (so it reduces what the trained projector sees); a layer
policy is added to its policies. Refusals are :class:`VariantError` (a ConfigError) naming the method.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .compression import op_spec, policy_spec
from .errors import CompactVLError, ConfigError
from .model import CompactVLM
from .ops import build_ops
from .policies import build_policy
from .registry import POLICIES, TOKEN_OPS


class VariantError(ConfigError):
    """A compression override this model cannot run (unknown method, bad knob, learned weights it lacks...)."""


def load_model(path: str | Path, device: str | None = None) -> CompactVLM:
    """A saved CompactVLM (``save_pretrained`` folder or run folder) in eval mode, on ``device`` when given."""
    model = CompactVLM.from_pretrained(path)
    if device:
        model.to(device)
    return model.eval()


def visual_tokens_per_image(model: CompactVLM) -> int:
    """Visual tokens the saved recipe hands the LM per image (one probe through the token ops)."""
    with torch.no_grad():
        probe = model.prepare([[(f"{model.config.image_token}\nx", None)]], [[Image.new("RGB", (64, 64))]])
    return int(probe.visual_counts[0][0])


def compression_variant(model: CompactVLM, compression: dict | None, visual_per_image: int) -> dict:
    """The ``model.variant(**spec)`` arguments that run ``compression`` (``{"method": name, **knobs}``; a budget
    as ``keep`` / ``tokens``) on top of the saved recipe; ``{}`` for None. Raises :class:`VariantError`."""
    if not compression:
        return {}
    knobs = {k: v for k, v in compression.items() if k != "method"}
    method, cfg = compression["method"], model.config
    try:
        if method in TOKEN_OPS:
            ops = [*cfg.token_ops, op_spec(method, knobs, visual_per_image)]
            pipe = build_ops([dict(o) for o in ops], model.token_ops.in_channels, text_dim=model.lm.config.hidden_size)
            if pipe.out_channels != model.token_ops.out_channels:
                raise VariantError(f"compression method '{method}' changes the channel width the projector was "
                                   "trained on")
            if any(True for _ in pipe.parameters()) and not any(True for _ in model.token_ops.parameters()):
                raise VariantError(f"compression method '{method}' has learned weights this model lacks")
            return {"token_ops": ops}
        if method in POLICIES:
            spec = policy_spec(method, knobs)
            build_policy(dict(spec))
            return {"policies": [*cfg.policies, spec]}
    except (CompactVLError, TypeError, ValueError) as e:
        if isinstance(e, VariantError):
            raise
        raise VariantError(f"compression {compression}: {e}") from e
    raise VariantError(f"compression method '{method}' is neither a token op nor a layer policy")


def budget_methods(model: CompactVLM, visual_per_image: int) -> list[str]:
    """The registered token ops and layer policies that take a budget (``keep``) and that this model can run as a
    variant (built, not run): what a front end offers to pick from."""
    names = sorted({TOKEN_OPS.get(n).name for n in TOKEN_OPS.names()}) + sorted(POLICIES.names())
    out = []
    for name in names:
        try:
            compression_variant(model, {"method": name, "keep": 0.5}, visual_per_image)
        except VariantError:
            continue
        out.append(name)
    return out
