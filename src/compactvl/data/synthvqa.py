"""synthvqa: procedurally generated VQA in which fine detail matters.

Each sample is a seeded 224×224 scene of small flat shapes (and, for glyph questions, one white label with a
character on it) on a gray background, with one templated question whose answer is one word. Five categories,
each with a small, balanced answer space (chance = 1/|answers|):

==========  ==============================================================  =====================  ======
category    question                                                        answers                chance
==========  ==============================================================  =====================  ======
color       What color is the {shape}?                                      8 colors               1/8
shape       What shape is the {color} object?                               6 shapes               1/6
count       How many {shape}s / {color} objects are there?                  1 … 6                  1/6
glyph       What character is written on the label?                         10 digits/letters      1/10
position    Where is the {A} relative to the {B}: left, right, above, ...?  left/right/above/below 1/4
==========  ==============================================================  =====================  ======

Difficulty is object size: ``small`` (10–16 px, about one 14-px ViT patch), ``medium`` (20–28 px) and
``large`` (32–44 px, two to three patches) — and clutter: ``distractors`` is the number of objects in a scene
besides those the question is about. By default it is 2–4 for color, shape and glyph questions, 0–3 for count and
0–2 for position questions; ``distractors=(lo, hi)`` (or one number) sets it for every category. Distractors are
what makes a question need binding — finding *the* triangle among other shapes before reading its color — which a
small VLM learns slowest; the demo uses ``distractors=0`` to fit 10 CPU minutes (docs/training.md, "What makes
synthvqa hard"). Small objects and small glyphs are what token compression loses
first, as TextVQA/OCRBench show in the papers. Objects sit in distinct cells of a grid sized to the level, so
they never overlap; a referred-to object ("the red circle") is unique in its scene.

``task="describe"`` turns the same scenes into dense descriptions for an align stage (as LLaVA aligns on
captions): the question is always "Describe the image." and the answer lists every object drawn, in reading order
(the 3×3 regions row by row, left to right), with its size level, color, shape (a label: its character) and place in the
image's 3×3 regions — e.g. "3 objects: a small red circle at the top left, a small white label with the character 7
in the center, a small blue star at the bottom right." (:func:`describe_scene`). Scene types follow ``categories``
as for questions; the streams differ from the vqa task's (``.../describe/...``), so the two tasks never share an
image. A description is not a one-word answer: exact-match evaluation refuses it (``compactvl.config``).

Everything is a pure function of (seed, split, index): the question category is ``index % 5``, the answer
cycles through a seeded permutation of the category's answer space (so answers are balanced to within one),
and the scene is drawn with ``random.Random(f"synthvqa/{seed}/{split}/{index}")``. Splits use different
streams, so they do not overlap. Rendering takes about a millisecond; nothing is stored.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from ..errors import ConfigError
from .llava import IMAGE_PLACEHOLDER, Sample

IMAGE_SIZE = 224
CATEGORIES = ("color", "shape", "count", "glyph", "position")
SPLITS = ("train", "val", "test")
DEFAULT_SIZE = {"train": 20000, "val": 1000, "test": 1000}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235), "yellow": (245, 220, 40),
          "orange": (245, 140, 30), "purple": (150, 60, 200), "pink": (250, 140, 200), "cyan": (60, 220, 230)}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
GLYPHS = ("2", "3", "4", "5", "7", "9", "E", "H", "K", "R")
POSITIONS = ("left", "right", "above", "below")
ANSWERS: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "count": tuple("123456"),
                                       "glyph": GLYPHS, "position": POSITIONS}
LEVELS = {"small": (10, 16), "medium": (20, 28), "large": (32, 44)}
SUFFIX = " Answer with one word."
TASKS = ("vqa", "describe")
DESCRIBE_PROMPT = "Describe the image."
DESCRIBE_CATEGORY = "describe"
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def answer_space(category: str) -> tuple[str, ...]:
    """The answers a question of ``category`` can have."""
    if category not in ANSWERS:
        raise ConfigError(f"unknown synthvqa category {category!r}; choose from {', '.join(CATEGORIES)}")
    return ANSWERS[category]


def chance_level(category: str) -> float:
    """Accuracy of guessing uniformly (answers are balanced, so also of always giving one answer)."""
    return 1 / len(answer_space(category))


def _region(box: Sequence[int]) -> tuple[int, int]:
    """(row, column) of the image's 3×3 regions that holds the center of ``box``."""
    x0, y0, x1, y1 = box
    return min(2, int(3 * (y0 + y1) / 2 / IMAGE_SIZE)), min(2, int(3 * (x0 + x1) / 2 / IMAGE_SIZE))


def describe_object(obj: dict, level: str) -> str:
    """One drawn object in words: ``a small red circle at the top left`` / ``a large white label with the character
    7 in the center`` (the region: the image's 3×3 thirds holding the object's center)."""
    r, c = _region(obj["box"])
    row, col = _ROWS[r], _COLS[c]
    where = "in the center" if (row, col) == ("middle", "center") else \
        f"at the {row}" if col == "center" else f"on the {col}" if row == "middle" else f"at the {row} {col}"
    what = (f"{obj['color']} label with the character {obj['text']}" if obj["shape"] == "label"
            else f"{obj['color']} {obj['shape']}")
    return f"a {level} {what} {where}"


def reading_order(objects: list[dict], level: str) -> list[dict]:
    """The objects in reading order: by 3×3 region (row by row, left to right), then by the grid cell they were
    placed in (each object's center lies inside its cell, so the cell is recovered from the box exactly; no two
    objects share one, so the order is total)."""
    cell = IMAGE_SIZE / (IMAGE_SIZE // (LEVELS[level][1] + 8))

    def key(o: dict) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = o["box"]
        return (*_region(o["box"]), int((y0 + y1) / 2 // cell), int((x0 + x1) / 2 // cell))
    return sorted(objects, key=key)


def describe_scene(objects: list[dict], level: str) -> str:
    """The describe task's answer: how many objects, then each in reading order (:func:`describe_object`)."""
    parts = [describe_object(o, level) for o in reading_order(objects, level)]
    return f"{len(parts)} object{'s' if len(parts) != 1 else ''}: {', '.join(parts)}."


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)  # Pillow >= 10.1 with FreeType: a scalable font


def _draw(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x0, y0, x1, y1 = obj["box"]
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    fill, shape = COLORS.get(obj["color"], (255, 255, 255)), obj["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape in ("square", "label"):
        draw.rectangle((x0, y0, x1, y1), fill=fill)
        if shape == "label":
            draw.text((cx, cy), obj["text"], fill=(0, 0, 0), font=_font(max(8, round(0.9 * (x1 - x0)))),
                      anchor="mm")
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        draw.polygon([(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                       cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)],
                     fill=fill)
    elif shape == "cross":
        w = (x1 - x0) / 6
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)


class SynthVQA(Dataset):
    """``SynthVQA("train", size=20000, seed=0, difficulty=("small", "medium", "large"))`` → :class:`Sample`s
    with a 224×224 RGB image, a one-turn question, its one-word answer, its category and
    ``meta = {difficulty, objects: [{shape, color, box[, text]}], query, seed, split, index}``; with
    ``task="describe"``, the question "Describe the image." and a description of every object drawn."""

    categories = CATEGORIES

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0,
                 difficulty: str | Sequence[str] = tuple(LEVELS), categories: Sequence[str] = CATEGORIES,
                 distractors: int | Sequence[int] | None = None, task: str | None = None):
        if split not in SPLITS:
            raise ConfigError(f"unknown synthvqa split {split!r}; choose from {', '.join(SPLITS)}")
        levels = (difficulty,) if isinstance(difficulty, str) else tuple(difficulty)
        bad = [d for d in levels if d not in LEVELS] or (["(none)"] if not levels else [])
        if bad:
            raise ConfigError(f"unknown synthvqa difficulty {', '.join(bad)}; choose from {', '.join(LEVELS)}")
        cats = tuple(categories)
        for c in cats or ["(none)"]:
            answer_space(c)
        self.split, self.seed, self.levels, self.categories = split, int(seed), levels, cats
        self.distractors = _distractor_range(distractors)
        self.task = "vqa" if task is None else task
        if self.task not in TASKS:
            raise ConfigError(f"unknown synthvqa task {task!r}; choose from {', '.join(TASKS)}")
        self.size = DEFAULT_SIZE[split] if size is None else int(size)
        if self.size < 1:
            raise ConfigError(f"synthvqa size must be at least 1, got {size}; ask for a positive number of samples")

    answer_space = staticmethod(answer_space)
    chance_level = staticmethod(chance_level)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"synthvqa index {index} out of range for size {self.size}")
        cat = self.categories[index % len(self.categories)]
        space = ANSWERS[cat]
        if self.task == "describe":
            return self._describe(index, cat, space)
        rng, level, answer, (question, objects, query) = self._question(index, cat, space)
        image = self._render(rng, objects, level, query.get("relation"))
        return Sample(
            id=f"synthvqa-{self.split}-{self.seed}-{index}", images=[image],
            conversations=[{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}{SUFFIX}"},
                           {"from": "gpt", "value": answer}],
            category=cat, answer=answer,
            meta={"difficulty": level, "distractors": len(objects) - _referents(cat, answer), "objects": objects,
                  "query": query, "seed": self.seed, "split": self.split, "index": index})

    def _question(self, index: int, cat: str, space: tuple[str, ...]) -> tuple:
        """Sample ``index``'s random stream (positioned to render its image next), difficulty, answer, and
        question / objects / referents (``_scene``)."""
        block, r = divmod(index // len(self.categories), len(space))
        answer = random.Random(f"synthvqa/{self.seed}/{self.split}/{cat}/{block}").sample(space, len(space))[r]
        rng = random.Random(f"synthvqa/{self.seed}/{self.split}/{index}")
        level = rng.choice(self.levels)
        return rng, level, answer, self._scene(rng, cat, answer, level, self.distractors)

    def question_answers(self) -> list[tuple[str, str]]:
        """(``Sample.question``, ``Sample.answer``) of every sample, in order, without drawing any image (the
        question-only control reads these); the describe task draws them (a description reads the drawn boxes)."""
        if self.task == "describe":
            return [(s.question, s.answer) for s in self]
        out = []
        for i in range(self.size):
            cat = self.categories[i % len(self.categories)]
            _, _, answer, (question, _, _) = self._question(i, cat, ANSWERS[cat])
            out.append((f"{question}{SUFFIX}".strip(), answer))
        return out

    def _describe(self, index: int, cat: str, space: tuple[str, ...]) -> Sample:
        """The describe task: a scene of category ``cat`` (its answer drawn from its own stream) and the description
        of every object drawn; ``meta`` as for questions, with the scene's category under ``scene``."""
        rng = random.Random(f"synthvqa/{self.seed}/{self.split}/describe/{index}")
        answer = rng.choice(space)
        level = rng.choice(self.levels)
        _, objects, query = self._scene(rng, cat, answer, level, self.distractors)
        image = self._render(rng, objects, level, query.get("relation"))
        text = describe_scene(objects, level)
        return Sample(
            id=f"synthvqa-describe-{self.split}-{self.seed}-{index}", images=[image],
            conversations=[{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{DESCRIBE_PROMPT}"},
                           {"from": "gpt", "value": text}],
            category=DESCRIBE_CATEGORY, answer=text,
            meta={"difficulty": level, "distractors": len(objects) - _referents(cat, answer), "objects": objects,
                  "query": query, "scene": cat, "seed": self.seed, "split": self.split, "index": index,
                  "task": "describe"})

    @staticmethod
    def _scene(rng: random.Random, cat: str, answer: str, level: str,
               distractors: tuple[int, int] | None = None) -> tuple[str, list[dict], dict]:
        """The question, the objects (shape, color[, text]) in placement order (the question's referents first),
        and the question's referents."""
        colors = list(COLORS)

        def extra(lo: int, hi: int) -> int:  # how many distractors: the category's default range unless set
            return rng.randint(*(distractors or (lo, hi)))

        def others(n: int, shapes=SHAPES, cols=colors, avoid=()) -> list[dict]:
            out = []
            while len(out) < n:
                o = {"shape": rng.choice(shapes), "color": rng.choice(cols)}
                if (o["shape"], o["color"]) not in avoid:
                    out.append(o)
            return out

        if cat == "color":
            s = rng.choice(SHAPES)
            objs = [{"shape": s, "color": answer}] + others(extra(2, 4), [x for x in SHAPES if x != s])
            return f"What color is the {s}?", objs, {"shape": s}
        if cat == "shape":
            c = rng.choice(colors)
            objs = [{"shape": answer, "color": c}] + others(extra(2, 4), cols=[x for x in colors if x != c])
            return f"What shape is the {c} object?", objs, {"color": c}
        if cat == "count":
            k, n_extra = int(answer), extra(0, 3)
            if rng.random() < 0.5:
                s = rng.choice(SHAPES)
                objs = others(k, shapes=[s]) + others(n_extra, [x for x in SHAPES if x != s])
                return f"How many {_plural(s)} are there?", objs, {"shape": s}
            c = rng.choice(colors)
            objs = others(k, cols=[c]) + others(n_extra, cols=[x for x in colors if x != c])
            return f"How many {c} objects are there?", objs, {"color": c}
        if cat == "glyph":
            objs = [{"shape": "label", "color": "white", "text": answer}] + others(extra(2, 4))
            return "What character is written on the label?", objs, {}
        a = others(1)[0]
        b = others(1, [x for x in SHAPES if x != a["shape"]], [x for x in colors if x != a["color"]])[0]
        objs = [a, b] + others(extra(0, 2), avoid={(a["shape"], a["color"]), (b["shape"], b["color"])})
        q = (f"Where is the {a['color']} {a['shape']} relative to the {b['color']} {b['shape']}: "
             "left, right, above, or below?")
        return q, objs, {"a": dict(a), "b": dict(b), "relation": answer}

    @staticmethod
    def _render(rng: random.Random, objects: list[dict], level: str, relation: str | None = None) -> Image.Image:
        """Place objects in distinct grid cells (a position question's pair first) and draw them."""
        lo, hi = LEVELS[level]
        n = IMAGE_SIZE // (hi + 8)
        cell = IMAGE_SIZE / n
        cells = [(r, c) for r in range(n) for c in range(n)]
        rng.shuffle(cells)
        placed: list[tuple[int, int]] = []
        if relation is not None:
            placed = _pair_cells(rng, n, relation)
            cells = [x for x in cells if x not in placed]
        placed += cells[: len(objects) - len(placed)]
        bg = rng.randint(100, 150)
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
        draw = ImageDraw.Draw(img)
        for obj, (r, c) in zip(objects, placed):
            s = rng.randint(lo, hi)
            j = max(0.0, (cell - s) / 2 - 2)
            cx, cy = (c + 0.5) * cell + rng.uniform(-j, j), (r + 0.5) * cell + rng.uniform(-j, j)
            x0, y0 = round(cx - s / 2), round(cy - s / 2)
            obj["box"] = [x0, y0, x0 + s, y0 + s]
            _draw(draw, obj)
        return img


MAX_DISTRACTORS = 8  # with 6 counted objects that still fits the 16 cells of the large level


def _distractor_range(distractors: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None`` (each category's default), ``k`` or ``(lo, hi)`` → ``(lo, hi)``, checked."""
    if distractors is None:
        return None
    vals = [distractors] if isinstance(distractors, int) else distractors
    vals = list(vals) if isinstance(vals, (list, tuple)) else []
    if len(vals) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ConfigError(f"synthvqa distractors must be a whole number or [lo, hi], got {distractors!r}")
    lo, hi = vals[0], vals[-1]
    if not 0 <= lo <= hi <= MAX_DISTRACTORS:
        raise ConfigError(f"synthvqa distractors [{lo}, {hi}] out of range; use 0 <= lo <= hi <= {MAX_DISTRACTORS}")
    return lo, hi


def _referents(cat: str, answer: str) -> int:
    """How many objects of a scene the question is about (the rest are distractors)."""
    return int(answer) if cat == "count" else 2 if cat == "position" else 1


def _pair_cells(rng: random.Random, n: int, relation: str) -> list[tuple[int, int]]:
    """Cells for objects A and B with A `relation` B: same row (column) and at least two cells apart, so the
    relation holds by a wide margin whatever the jitter inside the cells."""
    lo, hi = sorted(rng.sample(range(n), 2))
    while hi - lo < 2:
        lo, hi = sorted(rng.sample(range(n), 2))
    line = rng.randrange(n)
    first, second = (lo, hi) if relation in ("left", "above") else (hi, lo)
    if relation in ("left", "right"):
        return [(line, first), (line, second)]
    return [(first, line), (second, line)]
