"""Where and in what precision a model runs: the default device of this process and the autocast dtype a
``precision`` setting (fp32 / bf16 / auto) resolves to. Shared by training, evaluation and the demo."""
from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA device ``LOCAL_RANK`` (one per process under torchrun / accelerate launch) when CUDA is available, else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). ``auto``: bf16 on CUDA with bf16 support, and on CPUs with AMX-BF16 tiles
    (where bf16 matmuls run several times faster than fp32); fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.bfloat16 if device.type == "cpu" and amx() else None
