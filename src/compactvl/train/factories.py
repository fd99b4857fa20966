"""Builders that turn a resolved recipe (``compactvl.config``) into the parts training needs: the model
(``cfg["model"]``) and the datasets (``cfg["data"]``)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

from torch.utils.data import ConcatDataset, Dataset

from ..data import Validator, get_dataset
from ..errors import ConfigError
from ..model import CompactVLM


def build_model(cfg: dict) -> CompactVLM:
    """A CompactVLM from ``cfg["model"]`` (``model.init``: load a saved one instead of building from parts)."""
    m, t = cfg["model"], cfg["train"]
    if m.get("init"):
        return CompactVLM.from_pretrained(m["init"], train_encoders=bool(t["train_encoders"]))
    return CompactVLM.from_recipe(m, seed=t["seed"], train_encoders=bool(t["train_encoders"]))


def visual_tokens_per_image(model: CompactVLM) -> int:
    """The visual tokens one image puts into the LM, as the model's token ops predict for each encoder's grid;
    0 when they depend on the image (a lower bound: the length check then counts the text only)."""
    grids = [enc.grid_for(layer) for enc, layer in zip(model.encoders, model.layers)]
    n = model.token_ops.expected_tokens([h * w for h, w in grids], grids)
    return int(n) if n is not None else 0


def data_validator(model: CompactVLM) -> Validator:
    """``validator(turns, n_images)`` for ``LlavaDataset``: prepares a record's text as training will (the model's
    processor and chat template) and checks it fits the LM's context with its visual tokens, raising InputError
    where training would fail (see ``Processor.check_conversation``)."""
    return functools.partial(model.processor.check_conversation,
                             max_length=getattr(model.runner, "max_positions", None),
                             visual_tokens_per_image=visual_tokens_per_image(model))


def build_dataset(spec: dict, model: CompactVLM | None = None) -> Dataset:
    """One dataset from a resolved ``data.train`` / ``data.eval`` entry. With ``model``, a LLaVA file's records
    are also validated as that model will prepare them (tokenisation, context length: :func:`data_validator`)."""
    return get_dataset(spec["name"], spec["split"], n=spec["n"], seed=spec["seed"], image_folder=spec["image_folder"],
                       skip_malformed=spec["skip_malformed"], difficulty=spec["difficulty"],
                       categories=spec["categories"], distractors=spec["distractors"], task=spec.get("task"),
                       validator=data_validator(model) if model is not None else None)


def build_train_data(specs: Sequence[dict], model: CompactVLM | None = None) -> Dataset:
    """One dataset from the ``data.train`` entries (concatenated in order); ``model``: as in :func:`build_dataset`
    (pass it, so a record training would fail on is an error — or skipped with skip_malformed — before step 0)."""
    if not specs:
        raise ConfigError("data.train is empty; name at least one training set (e.g. synthvqa)")
    sets = [build_dataset(s, model) for s in specs]
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def skipped_records(data: Dataset) -> int:
    """Malformed records skipped while loading (LLaVA files with skip_malformed)."""
    parts = data.datasets if isinstance(data, ConcatDataset) else [data]
    return sum(len(getattr(d, "skipped", [])) for d in parts)
