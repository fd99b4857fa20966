"""Export a compactvl dataset as an lmms-eval task folder: ``compactvl data export --format lmms``.

    DIR/synthvqa_test.parquet                 id, question, answer, category, image (PNG bytes; HF ``datasets``)
    DIR/compactvl_synthvqa.yaml               generate_until, exact match (include: the packaged vqa_generate.yaml)
    DIR/compactvl_synthvqa_loglik.yaml        loglikelihood of the answer
    DIR/compactvl_synthvqa_multiround.yaml    two rounds (the question, then a follow-up)

``lmms-eval --include_path DIR --tasks compactvl_synthvqa`` runs it. The images are stored losslessly (PNG), so a
model sees the pixels ``compactvl eval`` gives it. The YAMLs include the task bodies shipped in
``compactvl/lmms/tasks/`` by absolute path: export again after moving the environment.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from tqdm import tqdm

from ..data import IMAGE_PLACEHOLDER, split_turns
from ..errors import ConfigError, InputError

TASKS = Path(__file__).with_name("tasks")
KINDS = {"": "vqa_generate.yaml", "_loglik": "vqa_loglik.yaml", "_multiround": "vqa_multiround.yaml"}


@dataclass
class Exported:
    data: Path
    tasks: list[str]  # the task names lmms-eval's --tasks takes
    yamls: list[Path]
    records: int


def _record(sample) -> dict:
    turns = split_turns(sample.conversations)
    if len(turns) != 1 or sample.answer is None:
        raise InputError(f"sample {sample.id}: an lmms-eval VQA task takes one question and its answer; this sample "
                         f"has {len(turns)} turn(s){'' if sample.answer is not None else ' and no answer'}")
    images = sample.load_images()
    if len(images) != 1:
        raise InputError(f"sample {sample.id} has {len(images)} images; the exported task takes one per question")
    question = turns[0][0]
    lead = IMAGE_PLACEHOLDER + "\n"
    question = question[len(lead):] if question.startswith(lead) else question  # the model puts the image first
    buf = io.BytesIO()
    images[0].convert("RGB").save(buf, format="PNG")
    return {"id": sample.id, "question": question, "answer": sample.answer, "category": sample.category or "",
            "image": {"bytes": buf.getvalue(), "path": None}}


def export_task(dataset: Dataset, out: str | os.PathLike, name: str, task: str | None = None,
                progress: bool = False) -> Exported:
    """Write ``dataset`` (compactvl Samples) to ``out/NAME.parquet`` and the task YAMLs ``TASK``, ``TASK_loglik``,
    ``TASK_multiround`` (default TASK: ``compactvl_`` + the part of NAME before ``_``)."""
    try:
        import datasets  # optional: lmms-eval's own dependency, needed only to write (and read) the task data
    except ImportError:
        raise ConfigError("--format lmms writes the data with Hugging Face datasets; install lmms-eval (see "
                          "docs/lmms-eval.md) or `pip install datasets`") from None
    task = task or "compactvl_" + name.split("_")[0]
    if not task.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"task name {task!r}: use letters, digits, '_' and '-' only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_record(dataset[i]) for i in tqdm(range(len(dataset)), disable=not progress, desc="export", unit="sample")]
    if not rows:
        raise InputError("the dataset is empty; nothing to export")
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "category": datasets.Value("string"),
                                  "image": datasets.Image()})
    data = out / f"{name}.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(data))
    yamls = []
    for suffix, body in KINDS.items():
        path = out / f"{task}{suffix}.yaml"
        path.write_text(f"# written by compactvl data export --format lmms; lmms-eval --include_path {out}\n"
                        f"task: {task}{suffix}\ninclude: {(TASKS / body).resolve()}\n"
                        f"dataset_kwargs:\n  data_files:\n    test: {data.name}\n")
        yamls.append(path)
    return Exported(data, [p.stem for p in yamls], yamls, len(rows))
