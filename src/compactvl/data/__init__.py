"""Datasets: LLaVA-format files, the built-in synthvqa and easy-vqa sets, and answer scoring.

Every dataset yields :class:`Sample` (id, images, LLaVA conversations, category, answer, meta);
:func:`get_dataset` picks one by name or path, :func:`write_llava` exports any of them as LLaVA JSON + PNGs.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import ConfigError
from .answers import accuracy_report, exact_match, normalize_answer, vqa_accuracy
from .easyvqa import EasyVQA
from .llava import IMAGE_PLACEHOLDER, LlavaDataset, Sample, Validator, sample_location, split_turns, write_llava
from .synthvqa import SynthVQA

BUILTIN = ("synthvqa", "easyvqa")

__all__ = ["IMAGE_PLACEHOLDER", "BUILTIN", "EasyVQA", "LlavaDataset", "Sample", "SynthVQA", "accuracy_report",
           "exact_match", "get_dataset", "normalize_answer", "question_answers", "sample_location", "split_turns",
           "Validator", "vqa_accuracy", "write_llava"]


def get_dataset(name: str | os.PathLike, split: str = "test", n: int | None = None, seed: int = 0,
                image_folder: str | os.PathLike | None = None, skip_malformed: bool = False,
                difficulty: str | Sequence[str] | None = None,
                categories: str | Sequence[str] | None = None,
                distractors: int | Sequence[int] | None = None, validator: Validator | None = None,
                task: str | None = None) -> Dataset:
    """``"synthvqa"``, ``"easyvqa"`` or the path of a LLaVA ``.json``/``.jsonl`` file (``split`` and ``seed``
    are then unused; ``n`` keeps the first n records; ``image_folder`` defaults to the file's folder).
    ``difficulty`` (synthvqa only) is one or several of small/medium/large; ``categories`` (synthvqa only) one or
    several of color/shape/count/glyph/position (default: all five, in turn); ``distractors`` (synthvqa only) the
    number of other objects per scene, ``k`` or ``[lo, hi]`` (default: each category's own range). ``validator``
    (LLaVA files only) checks each record as the model will prepare it (see :class:`LlavaDataset`). ``task``
    (synthvqa only): ``vqa`` (default) or ``describe`` (a description of every object drawn, for training)."""
    if n is not None and n < 1:
        raise ConfigError(f"n must be at least 1, got {n}; leave it out to use the whole split")
    if difficulty is not None and name != "synthvqa":
        raise ConfigError(f"difficulty levels exist only for synthvqa, not {name}; leave difficulty out")
    if categories is not None and name != "synthvqa":
        raise ConfigError(f"question categories can be chosen only for synthvqa, not {name}; leave categories out")
    if distractors is not None and name != "synthvqa":
        raise ConfigError(f"distractors can be set only for synthvqa, not {name}; leave distractors out")
    if task is not None and task != "vqa" and name != "synthvqa":
        raise ConfigError(f"task {task!r} exists only for synthvqa, not {name}; leave task out")
    if name == "synthvqa":
        kw = {"difficulty": difficulty} if difficulty else {}
        kw["distractors"], kw["task"] = distractors, task
        if categories is not None:
            kw["categories"] = (categories,) if isinstance(categories, str) else tuple(categories)
            if not kw["categories"]:
                raise ConfigError("categories is empty; name at least one of color, shape, count, glyph, position")
        return SynthVQA(split, size=n, seed=seed, **kw)
    if name == "easyvqa":
        return EasyVQA(split, n=n, seed=seed)
    path = Path(name)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        return LlavaDataset(path, image_folder, skip_malformed=skip_malformed, limit=n, validator=validator)
    hint = f" ({path} does not exist)" if path.suffix in (".json", ".jsonl") else ""
    raise ConfigError(f"unknown dataset {str(name)!r}{hint}; use {' or '.join(BUILTIN)}, or the path of a LLaVA "
                      ".json/.jsonl file")


def question_answers(dataset: Dataset) -> list[tuple[str, str | None]]:
    """(question, answer) of every sample of ``dataset`` (a ``ConcatDataset`` of them too), in order, as
    ``Sample.question`` and ``Sample.answer`` give them; the built-in question sets and LLaVA files answer without
    loading or drawing any image, any other dataset by reading its samples."""
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        return [qa for part in parts for qa in question_answers(part)]
    fast = getattr(dataset, "question_answers", None)
    return fast() if fast is not None else [(s.question, s.answer) for s in dataset]
