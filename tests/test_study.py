"""compactvl study on tiny parts: the grid runs end to end, every figure carries its interval, a cell that cannot
run is recorded with its reason, and a killed study continues to the same figures."""
from __future__ import annotations

import json
import shutil

import pytest

from compactvl.cli import main
from compactvl.config import load_config
from compactvl.demo import tiny_model
from compactvl.errors import ConfigError
from compactvl.model import CompactVLM
from compactvl.study import StudySettings, run_study
from compactvl.train import Trainer, build_train_data

TIMING = ("lm_seconds", "prepare_seconds", "speedup")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-run")
    cfg = load_config({"model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
                       "data": {"train": [{"name": "synthvqa", "n": 8}]},
                       "train": {"stage": "sft", "lr": 1e-2, "batch_size": 4, "max_steps": 2, "precision": "fp32"},
                       "output_dir": str(out)})
    Trainer(tiny_model(cfg), build_train_data(cfg["data"]["train"]), cfg, progress=False, log=None).fit()
    return out


def _settings(**kw):
    return StudySettings(sets=[{"name": "synthvqa", "split": "test", "n": 6}], budgets=(0.5, 0.25),
                         methods=["fastv", "random", "sip"], batch_size=3, max_new_tokens=2, **kw)


def _without_timing(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in TIMING}


def test_a_quick_study_runs_and_a_killed_one_continues_to_the_same_figures(run_dir, tmp_path):
    model = CompactVLM.from_pretrained(run_dir)
    report = run_study(model, _settings(), tmp_path / "a", progress=False, log=lambda *_: None)
    methods = {m["name"]: m for m in report["methods"]}
    assert methods["fastv"]["runs"] and methods["random"]["runs"]
    assert not methods["sip"]["runs"] and "no budget knob" in methods["sip"]["reason"]  # named, with why
    cells = report["cells"]
    assert len(cells) == 2 + 2 * 3  # fastv at 2 budgets, random at 2 budgets x 3 seeds
    assert all(c["status"] == "ok" for c in cells)
    for c in cells:
        assert c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]
        assert c["paired"]["n"] == 6 and 0 <= c["paired"]["agreement"] <= 1 and c["kl_first_token"] >= 0
        assert c["macs_ratio"] < 1 and c["visual_tokens"] is not None
        if c["retention"] is not None:
            assert c["retention_ci95"][0] <= c["retention"] <= c["retention_ci95"][1]
    base = report["uncompressed"]["synthvqa-test"]
    half = next(c for c in cells if c["method"] == "random" and c["keep"] == 0.5 and c["seed"] == 0)
    assert half["visual_tokens"] == base["visual_tokens"] // 2
    md = (tmp_path / "a" / "study.md").read_text()
    assert "| uncompressed |" in md and "| fastv | 0.5 |" in md and "Not run on this model: sip" in md
    # charts need a defined retention (the tiny model may score 0 uncompressed): drawn exactly when there is one
    drawn = (tmp_path / "a" / "retention_vs_speedup.png").is_file()
    assert drawn == any(c["retention"] is not None for c in cells)
    # a study killed after some cells: the cached cells are kept, the rest computed, the figures the same
    partial = tmp_path / "b"
    shutil.copytree(tmp_path / "a", partial)
    for p in sorted((partial / "cells").glob("random-*.json"))[:3]:
        p.unlink()
    again = run_study(model, _settings(), partial, progress=False, log=lambda *_: None)
    assert [_without_timing(c) for c in again["cells"]] == [_without_timing(c) for c in cells]
    with pytest.raises(ConfigError, match="holds a study with other settings"):
        run_study(model, _settings(seeds=(0,)), partial, progress=False, log=lambda *_: None)


def test_study_cli_and_bad_input(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", str(run_dir), "--n", "4", "--methods", "fastv", "--budgets", "0.5", "--batch-size", "4",
                 "--max-new-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "study.json").read_text())
    assert [c["id"] for c in rep["cells"]] == ["fastv-keep0.5-synthvqa-test"]
    assert main(["study", str(run_dir), "--methods", "nosuch", "--n", "2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(["study", str(run_dir), "--budgets", "2", "--out", str(tmp_path / "y")]) == 2
    assert "every budget is a fraction in (0, 1]" in capsys.readouterr().err


def test_study_charts_draw_retention_against_speedup_and_the_category_heat_map(tmp_path):
    from compactvl.plots import study_charts

    def cell(method, keep, ret, speed):
        return {"status": "ok", "method": method, "keep": keep, "seed": None, "dataset": "synthvqa-test",
                "retention": ret, "retention_ci95": [ret - 0.1, ret + 0.05], "speedup": speed,
                "per_category": {"color": {"retention": ret}, "count": {"retention": ret / 2}}}
    report = {"cells": [cell("fastv", 0.5, 0.9, 1.6), cell("fastv", 0.25, 0.7, 2.4), cell("random", 0.5, 0.6, 1.7),
                        {"status": "failed", "method": "x", "keep": 0.5, "seed": None, "dataset": "synthvqa-test"}]}
    paths = study_charts(report, tmp_path)
    assert [p.name for p in paths] == ["retention_vs_speedup.png", "category_retention.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert study_charts({"cells": [{**report["cells"][0], "retention": None}]}, tmp_path / "none") == []
