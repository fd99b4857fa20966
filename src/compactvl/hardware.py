"""What a measurement ran on: the CPU model, core and torch-thread counts, the GPU and the load average (core: no
compactvl imports). Used by ``compactvl bench`` and ``compactvl demo`` to state the machine beside their numbers."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str | None:
    """The CPU model (``model name`` in /proc/cpuinfo, else ``platform.processor()``); None when neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (2 decimals): other work on the machine slows wall-clock figures. None
    where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (where bf16 matmuls run several times faster than fp32)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def machine() -> dict:
    """Platform, Python, torch, CPU model, logical CPUs, torch threads and the first GPU (None without CUDA)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_name() or "", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu}
