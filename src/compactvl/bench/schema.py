"""The ``compactvl bench`` report format: its schema id, the definitions every report carries, and validation against
``bench_schema.json`` (JSON Schema draft 2020-12, shipped beside this module)."""
from __future__ import annotations

import json
from importlib.resources import files

from ..errors import ConfigError
from ..measure.macs import DEFINITION

SCHEMA_ID = "compactvl.bench/1"
SCHEMA_FILE = "bench_schema.json"
DEFINITIONS = {
    "prefill_ms": "time to first token on the LM side: Runner.prefill (KV cache on) + LM head on the last position + "
                  "argmax, inputs given as embeddings; median and quartiles of the timed repeats after warm-up; "
                  "perf_counter, CUDA synchronised before and after each run; methods interleaved per repeat "
                  "unless isolated",
    "decode_ms_per_token": "one Runner.extend step (1 token, cache on) + LM head + argmax; median over all steps of "
                           "all repeats",
    "throughput": "prefill: batch / prefill seconds (samples/s); decode: batch / decode-step seconds (tokens/s)",
    "memory": "largest peak over the timed runs (each run: reset, run, read): CUDA max_memory_allocated after "
              "reset_peak_memory_stats; CPU peak RSS (VmHWM reset through /proc/self/clear_refs), which includes "
              "weights and allocator caches; see memory.method",
    "macs": DEFINITION,
    "speedup": "vanilla prefill median / method prefill median, same visual tokens and batch",
    "ideal_speedup": "vanilla LLM MACs / method LLM MACs = 1 / macs.ratio",
    "efficiency": "speedup / ideal_speedup (1 = time falls exactly as MACs do)",
    "score_ms": "time in-LLM policies spent scoring and selecting tokens (ScorePolicy.score_seconds), host clock",
    "op_ms": "--op: one forward of the pre-LLM token-op pipeline (TokenPipeline) on synthetic inputs (a square grid of "
             "visual tokens of width settings.op_width from a synthetic encoder output with CLS attention, keys and "
             "features, plus prompt text embeddings of the same width), on the LM's device and dtype; median and "
             "quartiles of the timed repeats after warm-up, perf_counter, CUDA synchronised; interleaved with the "
             "LM cells of the same visual count and batch",
    "op_share": "--op: op_ms median / the vanilla prefill_ms median for the same visual count and batch; over_limit: "
                "op_share > settings.op_limit percent",
}


def load_schema() -> dict:
    return json.loads(files(__package__).joinpath(SCHEMA_FILE).read_text())


def validate_report(report: dict) -> None:
    """Validate against ``bench_schema.json`` (needs ``jsonschema``); raise ConfigError listing the first errors."""
    try:
        import jsonschema  # optional: a test extra
    except ImportError:
        raise ConfigError("validating a bench report needs the jsonschema package; pip install jsonschema") from None
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        msg = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5])
        raise ConfigError(f"the bench report does not match {SCHEMA_FILE}: {msg}")
