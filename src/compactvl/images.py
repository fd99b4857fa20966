"""Loading images safely — the one loader for every path (chat, eval, training, adapters): every file or PIL image
becomes an 8-bit RGB PIL image, or an :class:`~compactvl.errors.InputError` that names the file and what to do.

In this order, so that nothing is decoded before it is known to be affordable:

1. **Regular files only.** A path is ``os.stat``-ed first; a directory, FIFO, socket or device is refused before it
   is opened (a FIFO would block forever, a device never ends). The file is then opened non-blocking and checked
   again on its descriptor, so swapping the path in between does not help.
2. **Formats**: PNG, JPEG (and MPO, what phones write), WebP, GIF, BMP, TIFF, PPM/PGM/PBM and, where Pillow has it,
   AVIF (``FORMATS``). Pillow's other plugins are not tried: some run external programs (EPS → Ghostscript), and
   none is needed for a VLM's inputs.
3. **Limits from the header, before decoding**: an empty image (0 wide or high) is refused; more than
   ``max_pixels`` pixels (default 64 MP, ``DEFAULT_MAX_PIXELS``) is refused as a possible decompression bomb (a
   118-byte PNG can claim 100000×100000); a long side more than ``max_aspect`` times the short one (default 50:1,
   ``DEFAULT_MAX_ASPECT``) is refused. Both limits are symmetric in width and height, so EXIF rotation (which swaps
   them) cannot move an image across a limit. PIL images passed in are checked by the same limits.
4. **Decode** the first frame (animated GIF/WebP, multi-page TIFF). Every failure — truncated data, a header that
   lies, an unknown format, odd modes or palettes, and whatever exception the decoder raises for malformed input
   (OSError, ValueError, SyntaxError, struct.error, EOFError, ZeroDivisionError, MemoryError, ...) — becomes
   InputError naming the file.
5. **EXIF orientation** (tag 274, values 2..8) is applied, so phone photos stand upright; the orientation tag is
   removed, so loading an already-loaded image again changes nothing. Unreadable EXIF data counts as orientation 1.
6. **Modes** (``to_rgb``, the one set of rules): RGBA / LA / PA / P-with-transparency are composited over white;
   CMYK and YCbCr are converted by PIL's ICC-free transform; 16-bit and 32-bit integer grayscale (I;16, I) are
   scaled from their full range to 8 bits; float (F) from [0, 1] when within it, else min-max over the finite
   values (NaN → black, ±inf → the ends); 1-bit and L become RGB.

Memory is bounded by the limits: the decoded image has at most ``max_pixels`` pixels, and the encoders'
``preprocess`` crops before it resizes, so its cost does not grow with the aspect ratio either.
"""
from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, InputError

DEFAULT_MAX_PIXELS = 64_000_000
# 50:1 admits every real photo, panorama (≤ ~10:1), receipt and long screenshot (≤ ~40:1) we have seen, while a
# short-side resize to an encoder's S (224..518) then yields at most 50·S × S pixels. A 1×20000 strip carries no
# picture a VLM can use and, resized that way, used to cost 4.6 GB.
DEFAULT_MAX_ASPECT = 50.0
# Pillow format ids tried, in this order (JPEG covers MPO); the ones this Pillow lacks are dropped at first use.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")
ImageLike = Union[str, os.PathLike, Image.Image]
_ORIENTATION = 0x0112
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _ratio(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _check_limits(max_pixels: int, max_aspect: float) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float, np.number)) or not max_aspect >= 1:
        raise ConfigError(f"max_aspect must be a number >= 1 (long side : short side), got {max_aspect!r}")


def check_size(width: int, height: int, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> None:
    """Raise InputError naming ``name`` if a ``width``×``height`` image is empty or over a limit (module doc)."""
    _check_limits(max_pixels, max_aspect)
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise InputError(f"{name}: the image is empty ({w}x{h} pixels); re-export it, or drop it from the input")
    if w * h > max_pixels:
        raise InputError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (max_pixels={max_pixels}; a "
            "possible decompression bomb, refused before decoding); downscale the image or raise max_pixels"
        )
    long, short = max(w, h), min(w, h)
    if long > max_aspect * short:
        raise InputError(
            f"{name}: {w}x{h} has aspect ratio {_ratio(long / short)}:1 over the limit {_ratio(max_aspect)}:1 "
            f"(max_aspect={max_aspect:g}); crop or pad it to a less extreme shape, or raise max_aspect"
        )


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
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        a8 = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: cannot convert image mode {mode} to RGB ({e}); save it as PNG or JPEG in RGB") from e


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (2..8); unreadable EXIF data counts as 1 (upright)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF must not cost an otherwise good image: PIL raises many kinds here
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


@functools.lru_cache(maxsize=1)
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so OPEN says which of FORMATS this Pillow has
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; refuse anything else before opening it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"image file not found: {path}; check the path (relative paths resolve from "
                         f"{Path.cwd()})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the image file ({e}); check the path and its permissions") from e
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise InputError(f"{path} is {kind}, not an image file; name a regular image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is not a regular file; name a regular image file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot read the image file ({e}); check its permissions") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # the path was swapped after the stat above
        os.close(fd)
        raise InputError(f"{path} is not a regular file; name a regular image file")
    return os.fdopen(fd, "rb")


def _quiet() -> None:
    """Inside ``warnings.catch_warnings()``: our own limits replace Pillow's bomb warning, and Pillow's notes on
    malformed input ("Corrupt EXIF data", skipped TIFF tags) end as an InputError or a good image, not log noise."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def _bomb_message(name: str, e: Exception, max_pixels: int) -> str:
    m = re.search(r"\((\d+) pixels\)", str(e))
    claimed = f"the header claims {m.group(1)} pixels" if m else f"Pillow says: {e}"
    return (f"{name}: {claimed}, over the limit of {max_pixels} (max_pixels={max_pixels}) or Pillow's own "
            f"decompression-bomb limit (2 × PIL.Image.MAX_IMAGE_PIXELS); refused before decoding; downscale the image")


def _decode(img: Image.Image, name: str, max_pixels: int, max_aspect: float) -> Image.Image:
    """Check the header size, decode, stand upright, convert to RGB — every failure an InputError naming ``name``."""
    try:
        check_size(img.width, img.height, name, max_pixels, max_aspect)
        img.load()
        if img.size[0] <= 0 or img.size[1] <= 0:
            raise InputError(f"{name}: the image decoded to nothing ({img.size[0]}x{img.size[1]}); re-export it")
        out = to_rgb(_upright(img), name)
        check_size(out.width, out.height, name, max_pixels, max_aspect)  # whatever a plugin did while loading
        return out
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(_bomb_message(name, e, max_pixels)) from e
    except MemoryError as e:
        raise InputError(f"{name}: not enough memory to decode the image; downscale it or lower max_pixels") from e
    except Exception as e:  # untrusted data: PIL's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise InputError(f"{name}: the image file is corrupt or truncated ({type(e).__name__}: {e}); re-export or "
                         "re-download it") from e


def load_image(src: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Open ``src`` (a path or a PIL image) as upright 8-bit RGB within the limits, or raise InputError naming the
    file (see the module docstring for the steps and the defaults)."""
    _check_limits(max_pixels, max_aspect)
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or "image"
        with warnings.catch_warnings():
            _quiet()
            return _decode(src, str(name), max_pixels, max_aspect)
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"an image must be a file path or a PIL image, got {type(src).__name__}; open it with "
                         "PIL.Image.open or pass its path")
    path = Path(src)
    with _open_regular(path) as f, warnings.catch_warnings():
        _quiet()
        try:
            img = Image.open(f, formats=_formats())  # reads the header only
        except UnidentifiedImageError as e:
            raise InputError(f"{path}: not a readable image (unknown or corrupt format); use PNG, JPEG, WebP, BMP, "
                             "TIFF or GIF") from e
        except Image.DecompressionBombError as e:
            raise InputError(_bomb_message(str(path), e, max_pixels)) from e
        except MemoryError as e:
            raise InputError(f"{path}: not enough memory to read the image header; re-export the image") from e
        except Exception as e:  # untrusted data: a plugin's header parser can raise almost anything
            raise InputError(f"{path}: the image file is corrupt or truncated ({type(e).__name__}: {e}); re-export "
                             "or re-download it") from e
        return _decode(img, str(path), max_pixels, max_aspect)
