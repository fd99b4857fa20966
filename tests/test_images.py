"""Image loading: every mode becomes correct 8-bit RGB; bad files fail naming the file."""
import numpy as np
import pytest
from PIL import Image

from compactvl.errors import InputError
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
