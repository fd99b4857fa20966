"""Tests for compactvl.data: LLaVA records and their validation, synthvqa, easy-vqa, answer scoring and the
``compactvl data`` command."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compactvl.cli import main
from compactvl.data import (EasyVQA, LlavaDataset, Sample, SynthVQA, accuracy_report, exact_match, get_dataset,
                            normalize_answer, split_turns, vqa_accuracy, write_llava)
from compactvl.data import synthvqa as sv
from compactvl.errors import ConfigError, InputError


# ---------------------------------------------------------------- LLaVA format

def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (200, 0, 0)).save(tmp_path / "b.png")
    return tmp_path


def _write(folder: Path, records, name: str = "d.json") -> Path:
    p = folder / name
    p.write_text(records if isinstance(records, str) else json.dumps(records, indent=1))
    return p


GOOD = {"id": "ok", "image": "a.png", "conversations": _turns("<image>\nWhat?", "red", "And?", "blue")}


def test_llava_loads_records_lazily_with_images_text_only_and_multi_image(folder):
    recs = [GOOD, {"id": "t", "conversations": _turns("hi", "hello")},
            {"id": "m", "image": ["a.png", "b.png"], "conversations": _turns("<image><image> Same?", "no")}]
    ds = LlavaDataset(_write(folder, recs))
    assert len(ds) == 3 and ds.skipped == []
    assert ds.samples[0].images == [str((folder / "a.png").resolve())]  # paths until read
    s = ds[0]
    assert s.id == "ok" and s.answer == "blue" and s.category is None
    assert s.images[0].size == (8, 6) and s.images[0].getpixel((0, 0)) == (10, 20, 30)
    assert s.question == "What?"
    assert ds[1].images == [] and ds[1].answer == "hello"
    assert [im.size for im in ds[2].images] == [(8, 6), (5, 5)]
    assert split_turns(s.conversations) == [("<image>\nWhat?", "red"), ("And?", "blue")]


def test_jsonl_and_image_folder_and_limit(folder, tmp_path):
    sub = tmp_path / "meta"
    sub.mkdir()
    p = sub / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "two"}) + "\n")
    assert [s.id for s in LlavaDataset(p, folder)] == ["ok", "two"]
    assert len(LlavaDataset(p, folder, limit=1)) == 1
    with pytest.raises(InputError, match=r"record 0 \(id ok\): image file 'a.png' not found at .*meta/a.png"):
        LlavaDataset(p)  # image folder defaults to the JSON's folder


@pytest.mark.parametrize("record, message", [
    (["not", "a dict"], r"record 1: the record is a JSON list, not an object"),
    ({"id": "x", "image": "a.png"}, r"record 1 \(id x\): 'conversations' is missing or empty"),
    ({"id": "x", "conversations": []}, r"record 1 \(id x\): 'conversations' is missing or empty"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     r"record 1 \(id x\): turn 0 is from 'gpt' but should be from 'human'; turns must alternate"),
    ({"id": "x", "conversations": _turns("q", "a", "q2")},
     r"record 1 \(id x\): the last turn is from 'human', so the record has no answer"),
    ({"id": "x", "conversations": _turns("q", "  ")}, r"record 1 \(id x\): the last gpt turn \(the answer\) is empty"),
    ({"id": "x", "conversations": [{"from": "human", "text": "q"}]}, r"record 1 \(id x\): turn 0 is not an object"),
    ({"id": "x", "image": "a.png", "conversations": _turns("no placeholder", "a")},
     r"record 1 \(id x\): the human turns hold 0 '<image>' placeholder\(s\) but the record has 1 image\(s\)"),
    ({"id": "x", "conversations": _turns("<image> <image>", "a")},
     r"record 1 \(id x\): the human turns hold 2 '<image>' placeholder\(s\) but the record has 0 image"),
    ({"id": "x", "image": "gone.png", "conversations": _turns("<image>", "a")},
     r"record 1 \(id x\): image file 'gone.png' not found at /\S+/gone.png"),
    ({"id": "x", "image": 7, "conversations": _turns("<image>", "a")}, r"record 1 \(id x\): 'image' must be"),
])
def test_malformed_record_names_file_and_index_or_is_skipped(folder, record, message):
    path = _write(folder, [GOOD, record])
    with pytest.raises(InputError, match=message) as e:
        LlavaDataset(path)
    assert str(e.value).startswith(f"{path}: record 1") and "--skip-malformed" in str(e.value)
    ds = LlavaDataset(path, skip_malformed=True)
    assert [s.id for s in ds] == ["ok"] and [i for i, _ in ds.skipped] == [1]
    report = ds.report()
    assert "1 records loaded, 1 malformed skipped" in report and "record 1:" in report


def test_file_level_errors(folder):
    bad = _write(folder, '[\n {"id": "a",\n  "conversations": [}\n]')
    with pytest.raises(InputError, match=re.escape(f"{bad}: invalid JSON at line 3 column 21 (Expecting value)")):
        LlavaDataset(bad)
    with pytest.raises(InputError, match=r"the top level is a JSON dict, not a list of records"):
        LlavaDataset(_write(folder, {"a": 1}))
    with pytest.raises(InputError, match=r"d.json: the dataset is empty \(no records\)"):
        LlavaDataset(_write(folder, []))
    with pytest.raises(InputError, match=r"all 2 records are malformed .* \(first, record 0: 'conversations'"):
        LlavaDataset(_write(folder, [{"id": 1}, {"id": 2}]), skip_malformed=True)
    with pytest.raises(InputError, match=r"nope.json does not exist"):
        LlavaDataset(folder / "nope.json")
    with pytest.raises(InputError, match=r"image folder .*/imgs does not exist"):
        LlavaDataset(_write(folder, [GOOD]), folder / "imgs")
    jl = folder / "d.jsonl"
    jl.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(InputError, match=r"d.jsonl: record 1: line 2 is not valid JSON"):
        LlavaDataset(jl)
    assert LlavaDataset(jl, skip_malformed=True).skipped[0][0] == 1


def test_unreadable_image_is_reported_on_access(folder):
    (folder / "a.png").write_bytes(b"not a png")
    ds = LlavaDataset(_write(folder, [GOOD]))
    with pytest.raises(InputError, match=r"d.json: record 0 \(id ok\): .*a.png: not a readable image"):
        ds[0]


def test_write_llava_round_trip_dedupes_images_and_rejects_bad_output(folder, tmp_path):
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    samples = [Sample("s/1", [red], _turns("<image>\nq", "a"), category="c", meta={"k": [1, 2]}),
               Sample("s 2", [red.copy(), str(folder / "b.png")], _turns("<image><image>q", "b")),
               Sample("txt", [], _turns("hi", "yo"))]
    w = write_llava(samples, tmp_path / "out", "set")
    assert w.records == 3 and w.images == 2  # the two identical red images are written once
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["s_1.png", "s_2_1.png"]
    assert not list((tmp_path / "out").glob(".*tmp"))
    back = LlavaDataset(w.json_path)
    assert [(s.id, s.conversations, s.category, s.meta, s.answer) for s in back] == \
        [(s.id, s.conversations, s.category, s.meta, s.answer) for s in samples]
    assert back[1].images[1].getpixel((0, 0)) == (200, 0, 0) and back[0].images[0].tobytes() == red.tobytes()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=re.escape(f"cannot write to output directory {blocker}/out (")
                       + ".*choose a writable"):
        write_llava(samples, blocker / "out")
    with pytest.raises(InputError, match=r"cannot export sample 0 \(id x\): the last turn is from 'human'"):
        write_llava([Sample("x", [], _turns("q"))], tmp_path / "o2")
    with pytest.raises(InputError, match=r"nothing to export"):
        write_llava([], tmp_path / "o3")


# ---------------------------------------------------------------- synthvqa

def _digest(im: Image.Image) -> str:
    return hashlib.sha1(im.tobytes()).hexdigest()


def test_synthvqa_is_deterministic_per_seed_split_index():
    a, b = SynthVQA("train", size=20, seed=3), SynthVQA("train", size=20, seed=3)
    for i in (0, 7, 19):
        sa, sb = a[i], b[i]
        assert sa.images[0].tobytes() == sb.images[0].tobytes()
        assert (sa.conversations, sa.meta) == (sb.conversations, sb.meta)
    assert a[-1].id == a[19].id == "synthvqa-train-3-19"
    assert _digest(a[0].images[0]) != _digest(SynthVQA("val", size=20, seed=3)[0].images[0])
    assert _digest(a[0].images[0]) != _digest(SynthVQA("train", size=20, seed=4)[0].images[0])
    with pytest.raises(IndexError):
        a[20]


def test_synthvqa_splits_do_not_overlap():
    seen = {split: {_digest(SynthVQA(split, size=150)[i].images[0]) for i in range(150)} for split in sv.SPLITS}
    assert all(len(v) == 150 for v in seen.values())
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_synthvqa_categories_and_answers_are_balanced():
    ds = SynthVQA("test", size=5 * 120)
    samples = [ds[i] for i in range(len(ds))]
    assert Counter(s.category for s in samples) == {c: 120 for c in sv.CATEGORIES}
    for cat in sv.CATEGORIES:
        counts = Counter(s.answer for s in samples if s.category == cat)
        assert set(counts) == set(sv.answer_space(cat))
        assert max(counts.values()) - min(counts.values()) <= 1, (cat, counts)
        assert sv.chance_level(cat) == pytest.approx(1 / len(sv.answer_space(cat)))
    assert all(len(sv.answer_space(c)) <= 10 for c in sv.CATEGORIES)
    assert Counter(s.meta["difficulty"] for s in samples).keys() == {"small", "medium", "large"}


def _center(box):
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


@pytest.mark.parametrize("distractors", [None, 0, 8])
def test_synthvqa_answers_match_the_drawn_scene(distractors):
    ds = SynthVQA("val", size=250, distractors=distractors)
    for i in range(len(ds)):
        s = ds[i]
        img, objs, q, a = s.images[0], s.meta["objects"], s.meta["query"], s.answer
        assert img.size == (224, 224) and img.mode == "RGB"
        assert s.conversations[0]["value"].startswith("<image>\n") and s.conversations[1]["value"] == a
        lo, hi = sv.LEVELS[s.meta["difficulty"]]
        for k, o in enumerate(objs):  # inside the image, of the level's size, not overlapping, drawn in its color
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 and 0 <= y0 and x1 <= 224 and y1 <= 224 and lo <= x1 - x0 <= hi
            for p in objs[:k]:
                assert x1 <= p["box"][0] or p["box"][2] <= x0 or y1 <= p["box"][1] or p["box"][3] <= y0
            if o["shape"] != "label":
                assert img.getpixel(_center(o["box"])) == sv.COLORS[o["color"]], (i, o)
        if s.category == "color":
            assert [o["color"] for o in objs if o["shape"] == q["shape"]] == [a]
        elif s.category == "shape":
            assert [o["shape"] for o in objs if o["color"] == q["color"]] == [a]
        elif s.category == "count":
            key = "shape" if "shape" in q else "color"
            assert sum(o[key] == q[key] for o in objs) == int(a)
        elif s.category == "glyph":
            assert [o["text"] for o in objs if o["shape"] == "label"] == [a]
            x0, y0, x1, y1 = next(o["box"] for o in objs if o["shape"] == "label")
            assert np.asarray(img.crop((x0, y0, x1, y1))).min() < 60  # dark glyph pixels on the white label
        else:
            match = lambda d: [o for o in objs if (o["shape"], o["color"]) == (d["shape"], d["color"])]  # noqa: E731
            (oa,), (ob,) = match(q["a"]), match(q["b"])
            (ax, ay), (bx, by) = _center(oa["box"]), _center(ob["box"])
            dx, dy = bx - ax, by - ay
            expect = ("left" if dx > 0 else "right") if abs(dx) > 2 * abs(dy) else ("above" if dy > 0 else "below")
            assert abs(dx) > 2 * abs(dy) or abs(dy) > 2 * abs(dx)
            assert expect == a, (i, oa, ob)


def test_synthvqa_difficulty_controls_object_size_and_bad_knobs():
    small = SynthVQA("train", size=30, difficulty="small")
    large = SynthVQA("train", size=30, difficulty=["large"])
    assert all(small[i].meta["difficulty"] == "small" for i in range(30))
    assert max(o["box"][2] - o["box"][0] for i in range(30) for o in small[i].meta["objects"]) <= 16
    assert min(o["box"][2] - o["box"][0] for i in range(30) for o in large[i].meta["objects"]) >= 32
    assert [s.category for s in SynthVQA(size=4, categories=["glyph", "count"])] == ["glyph", "count"] * 2
    with pytest.raises(ConfigError, match=r"unknown synthvqa split 'dev'; choose from train, val, test"):
        SynthVQA("dev")
    with pytest.raises(ConfigError, match=r"unknown synthvqa difficulty tiny; choose from small, medium, large"):
        SynthVQA(difficulty="tiny")
    with pytest.raises(ConfigError, match=r"unknown synthvqa category 'ocr'; choose from color, shape"):
        SynthVQA(categories=["ocr"])
    with pytest.raises(ConfigError, match=r"size must be at least 1, got 0"):
        SynthVQA(size=0)


# ---------------------------------------------------------------- easy-vqa

def test_easyvqa_wraps_the_package_with_derived_categories():
    ds = EasyVQA("test", n=200, seed=1)
    assert len(ds) == 200 and len(EasyVQA("test")) == 9673
    samples = list(ds)
    assert samples[0].images[0].size == (64, 64) and samples[0].images[0].mode == "RGB"
    for s in samples:
        assert s.answer in EasyVQA.answer_space(s.category)
        assert s.conversations[0]["value"].startswith("<image>\n") and s.question.endswith("Answer with one word.")
        if s.category == "yesno":
            assert s.question.split()[0] in ("is", "does")
    assert set(Counter(s.category for s in samples)) == {"shape", "color", "yesno"}
    assert [s.id for s in EasyVQA("test", n=200, seed=1)] == [s.id for s in samples]
    assert EasyVQA.chance_level("shape") == pytest.approx(1 / 3) and EasyVQA.chance_level("yesno") == 0.5
    with pytest.raises(ConfigError, match=r"easy-vqa has only the splits train, test, not 'val'"):
        EasyVQA("val")
    with pytest.raises(ConfigError, match=r"ask for n between 1 and 9673, not 10000"):
        EasyVQA("test", n=10000)


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("raw, norm", [
    ("Red", "red"), ("  Two. ", "2"), ("the Circle!", "circle"), ("an apple", "apple"), ("1,000", "1000"),
    ("3.5", "3.5"), ("yes,", "yes"), ("Don't", "dont"), ("t-shirt", "t shirt"), ("none", "0"), ("E", "e"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_vqa_accuracy_and_report():
    assert exact_match("Three.", "3") and exact_match("blue", ["red", "Blue"]) and not exact_match("red", "reds")
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] * 4) == 1.0
    r = accuracy_report(["red", "2", "circle", "no"], ["red", "two", "square", "no"], ["color", "count", "shape", None])
    assert r["overall"] == 0.75 and r["n"] == 4 and r["correct"] == 3
    assert r["per_category"] == {"color": {"n": 1, "correct": 1, "accuracy": 1.0},
                                 "count": {"n": 1, "correct": 1, "accuracy": 1.0},
                                 "shape": {"n": 1, "correct": 0, "accuracy": 0.0}}
    with pytest.raises(InputError, match=r"got 1 predictions but 2 gold answers"):
        accuracy_report(["a"], ["a", "b"])
    with pytest.raises(InputError, match=r"got no samples"):
        accuracy_report([], [])
    with pytest.raises(InputError, match=r"got 1 categories for 2 samples"):
        accuracy_report(["a", "b"], ["a", "b"], ["x"])


# ---------------------------------------------------------------- get_dataset and the CLI

def test_get_dataset_dispatch(folder):
    assert isinstance(get_dataset("synthvqa", "val", n=5), SynthVQA) and len(get_dataset("synthvqa", n=5)) == 5
    assert get_dataset("synthvqa", n=3, difficulty=["small"])[0].meta["difficulty"] == "small"
    assert isinstance(get_dataset("easyvqa", "train", n=3), EasyVQA)
    assert len(get_dataset(str(_write(folder, [GOOD, GOOD])), n=1)) == 1
    with pytest.raises(ConfigError, match=r"unknown dataset 'vqav2'; use synthvqa or easyvqa, or the path"):
        get_dataset("vqav2")
    with pytest.raises(ConfigError, match=r"missing.json does not exist"):
        get_dataset("missing.json")
    with pytest.raises(ConfigError, match=r"difficulty levels exist only for synthvqa"):
        get_dataset("easyvqa", difficulty="small")


def test_cli_export_round_trip_equals_the_generator(tmp_path, capsys):
    assert main(["data", "export", "--set", "synthvqa", "--split", "val", "--n", "12", "--seed", "5",
                 "--out", str(tmp_path)]) == 0
    assert "wrote 12 records and 12 images" in capsys.readouterr().out
    back, orig = LlavaDataset(tmp_path / "synthvqa_val.json"), SynthVQA("val", size=12, seed=5)
    for a, b in zip(back, orig, strict=True):
        assert (a.id, a.conversations, a.answer, a.category, a.meta) == (b.id, b.conversations, b.answer,
                                                                         b.category, b.meta)
        assert a.images[0].tobytes() == b.images[0].tobytes()
    assert main(["data", "export", "--set", "synthvqa", "--n", "10", "--distractors", "1", "2", "--out",
                 str(tmp_path), "--name", "d"]) == 0
    d = [r["id"] for r in json.loads((tmp_path / "d.json").read_text())]
    assert [LlavaDataset(tmp_path / "d.json")[i].meta for i in range(10)] == \
        [SynthVQA("test", size=10, distractors=[1, 2])[i].meta for i in range(10)] and len(d) == 10
    assert main(["data", "export", "--set", "easyvqa", "--n", "40", "--out", str(tmp_path), "--name", "e"]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert len(e) == 40 and len({r["image"] for r in e}) < 40  # questions share images; each PNG written once
    assert main(["data", "check", str(tmp_path / "e.json")]) == 0
    assert "40 records loaded, 0 malformed skipped" in capsys.readouterr().out


def test_cli_errors_and_skip_report(folder, tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["data", "export", "--set", "synthvqa", "--n", "2", "--out", str(blocker / "x")]) == 2
    assert f"cannot write to output directory {blocker}/x" in capsys.readouterr().err
    path = _write(folder, [GOOD, {"id": "bad", "conversations": _turns("q")}])
    assert main(["data", "check", str(path)]) == 2
    assert f"{path}: record 1 (id bad): the last turn is from 'human'" in capsys.readouterr().err
    assert main(["data", "check", str(path), "--skip-malformed"]) == 1
    assert "1 records loaded, 1 malformed skipped\n  record 1: the last turn" in capsys.readouterr().out
    assert main(["data", "export", "--set", str(path), "--skip-malformed", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 records" in out and "1 malformed skipped" in out
    assert main(["data", "info", "--set", "synthvqa"]) == 0
    assert "glyph     chance 0.100  answers (10): 2 3 4 5 7 9 E H K R" in capsys.readouterr().out


def test_recipe_data_entries_choose_synthvqa_categories():
    from compactvl.config import load_config
    from compactvl.errors import ConfigError
    from compactvl.train import build_train_data

    def data(entry):
        return build_train_data(load_config({"data": {"train": [entry]}})["data"]["train"])

    ds = data({"name": "synthvqa", "n": 12, "categories": ["color", "count"]})
    assert [ds[i].category for i in range(4)] == ["color", "count", "color", "count"]
    assert {data({"name": "synthvqa", "n": 3, "categories": "glyph"})[i].category for i in range(3)} == {"glyph"}
    with pytest.raises(ConfigError, match="unknown synthvqa category 'colour'; choose from color"):
        data({"name": "synthvqa", "n": 3, "categories": ["colour"]})
    with pytest.raises(ConfigError, match="categories is empty"):
        data({"name": "synthvqa", "n": 3, "categories": []})
    with pytest.raises(ConfigError, match="only for synthvqa, not easyvqa"):
        data({"name": "easyvqa", "n": 3, "categories": ["color"]})


def test_synthvqa_distractors_set_the_clutter_of_every_category():
    """``distractors`` = objects besides the question's referents (1 for color/shape/glyph, 2 for position, the
    answer for count); k or [lo, hi] for every category, each category's own range by default."""
    referents = {"color": 1, "shape": 1, "glyph": 1, "position": 2}
    for spec, allowed in [(0, {0}), (3, {3}), ([1, 2], {1, 2})]:
        ds = SynthVQA("train", size=100, distractors=spec)
        seen = Counter()
        for s in ds:
            n_ref = referents.get(s.category) or int(s.answer)
            assert s.meta["distractors"] == len(s.meta["objects"]) - n_ref
            assert s.meta["distractors"] in allowed, (spec, s.category, s.meta["distractors"])
            seen[s.meta["distractors"]] += 1
        assert set(seen) == allowed  # both ends of a range occur
    default = {c: set() for c in sv.CATEGORIES}
    for s in SynthVQA("train", size=500):
        default[s.category].add(s.meta["distractors"])
    assert default == {"color": {2, 3, 4}, "shape": {2, 3, 4}, "glyph": {2, 3, 4}, "count": {0, 1, 2, 3},
                       "position": {0, 1, 2}}


def test_synthvqa_default_scenes_are_unchanged():
    """The published demo figures are for these scenes: the default (no distractors knob) must not drift."""
    ds = SynthVQA("test", size=50)
    blob = json.dumps([[ds[i].meta["objects"], ds[i].conversations] for i in range(50)], sort_keys=True)
    assert hashlib.sha1(blob.encode()).hexdigest() == "0869a203f1cd759751a697be9e60964fa9454622"


@pytest.mark.parametrize("bad, msg", [(-1, r"\[-1, -1\] out of range; use 0 <= lo <= hi <= 8"),
                                      ([3, 1], r"\[3, 1\] out of range"), (9, r"\[9, 9\] out of range"),
                                      ([1, 2, 3], "must be a whole number or \\[lo, hi\\], got \\[1, 2, 3\\]"),
                                      ("two", "must be a whole number or"), (True, "must be a whole number or"),
                                      ([1.5, 2], "must be a whole number or")])
def test_synthvqa_bad_distractors_are_clear_errors(bad, msg):
    with pytest.raises(ConfigError, match="synthvqa distractors " + msg):
        SynthVQA(distractors=bad)


def test_distractors_only_for_synthvqa_and_through_the_config():
    with pytest.raises(ConfigError, match="distractors can be set only for synthvqa, not easyvqa"):
        get_dataset("easyvqa", "test", n=2, distractors=1)
    from compactvl.config import load_config
    from compactvl.train import build_dataset
    cfg = load_config("demo", ["--data.train.0.distractors", "[1, 2]", "--data.train.0.n", "20"])
    ds = build_dataset(cfg["data"]["train"][0])
    assert {s.meta["distractors"] for s in ds} == {1, 2}


def test_an_unreadable_image_fails_data_check_and_is_skipped_with_skip_malformed(tmp_path, capsys):
    """A LLaVA file whose image is corrupt: `data check` decodes every image and names it; --skip-malformed (and
    skip_malformed=True for training / eval) skips the record instead of failing at that sample later."""
    assert main(["data", "export", "--set", "synthvqa", "--n", "3", "--out", str(tmp_path), "--name", "d"]) == 0
    records = json.loads((tmp_path / "d.json").read_text())
    (tmp_path / records[1]["image"]).write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "not a readable image" in err and "--skip-malformed" in err
    assert main(["data", "check", str(tmp_path / "d.json"), "--skip-malformed"]) == 1
    assert "2 records loaded, 1 malformed skipped" in capsys.readouterr().out
    ds = LlavaDataset(tmp_path / "d.json", skip_malformed=True)
    assert len(ds) == 2 and ds.skipped[0][0] == 1 and all(len(ds[i].images) == 1 for i in range(2))
    lazy = LlavaDataset(tmp_path / "d.json")  # without skipping, images are read on access: the error names both
    with pytest.raises(InputError, match=r"record 1 .*not a readable image"):
        lazy[1]
