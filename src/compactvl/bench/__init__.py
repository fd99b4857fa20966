"""``compactvl bench``: measured speed and memory of an LM prefill and decode under token-reduction methods (an
application: it builds on ``compactvl.measure`` for the analytic MACs and the counted token schedules).

What is measured, for each method × visual-token count × batch size (definitions also in docs/benchmarks.md and in
every report's ``definitions``):

* **prefill_ms** (time to first token): ``Runner.prefill`` over the whole prompt with the KV cache on, plus the LM head
  on the last position and the argmax that picks the first token. Inputs are ready-made embeddings (the vision side is
  not timed), so this is the LM side of the time to first token. Median (and quartiles) of ``repeats`` timed runs
  after ``warmup`` untimed ones; ``time.perf_counter`` around each run, with ``torch.cuda.synchronize`` before and
  after it on CUDA. The methods of one (visual, batch) group are interleaved (repeat r of every method, then repeat
  r + 1), so that load from other processes on a shared machine falls on all of them alike.
* **decode_ms_per_token**: median over every decode step of every repeat (``decode_tokens`` steps after each timed
  prefill, each ``Runner.extend`` by one token + LM head + argmax, same synchronisation). Pruned methods decode over
  a shorter cache.
* **throughput**: ``batch / prefill_s`` samples per second (prefill throughput) and ``batch / decode_step_s`` tokens per
  second (decode throughput).
* **memory** (the largest peak over the timed runs; each run: reset, prefill + decode, read): on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the process's peak resident set
  (Linux ``VmHWM``), reset by writing 5 to ``/proc/self/clear_refs``. CPU RSS includes the weights, the inputs of the
  interleaved methods and whatever the allocator kept from earlier runs, so without ``isolate`` it depends on what
  ran before; ``isolate=True`` runs each cell alone in a fresh process (no interleaving) so that it does not. Where
  the reset is impossible the report says ``ru_maxrss`` (a process high-water mark that cannot go down).
* **macs**: the analytic LLM MACs (``measure.macs.llm_macs``) of the method's schedule and the ratio to vanilla's;
  ``ideal_speedup`` = 1 / ratio, ``speedup`` = vanilla prefill median / this prefill median (same visual count and
  batch: a ratio of medians), ``efficiency`` = speedup / ideal_speedup (1.0: time fell exactly as MACs did).
* **schedule check**: one warm-up run carries a :class:`~compactvl.measure.counted.CountingPolicy`; the tokens that
  really entered each layer (per sample) must equal the analytic schedule (``schedule.matches``).
* **score_ms**: time the in-LLM pruning policies spent scoring and selecting (``ScorePolicy.score_seconds``), and its
  share of the prefill. On CUDA it is host time (not synchronised), an underestimate.
* **op_ms** (``--op``, :mod:`~compactvl.bench.op_timing`): the forward of a pre-LLM token op (the time it spends
  choosing tokens) on synthetic inputs of the same visual count and batch, and its ``share`` of the vanilla
  prefill median; rows above ``op_limit`` percent are flagged (``over_limit``).

Modules, one job each: ``methods`` (the method grammar, :func:`parse_method`), ``model`` (the LM and its synthetic
inputs), ``memory`` (:class:`MemoryProbe`), ``measurement`` (one cell: warm-up, timed runs, result row),
``op_timing`` (token-op cells: grammar, synthetic inputs, share of the prefill), ``isolation`` / ``worker`` (a cell
in a fresh process), ``sweep`` (:func:`run_bench`), ``schema`` (the report's
definitions and JSON Schema), ``pareto`` (accuracy beside MACs) and ``report`` (Markdown, files). Plots:
:mod:`compactvl.plots`.
"""
from .measurement import BenchSettings, Measurement, run_one, stats
from .memory import MemoryProbe
from .methods import MethodSpec, known_methods, parse_method
from .model import DTYPES, BenchModel, load_bench_model, make_inputs, resolve_device, resolve_dtype
from .op_timing import OpMeasurement, OpSpec, add_op_shares, known_ops, parse_op, synthetic_op_inputs
from .pareto import accuracy_points, load_accuracy, pareto_front
from .report import markdown, write_outputs
from .schema import DEFINITIONS, SCHEMA_ID, load_schema, validate_report
from .sweep import add_speedups, environment, run_bench

__all__ = [
    "BenchSettings", "Measurement", "run_one", "stats", "MemoryProbe", "MethodSpec", "known_methods", "parse_method",
    "OpMeasurement", "OpSpec", "add_op_shares", "known_ops", "parse_op", "synthetic_op_inputs",
    "DTYPES", "BenchModel", "load_bench_model", "make_inputs", "resolve_device", "resolve_dtype", "accuracy_points",
    "load_accuracy", "pareto_front", "markdown", "write_outputs", "DEFINITIONS", "SCHEMA_ID", "load_schema",
    "validate_report", "add_speedups", "environment", "run_bench",
]
