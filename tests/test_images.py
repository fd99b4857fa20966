"""Image loading: every mode becomes correct 8-bit RGB; bad files fail naming the file."""
import os
import re
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import ConfigError, InputError
from compactvl.images import load_image


def save(tmp_path, img, name):
    p = tmp_path / name
    img.save(p)
    return p


def test_rgb_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    out = load_image(save(tmp_path, Image.fromarray(a), "x.png"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), a)


def test_rgba_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[..., 0] = 200
    a[:, :2, 3] = 255  # left half opaque red-ish, right half fully transparent
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(a, "RGBA"), "a.png")))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 3].tolist() == [255, 255, 255]


def test_grayscale_and_16bit(tmp_path):
    g = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(g, "L"), "g.png")))
    assert out.shape == (4, 4, 3) and np.array_equal(out[..., 0], g) and np.array_equal(out[..., 2], g)
    g16 = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    out16 = np.asarray(load_image(save(tmp_path, Image.fromarray(g16), "g16.png")))
    assert out16[..., 0].tolist() == [[0, 255], [128, 1]]


def test_cmyk_converted(tmp_path):
    img = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(save(tmp_path, img, "c.jpg")))
    assert out.shape == (3, 3, 3)
    r, g, b = out[1, 1].tolist()
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    img.info["transparency"] = 1
    img.putpixel((1, 1), 1)
    out = np.asarray(load_image(save(tmp_path, img, "p.png")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]


def test_float_with_nan_and_inf(tmp_path):
    a = np.array([[np.nan, np.inf], [-np.inf, 0.5]], np.float32)  # finite values within [0, 1]: scaled from it
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(a), "f.tiff")))
    assert out[..., 0].tolist() == [[0, 255], [0, 128]]


def test_missing_corrupt_and_not_image(tmp_path):
    with pytest.raises(InputError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(InputError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(InputError, match="t.txt: not a readable image"):
        load_image(tmp_path / "t.txt")
    good = save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "trunc.png")
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def test_pixel_limit_refuses_bombs_before_decoding(tmp_path):
    p = save(tmp_path, Image.new("L", (400, 300)), "big.png")
    with pytest.raises(InputError, match=r"big.png: 400x300 = 120000 pixels exceeds the limit of 100000"):
        load_image(p, max_pixels=100_000)
    assert load_image(p, max_pixels=120_000).size == (400, 300)


# ------------------------------------------------------------------ issue 16: one safe loader for every path
def png_with_header(width, height, data_rows=None):
    """A PNG whose IHDR claims ``width``×``height`` (valid CRCs) but whose IDAT holds ``data_rows`` (default: one
    1-pixel grayscale row): the header lies, so only a loader that checks the header before decoding stays cheap."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(data_rows if data_rows is not None else b"\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_fifo_refused_without_opening_it(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("this platform has no FIFOs (os.mkfifo)")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []

    def attempt():  # in a thread: a loader that opens the FIFO blocks forever waiting for a writer
        try:
            load_image(fifo)
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            outcome.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the thread can end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], InputError), outcome
    assert re.search(r"pipe.png is a FIFO \(named pipe\), not an image file", str(outcome[0]))


def test_thin_image_refused_by_the_aspect_limit(tmp_path):
    p = save(tmp_path, Image.new("L", (1, 20000), 128), "strip.png")
    assert p.stat().st_size < 200  # tiny on disk, huge once its short side is resized to 224
    with pytest.raises(InputError, match=r"strip.png: 1x20000 has aspect ratio 20000:1 over the limit 50:1 "
                                         r"\(max_aspect=50\)"):
        load_image(p)
    with pytest.raises(InputError, match=r"20x1 has aspect ratio 20:1 over the limit 2.5:1 \(max_aspect=2.5\)"):
        load_image(Image.new("RGB", (20, 1)), max_aspect=2.5)
    assert load_image(p, max_aspect=20000).size == (1, 20000)
    assert load_image(Image.new("RGB", (50, 1))).size == (50, 1)  # exactly at the default limit


def test_preprocess_cost_does_not_grow_with_the_aspect_ratio(tmp_path):
    """The encoders crop before resizing: a 1×20000 strip (allowed by a raised limit) gives one S×S tensor, the
    centre of the strip, as a full resize-then-crop would."""
    enc = tiny_encoder("clip", image_size=32)
    a = np.zeros((20000, 1), np.uint8)
    a[9990:10010] = 255  # a white band of 20 rows in the middle; the 32×32 crop covers the middle source row
    x = enc.preprocess([Image.fromarray(a)])
    assert x.shape == (1, 3, 32, 32)
    white = (1.0 - torch.tensor(enc.image_mean)) / torch.tensor(enc.image_std)
    torch.testing.assert_close(x[0, :, 16, 16], white)  # the centre is the band
    with pytest.raises(InputError, match="image 0 is empty"):
        enc.preprocess([Image.new("RGB", (0, 5))])


def test_header_claiming_100000_squared_refused_before_decoding(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_with_header(100_000, 100_000))
    with pytest.raises(InputError, match=r"huge.png: the header claims 10000000000 pixels, over the limit of "
                                         r"64000000 \(max_pixels=64000000\).*refused before decoding"):
        load_image(tmp_path / "huge.png")
    # below Pillow's own bomb limit, our limit is the one that refuses it (decoding would fail as truncated)
    (tmp_path / "big.png").write_bytes(png_with_header(9000, 9000))
    with pytest.raises(InputError, match=r"big.png: 9000x9000 = 81000000 pixels exceeds the limit of 64000000"):
        load_image(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"big.png: the image file is corrupt or truncated"):
        load_image(tmp_path / "big.png", max_pixels=81_000_000)


def test_empty_images_refused(tmp_path):
    (tmp_path / "zero.png").write_bytes(png_with_header(0, 0))
    with pytest.raises(InputError, match="zero.png"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(InputError, match=r"image: the image is empty \(0x0 pixels\)"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(InputError, match=r"the image is empty \(7x0 pixels\)"):
        load_image(Image.new("L", (7, 0)))


def test_pil_images_checked_by_the_same_limits():
    with pytest.raises(InputError, match=r"image: 400x300 = 120000 pixels exceeds the limit of 100000"):
        load_image(Image.new("RGB", (400, 300)), max_pixels=100_000)
    out = load_image(Image.new("LA", (3, 2), (10, 255)))
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [10, 10, 10]
    with pytest.raises(InputError, match="a file path or a PIL image, got bytes"):
        load_image(b"\x89PNG")
    with pytest.raises(ConfigError, match="max_aspect must be a number >= 1"):
        load_image(Image.new("RGB", (3, 3)), max_aspect=0.5)
    with pytest.raises(ConfigError, match="max_pixels must be a positive integer"):
        load_image(Image.new("RGB", (3, 3)), max_pixels=0)


# EXIF orientation -> what a viewer shows, written with numpy (not with PIL's table)
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
           8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path, orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 5 wide, 3 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "o.png"
    Image.fromarray(a).save(p, exif=exif)
    out = load_image(p)
    assert np.array_equal(np.asarray(out), UPRIGHT[orientation](a))
    assert out.size == ((3, 5) if orientation >= 5 else (5, 3))  # 5..8 swap width and height
    assert np.array_equal(np.asarray(load_image(out)), np.asarray(out))  # loading again does not rotate again


def test_exif_orientation_6_rotates_a_phone_photo(tmp_path):
    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :24] = (255, 0, 0)  # stored sideways: the left half red; the phone was turned 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = np.asarray(load_image(p)).astype(int)
    assert out.shape == (48, 32, 3)
    assert out[2, 16, 0] > 200 and out[2, 16, 2] < 60  # the red half is now on top
    assert out[45, 16, 0] < 60  # and the bottom is black
