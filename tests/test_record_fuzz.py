"""Hostile LLaVA records (issue 16): every record that loads is one training can use, every other one is an
InputError naming the file, record and id — or, with skip_malformed, skipped and counted by reason — and no input
makes the loader raise anything else. Tiny random model only (seconds)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from compactvl.cli import main
from compactvl.config import load_config
from compactvl.data import LlavaDataset, sample_location
from compactvl.data.collate import collate
from compactvl.demo import tiny_model
from compactvl.errors import InputError
from compactvl.testing import tiny_lm, tiny_tokenizer
from compactvl.train import Trainer, build_train_data
from compactvl.train.factories import data_validator, visual_tokens_per_image

CFG = {"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
       "data": {"train": [{"name": "synthvqa", "n": 8}]},
       "train": {"stage": "sft", "lr": 1e-3, "batch_size": 2, "max_steps": 1, "warmup_steps": 0,
                 "precision": "fp32"}}


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


GOOD = {"id": "ok", "image": "a.png", "conversations": _turns("<image>\nWhat colour?", "red")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(load_config(CFG)).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (16, 12), (200, 30, 30)).save(d / "a.png")
    Image.new("RGB", (9, 9), (0, 90, 200)).save(d / "b.png")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def _jsonl(folder: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    p = folder / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (record as one JSONL line, reason class, what the message says)
CASES = {
    "list in from": (json.dumps({"id": "x", "conversations": [{"from": ["human"], "value": "q"},
                                                              {"from": "gpt", "value": "a"}]}),
                     "field type", r"turn 0: 'from' is a JSON list, not a string"),
    "dict in from": (json.dumps({"id": "x", "conversations": [{"from": "human", "value": "q"},
                                                              {"from": {"a": 1}, "value": "a"}]}),
                     "field type", r"turn 1: 'from' is a JSON object, not a string"),
    "id a list": (json.dumps({"id": ["x"], "conversations": _turns("q", "a")}), "field type",
                  r"'id' is a JSON list; give a string or an integer"),
    "deep nesting": ('{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '
                     f'"meta": {{"m": {_nested(60)}}}}}', "too large", r"meta\.m\[0\]\[0\].* nests deeper than 32"),
    "nesting past the parser": ('{"id": "x", "meta": ' + _nested(100_000) + "}", "invalid JSON",
                                r"line 2 nests too deeply to parse"),
    "5000-digit integer": ('{"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": '
                           '"a"}], "meta": {"n": ' + "7" * 5000 + "}}", "too large",
                           r"meta\.n is an integer of 5,000 digits, over the 4,300 limit"),
    "NUL in image name": (json.dumps({"id": "x", "image": "a.png\x00.txt", "conversations": _turns("<image>", "a")}),
                          "image name", r"image name 'a\.png\\x00\.txt' holds a NUL character"),
    "over-long image name": (json.dumps({"id": "x", "image": "a" * 5000, "conversations": _turns("<image>", "a")}),
                             "image name", r"is over 4096 characters"),
    "over-long path part": (json.dumps({"id": "x", "image": "b" * 300 + ".png",
                                        "conversations": _turns("<image>", "a")}),
                            "image name", r"is not a usable path \(OSError: File name too long\)"),
    "<image> in an answer": (json.dumps({"id": "x", "image": "a.png",
                                         "conversations": _turns("<image> q", "a <image>")}),
                             "placeholders", r"turn 1 \(gpt\) holds '<image>'"),
    "blank user turn": (json.dumps({"id": "x", "conversations": _turns("q", "a", " \n ", "b")}), "conversation",
                        r"turn 2 \(human\) is blank"),
    "lone surrogate": ('{"id": "x", "conversations": [{"from": "human", "value": "q \\ud800"}, '
                       '{"from": "gpt", "value": "a"}]}', "text encoding",
                       r"conversations\[0\]\.value holds an unpaired surrogate \(\\ud800 at character 2\)"),
    "over-long string": (json.dumps({"id": "x", "conversations": _turns("q", "a" * 1_000_001)}), "too large",
                         r"conversations\[1\]\.value is a string of 1,000,001 characters"),
    "unreadable image": (json.dumps({"id": "x", "image": "broken.png", "conversations": _turns("<image> q", "a")}),
                         "image unreadable", r"broken\.png: not a readable image"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_failure_class_is_a_named_error_or_skipped_and_counted(images, case):
    line, kind, message = CASES[case]
    path = _jsonl(images, [json.dumps(GOOD), line])
    with pytest.raises(InputError, match=message) as e:
        LlavaDataset(path, check_images=True)
    assert str(e.value).startswith(f"{path}: record 1") and "--skip-malformed" in str(e.value)
    if case != "nesting past the parser":  # a line that does not parse has no id to name
        assert str(e.value).startswith(f"{path}: record 1 (id x): ") or "'id' is" in str(e.value)
    ds = LlavaDataset(path, skip_malformed=True)
    assert [s.id for s in ds.samples] == ["ok"] and [i for i, _ in ds.skipped] == [1]
    assert dict(ds.skip_reasons) == {kind: 1}
    assert ds.report().endswith(f"skipped by reason: {kind} 1")


def test_a_json_list_skips_an_oversized_integer_alone_and_names_nesting_past_the_parser(images):
    p = images / "big.json"
    p.write_text('[{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},'
                 ' {"id": ' + "9" * 5000 + ', "conversations": []}]')
    ds = LlavaDataset(p, skip_malformed=True)
    assert len(ds) == 1 and ds.skip_reasons == {"too large": 1} and "id is an integer of 5,000 digits" in ds.report()
    p.write_text("[" + _nested(100_000) + "]")
    with pytest.raises(InputError, match=r"big\.json: the JSON nests too deeply to parse; flatten the records"):
        LlavaDataset(p, skip_malformed=True)


def test_jsonl_is_split_on_newlines_only(images):
    """U+2028, U+2029 and NEL are valid inside JSON strings; str.splitlines would cut the record there."""
    odd = {"id": "odd", "image": "a.png", "conversations": _turns("<image> line\u2028sep\u2029par\x85nel", "red")}
    path = images / "odd.jsonl"
    path.write_text(json.dumps(GOOD) + "\r\n" + json.dumps(odd, ensure_ascii=False) + "\n", encoding="utf-8")
    ds = LlavaDataset(path)
    assert [s.id for s in ds.samples] == ["ok", "odd"] and ds.skipped == []
    assert ds.samples[1].conversations[0]["value"] == "<image> line\u2028sep\u2029par\x85nel"


def _answer_of_length(model, target: int) -> str:
    """The longest answer of repeated words whose one-image conversation fits in ``target`` positions."""
    per_image = visual_tokens_per_image(model)

    def needs(words: int) -> int:
        return model.processor.check_conversation([("<image> q", "w " * words)], 1, None, per_image)

    lo, hi = 1, target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if needs(mid) <= target else (lo, mid - 1)
    return "w " * lo


def test_longer_than_the_context_is_caught_only_with_a_validator(images, model):
    limit = model.runner.max_positions
    long = _answer_of_length(model, limit) + "w " * 40
    path = _jsonl(images, [json.dumps(GOOD), json.dumps({"id": "x", "image": "a.png",
                                                         "conversations": _turns("<image> q", long)})])
    assert len(LlavaDataset(path)) == 2  # without the model, the length is unknown
    with pytest.raises(InputError, match=rf"record 1 \(id x\): the sample needs \d+ positions \(1 image\(s\) at 4 "
                                         rf"visual tokens each\) but the LM's context is {limit}"):
        LlavaDataset(path, validator=data_validator(model))
    ds = LlavaDataset(path, skip_malformed=True, validator=data_validator(model))
    assert len(ds) == 1 and ds.skip_reasons == {"too long for the context": 1}


def test_a_record_that_passes_validation_never_fails_in_training(images, model, tmp_path):
    """Every failure class plus valid edge cases (multi-image, multi-turn, odd Unicode, exactly the context
    length); what loads runs through collate, prepare and the loss, and the validator's length is the real one."""
    limit = model.runner.max_positions
    edge = [GOOD,
            {"id": 7, "image": ["a.png", "b.png"], "conversations": _turns("<image> one <image> two", "same?")},
            {"id": "multi", "conversations": _turns("hi", "", "and?", "yes")},  # an empty earlier answer is fine
            {"id": "uni", "image": "a.png", "conversations": _turns("<image> \u2028\x85 é 😀", "ok \u2029")},
            {"id": "full", "image": "a.png", "conversations": _turns("<image> q", _answer_of_length(model, limit))}]
    lines = [json.dumps(r, ensure_ascii=False) for r in edge] + [line for line, _, _ in CASES.values()]
    path = _jsonl(images, lines, "mixed.jsonl")
    check = data_validator(model)
    ds = LlavaDataset(path, skip_malformed=True, check_images=True, validator=check)
    assert [s.id for s in ds.samples] == ["ok", "7", "multi", "uni", "full"] and len(ds.skipped) == len(CASES)
    assert ds.skip_reasons == Counter(kind for _, kind, _ in CASES.values())
    for i in range(len(ds)):
        b = collate([ds[i]])
        with torch.no_grad():
            x = model.prepare(b.conversations, b.images, with_labels=True)
            out = model(x, return_logits=False)
        assert x.inputs_embeds.shape[1] == check(b.conversations[0], len(b.images[0])) <= limit
        if b.ids[0] == "full":
            assert x.inputs_embeds.shape[1] > limit - 5  # the boundary itself was exercised
        assert math.isfinite(float(out.ce_sum))
    assert sample_location(ds, 4) == f"{path}: record 4 (id full)"
    cfg = load_config({**CFG, "data": {"train": [{"name": str(path), "skip_malformed": True}]},
                       "train": {**CFG["train"], "batch_size": 5}, "output_dir": str(tmp_path / "run")})
    fresh = tiny_model(cfg)
    data = build_train_data(cfg["data"]["train"], model=fresh)
    res = Trainer(fresh, data, cfg, progress=False, log=None).fit(export=False)
    assert res.steps == 1 and res.skipped_records == len(CASES) and math.isfinite(res.losses[0])


# ---------------------------------------------------------------- property: InputError or samples, nothing else
_text = st.one_of(st.text(max_size=12), st.sampled_from(["<image>", "<image> q", " ", "\ud800", "a.png", "b.png",
                                                          "broken.png", "a.png\x00", "x" * 300, "../a.png"]))
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _text)
_json = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(_text, kids, max_size=3)), max_leaves=8)
_turn = st.one_of(st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["human", "gpt", "user", "assistant"]),
                                                                        _json),
                                         "value": st.one_of(_text, _json)}), _json)
_record = st.one_of(
    st.fixed_dictionaries({}, optional={"id": _json, "image": st.one_of(_text, st.lists(_text, max_size=2), _json),
                                        "conversations": st.one_of(st.lists(_turn, max_size=4), _json),
                                        "category": _json, "meta": _json}),
    _json)
_line = st.one_of(_record.map(json.dumps), st.text(max_size=30),
                  st.sampled_from(["{", "[]", '{"id": ' + "1" * 4400 + "}", _nested(5000), "\x85", "\u2028"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, min_size=1, max_size=4), skip=st.booleans(), as_list=st.booleans())
def test_any_file_loads_samples_or_raises_input_error(images, model, lines, skip, as_list):
    """JSONL lines, or the same texts joined into one JSON list: samples that prepare for training, or an
    InputError naming the file; never another exception."""
    lines = [json.dumps(GOOD)] + lines
    path = images / ("fuzz.json" if as_list else "fuzz.jsonl")
    path.write_text("[" + ",\n".join(lines) + "]" if as_list else "\n".join(lines), encoding="utf-8")
    try:
        ds = LlavaDataset(path, skip_malformed=skip, check_images=True, validator=data_validator(model))
    except InputError as e:
        assert str(e).startswith(str(path)) and (as_list or not skip)  # with skipping only a broken list fails whole
        return
    if not as_list:
        records = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip(" \t\r")]
        assert len(ds) + len(ds.skipped) == len(records)
    assert len(ds.skipped) == sum(ds.skip_reasons.values()) and (skip or not ds.skipped)
    for i in range(len(ds)):  # what loaded prepares for training without an error
        b = collate([ds[i]])
        with torch.no_grad():
            x = model.prepare(b.conversations, b.images, with_labels=True)
        assert x.inputs_embeds.shape[1] <= model.runner.max_positions


def test_data_check_with_an_lm_checks_lengths_and_reports_reasons(images, tmp_path, capsys):
    lm_dir = tmp_path / "lm"
    tiny_lm().save_pretrained(lm_dir)
    tiny_tokenizer().save_pretrained(lm_dir)
    long = {"id": "x", "image": "a.png", "conversations": _turns("<image> q", "w " * 400)}  # 800 characters
    path = _jsonl(images, [json.dumps(GOOD), json.dumps(long), CASES["<image> in an answer"][0]], "check.jsonl")
    assert main(["data", "check", str(path), "--skip-malformed"]) == 1  # without the LM: the length is not known
    assert capsys.readouterr().out.endswith("skipped by reason: placeholders 1\n")
    assert main(["data", "check", str(path), "--lm", str(lm_dir), "--visual-tokens", "16"]) == 2
    assert re.search(r"record 1 \(id x\): the sample needs \d+ positions \(1 image\(s\) at 16 visual tokens each\) "
                     r"but the LM's context is 512", capsys.readouterr().err)
    assert main(["data", "check", str(path), "--lm", str(lm_dir), "--skip-malformed"]) == 1
    out = capsys.readouterr().out
    assert "1 records loaded, 2 malformed skipped" in out
    assert out.endswith("skipped by reason: too long for the context 1, placeholders 1\n")


def test_a_data_error_during_training_names_the_step_file_record_and_id(tmp_path):
    """Without a validator (data built without the model) a record too long for the context loads, then fails
    in training: the error names the step, the file, the record index and its id — not 'sample 0'."""
    from compactvl.config import load_config
    from compactvl.demo import tiny_model
    from compactvl.train import Trainer

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    good = {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                             {"from": "gpt", "value": "yes"}]}
    long = {"id": "too-long", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\n" + "x" * 900},
                                                                   {"from": "gpt", "value": "no"}]}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in (good, long)) + "\n")
    cfg = load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                       "data": {"train": [{"name": str(tmp_path / "d.jsonl")}]},
                       "train": {"stage": "sft", "batch_size": 2, "max_steps": 1, "precision": "fp32"},
                       "output_dir": str(tmp_path / "run")})
    model = tiny_model(cfg)
    data = LlavaDataset(tmp_path / "d.jsonl")  # no validator: the record is found only in training
    with pytest.raises(InputError, match=r"step 1: .*d.jsonl: record 1 \(id too-long\)"):
        Trainer(model, data, cfg, progress=False, log=None).fit()
