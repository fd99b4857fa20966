"""The architecture holds: strict layers without cycles (import-linter, configured in pyproject.toml), and one method =
one file — a token op and a layer policy defined HERE, each registered with one line, work in ``compactvl macs``,
``compactvl bench``, ``compress`` and ``compactvl eval`` with no other edit (docs/design.md, "Adding a method")."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from compactvl.cli import main
from compactvl.compression import compress
from compactvl.measure.macs import llm_macs
from compactvl.ops.base import StreamOp, budget_count, check_int, register
from compactvl.policies import ScorePolicy
from compactvl.registry import POLICIES, TOKEN_OPS
from compactvl.schedules import Budget, Schedule, kept, made, parse_fraction, parse_layers, schedule_for
from compactvl.tokens import rank_keep

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "compactvl"


# ----------------------------------------------------------------------------------------------- layers
def test_import_contracts_hold():
    """``lint-imports`` (import-linter) with the contracts in pyproject.toml: applications > measurement > models >
    components > core, and no import cycle between the modules of any package."""
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"import-linter is not installed next to {sys.executable}; it is in the test extra (./run setup)")
    run = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _sized(path: Path) -> int:
    return sum(1 for _ in path.open())


def test_no_oversized_module_without_a_stated_reason():
    """Modules stay under ~400 lines; a longer one says why in a ``# Size:`` line (one job, not several)."""
    over = {str(p.relative_to(SRC)): _sized(p) for p in SRC.rglob("*.py") if _sized(p) > 420}
    unexplained = [f"{name} ({n} lines)" for name, n in over.items() if "# Size: " not in (SRC / name).read_text()]
    assert not unexplained, f"split these along their jobs or state why not in a '# Size: ' comment: {unexplained}"


def test_function_level_imports_say_why():
    """Imports sit at module top; one inside a function or class (an optional or heavy dependency, a CLI command
    loaded on demand) carries a comment on one of its lines saying why."""
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        lines = p.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                text = lines[node.lineno - 1:node.end_lineno]
                if not any("#" in line for line in text):
                    bad.append(f"{p.relative_to(SRC)}:{node.lineno}: {text[0].strip()}")
    assert not bad, "hoist these to the module top or say why they are lazy:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------- one method = one file
class ToyFirst(StreamOp):
    """Toy token op: keeps the first ``n`` tokens of each image in raster order."""

    def __init__(self, in_channels: list[int], *, n: int = 4, streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.n = check_int(n, "n", "toy_first")

    def apply(self, t, ctx, i):
        order = -torch.arange(t.mask.shape[1], dtype=torch.float32, device=t.x.device).expand(t.mask.shape)
        return t.keep(rank_keep(order, t.mask, t.kept_counts().clamp(max=self.n)))

    def tokens_out(self, n: int, grid) -> int:
        return min(n, self.n)

    @classmethod
    def budget_knobs(cls, budget: Budget, n: int | None) -> dict[str, Any]:
        return {"n": budget_count("toy_first", budget, n)}


class ToyNorm(ScorePolicy):
    """Toy policy: from layer K on, keep the visual tokens whose hidden state entering K has the largest norm."""

    method = "toy_norm"
    layers_knob = "layer"
    first_layer = 1
    reference_positions = "compact"
    macs_help = "toy: layers from K see kept(n, keep) visual tokens"
    macs_knobs = {"layer": "K, the first pruned layer", "keep": "fraction kept"}

    def __init__(self, layer: int = 1, keep: Any = None, count: Any = None):
        super().__init__(layers=layer, keep=0.5 if keep is None and count is None else keep, count=count)
        self.layer = layer

    def score(self, layer_idx, state, runner):
        return state.hidden.norm(dim=-1)

    def schedule_knobs(self) -> dict[str, Any]:
        return {"layer": self.layer, "keep": self.keep[0]}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        return {"count": budget.tokens} if budget.tokens is not None else {"keep": budget.fraction}

    @staticmethod
    def macs_schedule(num_layers: int, visual: int, text: int, layer: Any = 1, keep: Any = 0.5) -> Schedule:
        k = parse_layers("toy_norm", "layer", layer, 1, num_layers - 1)[0]
        f = parse_fraction("toy_norm", "keep", keep)
        return made("toy_norm", [visual] * k + [kept(visual, f)] * (num_layers - k), visual, text, layer=k, keep=f)


@pytest.fixture(scope="module")
def toys():
    """The toy methods registered, one line each (a method file would put these lines on its classes as
    decorators); unregistered afterwards so no other test sees them."""
    register("toy_first")(ToyFirst)
    POLICIES.register("toy_norm")(ToyNorm)
    yield
    TOKEN_OPS.unregister("toy_first")
    POLICIES.unregister("toy_norm")


@pytest.fixture(scope="module")
def llava(tmp_path_factory, toys):
    """A tiny random LLaVA (36 image tokens, 4 decoder layers) saved with its processor."""
    from compactvl.testing import tiny_llava, tiny_llava_processor

    path = tmp_path_factory.mktemp("toy") / "llava"
    torch.manual_seed(0)
    tiny_llava().save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llava_processor().save_pretrained(path)
    return path


def test_a_toy_policy_works_in_macs_with_no_other_edit(toys, capsys):
    assert main(["macs", "--llm", "smollm2-135m", "--visual", "64", "--text", "8", "--method", "toy_norm",
                 "--layer", "3", "--keep", "0.25", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    expected = llm_macs("smollm2-135m", schedule_for("toy_norm", 30, 64, 8, layer=3, keep=0.25))
    assert rep["method"] == "toy_norm" and rep["llm_macs"] == expected.llm_macs
    assert [r["visual"] for r in rep["schedule"]] == [64] * 3 + [16] * 27


def test_a_toy_op_and_policy_work_in_compress(llava):
    from transformers import LlavaForConditionalGeneration

    from test_adapters import make_inputs

    model = LlavaForConditionalGeneration.from_pretrained(llava).eval()
    batch, singles, counts = make_inputs(model, "llava")
    vlm = compress(model, "toy_first", tokens=5)  # the budget reaches the op through its budget_knobs
    assert vlm.prepare(batch).lm.visual_counts.tolist() == [5, 5] and vlm.budget(36, (6, 6)) == 5
    assert compress(model, "toy_first", keep=0.25).budget(36, (6, 6)) == kept(36, 0.25)
    pol = compress(model, "toy_norm", layer=2, keep=0.5)
    assert pol.positions == "compact"  # the method's reference position policy is the default
    out, p = pol.prefill(singles[0])
    text = int(singles[0]["attention_mask"].sum()) - counts[0]
    assert out.cache.lengths() == pol.schedule(counts[0], text, grid=(6, 6)).tokens == [43, 43, 25, 25]
    assert compress(model, "toy_norm", layer=2, tokens=7).policies[0].count == [7]


def test_a_toy_op_and_policy_work_in_eval_and_bench(llava, tmp_path, capsys):
    for method, knob in (("toy_first", "tokens=5"), ("toy_norm", "keep=0.5")):
        out = tmp_path / method
        assert main(["eval", str(llava), "--set", "synthvqa", "--n", "2", "--batch-size", "2", "--max-new-tokens", "2",
                     "--method", method, "--knob", knob, "--out", str(out), "--no-progress"]) == 0
        assert json.loads((out / "metrics.json").read_text())["n"] == 2
    out = tmp_path / "bench"
    assert main(["bench", "--vlm", str(llava), "--visual", "12", "--text", "6", "--prefix", "2", "--batch", "2",
                 "--method", "vanilla", "--method", "toy_norm:layer=1,keep=0.25", "--repeats", "1",
                 "--decode-tokens", "1", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    toy = rows["toy_norm:layer=1,keep=0.25"]
    assert toy["schedule"]["matches"] is True and toy["schedule"]["counted_visual"] == [12, 3, 3, 3]
    assert toy["macs"]["ratio"] < 1
