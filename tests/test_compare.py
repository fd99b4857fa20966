"""``compactvl demo --compare``: suites of systems at equal visual tokens and training budget, refused before any
training when they are not comparable, resumable per system, and each row compared with the baseline on the same
items (tiny random parts with --quick; seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compactvl.cli import main
from compactvl.compare import read_suite, resolve_suite, run_comparison, task_losses
from compactvl.demo import tiny_model
from compactvl.errors import ConfigError
from compactvl.evaluate import read_results
from compactvl.stats import paired_comparison
from compactvl.manifest import write_manifest
from compactvl.train import Trainer, build_train_data, list_checkpoints

EVAL = ["--data.eval", "[{name: synthvqa, split: test, n: 12}]"]


def _suite(tmp_path: Path, systems: list[dict], budget: int = 4, **extra) -> Path:
    """A small suite: the demo's encoder at 4 visual tokens (pixel shuffle 8 on 16x16 patches) as the baseline."""
    path = tmp_path / "suite.yaml"
    suite = {"name": "small", "baseline": "shuffle", "common": {"train": {"stage": "align"}},
             "budgets": {budget: [{"name": "shuffle", "recipe": "demo",
                                   "model": {"token_ops": [{"op": "pixel_shuffle", "k": 8}]}}, *systems]}, **extra}
    path.write_text(yaml.safe_dump(suite))
    return path


AVGPOOL = {"name": "avgpool", "recipe": "demo", "model": {"token_ops": [{"op": "avgpool", "k": 8}]}}


def _quiet(lines: list[str]):
    return lines.append


def test_a_suite_trains_each_system_and_compares_it_with_the_baseline_on_the_same_items(tmp_path):
    got: list[str] = []
    suite = _suite(tmp_path, [AVGPOOL])
    s = run_comparison(str(suite), tmp_path / "out", quick=True, overrides=EVAL, progress=False, log=_quiet(got))
    rows = {r["system"]: r for r in s["systems"]}
    assert list(rows) == ["shuffle", "avgpool"] and all(r["status"] == "done" for r in rows.values())
    assert rows["shuffle"]["visual_tokens"] == rows["avgpool"]["visual_tokens"] == 4
    assert rows["shuffle"]["train_steps"] == rows["avgpool"]["train_steps"] == 4
    # the paired difference is the mean per-item difference of the two runs' saved verdicts
    runs = {k: read_results(tmp_path / "out" / "4" / k / "eval" / "as_trained" / "synthvqa-test")
            for k in rows}
    a = {p["id"]: p["correct"] for p in runs["shuffle"].predictions}
    b = {p["id"]: p["correct"] for p in runs["avgpool"].predictions}
    assert set(a) == set(b) and len(a) == 12
    v = rows["avgpool"]["sets"]["synthvqa-test"]["vs_baseline"]
    assert v["difference"] == pytest.approx(sum(b[i] - a[i] for i in a) / 12)
    ids = [p["id"] for p in runs["shuffle"].predictions]  # paired item by item, in the baseline's order
    pa = {p["id"]: p["prediction"] for p in runs["shuffle"].predictions}
    pb = {p["id"]: p["prediction"] for p in runs["avgpool"].predictions}
    assert v == paired_comparison([a[i] for i in ids], [b[i] for i in ids], [pa[i] for i in ids],
                                  [pb[i] for i in ids]).to_dict()
    assert rows["shuffle"]["sets"]["synthvqa-test"]["vs_baseline"] is None  # the baseline itself
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| avgpool | 4 |" in table and "baseline" in table and "(n=12)" in table
    for png in ("compare.png", "curves.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["systems"] == json.loads(
        json.dumps(s["systems"]))
    _assert_the_question_only_control(s, suite, runs, tmp_path / "out")


def _assert_the_question_only_control(s: dict, suite: Path, runs: dict, out: Path) -> None:
    """The control, recomputed here from the training samples themselves (images drawn, answers counted): each test
    question answered with its most common training answer (ties: alphabetical), else the most common one."""
    cfg = resolve_suite(read_suite(str(suite)), True, EVAL)[0].cfg
    train = [(x.question, x.answer) for x in build_train_data(cfg["data"]["train"])]
    votes: dict = {}
    for q, a in train:
        votes.setdefault(q, {}).setdefault(a, 0)
        votes[q][a] += 1
    top = lambda d: sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    overall: dict = {}
    for _, a in train:
        overall[a] = overall.get(a, 0) + 1
    rows = runs["shuffle"].predictions
    blind = [top(votes[r["question"]]) if r["question"] in votes else top(overall) for r in rows]
    hits = [b.lower() == r["answer"].lower() for b, r in zip(blind, rows)]
    c = s["question_only"]["4"]["synthvqa-test"]
    assert c["n"] == 12 and c["accuracy"] == pytest.approx(sum(hits) / 12) and c["train_pairs"] == len(train)
    assert c["seen_in_training"] == sum(r["question"] in votes for r in rows) > 0
    assert c["vs_baseline"] == paired_comparison(hits, [r["correct"] for r in rows], blind,
                                                 [r["prediction"] for r in rows]).to_dict()
    for name, run in runs.items():  # every system paired with the control, item by item
        mine = {p["id"]: p for p in run.predictions}
        got = [mine[r["id"]] for r in rows]
        v = next(x for x in s["systems"] if x["system"] == name)["sets"]["synthvqa-test"]["vs_question_only"]
        assert v == paired_comparison(hits, [g["correct"] for g in got], blind,
                                      [g["prediction"] for g in got]).to_dict()
    table = (out / "compare.md").read_text()
    assert "| question-only (no image) | 0 |" in table and f"{sum(hits) / 12:.3f}" in table
    assert "Δ vs question-only" in table



def test_the_same_command_reuses_finished_systems_and_retrains_changed_ones(tmp_path):
    suite = _suite(tmp_path, [AVGPOOL])
    out = tmp_path / "out"
    run_comparison(str(suite), out, quick=True, overrides=EVAL, progress=False, log=lambda s: None)
    stamp = {k: (out / "4" / k / "results.json").stat().st_mtime_ns for k in ("shuffle", "avgpool")}
    got: list[str] = []
    run_comparison(str(suite), out, quick=True, overrides=EVAL, progress=False, log=_quiet(got))
    assert sum("finished earlier with the same config, reused" in line for line in got) == 2
    assert {k: (out / "4" / k / "results.json").stat().st_mtime_ns for k in stamp} == stamp
    (out / "compare.md").unlink()  # --report rewrites the report from the finished runs, training nothing
    again = run_comparison(str(suite), out, quick=True, overrides=EVAL, report=True, log=lambda s: None)
    assert [r["status"] for r in again["systems"]] == ["done", "done"] and (out / "compare.md").is_file()
    (out / "4" / "avgpool" / "results.json").rename(out / "results.json.away")  # as if avgpool had not finished
    partial = run_comparison(str(suite), out, quick=True, overrides=EVAL, report=True, log=lambda s: None)
    (out / "results.json.away").rename(out / "4" / "avgpool" / "results.json")
    assert [r["status"] for r in partial["systems"]] == ["done", "not run yet"]
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert "| avgpool | not run yet |" in table[-1] and {line.count("|") for line in table} == {table[0].count("|")}
    other = run_comparison(str(suite), out, quick=True, overrides=[*EVAL, "--train.lr", "0.002"], report=True,
                           log=lambda s: None)  # runs of another config are not this comparison's
    assert [r["status"] for r in other["systems"]] == ["not run yet"] * 2
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert "| avgpool | not run yet |" in table[-1] and {line.count("|") for line in table} == {table[0].count("|")}
    assert {k: (out / "4" / k / "results.json").stat().st_mtime_ns for k in stamp} == stamp
    got.clear()  # another learning rate is another experiment: every system trains again
    run_comparison(str(suite), out, quick=True, overrides=[*EVAL, "--train.lr", "0.002"], progress=False,
                   log=_quiet(got))
    assert not any("reused" in line for line in got)
    assert all((out / "4" / k / "results.json").stat().st_mtime_ns != stamp[k] for k in stamp)


def test_an_interrupted_system_resumes_from_its_checkpoint(tmp_path):
    suite = _suite(tmp_path, [])
    out = tmp_path / "out"
    (system,) = resolve_suite(read_suite(str(suite)), True, EVAL)
    run_dir = out / "4" / "shuffle"
    cfg = {**system.cfg, "output_dir": str(run_dir)}
    model = tiny_model(cfg, None)
    Trainer(model, build_train_data(cfg["data"]["train"], model=model), cfg, output_dir=run_dir / "train",
            progress=False, log=None).fit(stop_at=2)  # as a kill after step 2 would leave it
    # as an earlier compactvl wrote it: without a config key added since (data entries' `task`, default None)
    (ckpt,) = list_checkpoints(run_dir / "train")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    for spec in saved["data"]["train"]:
        del spec["task"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    write_manifest(ckpt)
    got: list[str] = []
    s = run_comparison(str(suite), out, quick=True, overrides=EVAL, progress=False, log=_quiet(got))
    assert any("resuming its training" in line for line in got)
    assert any("resumed from" in line and "at step 2/4" in line for line in got)
    assert s["systems"][0]["train_steps"] == 4
    done = json.loads((run_dir / "results.json").read_text())  # the same for a finished run: still reused
    for spec in done["config"]["data"]["train"] + done["config"]["data"]["eval"]:
        del spec["task"]
    (run_dir / "results.json").write_text(json.dumps(done))
    got.clear()
    run_comparison(str(suite), out, quick=True, overrides=EVAL, progress=False, log=_quiet(got))
    assert any("finished earlier with the same config, reused" in line for line in got)


def test_systems_with_other_visual_tokens_are_refused_before_anything_trains(tmp_path):
    wide = {"name": "wide", "recipe": "demo", "model": {"token_ops": [{"op": "avgpool", "k": 4}]}}  # 16 tokens
    with pytest.raises(ConfigError, match=r"budget 4: wide \(16\) feed the LM other than 4 visual tokens"):
        run_comparison(str(_suite(tmp_path, [AVGPOOL, wide])), tmp_path / "out", quick=True, overrides=EVAL,
                       progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_two_names_for_one_system_are_refused_before_anything_trains(tmp_path):
    """token_concat is pixel_shuffle's other name: a system that differs from the baseline only by it would train the
    same weights again and report one result twice (the packaged suite once held such a pair)."""
    twin = {"name": "concat", "recipe": "demo", "model": {"token_ops": [{"op": "token_concat", "k": 8}]}}
    with pytest.raises(ConfigError, match="budget 4: shuffle and concat are the same system"):
        run_comparison(str(_suite(tmp_path, [AVGPOOL, twin])), tmp_path / "out", quick=True, overrides=EVAL,
                       progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    deeper = {"name": "concat_deep", "recipe": "demo", "model": {"token_ops": [{"op": "token_concat", "k": 8}],
                                                                 "projector": {"type": "mlp", "depth": 3}}}
    systems = resolve_suite(read_suite(str(_suite(tmp_path, [deeper]))), True, [])  # differs: accepted
    assert [s.name for s in systems] == ["shuffle", "concat_deep"]


def test_named_recipes_must_share_data_and_tokens_unless_unequal(tmp_path, capsys):
    # venvl trains on 800 synthvqa samples, the demo on synthvqa + easy-vqa: refused, naming the difference
    with pytest.raises(ConfigError, match=r"the systems differ in data.train: .*as named/demo.*as named/venvl.*"
                                          r"--unequal"):
        run_comparison("demo,venvl", tmp_path / "a", overrides=EVAL, log=lambda s: None)
    same_data = [*EVAL, "--data.train", "[{name: synthvqa, n: 16}]"]
    with pytest.raises(ConfigError, match=r"budget as named: llava_stf \(16\) feed the LM other than 21"):
        run_comparison("venvl,llava_stf", tmp_path / "b", quick=True, overrides=same_data, log=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the CLI: a clear error and exit code 2, then --unequal compares them as they are
    assert main(["demo", "--compare", "venvl,llava_stf", "--quick", "--out", str(tmp_path / "c"), *same_data]) == 2
    assert "feed the LM other than 21 visual tokens" in capsys.readouterr().err
    assert main(["demo", "--compare", "venvl,llava_stf", "--quick", "--unequal", "--no-progress", "--out",
                 str(tmp_path / "c"), *same_data]) == 0
    rows = {r["system"]: r for r in json.loads((tmp_path / "c" / "compare.json").read_text())["systems"]}
    assert rows["venvl"]["visual_tokens"] == 21 and rows["llava_stf"]["visual_tokens"] == 16
    assert rows["venvl"]["expert_gmacs"] > 0 and rows["llava_stf"]["expert_gmacs"] == 0  # HTE experts cost MACs
    assert rows["venvl"]["llm_gmacs"] > rows["venvl"]["expert_gmacs"]
    assert rows["llava_stf"]["sets"]["synthvqa-test"]["vs_baseline"]["n"] == 12  # compared with the first, venvl


@pytest.mark.parametrize("args, needle", [
    (["--compare", "venvl,venvl"], "named twice"),
    (["--compare", "venvl,nonesuch"], "recipe 'nonesuch' not found"),
    (["--compare", "systems", "--budget", "8"], "no budget 8 in suite 'systems'; it has 16, 4"),
    (["--compare", "systems", "--only", "venvl,nope"], "--only names systems the suite does not have: nope"),
    (["--compare", "systems", "--unequal"], "--unequal is for recipes named on the command line"),
    (["--budget", "16"], "--budget goes with --compare"),
])
def test_bad_compare_arguments_are_clear_errors(tmp_path, capsys, args, needle):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_malformed_suite_is_refused(tmp_path):
    bad = _suite(tmp_path, [{"name": "x", "recipe": "demo", "modle": {}}])
    with pytest.raises(ConfigError, match=r"needs `name` and `recipe`.*unknown keys \['modle'\]"):
        read_suite(str(bad))
    no_base = tmp_path / "nobase.yaml"
    no_base.write_text(yaml.safe_dump({"name": "n", "baseline": "z", "budgets": {4: [AVGPOOL]}}))
    with pytest.raises(ConfigError, match="budget 4 lacks the baseline 'z'"):
        read_suite(str(no_base))


def test_the_packaged_suite_holds_every_system_at_its_budget_and_uses_its_cuda_budget_on_cuda():
    suite = read_suite("systems")
    cpu = resolve_suite(suite, False, [])
    names16 = [s.name for s in cpu if s.budget == "16"]
    for want in ("pixel_shuffle_mlp", "avgpool_mlp", "resampler", "llava_stf", "llava_stf_stf_only",
                 "llava_stf_avgpool", "llava_stf_token_concat", "venvl", "venvl_mke_only", "venvl_no_sip",
                 "venvl_hte_sparse", "leomini", "leomini_no_mmoe", "qmop", "learnpruner"):
        assert want in names16
    assert {s.budget for s in cpu} == {"16", "4"}
    assert all(s.cfg["data"]["eval"][0]["n"] == 500 for s in cpu)  # n >= 500 per set
    assert len({json.dumps(s.cfg["data"]["train"]) for s in cpu}) == 1
    cuda = resolve_suite(suite, False, [], budgets=["4"], only=["qmop"], cuda=True)
    assert [s.name for s in cuda] == ["pixel_shuffle_mlp", "qmop"]  # the baseline always runs
    assert cuda[0].cfg["data"]["train"][0]["n"] == 20000 and cuda[0].cfg["train"]["epochs"] == 2


def test_the_packaged_suite_feeds_each_lm_its_budget(capsys):
    """Every system of the packaged suite, built with tiny parts on the real patch grids, feeds its LM exactly its
    budget (the same check runs with the real parts before a real comparison trains)."""
    assert main(["demo", "--compare", "systems", "--quick", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count(" 16 visual tokens") == 15 and out.count("  4 visual tokens") == 8
    assert "nothing was trained" in out


@pytest.mark.slow
def test_tiny_parts_on_the_real_patch_grids_give_the_real_token_counts():
    """--quick stands in for the real model in the budget check: the tiny encoders are sized so their patch grids
    equal the real encoders' (DINOv2-S 14 px patches, EfficientNet-Lite0 stride 16), so token counts agree."""
    from compactvl.compare import check_comparable

    suite = read_suite("systems")
    picked = [s for s in resolve_suite(suite, False, [], budgets=["4"], only=["venvl", "learnpruner", "leomini"])]
    tiny = [s for s in resolve_suite(suite, True, [], budgets=["4"], only=["venvl", "learnpruner", "leomini"])]
    check_comparable(picked, quick=False, log=lambda s: None)
    check_comparable(tiny, quick=True, log=lambda s: None)
    assert [s.tokens for s in picked] == [s.tokens for s in tiny] == [4] * 4


def test_systems_on_the_same_encoder_share_its_training_features_and_train_as_they_would_alone(tmp_path):
    """The second system reads the baseline's encoded training images (nothing encoded again), and its losses and
    answers are those of the same system run on its own."""
    got: list[str] = []
    suite = _suite(tmp_path, [AVGPOOL])
    run_comparison(str(suite), tmp_path / "out", quick=True, overrides=EVAL, progress=False, log=_quiet(got))
    cached = [line for line in got if line.startswith("feature cache:")]
    assert len(cached) == 2 and cached[0].startswith("feature cache: 32 images") and "; 0 read from" in cached[0]
    assert cached[1].startswith("feature cache: 0 images") and "; 32 read from a cache shared" in cached[1]
    (tmp_path / "alone").mkdir()
    path = tmp_path / "alone" / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "alone", "baseline": "avgpool", "common": {"train": {"stage": "align"}},
                                    "budgets": {4: [AVGPOOL]}}))
    run_comparison(str(path), tmp_path / "alone" / "out", quick=True, overrides=EVAL, progress=False,
                   log=lambda s: None)
    shared, own = (json.loads((root / "4" / "avgpool" / "results.json").read_text())
                   for root in (tmp_path / "out", tmp_path / "alone" / "out"))
    assert shared["train"]["losses"] == own["train"]["losses"]
    assert [r["correct"] for r in shared["results"]] == [r["correct"] for r in own["results"]]
    a, b = (read_results(root / "4" / "avgpool" / "eval" / "as_trained" / "synthvqa-test").predictions
            for root in (tmp_path / "out", tmp_path / "alone" / "out"))
    assert [p["prediction"] for p in a] == [p["prediction"] for p in b]
    assert shared["train"]["feature_cache"]["misses"] == 0 and own["train"]["feature_cache"]["misses"] == 32
    row = json.loads((tmp_path / "out" / "compare.json").read_text())["systems"][1]
    assert row["encode_s"] == shared["train"]["feature_cache"]["seconds"] < row["train_s"]
    assert f"| {row['train_s']:.0f} ({row['encode_s']:.0f} encoding) |" in (tmp_path / "out" / "compare.md").read_text()


def test_systems_run_grouped_by_encoder_so_each_encoder_encodes_the_training_images_once(tmp_path):
    """A system on another encoder (112 px) listed between two on the demo's (224 px) runs after both; the report
    keeps the suite's order."""
    small = {"name": "small112", "recipe": "demo",
             "model": {"encoders": [{"name": "dinov2-small", "image_size": 112}],
                       "token_ops": [{"op": "pixel_shuffle", "k": 4}]}}
    got: list[str] = []
    s = run_comparison(str(_suite(tmp_path, [small, AVGPOOL])), tmp_path / "out", quick=True, overrides=EVAL,
                       progress=False, log=_quiet(got))
    started = [line.split()[2] for line in got if line.startswith("\n=== [")]
    assert started == ["4/shuffle", "4/avgpool", "4/small112"]
    encoded = [int(line.split()[2]) for line in got if line.startswith("feature cache:")]
    assert encoded == [32, 0, 32]
    assert [r["system"] for r in s["systems"]] == ["shuffle", "small112", "avgpool"]


def test_the_curves_plot_the_task_loss_without_the_auxiliary_losses_where_they_were_recorded():
    assert task_losses({"losses": [3.0, 2.5], "aux_losses": [1.0, 0.25]}) == {"losses": [2.0, 2.25], "known": True}
    for old in ({"losses": [3.0, 2.5]}, {"losses": [3.0, 2.5], "aux_losses": [None, 0.25]}):  # a resumed older run
        assert task_losses(old) == {"losses": [3.0, 2.5], "known": False}
