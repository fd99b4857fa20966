"""Loading images safely: every file becomes an 8-bit RGB PIL image, or a clear error that names the file.

- Missing, unreadable, truncated or non-image files → InputError naming the path.
- Images over ``max_pixels`` (default 64 MP) are refused before decoding (decompression bombs).
- Modes: RGBA / LA / PA / P-with-transparency are composited over white; CMYK and YCbCr are converted by PIL's ICC-free
  transform; 16-bit and 32-bit integer grayscale (I;16, I) are scaled from their full range to 8 bits; float (F) from
  [0, 1] when within it, else min-max; 1-bit and L become RGB.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

DEFAULT_MAX_PIXELS = 64_000_000
ImageLike = Union[str, os.PathLike, Image.Image]


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") else float(max(a.max(), 1))
        lo = 0.0 if mode.startswith("I;16") else float(min(a.min(), 0))
        a8 = np.clip((a - lo) / max(top - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
        a8 = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: cannot convert image mode {mode} to RGB ({e}); save it as PNG or JPEG in RGB") from e


def load_image(src: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``src`` (a path or a PIL image) as RGB, refusing bombs and naming the file in every error."""
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise InputError(
                f"image of {src.width}x{src.height} = {src.width * src.height} pixels exceeds the limit of "
                f"{max_pixels}; downscale it or raise max_pixels"
            )
        return to_rgb(src)
    path = Path(src)
    if not path.exists():
        raise InputError(f"image file not found: {path}; check the path (relative paths resolve from {Path.cwd()})")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image file; name an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(path)  # reads the header only
            if img.width * img.height > max_pixels:
                raise InputError(
                    f"{path}: {img.width}x{img.height} = {img.width * img.height} pixels exceeds the limit of "
                    f"{max_pixels} (possible decompression bomb); downscale the image or raise max_pixels"
                )
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused as a possible decompression bomb ({e}); downscale the image") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format); use PNG, JPEG, WebP, BMP, TIFF or GIF") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: the image file is corrupt or truncated ({e}); re-export or re-download it") from e
    return to_rgb(img, str(path))
