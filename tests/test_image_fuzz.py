"""Fuzzing the one image loader (issue 16): every file, however broken, gives an upright RGB image within the limits
or an InputError naming the file — never a raw exception from inside PIL or numpy.

The corpus is built here, deterministically: formats × modes × truncations × byte flips, headers that lie (PNG IHDR,
GIF screen, BMP sizes), bombs, thin images and EXIF orientations, each loaded with the default limits and with tight
ones. A hypothesis property adds random bytes and mutated valid PNG/JPEG files.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from compactvl.errors import InputError
from compactvl.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, load_image

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
MODES = ["1", "L", "P", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
TIGHT = {"max_pixels": 40, "max_aspect": 2.0}


def _image(mode: str, size=(7, 5), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    a = rng.integers(0, 60000, (h, w))
    if mode in ("I;16", "I"):
        return Image.fromarray(a.astype(np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray((a / 60000.0 * 3 - 1).astype(np.float32))  # outside [0, 1]: min-max scaling
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes | None:
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **kw)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # PIL cannot write this mode in this format
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int, depth=8, color=0, payload=b"\x00\x00", fix_crc=True) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    head = _chunk(b"IHDR", ihdr) if fix_crc else _chunk(b"IHDR", ihdr)[:-4] + b"\0\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + head + _chunk(b"IDAT", zlib.compress(payload)) + _chunk(b"IEND", b"")


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


def corpus() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(16)
    out: list[tuple[str, bytes]] = []
    valid: list[tuple[str, bytes]] = []
    for fmt in FORMATS:
        for mode in MODES:
            data = _encode(_image(mode), fmt)
            if data is not None:
                valid.append((f"{fmt}-{mode.replace(';', '')}", data))
    for name, data in valid:
        out.append((name, data))
        for cut in (0, 1, 8, 16, 33, len(data) // 4, len(data) // 2, len(data) - 1):
            out.append((f"{name}-cut{cut}", data[:cut]))
        for k in range(6):  # byte flips, half of them in the header
            pos = int(rng.integers(0, min(len(data), 64))) if k < 3 else int(rng.integers(0, len(data)))
            out.append((f"{name}-flip{k}", data[:pos] + bytes([data[pos] ^ int(rng.integers(1, 256))]) + data[pos + 1:]))
    # headers that lie
    for w, h in ((0, 0), (0, 5), (5, 0), (100, 100), (1, 20000), (20000, 1), (9000, 9000), (100_000, 100_000),
                 (2**31 - 1, 1), (2**31 - 1, 2**31 - 1), (2**32 - 1, 3)):
        out.append((f"png-claims-{w}x{h}", _png_claiming(w, h)))
        out.append((f"png-claims-{w}x{h}-badcrc", _png_claiming(w, h, fix_crc=False)))
    for depth, color in ((16, 0), (1, 3), (8, 3), (8, 4), (8, 6), (3, 0), (8, 1), (16, 2), (8, 9)):  # palette w/o PLTE
        out.append((f"png-depth{depth}-color{color}", _png_claiming(4, 4, depth, color, b"\x00" * 200)))
    gif = _encode(_image("P"), "GIF")
    for w, h in ((0, 0), (65535, 65535), (1, 65535), (300, 2)):
        out.append((f"gif-claims-{w}x{h}", _patched(_patched(gif, 6, "<H", w), 8, "<H", h)))
    bmp = _encode(_image("RGBA").convert("RGB"), "BMP")
    for w, h in ((0, 5), (7, 0), (7, -5), (-7, 5), (100_000, 100_000), (1, 2**31 - 1), (7, -(2**31))):
        out.append((f"bmp-claims-{w}x{h}", _patched(_patched(bmp, 18, "<i", w), 22, "<i", h)))
    for bpp in (0, 3, 7, 64, 65535):
        out.append((f"bmp-bpp{bpp}", _patched(bmp, 28, "<H", bpp)))
    # bombs: well-formed and cheap on disk, refused by the limits (default or tight)
    out.append(("bomb-png-4000x4000", _encode(Image.new("L", (4000, 4000)), "PNG", optimize=True)))
    out.append(("bomb-gif-3000x3000", _encode(Image.new("P", (3000, 3000)), "GIF")))
    # thin images
    for w, h in ((1, 1), (1, 50), (50, 1), (1, 51), (51, 1), (1, 400), (400, 2), (3, 150)):
        for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
            data = _encode(Image.new("L", (w, h), 77), fmt)
            if data is not None:
                out.append((f"thin-{fmt}-{w}x{h}", data))
    # EXIF orientations, including nonsense values and a broken EXIF block
    for orientation in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535):
        for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
            exif = Image.Exif()
            exif[0x0112] = orientation
            data = _encode(_image("RGBA", (9, 4)).convert("RGB"), fmt, exif=exif)
            if data is not None:
                out.append((f"exif{orientation}-{fmt}", data))
    good = _encode(_image("RGBA", (9, 4)).convert("RGB"), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    out.append(("exif-broken-JPEG", good))
    # modes only some formats carry: float with NaN/inf, Lab, YCbCr, big-endian 16-bit, a palette shorter than tRNS
    for name, img in (("F-nan", Image.fromarray(np.array([[np.nan, np.inf], [-np.inf, 0.5]], np.float32))),
                      ("LAB", Image.new("LAB", (3, 3), (50, 10, 10))), ("YCbCr", Image.new("YCbCr", (3, 3))),
                      ("I16B", Image.new("I;16B", (3, 3)))):
        out.append((f"tiff-{name}", _encode(img, "TIFF")))
    pal = Image.new("P", (4, 4))
    pal.putpalette([1, 2, 3] * 2)
    out.append(("png-short-palette-trns", _encode(pal, "PNG", transparency=b"\x00" * 200)))
    out.append(("text-not-an-image", b"hello, this is not an image\n" * 3))
    out.append(("eps-not-allowed", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"))
    return out


CORPUS = corpus()


def check_one(path: Path, **limits) -> str:
    """'ok' or 'refused'; anything other than an RGB image within the limits or an InputError naming the file
    raises AssertionError (or the raw exception itself)."""
    max_pixels = limits.get("max_pixels", DEFAULT_MAX_PIXELS)
    max_aspect = limits.get("max_aspect", DEFAULT_MAX_ASPECT)
    try:
        img = load_image(path, **limits)
    except InputError as e:
        assert path.name in str(e), f"{path.name}: the error does not name the file: {e}"
        return "refused"
    assert isinstance(img, Image.Image) and img.mode == "RGB", (path.name, type(img), getattr(img, "mode", None))
    w, h = img.size
    assert w > 0 and h > 0 and w * h <= max_pixels and max(w, h) <= max_aspect * min(w, h), (path.name, img.size)
    assert np.asarray(img).shape == (h, w, 3)  # the pixels are really there (decoded, not lazy)
    return "ok"


def test_fuzz_corpus_gives_no_raw_exception(tmp_path):
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    raw = []
    for i, (name, data) in enumerate(CORPUS):
        p = tmp_path / f"{i:04d}-{name}.img"
        p.write_bytes(data)
        for limits in ({}, TIGHT):
            try:
                outcomes[check_one(p, **limits)] += 1
            except Exception as e:  # noqa: BLE001 - collected so that one run lists every offender
                raw.append(f"{p.name} {limits}: {type(e).__name__}: {e}")
    assert not raw, f"{len(raw)} of {2 * len(CORPUS)} loads gave a raw exception:\n" + "\n".join(raw[:30])
    assert len(CORPUS) > 700, len(CORPUS)
    # the corpus exercises both outcomes: valid files load, broken ones are refused
    assert outcomes["ok"] > 150 and outcomes["refused"] > 700, outcomes


def test_fuzz_corpus_valid_files_all_load(tmp_path):
    """The intact files of every format × mode load (no over-eager refusal), upright for every EXIF value."""
    names = [(name, data) for name, data in CORPUS
             if "-" in name and name.split("-")[0] in FORMATS and name.count("-") == 1]
    names += [(name, data) for name, data in CORPUS if name.startswith("exif") and "broken" not in name]
    assert len(names) > 60
    for i, (name, data) in enumerate(names):
        p = tmp_path / f"{i}-{name}"
        p.write_bytes(data)
        assert check_one(p) == "ok", name
        if name.startswith("exif"):
            orientation = int(name[4:].split("-")[0])
            assert load_image(p).size == ((4, 9) if orientation in (5, 6, 7, 8) else (9, 4)), name


# ------------------------------------------------------------------ hypothesis: random and mutated bytes
SEEDS = [d for d in (_encode(_image(m, (6, 4), seed=3), f) for m in ("RGB", "L", "RGBA", "P", "I;16")
                     for f in ("PNG", "JPEG")) if d is not None]
LIMITS = st.sampled_from([{}, TIGHT, {"max_pixels": 24}, {"max_aspect": 1.0}])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.binary(max_size=600), limits=LIMITS)
def test_random_bytes_load_or_refuse(tmp_path, data, limits):
    p = tmp_path / "random.bin"
    p.write_bytes(data)
    check_one(p, **limits)


@SETTINGS
@given(seed=st.sampled_from(range(len(SEEDS))),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10_000)), limits=LIMITS)
def test_mutated_png_and_jpeg_load_or_refuse(tmp_path, seed, edits, cut, limits):
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        data[pos % len(data)] = value
    p = tmp_path / "mutated.img"
    p.write_bytes(bytes(data[:cut] if cut is not None else data))
    check_one(p, **limits)


@SETTINGS
@given(w=st.integers(0, 300), h=st.integers(0, 300), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "F"]),
       limits=LIMITS)
def test_pil_images_load_or_refuse(w, h, mode, limits):
    try:
        img = load_image(Image.new(mode, (w, h)), **limits)
    except InputError as e:
        assert "image" in str(e)
        mp, ma = limits.get("max_pixels", DEFAULT_MAX_PIXELS), limits.get("max_aspect", DEFAULT_MAX_ASPECT)
        assert w == 0 or h == 0 or w * h > mp or max(w, h) > ma * min(w, h), (w, h, limits, e)
        return
    assert img.mode == "RGB" and img.size == (w, h)


@pytest.mark.parametrize("name", ["png-claims-100000x100000", "png-claims-9000x9000", "bomb-png-4000x4000"])
def test_bombs_refused_before_decoding(tmp_path, name):
    """The refusal names the limit; a 4000×4000 PNG is refused by a 1 MP limit, not decoded then measured."""
    p = tmp_path / f"{name}.png"
    p.write_bytes(dict(CORPUS)[name])
    with pytest.raises(InputError, match=rf"{name}.png: .*over the limit of 1000000 \(max_pixels=1000000\)|"
                                         rf"{name}.png: .* pixels exceeds the limit of 1000000"):
        load_image(p, max_pixels=1_000_000)
