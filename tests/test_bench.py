"""``compactvl bench`` on tiny random models: the method grammar, counted token schedules equal the analytic ones (and
a wrong one is caught), the report validates against the shipped JSON schema (and the schema rejects broken reports),
figures are internally consistent (speedup, efficiency, throughput, MACs), peak-RSS resets really reset, outputs
(JSON, Markdown, PNG, Pareto front) are written, the CLI and a saved CompactVLM work. No timing is asserted."""
import json
import sys
from pathlib import Path

import pytest
import torch

from compactvl.bench import (BenchSettings, MemoryProbe, MethodSpec, add_speedups, load_accuracy, load_bench_model,
                             load_schema, make_inputs, markdown, pareto_front, parse_method, run_bench, validate_report,
                             write_outputs)
from compactvl.cli import main
from compactvl.errors import ConfigError, InputError
from compactvl.measure.counted import (CountingPolicy, assert_same_schedule, counted_schedule, per_sample_schedules,
                                       schedule_mismatch)
from compactvl.measure.macs import kept, llm_macs, schedule_for
from compactvl.policies import build_policy
from compactvl.runner import LayerPolicy, Runner
from compactvl.testing import tiny_lm, tiny_lm_config

jsonschema = pytest.importorskip("jsonschema")

TINY = dict(visual=[12], text=6, prefix=2, batch=[1, 2], warmup=1, repeats=2, decode_tokens=2, threads=1)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(tiny_lm_config("qwen3").to_dict()))
    return path


@pytest.fixture(scope="module")
def report(tiny_config):
    model = load_bench_model(llm=str(tiny_config))
    methods = [parse_method(m) for m in ("keep:0.5", "fastv:layer=2,keep=0.5")]
    return run_bench(model, methods, BenchSettings(**TINY), progress=False)


# ----------------------------------------------------------------------------------------------- method grammar
def test_method_grammar():
    assert parse_method("vanilla") == MethodSpec("vanilla", "vanilla")
    assert parse_method("keep:0.25").keep == parse_method("keep:keep=0.25").keep == 0.25
    assert parse_method("keep:0.25").kind == "pre_llm" and parse_method("keep:0.25").visual_entering(576) == 144
    m = parse_method("fastv: layer=2, keep=0.5")
    assert (m.label, m.kind, m.policies) == ("fastv:layer=2,keep=0.5", "in_llm",
                                             ({"policy": "fastv", "layer": 2, "keep": 0.5},))
    for text in ("pyramiddrop:layers=[7,14,21],ratio=0.5", "pyramiddrop:layers=7/14/21,ratio=0.5"):
        assert parse_method(text).policies == ({"policy": "pyramiddrop", "layers": [7, 14, 21], "ratio": 0.5},)
    js = parse_method('{"policy": "sparsevlm", "retain": 64, "recycle": false, "label": "svlm64"}')
    assert js.label == "svlm64" and js.policies == ({"policy": "sparsevlm", "retain": 64, "recycle": False},)
    assert parse_method({"method": "keep", "keep": 0.5}).keep == 0.5
    assert parse_method("model", model_policies=[{"policy": "fastv"}]).policies == ({"policy": "fastv"},)


@pytest.mark.parametrize("text, words", [
    ("nosuch:x=1", ["unknown method 'nosuch'", "fastv", "keep"]),
    ("keep:1.5", ["(0, 1]"]),
    ("keep", ["(0, 1]"]),
    ("vanilla:keep=0.5", ["takes no knobs"]),
    ("fastv:layer", ["not knob=value"]),
    ("model", ["needs --model"]),
    ("{bad json", ["not valid JSON"]),
])
def test_method_grammar_errors_name_the_fix(text, words):
    with pytest.raises(ConfigError) as e:
        parse_method(text)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_method_model_on_a_model_without_policies_says_so():
    with pytest.raises(ConfigError, match="this model has none; name a method instead, e.g. --method fastv"):
        parse_method("model", model_policies=[])


# ----------------------------------------------------------------------------------------------- counted schedules
def _inputs(lm, visual=10, text=5, batch=2):
    return make_inputs(lm, visual, text, prefix=2, batch=batch, seed=3)


@pytest.mark.parametrize("spec, method, knobs", [
    ({"policy": "fastv", "layer": 2, "keep": 0.3}, "fastv", dict(layer=2, keep=0.3)),
    ({"policy": "pyramiddrop", "layers": [1, 3], "ratio": 0.5}, "pyramiddrop", dict(layers=[1, 3], ratio=0.5)),
    ({"policy": "sparsevlm", "layers": [1, 2], "keep": [0.6, 0.3]}, "sparsevlm", dict(layers=[1, 2], keep=[0.6, 0.3])),
])
def test_counted_schedule_equals_analytic(spec, method, knobs):
    lm = tiny_lm("llama")
    emb, vis = _inputs(lm)
    counter = CountingPolicy()
    Runner(lm, [build_policy(spec), counter]).prefill(emb, None, vis, use_cache=False)
    want = schedule_for(method, 4, 10, 5, **knobs)
    schedules = per_sample_schedules(counter)
    assert len(schedules) == 2
    for got in schedules:
        assert (got.tokens, got.visual, got.text) == (want.tokens, want.visual, 5)
        assert schedule_mismatch(got, want) is None
    assert want.visual[-1] < 10  # something really was pruned


class DropOneTooMany(LayerPolicy):
    """Test-local pruner: at layer 2, keeps kept(V, 0.5) - 1 visual tokens (one fewer than the fastv schedule)."""

    def before_layer(self, i, state, runner):
        if i != 2:
            return state
        v = state.visual & state.mask
        rank = v.long().cumsum(-1)
        n = kept(int(v[0].sum()), 0.5) - 1
        return state.select(~v | (rank <= n), layer=i)


def test_a_policy_that_disagrees_with_its_schedule_is_caught():
    lm = tiny_lm("llama")
    emb, vis = _inputs(lm)
    counter = CountingPolicy()
    Runner(lm, [DropOneTooMany(), counter]).prefill(emb, None, vis, use_cache=False)
    got, want = counted_schedule(counter, 0), schedule_for("fastv", 4, 10, 5, layer=2, keep=0.5)
    assert got.visual == [10, 10, 4, 4] and want.visual == [10, 10, 5, 5]
    assert "layer 2: measured 9 tokens (4 visual)" in schedule_mismatch(got, want)
    with pytest.raises(ConfigError, match="differ from the MACs schedule"):
        assert_same_schedule(got, want)


def test_counted_schedule_of_a_pre_llm_keep_refers_to_the_full_input():
    lm = tiny_lm("llama")
    emb, vis = _inputs(lm, visual=kept(10, 0.3))
    counter = CountingPolicy()
    Runner(lm, [counter]).prefill(emb, None, vis)
    got = counted_schedule(counter, 1, visual_input=10)
    want = schedule_for("keep", 4, 10, 5, keep=0.3)
    assert schedule_mismatch(got, want) is None
    assert llm_macs(lm.config, got).ratio == llm_macs(lm.config, want).ratio < 1


# ----------------------------------------------------------------------------------------------- the report
def test_report_validates_and_is_consistent(report, tiny_config):
    validate_report(report)
    rows = {(r["method"], r["batch"]): r for r in report["results"]}
    assert [m["label"] for m in report["methods"]][0] == "vanilla"  # added: speedups need it
    assert len(rows) == 3 * 2
    for (label, b), r in rows.items():
        assert r["schedule"]["matches"] is True and r["schedule"]["source"] == "analytic"
        assert r["prefill_ms"]["n"] == 2 and len(r["decode_ms_per_token"]["samples"]) == 2 * 2
        p = r["prefill_ms"]
        assert p["min"] <= p["q1"] <= p["median"] <= p["q3"] <= p["max"] and p["iqr"] == p["q3"] - p["q1"]
        assert r["throughput"]["prefill_samples_per_s"] == pytest.approx(b * 1e3 / p["median"])
        assert r["throughput"]["decode_tokens_per_s"] == pytest.approx(b * 1e3 / r["decode_ms_per_token"]["median"])
        van = rows[("vanilla", b)]
        assert r["speedup"] == pytest.approx(van["prefill_ms"]["median"] / p["median"])
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["macs"]["ratio"])
        assert r["memory"]["peak_mb"] >= r["memory"]["base_mb"] > 0
    keep = rows[("keep:0.5", 2)]
    assert keep["visual_entering"] == 6 and keep["schedule"]["counted_tokens"] == [6 + 6] * 4
    want = llm_macs(str(tiny_config), schedule_for("fastv", 4, 12, 6, layer=2, keep=0.5))
    fastv = rows[("fastv:layer=2,keep=0.5", 1)]
    assert (fastv["macs"]["llm_macs"], fastv["macs"]["ratio"]) == (want.llm_macs, want.ratio)
    assert fastv["schedule"]["counted_visual"] == [12, 12, 6, 6] and fastv["score_ms"]["n"] == 2
    assert rows[("vanilla", 1)]["speedup"] == 1.0 and rows[("vanilla", 1)]["macs"]["ratio"] == 1.0


def test_schema_rejects_broken_reports(report):
    assert load_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    broken = json.loads(json.dumps(report))
    del broken["results"][0]["prefill_ms"]
    broken["results"][1]["memory"]["method"] = "guess"
    broken["settings"]["batch"] = []
    with pytest.raises(ConfigError) as e:
        validate_report(broken)
    for where in ("results/0", "results/1/memory/method", "settings/batch"):
        assert where in str(e.value)


def test_speedups_come_from_the_matching_vanilla_row():
    def row(kind, v, b, ms, ratio):
        return dict(kind=kind, visual_input=v, batch=b, prefill_ms=dict(median=ms),
                    macs=dict(ideal_speedup=1 / ratio), speedup=None, efficiency=None)

    rows = [row("vanilla", 8, 1, 100.0, 1.0), row("vanilla", 8, 4, 300.0, 1.0), row("pre_llm", 8, 1, 50.0, 0.25),
            row("pre_llm", 8, 4, 200.0, 0.25), row("pre_llm", 16, 1, 10.0, 0.25)]
    add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 1.0, 2.0, 1.5, None]
    assert rows[2]["efficiency"] == 0.5 and rows[3]["efficiency"] == 0.375


def test_settings_are_checked():
    for bad in (dict(batch=[0]), dict(visual=[]), dict(repeats=0), dict(text=0), dict(warmup=0)):
        with pytest.raises(ConfigError):
            BenchSettings(**{**TINY, **bad}).check()
    s = BenchSettings(**{**TINY, "prefix": 50})
    s.check()
    assert s.prefix == TINY["text"] - 1


def test_unknown_llm_and_both_sources_are_refused(tiny_config):
    with pytest.raises(ConfigError, match="known presets"):
        load_bench_model(llm="no-such-lm")
    with pytest.raises(ConfigError, match="exactly one"):
        load_bench_model(llm=str(tiny_config), model_dir="x")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_peak_rss_is_reset_between_measurements():
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    big = torch.ones(64 * 1024 * 1024)  # 256 MiB, touched
    first = probe.stop()
    del big
    probe.start()
    torch.ones(1024).sum()
    second = probe.stop()
    if first["method"] != "vmhwm_reset":
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert first["delta_mb"] >= 200
    assert second["peak_mb"] < first["peak_mb"] - 200  # ru_maxrss could never go down like this


# ----------------------------------------------------------------------------------------------- outputs
def test_pareto_front():
    pts = [(10, 0.5), (5, 0.4), (5, 0.45), (20, 0.5), (1, 0.1), (8, 0.3)]
    assert pareto_front(pts) == [4, 2, 0]


def test_outputs_markdown_png_and_accuracy(report, tmp_path):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"vanilla": 0.60, "keep:0.5": 0.55, "fastv:layer=2,keep=0.5": 0.50,
                               "external": {"accuracy": 0.58, "llm_macs": 1e3}}))
    rep = json.loads(json.dumps(report))
    paths = write_outputs(rep, tmp_path / "out", acc)
    for kind in ("json", "markdown", "prefill_vs_visual", "accuracy_vs_macs"):
        assert paths[kind].is_file()
    for png in ("prefill_vs_visual", "accuracy_vs_macs"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    validate_report(saved)
    pareto = {a["method"]: a["pareto"] for a in saved["accuracy"]}
    # external has the fewest MACs; vanilla the best accuracy; keep/fastv are beaten by external (fewer MACs, better)
    assert pareto == {"vanilla": True, "keep:0.5": False, "fastv:layer=2,keep=0.5": False, "external": True}
    md = paths["markdown"].read_text()
    assert md.count("\n| keep:0.5 | 12 → 6 (6) |") == 2 and "| external | 0.00 | 0.58 | yes |" in md
    assert saved["plots"] == {"prefill_vs_visual": "prefill_vs_visual.png", "accuracy_vs_macs": "accuracy_vs_macs.png"}


def test_accuracy_for_an_unknown_method_or_without_numbers_is_refused(report, tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"nosuch": 0.5}))
    with pytest.raises(InputError, match="no bench row has that method"):
        write_outputs(json.loads(json.dumps(report)), tmp_path / "o", bad)
    bad.write_text(json.dumps([{"method": "vanilla", "accuracy": "high"}]))
    with pytest.raises(InputError, match="numeric accuracy"):
        load_accuracy(bad)
    assert load_accuracy(_write(tmp_path / "b.json", {"results": [{"method": "vanilla", "accuracy": 0.5}]})) == {
        "vanilla": {"accuracy": 0.5, "llm_macs": None}}
    (tmp_path / "eval").mkdir()
    _write(tmp_path / "eval" / "metrics.json", {"dataset": "synthvqa", "n": 10, "correct": 7, "accuracy": 0.7})
    assert load_accuracy(_write(tmp_path / "c.json", {"keep:0.5": "eval/metrics.json"})) == {
        "keep:0.5": {"accuracy": 0.7, "llm_macs": None}}
    with pytest.raises(InputError, match="cannot be read as JSON"):
        load_accuracy(_write(tmp_path / "d.json", {"keep:0.5": "eval/missing.json"}))


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- CLI and models
def test_cli_writes_a_valid_report(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", "--llm", str(tiny_config), "--visual", "8", "--text", "4", "--batch", "2", "--repeats", "1",
                 "--decode-tokens", "1", "--method", "keep:0.25", "--method", "sparsevlm:layers=[2],keep=[0.5]",
                 "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    validate_report(rep)
    assert [r["method"] for r in rep["results"]] == ["vanilla", "keep:0.25", "sparsevlm:layers=[2],keep=[0.5]"]
    assert rep["results"][2]["schedule"]["matches"] is True
    assert "| keep:0.25 | 8 → 2 (2) | 2 |" in capsys.readouterr().out
    assert main(["bench", "--llm", str(tiny_config), "--method", "nosuch"]) == 2
    # --out naming a file is refused before anything is measured (before: a crash after the whole benchmark)
    (tmp_path / "a-file.json").write_text("{}")
    capsys.readouterr()
    assert main(["bench", "--llm", str(tiny_config), "--out", str(tmp_path / "a-file.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "give a directory" in err and "Traceback" not in err
    assert (tmp_path / "a-file.json").read_text() == "{}"
    # an earlier report is never replaced silently: --overwrite says so
    before = (out / "bench.json").read_text()
    small = ["bench", "--llm", str(tiny_config), "--visual", "8", "--text", "4", "--batch", "1", "--repeats", "1",
             "--decode-tokens", "1", "--method", "vanilla", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(small) == 2 and (out / "bench.json").read_text() == before
    assert "already holds a benchmark (bench.json); pass --overwrite" in capsys.readouterr().err
    assert main([*small, "--overwrite"]) == 0 and (out / "bench.json").read_text() != before
    assert f"replacing the benchmark in {out}" in capsys.readouterr().err


def test_isolated_run_uses_a_fresh_process(tiny_config):
    kw = dict(llm=str(tiny_config))
    threads = torch.get_num_threads()
    rep = run_bench(load_bench_model(**kw), [parse_method("vanilla")],  # one child process: imports cost seconds
                    BenchSettings(visual=[8], text=4, batch=[1], repeats=1, decode_tokens=0, isolate=True,
                                  threads=threads + 1), model_kw=kw, progress=False)
    assert torch.get_num_threads() == threads and rep["settings"]["threads"] == threads + 1  # set, then restored
    validate_report(rep)
    row, = rep["results"]
    assert row["memory"]["method"] == "vmhwm_reset_fresh_process" or not sys.platform.startswith("linux")
    assert row["schedule"]["counted_tokens"] == [8 + 4] * 4 and row["decode_ms_per_token"] is None
    assert row["throughput"]["decode_tokens_per_s"] is None


def test_saved_compactvlm_with_its_own_policies(tmp_path):
    from compactvl.encoders.tiny import tiny_encoder
    from compactvl.model import CompactVLM
    from compactvl.testing import tiny_tokenizer

    CompactVLM.build(lm=tiny_lm("llama"), tokenizer=tiny_tokenizer(), encoders=[tiny_encoder("clip", image_size=32)],
                     policies=[{"policy": "fastv", "layer": 1, "keep": 0.5}]).save_pretrained(tmp_path / "vlm")
    model = load_bench_model(model_dir=str(tmp_path / "vlm"))
    m = parse_method("model", model.model_policies)
    rep = run_bench(model, [m], BenchSettings(visual=[8], text=4, batch=[1], repeats=1, decode_tokens=1, threads=1),
                    progress=False)
    validate_report(rep)
    assert rep["model"]["source"] == "compactvl" and rep["model"]["weights"] == "loaded"
    row = rep["results"][1]
    assert row["method"] == "model" and row["schedule"]["visual"] == [8, 4, 4, 4] and row["schedule"]["matches"]


def test_policy_budgets_use_the_methods_own_mapping():
    """keep= / tokens= mean the same in bench as in compress and eval: each policy's budget_knobs."""
    assert parse_method("fastv:layer=2,tokens=64").policies == ({"policy": "fastv", "layer": 2, "count": 64},)
    assert parse_method("pyramiddrop:keep=0.5").policies == ({"policy": "pyramiddrop", "ratio": 0.5},)
    assert parse_method("fastv:layer=2,keep=0.5").policies == ({"policy": "fastv", "layer": 2, "keep": 0.5},)
    with pytest.raises(ConfigError, match="keep is the fraction of visual tokens kept.*give tokens=64"):
        parse_method("fastv:keep=64")
