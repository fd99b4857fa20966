"""``compactvl ui`` without a browser: the overlay drawing on hand-made provenance (pixel colours at known patches),
and the page's callback on a tiny random saved model — its answers equal the model's own (a variant built from the
same recipe dicts by ``from_pretrained``), its token counts and MACs equal ``measure``'s, bad input gets a message.
The browser test is tests/test_ui_browser.py."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from compactvl.cli import main
from compactvl.compression import op_spec, policy_spec
from compactvl.measure import llm_macs, schedule_for
from compactvl.model import CompactVLM
from compactvl.schedules import Schedule
from compactvl.ui.overlay import (BLEND, DIM, EDGE, alive_tokens, centre_square, draw_tokens, group_colours,
                                  panel_strip)
from compactvl.ui.session import Session, respond

GREY = (100, 150, 200)


# ----------------------------------------------------------------------------------------------- overlay (pure)
def _centre(cell: tuple[int, int], grid=(4, 4), side: int = 64) -> tuple[int, int]:
    """(x, y) of the centre pixel of patch ``cell`` (row, col) in a side x side drawing."""
    step = side // grid[0]
    return cell[1] * step + step // 2, cell[0] * step + step // 2


# 4x4 grid: patch 0 pruned, patch 1 alone (token 0), patches 2,3 merged (token 1), patches 4,5,8,9 merged (token 2),
# the rest alone (tokens 3..10).
ASSIGN = [-1, 0, 1, 1, 2, 2, 3, 4, 2, 2, 5, 6, 7, 8, 9, 10]


def test_overlay_pixels_at_known_patches():
    img = Image.new("RGB", (64, 64), GREY)
    out = np.asarray(draw_tokens(img, ASSIGN, (4, 4)))
    grey = np.array(GREY, dtype=float)
    at = lambda cell: out[_centre(cell)[1], _centre(cell)[0]].astype(int)  # noqa: E731
    assert at((0, 0)).tolist() == np.floor(grey * DIM + 0.5).astype(int).tolist()  # pruned: darkened
    assert at((0, 1)).tolist() == list(GREY)  # kept alone: untouched
    colours = group_colours(ASSIGN)
    assert sorted(colours) == [1, 2] and colours[1] != colours[2]  # the merged tokens only, one colour each
    for token, cells in {1: [(0, 2), (0, 3)], 2: [(1, 0), (1, 1), (2, 0), (2, 1)]}.items():
        want = np.floor((1 - BLEND) * grey + BLEND * np.array(colours[token]) + 0.5).astype(int).tolist()
        assert all(at(c).tolist() == want for c in cells), token
    # white edges between different tokens, none inside a merged group
    assert out[8, 32].tolist() == list(EDGE)  # between patch 1 (token 0) and patch 2 (token 1)
    assert out[8, 48].tolist() != list(EDGE)  # between patches 2 and 3, both token 1
    assert out[32, 8].tolist() != list(EDGE)  # between patches 4 and 8, both token 2
    assert out[48, 8].tolist() == list(EDGE)  # between patch 8 (token 2) and patch 12 (token 7)


def test_overlay_alive_tokens_dim_the_dropped_ones_and_resize():
    img = Image.new("RGB", (40, 40), GREY)
    out = np.asarray(draw_tokens(img, ASSIGN, (4, 4), alive={0, 2}, size=64))
    assert out.shape == (64, 64, 3)
    dim = np.floor(np.array(GREY) * DIM + 0.5).astype(int).tolist()
    assert out[_centre((0, 2))[1], _centre((0, 2))[0]].tolist() == dim  # token 1 no longer alive
    assert out[_centre((3, 3))[1], _centre((3, 3))[0]].tolist() == dim  # token 10 neither
    assert out[_centre((0, 1))[1], _centre((0, 1))[0]].tolist() == list(GREY)  # token 0 alive, alone
    colour = group_colours([t if t in (0, 2) else -1 for t in ASSIGN])[2]
    want = np.floor((1 - BLEND) * np.array(GREY) + BLEND * np.array(colour) + 0.5).astype(int).tolist()
    assert out[_centre((1, 1))[1], _centre((1, 1))[0]].tolist() == want


def test_overlay_checks_and_helpers():
    with pytest.raises(ValueError, match="15 entries for a 4x4 grid"):
        draw_tokens(Image.new("RGB", (8, 8)), ASSIGN[:15], (4, 4))
    # visual tokens 0..3 sit at input rows 5..8; a policy kept rows 0..4 (text), 6 and 8
    assert alive_tokens([0, 1, 2, 3, 4, 6, 8], [5, 6, 7, 8]) == {1, 3}
    wide = Image.fromarray(np.arange(80, dtype=np.uint8)[None, :, None].repeat(40, 0).repeat(3, 2))
    sq = centre_square(wide)
    assert sq.size == (40, 40) and np.asarray(sq)[0, 0, 0] == 20 and np.asarray(sq)[0, -1, 0] == 59


def test_panel_strip_lays_out_panels_with_captions():
    panels = [(Image.new("RGB", (20, 20), (i * 40, 0, 0)), f"layer {i}") for i in range(8)]
    strip = np.asarray(panel_strip(panels, per_row=3, gap=4))
    assert strip.shape == (3 * (20 + 16 + 4) - 4, 3 * 24 - 4, 3)  # rows of 3, 3 and 2 panels
    assert strip[10, 10].tolist() == [0, 0, 0]  # panel 0, its caption below it
    assert strip[40 + 10, 24 + 10].tolist() == [160, 0, 0]  # panel 4: row 1, column 1
    assert strip[2 * 40 + 10, 2 * 24 + 10].tolist() == [255, 255, 255]  # no panel 8: background
    assert panel_strip([]) is None


# ----------------------------------------------------------------------------------------------- the callback
@pytest.fixture(scope="module")
def session(saved):
    return Session(CompactVLM.from_pretrained(saved), max_new_tokens=6, max_image_bytes=200_000,
                   max_image_pixels=1_000_000)


def _image(seed: int = 0, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _file(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_methods_offered(session):
    assert {"fastv", "pyramiddrop", "divprune", "random"} <= set(session.methods)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_callback_answer_counts_and_macs_equal_the_models_own(session, saved, tmp_path, method):
    img, question = _image(3), "What is in the picture?"
    status, table, base, over, layers = respond(session, _file(tmp_path, "x.png", _png(img)), question, method, 25)
    assert status.startswith(f"**{method} at 25%**"), status
    n = session.visual_per_image
    if method == "divprune":
        kw = {"token_ops": [op_spec(method, {"keep": 0.25}, n)]}
    else:
        kw = {"policies": [policy_spec(method, {"keep": 0.25})]}
    alone = CompactVLM.from_pretrained(saved, **kw)  # the same recipe dicts, built by from_pretrained
    plain = CompactVLM.from_pretrained(saved)
    c = session.run(img, question, method, 25)
    assert c.method.answer == alone.chat(img, question, max_new_tokens=6)
    assert c.baseline.answer == plain.chat(img, question, max_new_tokens=6)
    assert c.method.answer in table and c.baseline.answer in table

    # counts and MACs from the MACs module, on a schedule built here from the prompt's length
    prep = alone.prepare([[(f"<image>\n{question}", None)]], [[img]])
    visual, prompt = prep.visual_counts[0][0], int(prep.attention_mask.sum())
    L = alone.lm.config.num_hidden_layers
    if method == "divprune":
        assert visual == n // 4
        sched = Schedule([prompt] * L, [visual] * L, prompt - visual)
        assert layers is None and not c.method.layers and over is not None
    else:
        assert visual == n
        sched = schedule_for("fastv", L, visual, prompt - visual, **alone.runner.policies[0].schedule_knobs())
        assert len(c.method.layers) == 1 and c.method.layers[0][1].endswith(f"{sched.visual[-1]} visual tokens")
        assert layers.size == (session.layer_overlay_size, session.layer_overlay_size + 16)  # one panel + caption
    assert c.method.visual_tokens == visual and c.method.visual_per_layer == sched.visual
    assert c.method.llm_gmacs == pytest.approx(llm_macs(alone.lm.config, sched).llm_macs / 1e9, rel=1e-12)
    base_sched = Schedule([prompt - visual + n] * L, [n] * L, prompt - visual)
    assert c.baseline.llm_gmacs == pytest.approx(llm_macs(plain.lm.config, base_sched).llm_macs / 1e9, rel=1e-12)
    assert c.method.latency_s > 0 and c.baseline.latency_s > 0
    assert over.size == (session.overlay_size,) * 2 and base.size == over.size


def test_callback_errors_name_the_problem_and_the_page_keeps_working(session, tmp_path):
    good = _file(tmp_path, "ok.png", _png(_image(1)))
    bomb = _file(tmp_path, "bomb.png", _png(Image.new("1", (1200, 1000))))  # header: 1.2 MP, over the 1 MP limit
    cases = {
        "no image": ((None, "q", "fastv", 25), "no image: upload one"),
        "corrupt image": ((_file(tmp_path, "bad.png", b"\x89PNG\r\n\x1a\nnot really"), "q", "fastv", 25),
                          "bad.png"),
        "decompression bomb": ((bomb, "q", "fastv", 25), "decompression bomb"),
        "too many bytes": ((_file(tmp_path, "big.png", b"0" * 200_001), "q", "fastv", 25), "over the limit of 200000"),
        "unknown method": ((good, "q", "nosuch", 25), "unknown method 'nosuch'; pick one of:"),
        "budget 0": ((good, "q", "fastv", 0), "budget 0 is out of range"),
        "budget 101": ((good, "q", "fastv", 101), "budget 101 is out of range"),
        "budget missing": ((good, "q", "fastv", None), "budget None is out of range"),
        "empty question": ((good, "   ", "fastv", 25), "the question is empty"),
        "placeholder in question": ((good, "<image> hi", "fastv", 25), "image placeholder"),
    }
    for name, (args, message) in cases.items():
        status, table, base, over, layers = respond(session, *args)
        assert status.startswith("**Error:**") and message in status, (name, status)
        assert (table, base, over, layers) == ("", None, None, None), name
    assert "/tmp" not in respond(session, bomb, "q", "fastv", 25)[0]  # the file as the user named it
    status, table, *_ = respond(session, good, "still there?", "fastv", 50)
    assert status.startswith("**fastv at 50%**") and table


def test_cli_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ModuleNotFoundError
    assert main(["ui", "reference"]) == 2
    assert "compactvl ui needs gradio: pip install 'compactvl[ui]'" in capsys.readouterr().err


def test_help_does_not_import_gradio():
    code = "import sys; from compactvl.cli import build_parser; build_parser(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
