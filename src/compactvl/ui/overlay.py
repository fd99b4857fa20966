"""Visual tokens drawn over the image they came from: pure functions (PIL image + provenance -> PIL image), no model.

Provenance is what :class:`compactvl.tokens.Tokens` carries: ``assign``, for every original patch of the encoder's
``grid`` (row-major, h x w), the index of the token now holding it, or -1 once the patch was pruned. In-LLM policies
drop whole tokens later; ``alive`` (a set of token indices) says which of them still enter a given decoder layer.

How a patch is drawn (:func:`draw_tokens`):
- pruned (its token is -1, or not in ``alive``): darkened to ``DIM`` of its brightness;
- kept alone (its token holds this patch only): the image as it is;
- merged (its token holds two or more patches): blended with the token's own colour (``BLEND``) (:data:`PALETTE`,
  in the order tokens first appear in ``assign``), so one merged group is one colour;
- a white line runs along every cell edge between two different live tokens, or a live token and a pruned patch:
  each kept token is outlined, each merged group outlined as one region.
"""
from __future__ import annotations

import colorsys
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

DIM = 0.3  # brightness left to pruned patches
BLEND = 0.4  # weight of a merged group's colour
EDGE = (255, 255, 255)


def _palette(n: int) -> np.ndarray:
    """``n`` distinct saturated colours (golden-angle hues, two brightness levels)."""
    hues = (np.arange(n) * 0.381966) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0 if i % 2 == 0 else 0.75)]
                     for i, h in enumerate(hues)], dtype=np.float64).reshape(n, 3)


PALETTE = _palette(256)


def centre_square(image: Image.Image) -> Image.Image:
    """The centred square of side min(width, height): the part of an image the encoders see (they resize the
    shorter side and centre-crop, ``compactvl.encoders.base.VisionEncoder.preprocess``)."""
    w, h = image.size
    m = min(w, h)
    left, top = (w - m) / 2, (h - m) / 2
    return image.crop((round(left), round(top), round(left) + m, round(top) + m))


def group_colours(assign: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Token index -> colour, for the tokens holding two or more patches (in order of first appearance)."""
    a = np.asarray(assign, dtype=np.int64)
    tokens, first, counts = np.unique(a[a >= 0], return_index=True, return_counts=True)
    merged = tokens[counts > 1][np.argsort(first[counts > 1], kind="stable")]
    return {int(t): tuple(int(c) for c in PALETTE[i % len(PALETTE)]) for i, t in enumerate(merged)}


def draw_tokens(image: Image.Image, assign: Sequence[int], grid: tuple[int, int], alive: Iterable[int] | None = None,
                size: int | None = None) -> Image.Image:
    """``image`` (resized to ``size`` x ``size`` when given) with the patches of ``grid`` drawn as the module doc
    says. ``assign`` has one entry per patch, row-major; ``alive=None`` means every token in ``assign`` is live."""
    h, w = grid
    a = np.asarray(assign, dtype=np.int64).reshape(-1)
    if a.size != h * w:
        raise ValueError(f"assign has {a.size} entries for a {h}x{w} grid of {h * w} patches")
    img = image.convert("RGB")
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    px = np.asarray(img, dtype=np.float64)
    H, W = px.shape[:2]
    n_tok = int(a.max()) + 1 if a.size and a.max() >= 0 else 0
    live = np.zeros(n_tok + 1, dtype=bool)  # the last entry stands for -1 (pruned)
    live[:n_tok] = True if alive is None else False
    if alive is not None:
        idx = np.array([t for t in alive if 0 <= t < n_tok], dtype=np.int64)
        live[idx] = True
    a = np.where((a >= 0) & live[np.where(a >= 0, a, n_tok)], a, -1)  # a dead token's patches count as pruned
    cell = (np.arange(H)[:, None] * h // H) * w + (np.arange(W)[None, :] * w // W)
    tok = a[cell]  # [H, W] live token of each pixel, -1 where pruned
    out = px.copy()
    out[tok < 0] *= DIM
    colours = group_colours(a)
    if colours:
        lut = np.zeros((n_tok + 1, 3))
        is_merged = np.zeros(n_tok + 1, dtype=bool)
        for t, c in colours.items():
            lut[t], is_merged[t] = c, True
        sel = is_merged[np.where(tok >= 0, tok, n_tok)]
        out[sel] = (1 - BLEND) * px[sel] + BLEND * lut[tok[sel]]
    edge = np.zeros((H, W), dtype=bool)
    dy = tok[1:, :] != tok[:-1, :]
    dx = tok[:, 1:] != tok[:, :-1]
    edge[1:, :] |= dy & ((tok[1:, :] >= 0) | (tok[:-1, :] >= 0))
    edge[:, 1:] |= dx & ((tok[:, 1:] >= 0) | (tok[:, :-1] >= 0))
    out[edge] = EDGE
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def alive_tokens(kept_rows: Iterable[int], visual_rows: Sequence[int]) -> set[int]:
    """Tokens still live after an in-LLM drop: ``visual_rows[k]`` is the input row of visual token ``k`` (the order
    the LM received them), ``kept_rows`` the input rows a policy kept (``RunState.trace``'s original indices)."""
    kept = {int(r) for r in kept_rows}
    return {k for k, row in enumerate(visual_rows) if int(row) in kept}


def patch_count(assign: Sequence[int]) -> tuple[int, int, int]:
    """(kept tokens, patches they hold, pruned patches) of ``assign``."""
    a = np.asarray(assign, dtype=np.int64)
    return int(np.unique(a[a >= 0]).size), int((a >= 0).sum()), int((a < 0).sum())


def panel_strip(panels: Sequence[tuple[Image.Image, str]], per_row: int = 6, gap: int = 6) -> Image.Image | None:
    """Several (image, caption) panels of one size on one white canvas, ``per_row`` a row, each caption below its
    image (None without panels): the per-layer overlays as one picture."""
    if not panels:
        return None
    w, h = panels[0][0].size
    line = 16
    cols, rows = min(per_row, len(panels)), -(-len(panels) // per_row)
    canvas = Image.new("RGB", (cols * (w + gap) - gap, rows * (h + line + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (img, caption) in enumerate(panels):
        x, y = (i % per_row) * (w + gap), (i // per_row) * (h + line + gap)
        canvas.paste(img.resize((w, h)) if img.size != (w, h) else img, (x, y))
        draw.text((x + 2, y + h + 2), caption, fill=(0, 0, 0))
    return canvas
