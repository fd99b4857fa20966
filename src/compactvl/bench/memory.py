"""Peak memory over a region (``compactvl bench``): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the process's peak resident set (Linux ``VmHWM``), reset by writing 5 to
``/proc/self/clear_refs``. Where that reset is impossible the probe says ``ru_maxrss`` (a process high-water mark
that cannot go down)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory over a region: CUDA allocator peak, or CPU peak RSS (see the module docstring)."""

    def __init__(self, device: torch.device, isolated: bool = False):
        self.device, self.isolated = device, isolated

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "vmhwm_reset" + ("_fresh_process" if self.isolated else "")
        except OSError:
            self.method = "ru_maxrss" + ("_fresh_process" if self.isolated else "_process_highwater")

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("vmhwm"):
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            import resource  # Unix-only; needed only where /proc/self/clear_refs is missing

            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = r if sys.platform == "darwin" else r * 1024
        mb = 1024 * 1024
        return dict(peak_mb=peak / mb, base_mb=self.base / mb, delta_mb=max(0, peak - self.base) / mb,
                    method=self.method)
