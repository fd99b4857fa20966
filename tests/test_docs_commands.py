"""Every command in a fenced block of README.md and docs/*.md works as written, so a doc that drifts fails CI.

Each ``compactvl ...`` line is parsed by the real CLI parser, its ``--section.key VALUE`` overrides are applied to
its recipe, and most are then RUN in-process on tiny parts: ``runs/demo`` becomes a ``compactvl demo --quick``
run, ``--out`` a temporary folder, sample counts 4, and ``bench`` gets a tiny random LM, 8 visual tokens, one
repeat. Commands that would take minutes on real parts (the demo, training a real recipe, chat with the real
SmolLM2) are parsed and validated but not run: :data:`PARSE_ONLY` says why for each. Other lines (``./run``,
``torchrun``, ``python`` scripts) are listed in :data:`OTHER` with where they are covered.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from compactvl.cli import build_parser, command_in, main
from compactvl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_WORDS = ("compactvl ", "./run", ".venv/bin/", "python ", "pip ", "accelerate ", "torchrun ", "d=$(")

# command prefix -> why it is parsed and validated but not run here
PARSE_ONLY = {
    "compactvl demo --compare": "trains and evaluates several real recipes (an hour and more on 2 CPU cores)",
    "compactvl demo --out": "the full demo on real parts (about 33 minutes); `compactvl demo --quick` runs below",
    "compactvl train ": "trains a real recipe (minutes); tests/test_eval.py runs `compactvl train` on tiny parts",
    "compactvl chat --image": "loads the real SmolLM2 + DINOv2 (tests/test_sources.py loads them; test_cli chat)",
    "compactvl bench --vlm path/to": "needs a transformers VLM on disk; tests/test_adapters.py runs --vlm on tiny ones",
    "compactvl eval path/to": "needs a transformers VLM on disk; tests/test_adapters.py runs eval on tiny ones",
    "compactvl serve ": "starts a server that runs until stopped; tests/test_serve.py serves a tiny model in-process",
    "compactvl ui ": "starts a web page that runs until stopped; tests/test_ui_browser.py drives one in Chromium",
}
# first word(s) -> where the line is covered instead (it is not a compactvl command)
OTHER = {
    "./run": "the set-up and test targets: .ci/run calls ./run test; tests/test_install.py checks ./run's logic",
    "accelerate launch": "multi-process training: tests/test_train.py runs the 2-process gloo path",
    "torchrun": "multi-process training: tests/test_train.py runs the 2-process gloo path",
    "python benchmarks/": "benchmark scripts: run by hand, their figures are in docs/benchmarks.md",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/python -c": "a Python snippet shown in docs/data.md",
}


def _blocks(text: str):
    for m in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        yield m.group(1)


def doc_commands() -> list[tuple[str, str]]:
    """(where, command line) for every shell line of every fenced block: continuations joined, comments and
    ``$ `` prompts dropped, ``NAME="..."`` assignments of the block expanded."""
    out = []
    for doc in DOCS:
        for block in _blocks(doc.read_text()):
            env: dict[str, str] = {}
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                assign = re.fullmatch(r"([A-Z_]+)=\"(.*)\"", line)
                if assign:
                    env[assign.group(1)] = assign.group(2)
                    continue
                line = re.sub(r"\s+#\s.*$", "", line)
                line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)  # OMP_NUM_THREADS=1 compactvl ...
                for k, v in env.items():
                    line = line.replace(f"${k}", v)
                if line.startswith(SHELL_WORDS):
                    out.append((f"{doc.relative_to(ROOT)}", line))
    return out


def is_synopsis(line: str) -> bool:
    """A usage synopsis (``--llm NAME|PATH [--json]``), not a command to run."""
    return bool(re.search(r"\[--|\b[A-Z]{2,}\|[A-Z]|\.\.\.|\bDIR\b|\|easyvqa", line))


COMMANDS = doc_commands()


def test_the_docs_have_commands_and_every_one_is_classified():
    assert len(COMMANDS) > 40
    for where, line in COMMANDS:
        if line.startswith("compactvl "):
            continue
        assert any(line.startswith(k) for k in OTHER), f"{where}: no test covers `{line}`; add it to OTHER or run it"


def _parse(argv: list[str]):
    parser = build_parser(command_in(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "overrides_allowed", False):
        raise AssertionError(f"unknown arguments {extra}")
    return args, extra


@pytest.mark.parametrize("where, line", [c for c in COMMANDS if c[1].startswith("compactvl ")],
                         ids=[f"{w}:{line[:60]}" for w, line in COMMANDS if line.startswith("compactvl ")])
def test_every_compactvl_command_in_the_docs_parses_and_its_overrides_apply(where, line):
    if is_synopsis(line):
        pytest.skip("a usage synopsis (placeholders), not a command")
    argv = shlex.split(line)[1:]
    args, extra = _parse(argv)
    if args.command in ("train", "demo", "eval") and extra:
        recipe = getattr(args, "recipe", None) or "demo"
        if args.command == "train" and not Path(recipe).is_absolute() and (ROOT / recipe).is_file():
            recipe = str(ROOT / recipe)
        load_config(recipe, extra)  # every --section.key VALUE names a real key with a valid value


# ----------------------------------------------------------------------------------------------- run on tiny parts
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A `compactvl demo --quick` run (tiny random parts) standing in for runs/demo, and a tiny LM config."""
    from compactvl.testing import tiny_lm_config

    root = tmp_path_factory.mktemp("docs")
    assert main(["demo", "--quick", "--out", str(root / "demo"), "--no-progress"]) == 0
    lm = root / "tiny-lm.json"
    lm.write_text(json.dumps(tiny_lm_config("qwen3", max_position_embeddings=256).to_dict()))
    return root


def _tiny_argv(argv: list[str], tiny: Path, out: Path) -> list[str]:
    """The command on tiny parts: runs/demo and the reference model -> the quick demo run (the reference model itself
    is rebuilt and checked in tests/test_reference.py), --out -> a temp folder, counts -> 4, bench on a tiny LM with
    8 visual tokens and one repeat."""
    demo = tiny / "demo"
    subs = {"runs/demo/model": str(demo / "train" / "model"), "runs/demo": str(demo)}
    out_argv, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--out",) and i + 1 < len(argv):
            out_argv += [a, str(out)]
            i += 2
            continue
        if a in ("--n", "--batch-size") and i + 1 < len(argv):
            out_argv += [a, "4"]
            i += 2
            continue
        if argv[0] == "bench" and a in ("--llm", "--visual", "--batch", "--repeats") and i + 1 < len(argv):
            out_argv += [a, {"--llm": str(tiny / "tiny-lm.json"), "--visual": "8", "--batch": "1", "--repeats": "1"}[a]]
            i += 2
            continue
        if a == "reference" and i > 0 and argv[i - 1] != "--set":  # the committed model: tests/test_reference.py
            a = "runs/demo"
        out_argv.append(subs.get(a, a))
        i += 1
    if argv[0] == "study" and (len(argv) == 1 or argv[1].startswith("-")):  # its default model, the reference
        out_argv.insert(1, str(demo))
    if argv[0] == "bench":
        for flag, value in (("--repeats", "1"), ("--decode-tokens", "1"), ("--text", "6"), ("--prefix", "2"),
                            ("--out", str(out))):
            if flag not in out_argv:
                out_argv += [flag, value]
            else:
                out_argv[out_argv.index(flag) + 1] = value
        out_argv.append("--no-progress")
    if argv[0] == "data" and argv[1] == "export" and "--n" not in out_argv and "synthvqa" in out_argv:
        out_argv += ["--n", "4"]
    if argv[0] == "eval":
        out_argv += ["--eval.max_new_tokens", "2", "--no-progress"]
    return out_argv


def _runnable():
    for where, line in COMMANDS:
        if not line.startswith("compactvl ") or is_synopsis(line) or any(line.startswith(k) for k in PARSE_ONLY):
            continue
        yield where, line


@pytest.mark.parametrize("where, line", list(_runnable()), ids=[f"{w}:{line[:60]}" for w, line in _runnable()])
def test_every_runnable_command_in_the_docs_runs_on_tiny_parts(where, line, tiny, tmp_path, capsys, monkeypatch):
    argv = _tiny_argv(shlex.split(line)[1:], tiny, tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) land here, not in the checkout
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, f"{where}: `{line}` -> {argv}\n{captured.err[-2000:]}"
