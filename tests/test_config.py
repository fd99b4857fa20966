"""Tests for compactvl.config: recipes, dotted overrides, validation messages and the saved resolved config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compactvl.config import (defaults, list_recipes, load_config, parse_overrides, recipe_path, save_config)
from compactvl.errors import ConfigError


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_then_recipe_then_overrides(tmp_path):
    p = _recipe(tmp_path, "train:\n  lr: 2.0e-3\n  batch_size: 8\ndata:\n  train: [synthvqa]\n")
    cfg = load_config(p, ["--train.lr", "1e-4", "--train.max_steps=7", "--model.token_ops", "[{op: avgpool, k: 2}]"])
    assert cfg["train"]["lr"] == pytest.approx(1e-4)  # '1e-4' is a number, although YAML 1.1 reads it as a string
    assert cfg["train"]["batch_size"] == 8  # from the recipe
    assert cfg["train"]["max_steps"] == 7
    assert cfg["train"]["stage"] == defaults()["train"]["stage"]  # untouched default
    assert cfg["model"]["token_ops"] == [{"op": "avgpool", "k": 2}]
    assert cfg["data"]["train"][0] == {"name": "synthvqa", "split": "train", "n": None, "seed": 0,
                                       "image_folder": None, "skip_malformed": False, "difficulty": None,
                                       "categories": None, "distractors": None, "task": None}
    assert cfg["output_dir"] == "runs/r"  # named after the recipe file


def test_override_list_items_and_new_knobs_inside_specs(tmp_path):
    p = _recipe(tmp_path, "data:\n  train: [{name: synthvqa, n: 100}, easyvqa]\nmodel:\n  token_ops: [{op: avgpool}]\n")
    cfg = load_config(p, ["--data.train.1.n", "50", "--model.token_ops.0.k", "4", "--model.projector.norm", "true"])
    assert [d["n"] for d in cfg["data"]["train"]] == [100, 50]
    assert cfg["model"]["token_ops"] == [{"op": "avgpool", "k": 4}]
    assert cfg["model"]["projector"] == {"type": "mlp", "depth": 2, "norm": True}


def test_packaged_recipes_load_by_bare_name():
    names = list_recipes()
    assert "demo" in names
    for name in names:
        cfg = load_config(name)
        assert recipe_path(name).suffix == ".yaml"
        assert cfg["data"]["train"] and cfg["model"]["encoders"]


@pytest.mark.parametrize("args, needle", [
    (["--train.lrr", "1"], "did you mean 'lr'"),
    (["--trian.lr", "1"], "did you mean 'train'"),
    (["--train.lr", "fast"], "train.lr must be a number"),
    (["--train.batch_size", "2.5"], "whole number"),
    (["--train.stage", "pretrain"], "train.stage must be one of align, sft"),
    (["--train.lr"], "has no value"),
    (["train.lr", "1"], "overrides look like --section.key VALUE"),
    (["--data.train.5.n", "3"], "indexes a list of 1 item"),
    (["--train.lora", "{r: 4}"], "needs train.stage: sft"),
    (["--data.train.0.n", "0"], "positive whole number"),
    (["--data.train", "[{split: test}]"], "with 'name'"),
    (["--train.use_amp", "true"], "unknown config key 'train.use_amp'"),
])
def test_bad_overrides_name_the_problem_and_fix(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, args)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="not found.*packaged recipes: .*demo"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML at line 2"):
        load_config(_recipe(tmp_path, "train:\n\tlr: 1\n"))
    with pytest.raises(ConfigError, match="unknown config key 'trainer'.*did you mean 'train'"):
        load_config(_recipe(tmp_path, "trainer:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match="a recipe is a YAML mapping"):
        load_config(_recipe(tmp_path, "- a\n- b\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.lr", "3e-4", "--data.eval", "[{name: easyvqa, n: 5}]"])
    path = save_config(cfg, tmp_path / "out")
    assert path.name == "config.yaml" and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    again = yaml.safe_load(path.read_text())
    assert again == cfg
    assert load_config(again) == cfg  # a saved config is itself a valid recipe


def test_save_config_to_unwritable_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write .*choose a writable output directory"):
        save_config(defaults(), blocker / "sub")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c-d", "x y", "--e", "[1, 2]"]) == [("a.b", 1), ("c_d", "x y"),
                                                                          ("e", [1, 2])]


@pytest.mark.parametrize("name", list_recipes())
def test_packaged_recipe_variants_fit_the_trained_projector(name):
    """Every eval.variants entry of a packaged recipe builds, and its token ops hand the projector the channel width
    it was trained on (DINOv2-S: 384 channels); policies build from their recipe dicts."""
    from compactvl.ops import build_ops
    from compactvl.policies import build_policy

    cfg = load_config(name)
    widths = [384] * len(cfg["model"]["encoders"])
    trained = build_ops(cfg["model"]["token_ops"], widths).out_channels
    for v in cfg["eval"]["variants"]:
        if "token_ops" in v:
            assert build_ops(v["token_ops"], widths).out_channels == trained, v["name"]
        for p in v.get("policies", []):
            build_policy(p)
