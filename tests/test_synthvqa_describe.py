"""synthvqa's describe task (a dense description of every object drawn, for an align stage): the description against
the generator's own scene record and the image's pixels, determinism, batching long answers without truncation,
training on it, and the errors for evaluating it or asking it of other datasets. Tiny random parts (seconds)."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from compactvl.config import load_config
from compactvl.data import SynthVQA, get_dataset
from compactvl.data.synthvqa import COLORS, IMAGE_SIZE
from compactvl.demo import tiny_model
from compactvl.errors import ConfigError, InputError
from compactvl.evaluate import evaluate
from compactvl.processor import IGNORE_INDEX
from compactvl.train import Trainer, build_train_data, collate

ITEM = re.compile(r"a (small|medium|large) (?:(\w+) label with the character (\S+)|(\w+) (\w+)) "
                  r"(?:at the (top|bottom)(?: (left|right))?|on the (left|right)|(in the center))$")


def parse(description: str) -> tuple[int, list[dict]]:
    """The count and the items of a description, read back with a regular expression (not the generator's code)."""
    m = re.fullmatch(r"(\d+) objects?: (.*)\.", description)
    assert m, description
    items = []
    for text in m.group(2).split(", "):
        g = ITEM.fullmatch(text)
        assert g, text
        level, lcolor, char, color, shape, vert, vside, hside, center = g.groups()
        row = vert or "middle"
        col = vside or hside or "center"
        items.append({"level": level, "color": lcolor or color, "shape": "label" if char else shape,
                      "text": char, "row": row, "col": col})
    return int(m.group(1)), items


def region(box) -> tuple[str, str]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    third = IMAGE_SIZE / 3
    return (("top", "middle", "bottom")[min(2, int(cy // third))], ("left", "center", "right")[min(2, int(cx // third))])


@pytest.mark.parametrize("kw", [{}, {"distractors": [0, 4]}, {"categories": ["glyph", "count"], "difficulty": "small"}])
def test_the_description_lists_exactly_the_objects_drawn(kw):
    data = SynthVQA("train", size=25, seed=3, task="describe", **kw)
    for i in range(len(data)):
        s = data[i]
        assert s.question == "Describe the image." and s.category == "describe" and s.answer == s.conversations[1]["value"]
        objects, level = s.meta["objects"], s.meta["difficulty"]
        n, items = parse(s.answer)
        assert n == len(items) == len(objects) >= 1
        want = Counter((o["color"], o["shape"], o.get("text"), *region(o["box"])) for o in objects)
        got = Counter((it["color"], it["shape"], it["text"], it["row"], it["col"]) for it in items)
        assert got == want, (s.answer, objects)
        assert {it["level"] for it in items} == {level}
        rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
        keys = [(rows.index(it["row"]), cols.index(it["col"])) for it in items]
        assert keys == sorted(keys)  # reading order: region by region
        pixels = s.images[0].load()
        for o in objects:  # each described object is in the image, in its color, at its box's center
            if o["shape"] != "label":
                x0, y0, x1, y1 = o["box"]
                assert pixels[(x0 + x1) // 2, (y0 + y1) // 2] == COLORS[o["color"]], (o, s.id)


def test_descriptions_are_a_pure_function_of_the_seed():
    a, b = SynthVQA("train", size=6, seed=1, task="describe"), SynthVQA("train", size=6, seed=1, task="describe")
    c = SynthVQA("train", size=6, seed=2, task="describe")
    vqa = SynthVQA("train", size=6, seed=1)
    for i in range(6):
        assert a[i].answer == b[i].answer and a[i].images[0].tobytes() == b[i].images[0].tobytes()
        assert a[i].meta["objects"] == b[i].meta["objects"]
    assert [a[i].answer for i in range(6)] != [c[i].answer for i in range(6)]
    assert all(a[i].images[0].tobytes() != vqa[i].images[0].tobytes() for i in range(6))  # separate streams
    assert all(a[i].id != vqa[i].id for i in range(6))


def _cfg(train=None, data=None, out="runs/t"):
    return load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                        "data": data or {"train": [{"name": "synthvqa", "n": 16, "task": "describe",
                                                    "distractors": [0, 2]}], "eval": []},
                        "train": {"stage": "align", "batch_size": 8, "max_steps": 2, "warmup_steps": 0,
                                  "precision": "fp32", **(train or {})},
                        "output_dir": out})


def test_a_batch_of_long_descriptions_keeps_every_answer_token_and_equals_batch_one():
    """The labels of a padded batch hold each whole description (nothing is cut), and the summed loss of the batch
    equals the sum of the samples' losses one at a time."""
    cfg = _cfg()
    model = tiny_model(cfg).eval()
    data = build_train_data(cfg["data"]["train"])
    samples = [data[i] for i in range(6)]
    lengths = [len(s.answer) for s in samples]
    assert max(lengths) > 3 * min(lengths) or max(lengths) > 150, lengths  # long and unequal answers
    b = collate(samples)
    x = model.prepare(b.conversations, b.images, with_labels=True)
    tok = model.processor.tokenizer
    for row, s in zip(x.labels, samples):
        trained = tok.decode([int(t) for t in row if t != IGNORE_INDEX], skip_special_tokens=True)
        assert trained.strip() == s.answer, (trained, s.answer)
    with torch.no_grad():
        batch = model(x, return_logits=False)
        ones = [model(model.prepare([c], [im], with_labels=True), return_logits=False)
                for c, im in zip(b.conversations, b.images)]
    assert int(batch.num_tokens) == sum(int(o.num_tokens) for o in ones)
    torch.testing.assert_close(batch.ce_sum, sum(o.ce_sum for o in ones), rtol=1e-5, atol=1e-4)


def test_a_description_longer_than_the_context_is_an_error_not_a_truncation():
    """The tiny LM's context is 512 positions and its tokenizer is character-level, so a 12-object description does
    not fit: preparing / running it fails with the positions needed, never silently cut."""
    model = tiny_model(_cfg())
    data = SynthVQA("train", size=20, task="describe", categories=["count"], distractors=8)
    s = max((data[i] for i in range(len(data))), key=lambda x: len(x.answer))
    assert len(s.answer) > 512
    with pytest.raises(InputError, match=r"positions.*context is 512"):
        b = collate([s])
        model(model.prepare(b.conversations, b.images, with_labels=True), return_logits=False)


def test_a_two_set_align_trains_on_descriptions_and_questions(tmp_path):
    cfg = _cfg(data={"train": [{"name": "synthvqa", "n": 8, "task": "describe", "distractors": [0, 2]},
                               {"name": "synthvqa", "n": 8}], "eval": []})
    model = tiny_model(cfg)
    data = build_train_data(cfg["data"]["train"])
    assert {data[i].category for i in range(16)} >= {"describe", "color"}
    res = Trainer(model, data, cfg, output_dir=tmp_path, progress=False, log=None).fit(export=False)
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(res.losses)))


def test_describe_in_data_eval_and_other_misuse_are_clear_errors():
    with pytest.raises(ConfigError, match=r"data\.eval\.0: task describe cannot be evaluated.*put it in data\.train"):
        load_config({"data": {"eval": [{"name": "synthvqa", "task": "describe"}]}})
    with pytest.raises(ConfigError, match=r"data\.train\.0\.task must be one of vqa, describe"):
        load_config({"data": {"train": [{"name": "synthvqa", "task": "caption"}]}})
    with pytest.raises(ConfigError, match="task 'describe' exists only for synthvqa, not easyvqa"):
        get_dataset("easyvqa", "train", task="describe")
    with pytest.raises(ConfigError, match="unknown synthvqa task 'caption'; choose from vqa, describe"):
        SynthVQA("train", size=2, task="caption")
    cfg = load_config({"data": {"train": [{"name": "synthvqa", "task": "describe"}]}})
    assert cfg["data"]["train"][0]["task"] == "describe" and cfg["data"]["eval"][0]["task"] is None
    model = tiny_model(_cfg())
    with pytest.raises(InputError, match="describe task cannot be scored by exact match"):
        evaluate(model, SynthVQA("test", size=2, task="describe"))
