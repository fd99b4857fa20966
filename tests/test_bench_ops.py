"""``compactvl bench --op`` (compactvl.bench.op_timing) on a tiny random LM and tiny token grids: the op grammar and
its budget mapping, clear errors for unknown ops / bad specs / grids, synthetic inputs that carry what the ops read
(features at the required layers, CLS attention, keys, prompt text of the tokens' width), and an end-to-end run whose
op rows are consistent with the vanilla prefill row and validate against the JSON schema. No timing is asserted."""
import json

import pytest
import torch

from compactvl.bench import (BenchSettings, OpSpec, load_bench_model, markdown, parse_method, parse_op, run_bench,
                             synthetic_op_inputs, validate_report)
from compactvl.bench.op_timing import OpMeasurement, check_ops, op_grid
from compactvl.cli import main
from compactvl.errors import ConfigError, InputError
from compactvl.ops import build_ops
from compactvl.testing import tiny_lm_config

jsonschema = pytest.importorskip("jsonschema")

TINY = dict(visual=[16], text=5, prefix=2, batch=[2], warmup=1, repeats=2, decode_tokens=0, threads=1, op_width=8)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(tiny_lm_config("qwen3").to_dict()))
    return path


def test_op_grammar_maps_budgets_like_compress():
    assert parse_op("cdpruner:tokens=64").recipe(576) == [{"op": "cdpruner", "count": 64}]
    assert parse_op("divprune: keep=0.1").recipe(576) == [{"op": "divprune", "count": 58}]
    assert parse_op("divprune:keep=0.1").label == "divprune:keep=0.1"
    v = parse_op("visionzip:dominant=54,contextual=10")
    assert v.recipe(576) == [{"op": "visionzip", "dominant": 54, "contextual": 10}] and v.streams() == 1
    assert parse_op("prumerge").recipe(576) == [{"op": "prumerge"}]
    js = parse_op('[{"op": "pixel_shuffle", "k": 2, "label": "ps+dp"}, {"op": "divprune", "keep": 0.5}]')
    assert js.label == "ps+dp" and js.name == "pixel_shuffle+divprune"
    assert js.recipe(576) == [{"op": "pixel_shuffle", "k": 2}, {"op": "divprune", "count": 288}]
    mke = parse_op('[{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.8}]')
    assert mke.streams() == 2 and parse_op({"op": "cdpruner", "tokens": 8}).recipe(36) == [{"op": "cdpruner",
                                                                                             "count": 8}]


@pytest.mark.parametrize("text, match", [
    ("nosuch:tokens=64", r"unknown token op 'nosuch'; known: .*cdpruner.*--op cdpruner:tokens=64"),
    ("cdpruner:64", r"'64' is not knob=value; write e.g. cdpruner:tokens=64"),
    ("{bad json", "not valid JSON"),
    ("[]", r"op recipe \[\] is empty"),
    ('[{"k": 2}]', "not a mapping with an 'op' name"),
    ("", "empty op"),
])
def test_bad_op_specs_name_the_fix(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_op(text)


@pytest.mark.parametrize("ops, kw, match", [
    (["prumerge:tokens=8"], {}, r"--op prumerge:tokens=8: prumerge has no budget knob"),
    (["cdpruner:tokens=8,alpha=1"], {}, r"--op cdpruner:tokens=8,alpha=1: token op 'cdpruner' has no knob 'alpha'"),
    (["divprune:keep=2"], {}, r"keep=2; keep is the fraction"),
    (["cdpruner:tokens=8"], {"visual": [0]}, r"--op needs at least one visual token"),
    (["cdpruner:tokens=8", "cdpruner: tokens=8"], {}, r"given twice"),
    (["cdpruner:tokens=8"], {"op_width": 0}, r"--op-width must be a whole number >= 1"),
    (["cdpruner:tokens=8"], {"op_limit": 0}, r"--op-limit must be a percentage > 0"),
])
def test_ops_are_checked_before_anything_is_timed(ops, kw, match):
    with pytest.raises(ConfigError, match=match):
        check_ops([parse_op(o) for o in ops], BenchSettings(**{**TINY, **kw}))


def test_grids_are_square_or_a_strip():
    assert op_grid(576) == (24, 24) and op_grid(16) == (4, 4) and op_grid(8) == (1, 8)
    toks, _ = synthetic_op_inputs(1, 8, 1, 4, 2, [[22]], torch.device("cpu"), torch.float32)
    assert toks[0].grid == (1, 8)


def test_an_op_that_cannot_run_on_the_grid_names_itself():
    cell = OpMeasurement(parse_op("token_concat:k=3"), 16, 2, BenchSettings(**TINY), torch.device("cpu"),
                         torch.float32)
    with pytest.raises(InputError, match=r"--op token_concat:k=3 \(visual 16 = 4x4 grid, batch 2\): .*k=3"):
        cell.warmup()


def test_synthetic_inputs_carry_what_the_ops_read():
    toks, ctx = synthetic_op_inputs(2, 16, 3, 8, 5, [[22, 5], [22]], torch.device("cpu"), torch.float32, seed=1)
    assert len(toks) == 2 and [t.source for t in toks] == [0, 1]
    assert all(t.x.shape == (3, 16, 8) and t.grid == (4, 4) and t.layer == 22 for t in toks)
    assert sorted(ctx.encoders[0].features) == [5, 22] and sorted(ctx.encoders[1].features) == [22]
    att = ctx.encoders[0].attention(5)
    assert att.shape == (3, 16, 16) and (att > 0).all() and (att.sum(-1) < 1).all()  # CLS→patch, CLS column dropped
    assert ctx.encoders[0].keys(5).shape == (3, 16, 8) and ctx.encoders[0].cls.shape == (3, 8)
    assert ctx.text.shape == (3, 5, 8) and ctx.text_mask.all()
    # the layers an op asks for are the ones its cell provides
    cell = OpMeasurement(parse_op("vispruner:tokens=4,layer=7"), 16, 2, BenchSettings(**TINY), torch.device("cpu"),
                         torch.float32)
    assert 7 in cell.ctx.encoders[0].features


def test_timed_output_is_the_ops_own_output_on_those_inputs():
    """The cell times exactly the op: its output equals build_ops(recipe) on the same inputs, and a text-conditioned
    op runs its relevance path (no text-free fallback note)."""
    settings = BenchSettings(**TINY)
    cell = OpMeasurement(parse_op("cdpruner:tokens=5"), 16, 2, settings, torch.device("cpu"), torch.float32)
    cell.warmup()
    cell.timed()
    direct = build_ops([{"op": "cdpruner", "count": 5}], [8], text_dim=8)(cell.streams, cell.ctx)
    assert torch.equal(cell.out.assign, direct.assign) and torch.equal(cell.out.x, direct.x)
    row = cell.result()
    assert row["tokens_out"] == 5 and row["notes"] == [] and row["op_ms"]["n"] == 1 and row["streams"] == 1
    assert row["recipe"] == [{"op": "cdpruner", "count": 5}] and row["limit"] == pytest.approx(0.03)


def test_run_bench_reports_op_shares_of_the_vanilla_prefill(tiny_config):
    model = load_bench_model(llm=str(tiny_config))
    ops = [parse_op(o) for o in ("cdpruner:tokens=4", "divprune:keep=0.25", "vispruner:tokens=4", "mmtok:tokens=4",
                                 '[{"op": "pixel_shuffle", "k": 2}, {"op": "mke", "self_ratio": 0.5}]')]
    rep = run_bench(model, [], BenchSettings(**TINY, op_limit=0.5), progress=False, ops=ops)
    validate_report(rep)
    assert [r["method"] for r in rep["results"]] == ["vanilla"]
    vanilla = rep["results"][0]["prefill_ms"]["median"]
    assert [r["op"] for r in rep["ops"]] == [o.label for o in ops]
    for r in rep["ops"]:
        assert (r["visual_input"], r["batch"], r["width"]) == (16, 2, 8) and r["op_ms"]["n"] == 2
        assert r["prefill_ms"] == vanilla and r["share"] == pytest.approx(r["op_ms"]["median"] / vanilla)
        assert r["limit"] == pytest.approx(0.005) and r["over_limit"] == (r["share"] > 0.005)
    expected = [build_ops(o.recipe(16), [8] * o.streams(), text_dim=8).expected_tokens([16] * o.streams(),
                                                                                       [(4, 4)] * o.streams())
                for o in ops]
    assert [r["tokens_out"] for r in rep["ops"]] == expected and expected[:4] == [4, 4, 4, 4]
    assert [r["streams"] for r in rep["ops"]] == [1, 1, 1, 1, 2]
    assert rep["settings"]["op_width"] == 8 and "op_ms" in rep["definitions"]
    md = markdown(rep)
    assert "| cdpruner:tokens=4" in md and "| 16 → 4 | 2 | 8 |" in md
    # a report without ops says so, and old reports without the key still validate
    plain = run_bench(model, [parse_method("vanilla")], BenchSettings(**{**TINY, "repeats": 1}), progress=False)
    assert plain["ops"] is None
    plain.pop("ops")
    validate_report(plain)


def test_cli_op_mode_writes_ops_and_refuses_unknown_ops(tiny_config, tmp_path, capsys):
    out = tmp_path / "ops"
    code = main(["bench", "--llm", str(tiny_config), "--visual", "16", "--text", "4", "--batch", "2", "--repeats", "1",
                 "--decode-tokens", "0", "--op", "cdpruner:tokens=4", "--op", "divprune:tokens=4", "--op-width", "8",
                 "--op-limit", "1e-9", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    validate_report(rep)
    assert [r["method"] for r in rep["results"]] == ["vanilla"]  # --op without --method: vanilla only
    assert [r["op"] for r in rep["ops"]] == ["cdpruner:tokens=4", "divprune:tokens=4"]
    assert all(r["over_limit"] for r in rep["ops"])
    cap = capsys.readouterr()
    assert "Token-op scoring overhead" in cap.out and "⚠ over the limit" in cap.out
    assert "warning: token ops above --op-limit 1e-09 % of the vanilla prefill: cdpruner:tokens=4 (" in cap.err
    assert main(["bench", "--llm", str(tiny_config), "--op", "nosuch:tokens=4", "--no-progress"]) == 2
    assert "unknown token op 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "--llm", str(tiny_config), "--op", "cdpruner:tokens=4", "--op-width", "0",
                 "--no-progress"]) == 2
    assert "--op-width must be a whole number >= 1" in capsys.readouterr().err


def test_op_spec_round_trips():
    o = parse_op("cdpruner:tokens=64,theta=0.5")
    assert o == OpSpec("cdpruner:tokens=64,theta=0.5", ({"op": "cdpruner", "tokens": 64, "theta": 0.5},))
    assert o.to_dict() == {"label": o.label, "name": "cdpruner", "entries": [dict(o.entries[0])]}
