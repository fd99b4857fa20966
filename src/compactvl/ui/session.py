"""What one press of "Run" computes, without any web framework (``compactvl.ui.app`` only lays it out):

:meth:`Session.run` checks the inputs, then answers the question twice on the same image, with the model as saved and
with the picked method at the picked budget (``compactvl.variants.compression_variant``: a token op appended to the
saved token ops, or a layer policy added), and returns for each

- the answer (greedy; the same calls as ``CompactVLM.generate``),
- the visual tokens entering the LM and each decoder layer, and the LLM MACs: ``measure.counted.measured_schedule``,
  the counting ``compactvl demo`` and ``compactvl study`` report as ``llm_gmacs``,
- the measured latency of that one answer (image encoding + token ops + prefill + decoding, wall clock),
- overlays (``compactvl.ui.overlay``): the provenance of the tokens that enter the LM (``Tokens.assign``) over the
  part of the image the encoder sees, and for in-LLM policies one small overlay per pruning layer with the tokens
  still alive there (``RunState.trace``).

Every refusal is an :class:`~compactvl.errors.InputError` / ``ConfigError`` whose message names the problem and the
fix. One lock serialises runs: a variant swaps the model's ops and policies while it runs.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ..data.llava import Sample
from ..errors import CompactVLError, InputError
from ..images import load_image
from ..measure.counted import measured_schedule
from ..model import CompactVLM
from ..variants import budget_methods, compression_variant, visual_tokens_per_image
from .overlay import alive_tokens, centre_square, draw_tokens, panel_strip, patch_count

BASELINE = "as saved (uncompressed)"
log = logging.getLogger("compactvl.ui")


@dataclass
class RunResult:
    label: str
    answer: str
    visual_tokens: int  # entering the LM (after the pre-LLM token ops)
    visual_per_layer: list[int]  # entering each decoder layer
    patches: int  # the encoder's patches per image (its grid)
    llm_gmacs: float
    latency_s: float  # the whole answer: encoding, token ops, prefill, decoding
    lm_s: float  # of which the LM: prefill and decoding
    prefill_tokens: int  # the prompt's length (text + visual)
    overlay: Image.Image
    layers: list[tuple[Image.Image, str]] = field(default_factory=list)  # (overlay, caption) per pruning layer
    notes: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    method: RunResult
    baseline: RunResult


class Session:
    """The model and what the page may ask of it. ``methods``: the budget-taking methods this model can run."""

    def __init__(self, model: CompactVLM, max_new_tokens: int = 32, max_image_bytes: int = 8_000_000,
                 max_image_pixels: int | None = None, max_question_chars: int = 2000, overlay_size: int = 336,
                 layer_overlay_size: int = 168):
        self.model = model.eval()
        self.max_new_tokens, self.max_image_bytes = max_new_tokens, max_image_bytes
        self.max_image_pixels = max_image_pixels or model.config.max_pixels
        self.max_question_chars = max_question_chars
        self.overlay_size, self.layer_overlay_size = overlay_size, layer_overlay_size
        self.visual_per_image = visual_tokens_per_image(model)
        self.methods = budget_methods(model, self.visual_per_image)
        self._lock = threading.Lock()
        with torch.no_grad():  # the first forward of a process pays one-off costs; the measured runs should not
            model.chat(Image.new("RGB", (64, 64)), "warm-up", max_new_tokens=1)

    # ---------------------------------------------------------------- input checks
    def load(self, image: Any) -> Image.Image:
        """An uploaded file path (or a PIL image) -> RGB image within the size limits."""
        if image is None or (isinstance(image, str) and not image.strip()):
            raise InputError("no image: upload one (PNG, JPEG, WebP, GIF, BMP or TIFF) before pressing Run")
        if isinstance(image, Image.Image):
            return load_image(image, max_pixels=self.max_image_pixels)
        path = Path(getattr(image, "name", image))
        try:
            size = path.stat().st_size
        except OSError as e:
            raise InputError(f"the uploaded image {path.name} cannot be read ({e.strerror}); upload it again") from e
        if size > self.max_image_bytes:
            raise InputError(f"the uploaded image {path.name} is {size} bytes, over the limit of "
                             f"{self.max_image_bytes}; downscale it or save it as JPEG")
        try:
            return load_image(path, max_pixels=self.max_image_pixels)
        except InputError as e:  # name the file as the user knows it, not the server's temporary path
            raise InputError(str(e).replace(str(path), path.name)) from e

    def question(self, text: Any) -> str:
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise InputError("the question is empty: type a question about the image")
        if len(text) > self.max_question_chars:
            raise InputError(f"the question has {len(text)} characters; keep it under {self.max_question_chars}")
        if self.model.config.image_token in text:
            raise InputError(f"the question contains '{self.model.config.image_token}', the model's image "
                             "placeholder; remove it (the image is added for you)")
        return text

    def variant(self, method: Any, budget: Any) -> dict:
        """The variant running ``method`` keeping ``budget`` percent of the visual tokens."""
        if method not in self.methods:
            raise InputError(f"unknown method {method!r}; pick one of: {', '.join(self.methods)}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 100:
            raise InputError(f"budget {budget!r} is out of range: give the percentage of visual tokens to keep, "
                             "a number in (0, 100]")
        return compression_variant(self.model, {"method": method, "keep": float(budget) / 100},
                                   self.visual_per_image)

    # ---------------------------------------------------------------- running
    def run(self, image: Any, question: Any, method: Any, budget: Any) -> Comparison:
        img, text = self.load(image), self.question(question)
        spec = self.variant(method, budget)
        with self._lock:
            baseline = self._answer(img, text, {}, BASELINE)
            result = self._answer(img, text, spec, f"{method} at {budget:g}%")
        return Comparison(result, baseline)

    @torch.no_grad()
    def _answer(self, image: Image.Image, question: str, spec: dict, label: str) -> RunResult:
        ctx = self.model.variant(**spec) if spec else contextlib.nullcontext(self.model)
        prompt = f"{self.model.config.image_token}\n{question}"
        with ctx as m, _captured_tokens(m) as seen:
            eos = m.eos_token_ids()
            t0 = time.perf_counter()
            inputs = m.prepare([[(prompt, None)]], [[image]])
            t1 = time.perf_counter()
            out = m.runner.generate(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask,
                                    max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                    pad_token_id=m.processor.pad_token_id)
            t2 = time.perf_counter()
            tokens = seen[0]
            # MACs as demo / study count them: one more prefill, a CountingPolicy after the model's own policies.
            # The answer is a stand-in: for_generation cuts it off.
            measured = measured_schedule(m, Sample("ui", [image], [{"from": "human", "value": prompt},
                                                                   {"from": "gpt", "value": "-"}]))
            answer = m.processor.decode(out.token_lists(eos)[0])
        assign, grid = tokens.assign[0].tolist(), tuple(tokens.grid0)
        view = centre_square(image)
        overlay = draw_tokens(view, assign, grid, size=self.overlay_size)
        visual_rows = inputs.visual_mask[0].nonzero().flatten().tolist()
        layers = []
        for layer, kept in out.state.trace:
            alive = alive_tokens(kept[0].tolist(), visual_rows)
            layers.append((draw_tokens(view, assign, grid, alive, size=self.layer_overlay_size),
                           f"layer {layer}: {len(alive)} visual tokens"))
        n_tok, n_held, n_pruned = patch_count(assign)
        notes = [f"{n_tok} tokens hold {n_held} of {grid[0] * grid[1]} patches ({n_pruned} pruned)"]
        if len(m.encoders) > 1:
            notes.append("several encoders: the overlay shows the first encoder's patches")
        return RunResult(label, answer, int(measured["visual_tokens"]), list(measured["visual_per_layer"]),
                         grid[0] * grid[1], float(measured["llm_gmacs"]), t2 - t0, t2 - t1,
                         int(measured["prompt_tokens"]), overlay, layers, notes)


@contextlib.contextmanager
def _captured_tokens(model: CompactVLM) -> Iterator[list]:
    """The final :class:`~compactvl.tokens.Tokens` of each ``encode_images`` call in the block (their provenance),
    recorded by shadowing the method on this instance for the block."""
    seen: list = []
    original = model.encode_images

    def encode_images(*args, **kw):
        out = original(*args, **kw)
        seen.append(out[2])
        return out

    model.encode_images = encode_images
    try:
        yield seen
    finally:
        del model.encode_images


def summary_rows(c: Comparison) -> list[list[Any]]:
    """The comparison table: one row per run."""
    rows = []
    for r in (c.baseline, c.method):
        per_layer = r.visual_per_layer
        changed = per_layer and per_layer[-1] != per_layer[0]
        flow = f"{per_layer[0]} → {per_layer[-1]}" if changed else str(r.visual_tokens)
        rows.append([r.label, r.answer, f"{r.patches} → {flow}", f"{r.llm_gmacs:.4g}",
                     f"{1000 * r.latency_s:.0f} ({1000 * r.lm_s:.0f})"])
    return rows


SUMMARY_HEADERS = ["run", "answer", "visual tokens (patches → LM → last layer)", "LLM GMACs",
                   "latency ms (LM part)"]


def error_text(e: Exception) -> str:
    return f"**Error:** {e}"


def respond(session: Session, image: Any, question: Any, method: Any, budget: Any) -> tuple:
    """The page's callback: (status, comparison table, baseline overlay, method overlay, the per-layer overlays
    in one picture or None). Bad
    input fills the status with the message and empties the rest; the server goes on serving."""
    try:
        c = session.run(image, question, method, budget)
    except CompactVLError as e:
        return error_text(e), "", None, None, None
    except Exception as e:  # noqa: BLE001 - a method that fails on this input must not stop the page
        log.error("a run failed", exc_info=e)
        return error_text(f"the model failed on this input ({type(e).__name__}: {e})"), "", None, None, None
    head = "| " + " | ".join(SUMMARY_HEADERS) + " |\n|" + "---|" * len(SUMMARY_HEADERS) + "\n"
    table = head + "\n".join("| " + " | ".join(_cell(v) for v in row) + " |" for row in summary_rows(c))
    notes = "; ".join(c.method.notes)
    status = (f"**{c.method.label}**: {c.method.visual_tokens} visual tokens enter the LM "
              f"(as saved: {c.baseline.visual_tokens}), LLM MACs × {c.method.llm_gmacs / c.baseline.llm_gmacs:.2f}. "
              f"{notes}.")
    return status, table, c.baseline.overlay, c.method.overlay, panel_strip(c.method.layers)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ") or "(empty)"
