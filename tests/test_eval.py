"""Tests for compactvl.evaluate, ``compactvl eval`` / ``train`` on the command line, and the demo's code path
(tiny random parts, seconds)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from PIL import Image

from compactvl.cli import main
from compactvl.config import load_config
from compactvl.data import SynthVQA
from compactvl.demo import demo_config, run_demo, tiny_model
from compactvl.errors import ConfigError, InputError
from compactvl.evaluate import evaluate, format_table, predict
from compactvl.train import Trainer, build_train_data



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model after a few sft steps (so answers depend on the input), saved to disk."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                       "data": {"train": [{"name": "synthvqa", "n": 16}]},
                       "train": {"stage": "sft", "lr": 1e-2, "batch_size": 8, "max_steps": 4, "precision": "fp32"},
                       "output_dir": str(out)})
    model = tiny_model(cfg)
    res = Trainer(model, build_train_data(cfg["data"]["train"]), cfg, progress=False, log=None).fit()
    return model.eval(), res.model_dir, cfg


def test_batch_size_does_not_change_answers():
    model = tiny_model(load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}]}})).eval()
    ds = SynthVQA("test", size=10)  # five categories: prompts of different lengths, so batches are left padded
    samples = [ds[i] for i in range(10)]
    one = predict(model, samples, batch_size=1, max_new_tokens=6)
    assert len(set(one)) > 1  # answers differ between samples, so the comparison means something
    for bs in (3, 4, 10):
        assert predict(model, samples, batch_size=bs, max_new_tokens=6) == one, bs
    # evaluate() groups samples by prompt length; the answers, reported in dataset order, are the same
    grouped = evaluate(model, ds, batch_size=4, max_new_tokens=6)
    plain = evaluate(model, ds, batch_size=4, max_new_tokens=6, sort_by_length=False)
    assert [r["prediction"] for r in grouped.predictions] == [r["prediction"] for r in plain.predictions]
    assert [r["id"] for r in grouped.predictions] == [ds[i].id for i in range(10)]
    # the time is split: the LM alone (what compression changes) and preparing the inputs (image encoding)
    assert grouped.lm_seconds > 0 and grouped.prepare_seconds > 0
    assert grouped.lm_seconds + grouped.prepare_seconds <= grouped.seconds
    assert grouped.lm_samples_per_s == pytest.approx(10 / grouped.lm_seconds)
    assert "LM " in format_table([grouped]) and "preparing the inputs" in format_table([grouped])


class Oracle(torch.nn.Module):
    """Answers right on even-numbered samples (gold answer, in another case and with punctuation), wrong on odd."""

    def __init__(self, dataset):
        super().__init__()
        self.gold = {self.key(s.conversations[0]["value"], s.images[0]): (i, s.answer)
                     for i, s in enumerate(dataset[i] for i in range(len(dataset)))}

    @staticmethod
    def key(prompt: str, image: Image.Image) -> tuple:
        return prompt, image.tobytes()

    def generate(self, prompts, images, max_new_tokens=8):
        out = []
        for turns, ims in zip(prompts, images):
            assert turns[-1][1] is None  # the answer is cut off for generation
            i, answer = self.gold[self.key(turns[-1][0], ims[0])]
            out.append(f"The {answer.upper()}." if i % 2 == 0 else "nonsense")
        return out


def test_scores_predictions_and_writes_files(tmp_path):
    ds = SynthVQA("test", size=20)
    res = evaluate(Oracle(ds), ds, batch_size=6, out_dir=tmp_path, name="synthvqa-test", config=load_config())
    assert res.n == 20 and res.correct == 10 and res.accuracy == 0.5
    # categories cycle with the index (color, shape, count, glyph, position): even indices hit 3 of them
    for cat, v in res.per_category.items():
        assert v["n"] == 4 and v["chance"] == pytest.approx(SynthVQA.chance_level(cat))
    assert res.chance == pytest.approx(sum(SynthVQA.chance_level(c) for c in SynthVQA.categories) / 5)
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"id", "question", "prediction", "answer", "category", "correct"}
    assert [r["correct"] for r in rows] == [i % 2 == 0 for i in range(20)]
    assert rows[0]["id"] == ds[0].id and rows[0]["answer"] == ds[0].answer
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == 0.5 and "predictions" not in metrics
    assert res.lm_seconds is None and metrics["lm_seconds"] is None  # a model that does not report its time split
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == load_config()


def test_eval_bad_input(tmp_path, trained):
    model, _, _ = trained
    with pytest.raises(InputError, match="the evaluation set is empty"):
        evaluate(model, [], out_dir=tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write evaluation results to .*choose a writable"):
        evaluate(model, SynthVQA("test", size=2), out_dir=blocker / "x")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        predict(model, [SynthVQA("test", size=1)[0]], batch_size=0)


def test_cli_eval_of_a_training_run(trained, tmp_path, capsys):
    _, model_dir, _ = trained
    code = main(["eval", str(model_dir.parent), "--set", "synthvqa", "--n", "6", "--batch-size", "4",
                 "--out", str(tmp_path), "--no-progress", "--eval.max_new_tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "synthvqa-test" in out and "OVERALL" in out and "chance" in out
    files = tmp_path / "as_trained" / "synthvqa-test"
    metrics = json.loads((files / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["max_new_tokens"] == 3 and metrics["batch_size"] == 4
    assert yaml.safe_load((files / "config.yaml").read_text())["eval"]["max_new_tokens"] == 3
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    # --method is for transformers VLMs: on a compactvl model it is refused, not silently ignored
    assert main(["eval", str(model_dir.parent), "--method", "visionzip", "--knob", "keep=8", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a compactvl model" in err and "--eval.variants" in err and "Traceback" not in err


def test_cli_eval_uses_the_synthvqa_the_model_trained_on(tmp_path, capsys):
    """The demo trains on synthvqa without clutter (distractors 0); `eval --set synthvqa` scores on that, says so,
    and takes the data knobs `data export` takes to choose otherwise."""
    run = tmp_path / "run"
    cfg = load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                       "data": {"train": [{"name": "synthvqa", "n": 8, "distractors": 0}]},
                       "train": {"stage": "sft", "batch_size": 4, "max_steps": 1, "precision": "fp32"},
                       "output_dir": str(run)})
    Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, progress=False, log=None).fit()
    args = ["eval", str(run), "--set", "synthvqa", "--n", "2", "--batch-size", "2", "--no-progress",
            "--eval.max_new_tokens", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "synthvqa as the model trained on it: distractors=0" in capsys.readouterr().out
    assert (tmp_path / "a" / "as_trained" / "synthvqa-test-distractors0" / "metrics.json").is_file()
    assert main([*args, "--distractors", "1", "2", "--out", str(tmp_path / "b")]) == 0
    assert "as the model trained on it" not in capsys.readouterr().out
    assert (tmp_path / "b" / "as_trained" / "synthvqa-test-distractors1-2" / "metrics.json").is_file()
    assert main(["eval", str(run), "--set", "easyvqa", "--distractors", "1"]) == 2
    assert "--distractors apply to synthvqa only" in capsys.readouterr().err


def test_cli_eval_never_overwrites_results_silently(trained, tmp_path, capsys):
    from compactvl.cli.eval import holds_results

    _, model_dir, _ = trained
    run = tmp_path / "run"
    shutil.copytree(model_dir.parent, run)
    args = ["eval", str(run), "--set", "synthvqa", "--n", "2", "--batch-size", "2", "--no-progress",
            "--eval.max_new_tokens", "2"]
    assert main(args) == 0 and holds_results(run / "eval") and not (run / "eval-2").exists()
    assert main(args) == 0 and holds_results(run / "eval-2")  # the default folder gets a new name
    assert f"{run / 'eval'} holds earlier results; writing to {run / 'eval-2'}" in capsys.readouterr().out
    assert main([*args, "--out", str(run / "eval")]) == 2  # an explicit --out holding results needs --overwrite
    assert "already holds evaluation results; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(run / "eval"), "--overwrite"]) == 0
    assert f"replacing the results in {run / 'eval'}" in capsys.readouterr().out
    assert not (run / "eval-3").exists()


def test_cli_train_from_a_recipe_file_with_parts_on_disk(tmp_path, capsys):
    """`compactvl train recipe.yaml --overrides` on an LM and an encoder saved to disk (the path users with their
    own checkpoints take), then --resume after an interruption."""
    from compactvl.encoders import tiny_encoder
    from compactvl.testing import tiny_lm, tiny_tokenizer

    tiny_lm().save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    tiny_encoder("dinov2", 32).save_pretrained(tmp_path / "enc")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"lm": str(tmp_path / "lm"), "encoders": [str(tmp_path / "enc")],
                  "token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
        "data": {"train": [{"name": "synthvqa", "n": 16}], "eval": [{"name": "synthvqa", "split": "test", "n": 4}]},
        "train": {"batch_size": 8, "max_steps": 4, "precision": "fp32", "stage": "sft"},
        "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe), "--stop-at", "2", "--no-progress", "--train.lr", "2e-3"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["train", str(recipe), "--resume", "--no-progress", "--train.lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    assert "trained 4/4 steps" in out and "OVERALL" in out
    assert f"model: {tmp_path / 'run' / 'model'}" in out and f"compactvl eval {tmp_path / 'run'} " in out  # next steps
    saved = yaml.safe_load((tmp_path / "run" / "model" / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(2e-3)
    assert (tmp_path / "run" / "eval" / "synthvqa-test" / "predictions.jsonl").is_file()
    assert main(["train", str(recipe), "--train.lrr", "1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


RESULTS_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "quick", "command", "machine", "train", "results", "timings", "chart", "config"],
    "properties": {
        "train": {"type": "object", "required": ["steps", "samples", "first_loss", "final_loss", "losses",
                                                 "samples_per_s", "precision"]},
        "timings": {"type": "object", "required": ["load_s", "train_s", "eval_s", "total_s"]},
        "results": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["method", "dataset", "visual_tokens", "llm_gmacs", "n", "correct", "accuracy", "ci95",
                         "chance", "per_category", "paired_vs_as_trained"],
            "properties": {"accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                           "ci95": {"type": "array", "minItems": 2, "maxItems": 2},
                           "per_category": {"type": "object", "additionalProperties": {
                               "type": "object", "required": ["accuracy", "ci95", "n", "correct", "chance"]}}}}},
    },
}


def test_demo_quick_end_to_end(tmp_path, capsys):
    cfg = demo_config(quick=True, overrides=["--data.eval", "[{name: synthvqa, split: test, n: 6, distractors: 0}]"])
    res = run_demo(cfg, tmp_path, quick=True, progress=False, command="compactvl demo --quick")
    assert {r["dataset"] for r in res["results"]} == {"synthvqa-test-distractors0"}  # the clutter is in the label
    jsonschema.validate(json.loads((tmp_path / "results.json").read_text()), RESULTS_SCHEMA)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(tmp_path / "accuracy.png").size[0] > 300
    methods = [r["method"] for r in res["results"]]
    assert methods == ["as trained", "avgpool k=4"]
    trained, pooled = res["results"]
    assert trained["visual_tokens"] == 4 and pooled["visual_tokens"] == 1  # 4x4 grid -> avgpool 2 / 4
    # uncertainty: the Wilson interval of each accuracy; the variant against "as trained" on the same items
    assert trained["ci95"][0] <= trained["accuracy"] <= trained["ci95"][1] and trained["paired_vs_as_trained"] is None
    paired = pooled["paired_vs_as_trained"]
    assert paired["n"] == 6 and paired["difference"] == pytest.approx(pooled["accuracy"] - trained["accuracy"])
    assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1] and 0 <= paired["agreement"] <= 1
    assert pooled["llm_gmacs"] < trained["llm_gmacs"]
    for r in res["results"]:  # the reported accuracy is the mean of the per-sample verdicts written to disk
        rows = [json.loads(x) for x in (tmp_path / "eval" / r["method"].replace(" ", "_").replace("=", "_")
                                        / r["dataset"] / "predictions.jsonl").read_text().splitlines()]
        assert r["n"] == len(rows) == 6 and r["correct"] == sum(x["correct"] for x in rows)
    assert res["train"]["steps"] == 4 and len(res["train"]["losses"]) == 4
    out = capsys.readouterr().out
    assert "chance" in out and "as trained" in out and "results.json" in out
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["output_dir"] == str(tmp_path)
    # before training: the machine and the precision; after the first steps: the expected duration
    assert out.index("machine: ") < out.index("expected: training ") < out.index("as trained")
    assert "precision fp32" in out and "2 variant(s) x 6 samples" in out
    # next: chat about a saved scene like the training data (its clutter), with its question and answer
    sample = SynthVQA("test", size=1, distractors=0)[0]
    assert Image.open(tmp_path / "sample.png").tobytes() == sample.images[0].tobytes()
    assert f"--prompt {json.dumps(sample.question)}" in out and f"answer: {sample.answer};" in out
    assert "a scene like those it trained on (synthvqa-test-distractors0)" in out


def test_eval_set_labels_name_a_non_default_clutter():
    from compactvl.evaluate import eval_set_name
    spec = {"name": "synthvqa", "split": "test", "distractors": None}
    assert eval_set_name(spec) == "synthvqa-test"
    assert eval_set_name({**spec, "distractors": [1, 2]}) == "synthvqa-test-distractors1-2"
    assert eval_set_name({**spec, "distractors": 3}) == eval_set_name({**spec, "distractors": [3, 3]}) \
        == "synthvqa-test-distractors3"
    assert eval_set_name({"name": "/d/my_set.jsonl", "split": "test", "distractors": None}) == "my_set"


@pytest.mark.parametrize("variant, needle", [
    ("{name: typo, token_ops: [{op: random_keep, ratio: 0.5}]}", "unknown token op 'random_keep'"),
    ("{name: wide, token_ops: [{op: pixel_shuffle, k: 2}]}", "trained on"),
    ("{name: bad policy, policies: [{policy: fastv, layer: 2, keep: 2.0}]}", "bad policy"),
    ("{token_ops: []}", "no 'name'"),
])
def test_demo_checks_its_variants_before_training(tmp_path, variant, needle):
    """A variant that cannot run fails before the training it would otherwise waste, naming the variant."""
    cfg = demo_config(quick=True, overrides=["--eval.variants", f"[{variant}]"])
    with pytest.raises(ConfigError, match=needle):
        run_demo(cfg, tmp_path, quick=True, progress=False)
    assert not (tmp_path / "train").exists()


def test_system_recipes_train_and_evaluate_under_bf16_autocast(tmp_path):
    """The CPU demo trains in bf16 autocast: every full system (two encoders + MKE, experts, SIP, CoTR, MMoE, MBTF +
    STF) runs a training step and an evaluation in it, with tiny parts."""
    from compactvl.compare import run_comparison

    summary = run_comparison(["venvl", "leomini", "llava_stf"], tmp_path, quick=True, progress=False, unequal=True,
                             overrides=["--train.precision", "bf16", "--eval.precision", "bf16",
                                        "--train.max_steps", "1", "--data.eval", "[{name: synthvqa, split: test, n: 2}]"],
                             log=lambda s: None)
    for r in summary["systems"]:
        own = json.loads((Path(r["dir"]) / "results.json").read_text())
        assert own["train"]["precision"] == "bf16" and own["train"]["steps"] == 1
        assert math.isfinite(r["final_loss"]) and r["sets"]["synthvqa-test"]["accuracy"] is not None


def test_a_mistyped_local_path_is_reported_at_once_not_tried_on_the_hub(tmp_path, monkeypatch, capsys):
    from compactvl.compression import load_compressed
    from compactvl.errors import CheckpointError
    from compactvl.sources import local_or_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert main(["eval", "runs/demoo"]) == 2  # runs/ exists here: a typo, not the hub id runs/demoo
    assert "no such model directory 'runs/demoo'; runs holds: demo" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no such model directory './llava'"):
        load_compressed("./llava")
    assert local_or_hub("llava-hf/llava-1.5-7b-hf") == "hub" and local_or_hub("runs/demo") == "path"


def test_variants_are_compared_with_the_model_as_trained_on_the_same_items(trained, tmp_path):
    """The identity (the recipe's own token ops as a variant) agrees on every answer, with difference 0 and KL 0
    at the first answer token; a coarser pooling diverges (KL > 0), and every figure carries its interval."""
    from compactvl.demo import evaluate_variants

    _, model_dir, cfg = trained
    cfg = load_config({**cfg, "data": {**cfg["data"], "eval": [{"name": "synthvqa", "split": "test", "n": 8}]},
                       "eval": {**cfg["eval"], "max_new_tokens": 3, "variants": [
                           {"name": "same", "token_ops": [{"op": "avgpool", "k": 2}]},
                           {"name": "pool4", "token_ops": [{"op": "avgpool", "k": 4}]}]}})
    rows = evaluate_variants(model_dir, cfg, tmp_path, progress=False, log=lambda *_: None)
    assert [v.method for v in rows] == ["as trained", "same", "pool4"] and rows[0].paired == []
    same, pool4 = rows[1].paired[0], rows[2].paired[0]
    assert same["agreement"] == 1.0 and same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert same["kl_first_token"] == 0.0 and same["within_noise"] and same["mcnemar_p"] == 1.0
    assert pool4["kl_first_token"] > 0 and pool4["n"] == 8
    rows_kl = [r["kl_first_token"] for r in rows[2].results[0].predictions]
    assert pool4["kl_first_token"] == pytest.approx(sum(rows_kl) / 8)
    assert rows[0].results[0].first_logprobs is None  # the reference distributions are freed afterwards
    assert "first_logprobs" not in rows[0].results[0].to_dict()
