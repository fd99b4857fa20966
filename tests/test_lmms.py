"""``lmms-eval --model compactvl`` end to end: lmms-eval's own CLI (subprocess, offline) on the task folder
``compactvl data export --format lmms`` writes, with a tiny random saved CompactVLM at batch 3. Its per-item answers
and score equal the ``compactvl eval`` command's on the same items; the log-likelihoods equal the sum of the answer
tokens' log-softmax computed here through the model; multi-round answers are the conversation's. With VisionZip (the
model class in-process, as lmms-eval builds it) batch 3 equals batch 1 equals compactvl's evaluate; bad model args
are clear errors (docs/lmms-eval.md)."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("lmms-eval is not installed in this environment; run ./run setup (docs/lmms-eval.md)",
                    pytrace=False)
    pytest.skip("lmms-eval is not installed (docs/lmms-eval.md lists what to install)", allow_module_level=True)

import torch  # noqa: E402

from compactvl.cli import main as compactvl_main  # noqa: E402
from compactvl.compression import op_spec  # noqa: E402
from compactvl.data import SynthVQA, exact_match  # noqa: E402
from compactvl.errors import ConfigError  # noqa: E402
from compactvl.evaluate import evaluate  # noqa: E402
from compactvl.lmms import taskfns  # noqa: E402
from compactvl.lmms.loading import load, parse_int  # noqa: E402
from compactvl.model import CompactVLM  # noqa: E402

N = 5
DATA = dict(split="test", size=N, seed=0, distractors=0)
VZ = {"tokens": 4}  # VisionZip keeps 4 of the tiny encoder's 16 patches


@pytest.fixture(scope="module")
def model(saved):
    return CompactVLM.from_pretrained(saved).eval()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms") / "tasks"
    assert compactvl_main(["data", "export", "--set", "synthvqa", "--split", "test", "--n", str(N), "--distractors",
                           "0", "--format", "lmms", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run(saved, tasks, tmp_path_factory):
    """lmms-eval's CLI on the three exported tasks, the model as saved, batch 3."""
    out = tmp_path_factory.mktemp("lmms-out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "LMMS_EVAL_DATASETS_CACHE": str(out / "hf-cache")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "compactvl", "--model_args", f"pretrained={saved},batch_size=3",
           "--tasks", "compactvl_synthvqa,compactvl_synthvqa_loglik,compactvl_synthvqa_multiround",
           "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, f"lmms-eval failed:\n{p.stdout[-4000:]}"
    return out


def _samples(folder, task: str) -> list[dict]:
    (path,) = glob.glob(str(folder / "*" / f"*_samples_{task}.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    return sorted(rows, key=lambda r: r["doc_id"])


def _results(folder) -> dict:
    (path,) = glob.glob(str(folder / "*" / "*_results.json"))
    return json.load(open(path))


def test_generate_until_equals_compactvl_eval(run, saved, tmp_path):
    """As saved, batch 3: the same answers and accuracy as the `compactvl eval` command on the same items."""
    assert compactvl_main(["eval", str(saved), "--set", "synthvqa", "--n", str(N), "--distractors", "0",
                           "--batch-size", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    (pred_file,) = glob.glob(str(tmp_path / "**" / "predictions.jsonl"), recursive=True)
    ours = [json.loads(line) for line in open(pred_file)]
    folder = run
    theirs = _samples(folder, "compactvl_synthvqa")
    assert [r["filtered_resps"] for r in theirs] == [r["prediction"] for r in ours]
    assert [r["exact_match"] for r in theirs] == [float(r["correct"]) for r in ours]
    acc = sum(r["correct"] for r in ours) / len(ours)
    assert _results(folder)["results"]["compactvl_synthvqa"]["exact_match,none"] == pytest.approx(acc)


def _requests(docs: list[dict], task: str = "t") -> list:
    from lmms_eval.api.instance import Instance  # lazy: lmms_eval, which this module checked for

    gen = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": []}
    return [Instance("generate_until", (taskfns.doc_to_text(d), dict(gen), taskfns.doc_to_visual, i, task, "test"),
                     idx=0, metadata={"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def test_method_batch3_equals_batch1_and_compactvl_evaluate(saved, model):
    """The plugin with method=visionzip,tokens=4 (as lmms-eval builds it from --model_args): batch 3 gives batch 1's
    answers, which are compactvl's evaluate (what `compactvl eval --eval.variants` runs) under the same token op
    appended to the recipe; and VisionZip changes answers here."""
    from compactvl.lmms.model import CompactVL  # lazy: imports lmms_eval, which this module checked for

    ds = SynthVQA(**DATA)
    docs = [{"question": s.question, "answer": s.answer, "image": s.images[0]} for s in ds]
    answers = {}
    for bs in (1, 3):
        m = CompactVL.create_from_arg_string(f"pretrained={saved},method=visionzip,tokens={VZ['tokens']},"
                                             f"batch_size={bs}")
        m.task_dict = {"t": {"test": docs}}
        answers[bs] = [r.text for r in m.generate_until(_requests(docs))]
    spec = {"token_ops": [*model.config.token_ops, op_spec("visionzip", VZ, 16)]}
    with model.variant(**spec):
        res = evaluate(model, ds, batch_size=1, max_new_tokens=8)
    assert answers[3] == answers[1] == [p["prediction"] for p in res.predictions]
    plain = [p["prediction"] for p in evaluate(model, ds, batch_size=1, max_new_tokens=8).predictions]
    assert answers[1] != plain


def test_timing_reaches_lmms_eval_summary(run):
    thr = _results(run)["throughput"]
    assert thr["total_gen_tokens"] > 0 and thr["total_elapsed_time"] > 0
    assert {"avg_ttft", "avg_prepare_s", "avg_lm_s"} <= set(thr)
    assert 0 < thr["avg_ttft"] <= thr["total_elapsed_time"]


@torch.no_grad()
def test_loglikelihood_equals_sum_of_token_log_softmax(run, model):
    """Independently: the prompt's embeddings from prepare, the answer's tokens (the fallback chat template renders
    the assistant turn as ' ANSWER</s>'), one prefill, log-softmax at the positions before each answer token."""
    rows = _samples(run, "compactvl_synthvqa_loglik")  # batch 3 against one prompt at a time here
    ds = SynthVQA(**DATA)
    for r in rows:
        s = ds[r["doc_id"]]
        inp = model.prepare([[(f"<image>\n{s.question}", None)]], [s.images])
        ids = model.tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]
        emb = torch.cat([inp.inputs_embeds, model.runner.embed(torch.tensor([ids]))], dim=1)
        L = inp.inputs_embeds.shape[1]
        mask = torch.ones(emb.shape[:2], dtype=torch.bool)
        vis = torch.cat([inp.visual_mask, torch.zeros(1, len(ids), dtype=torch.bool)], dim=1)
        logits = model.runner.logits(model.runner.prefill(emb, mask, vis, use_cache=False).hidden)[0].float()
        lp = torch.log_softmax(logits[L - 1:L - 1 + len(ids)], -1)
        want = float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum())
        greedy = bool((lp.argmax(-1) == torch.tensor(ids)).all())
        assert r["perplexity"] == pytest.approx(want, abs=1e-3), s.id
        assert r["acc"] == float(greedy)


def test_loglikelihood_of_a_transformers_vlm_is_compressed_vlm_loglikelihood(tmp_path):
    """A transformers VLM (a tiny LLaVA with its processor, VisionZip to 8 tokens) at batch 2 over 3 requests: the
    pairs CompressedVLM.loglikelihood gives each question and answer alone (tests/test_adapters.py checks that one
    against transformers' own forward), with the images first as in generate_until."""
    from lmms_eval.api.instance import Instance  # lazy: lmms_eval, which this module checked for

    from compactvl.compression import load_compressed
    from compactvl.lmms.model import CompactVL
    from compactvl.testing import tiny_llava, tiny_llava_processor

    torch.manual_seed(0)
    tiny_llava().save_pretrained(tmp_path)
    tiny_llava_processor().save_pretrained(tmp_path)
    docs = [{"question": s.question, "answer": s.answer, "image": s.images[0]} for s in list(SynthVQA(**DATA))[:3]]
    m = CompactVL.create_from_arg_string(f"pretrained={tmp_path},method=visionzip,tokens=8,batch_size=2")
    m.task_dict = {"t": {"test": docs}}
    reqs = [Instance("loglikelihood", (taskfns.doc_to_text(d), taskfns.doc_to_target, taskfns.doc_to_visual, i, "t",
                                       "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs)]
    got = m.loglikelihood(reqs)
    vlm = load_compressed(str(tmp_path), "visionzip", tokens=8)
    want = [vlm.loglikelihood([taskfns.doc_to_text(d)], [d["image"]], [d["answer"]])[0] for d in docs]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in want] and all(lp < 0 for lp, _ in got)


def test_multi_round_is_the_conversation(run, model):
    plain = run
    rounds = _samples(plain, "compactvl_synthvqa_multiround")
    single = _samples(plain, "compactvl_synthvqa")
    ds = SynthVQA(**DATA)
    for r, one in zip(rounds, single):
        first, second = r["filtered_resps"]
        assert first == one["filtered_resps"]  # round 1 is the plain question
        s = ds[r["doc_id"]]
        conv = [(f"<image>\n{s.question}", first), (taskfns.FOLLOW_UP, None)]
        assert second == model.generate([conv], [s.images], max_new_tokens=8)[0]
        assert r["exact_match"] == float(exact_match(second, s.answer))


@pytest.mark.parametrize("pred,gold", [("Two.", "2"), ("the Red!", "red"), ("1,000", "1000"), ("blue", "red"),
                                       ("  Left ", "left"), ("none", "0")])
def test_task_scoring_is_compactvl_exact_match(pred, gold):
    assert taskfns.process_results({"answer": gold}, [pred])["exact_match"] == float(exact_match(pred, gold))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="nope"), "visionzip"),  # names the supported methods
    (dict(method="visionzip", knobs={"keep": 64}), "tokens=64"),
    (dict(method=None, knobs={"keep": 0.5}), "add method=NAME"),
    (dict(method="fastv", knobs={"layer": 99, "keep": 0.5}), "method=fastv"),
    (dict(dtype="fp8"), "float32, bfloat16, auto"),
])
def test_bad_model_args_name_the_fix(saved, kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load(str(saved), **kwargs)


def test_bad_settings_and_missing_pretrained():
    with pytest.raises(ConfigError, match="pretrained is missing"):
        load(None)
    with pytest.raises(ConfigError, match="batch_size='auto'"):
        parse_int("batch_size", "auto")
    assert parse_int("batch_size", "4") == 4


def test_model_args_through_lmms_eval_parsing(saved):
    """The class as lmms-eval builds it: a model-arg batch_size wins over the CLI's default; a bad method is the
    loader's clear error."""
    from compactvl.lmms.model import CompactVL  # lazy: imports lmms_eval, which this module checked for

    m = CompactVL.create_from_arg_string(f"pretrained={saved},batch_size=3,max_new_tokens=4",
                                         {"batch_size": 1, "device": None})
    assert (m.batch_size, m.max_new_tokens) == (3, 4)
    with pytest.raises(ConfigError, match="not a compression method"):
        CompactVL.create_from_arg_string(f"pretrained={saved},method=nope")
