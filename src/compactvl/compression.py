"""``compactvl.compress``: training-free visual-token compression of a loaded transformers VLM (issue 8).

    from compactvl.compression import compress
    vlm = compress(model, method="visionzip", tokens=64)          # a pre-LLM token op, 64 tokens per image
    vlm = compress(model, method="fastv", layer=2, keep=0.5)      # an in-LLM LayerPolicy
    vlm = compress(model, method="hte", keep=0.5)                 # Qwen3-VL-MoE: pruning by its own router saliency
    out = vlm.generate_ids(processor(text=..., images=..., return_tensors="pt"), max_new_tokens=32)
    texts = vlm.generate(["Describe the image."], [[image]], max_new_tokens=32)    # with a processor

``compress`` wraps the model (a ``...ForConditionalGeneration`` of a supported family, see
``compactvl.adapters.supported_model_types()``); it changes nothing in the model or its classes. Calling the model
itself keeps giving the original outputs, and any number of wrappers (and untouched models) coexist in a process.

What happens per batch: the family's adapter computes the image embeddings with the model's own vision tower and
projector; a token op (``method`` a name in ``compactvl.registry.TOKEN_OPS``, or ``ops=[recipe dicts]``) reduces
each image's tokens; the prompt is rebuilt with the kept tokens in place of the image placeholders (positions: see
``compactvl.adapters.base``); compactvl's Runner runs the model's own decoder layers on a view of its language model,
with LayerPolicies (``method`` in ``POLICIES``, or ``policies=[recipe dicts]``) acting between layers; generation is
batched with a KV cache. ``method=None`` changes nothing: it reproduces the model's logits and greedy output.

The budget, one vocabulary for every method: ``keep=f`` a fraction of the visual tokens in (0, 1], ``tokens=k`` a
count (per image for token ops). Each method maps it onto its own knobs in its own file (``budget_knobs``):
``visionzip`` keeps k = ``tokens`` or ``kept(n, f)`` split 54:10 dominant:contextual; ``random`` sets ``ratio``;
``bipartite_merge`` / ``self_merge`` ``ratio = 1-f`` or ``r = n-k``; ``fastv`` / ``hte`` ``keep`` or ``count``;
``pyramiddrop`` ``ratio`` (per stage); ``sparsevlm`` ``retain`` (reference tables) or ``keep`` per stage. A method
without a budget (``prumerge`` is adaptive) says so and lists its own knobs, which stay available everywhere.
Position policy (``positions``): ``keep`` for M-RoPE models; for 1D RoPE ``compact`` with a token op, else the
policies' ``reference_positions`` (PyramidDrop / SparseVLM renumber: ``compact``; FastV's in-place reference:
``keep``). Override with ``positions="keep" | "compact"``.

``load_compressed(path_or_id, method=..., **knobs)`` loads a model (and its processor) and compresses it; the
``eval`` / ``bench`` commands call it and then ``CompressedVLM.generate(prompts, images, max_new_tokens)``;
``CompressedVLM.loglikelihood(prompts, images, answers)`` scores answers (``lmms-eval --model compactvl``).
"""
# Size: one job, the compressed-model wrapper: its token ops and policies are their own modules, the adapters hold
# each family's specifics, and its text API (generate, loglikelihood) is the part of one public type users call.
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoProcessor

from .adapters import ADAPTERS, VLMAdapter, adapter_for, supported_model_types
from .adapters.base import Assembled, Encoded, Kept, apply_ops, assemble
from .adapters.prompts import render_prompts
from .errors import CheckpointError, CompactVLWarning, ConfigError, InputError
from .images import load_image
from .losses.next_token import answer_logprobs, next_token_targets
from .ops.base import OpContext, TokenPipeline, build_ops
from .policies import build_policy
from .processor import IGNORE_INDEX, answer_span
from .registry import POLICIES, TOKEN_OPS
from .runner import GenerateOutput, LayerPolicy, RunOutput, Runner, RunState, Signals
from .runner.state import check_position_policy
from .schedules import Budget, Schedule, schedule_for
from .sources import local_or_hub

# ----------------------------------------------------------------------------------------------- method specs
def op_spec(method: str, knobs: Mapping[str, Any], n: int | None) -> dict:
    """The recipe dict of token op ``method`` with ``knobs`` for images of ``n`` tokens (None: varies inside a
    group). A budget (``keep`` fraction / ``tokens`` count) becomes the op's own knobs through its ``budget_knobs``."""
    budget, rest = Budget.pop(method, knobs)
    spec = {"op": method, **rest}
    if budget is not None:
        spec.update(TOKEN_OPS.get(method).budget_knobs(budget, n))
    return spec


def policy_spec(method: str, knobs: Mapping[str, Any]) -> dict:
    """The recipe dict of layer policy ``method`` with ``knobs``; a budget goes through the policy's
    ``budget_knobs``."""
    budget, rest = Budget.pop(method, knobs)
    spec = {"policy": method, **rest}
    if budget is not None:
        spec.update(POLICIES.get(method).budget_knobs(budget))
    return spec


# ----------------------------------------------------------------------------------------------- the wrapper
@dataclass
class Prepared:
    """A batch ready for the Runner."""

    lm: Assembled
    persistent: list[LayerPolicy]
    notes: tuple[str, ...]


class CompressedVLM:
    """A transformers VLM run by compactvl with a token op and/or LayerPolicies. Build it with :func:`compress`."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter, *, method: str | None, op_specs: list[dict] | None,
                 op_knobs: Mapping[str, Any] | None, policies: Sequence[LayerPolicy], positions: str,
                 processor: Any = None):
        self.model, self.adapter, self.method = model, adapter, method
        self.processor = processor
        self.lm = adapter.lm_view()
        self.policies = list(policies)
        self.positions = check_position_policy(positions)
        self.runner = Runner(self.lm, self.policies, position_policy=self.positions)
        self._op_specs, self._op_knobs = op_specs, op_knobs
        self._pipelines: dict[Any, TokenPipeline] = {}
        self.notes: list[str] = []
        self.last: dict[str, Any] = {}
        if self.has_ops:  # validate knobs now, not at the first batch
            self._pipeline(self._nominal())

    # ---- the nn.Module-like surface compactvl.evaluate uses (the wrapped model holds every parameter)
    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "CompressedVLM":
        self.model.train(mode)
        return self

    def eval(self) -> "CompressedVLM":
        return self.train(False)

    def parameters(self):
        return self.model.parameters()

    # ---- description
    @property
    def has_ops(self) -> bool:
        return bool(self._op_specs) or self._op_knobs is not None

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def describe(self) -> str:
        parts = [f"{self.adapter.family} ({self.adapter.config.model_type})"]
        if self.has_ops:
            parts.append("ops: " + self._pipeline(self._nominal()).describe())
        if self.policies:
            parts.append("policies: " + ", ".join(repr(p) for p in self.policies))
        parts.append(f"positions: {self.positions}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"CompressedVLM({self.describe()})"

    # ---- token ops
    def _nominal(self) -> int | None:
        return None if self.adapter.ragged else self.adapter.nominal_tokens() or 64

    def _pipeline(self, n: int | None) -> TokenPipeline:
        key = n if self._op_knobs is not None and ("keep" in self._op_knobs or "tokens" in self._op_knobs) else None
        if key not in self._pipelines:
            specs = self._op_specs if self._op_knobs is None else [op_spec(self.method, self._op_knobs, n)]
            pipe = build_ops(specs, [self.adapter.op_channels]).eval()
            if any(True for _ in pipe.parameters()):
                raise ConfigError(f"token recipe {pipe.describe()} has learned weights; compress() applies training-free "
                                  f"methods to an existing model — train such ops with compactvl's trainer instead")
            if pipe.out_channels != self.adapter.op_channels:
                raise ConfigError(f"token recipe {pipe.describe()} changes the channels ({self.adapter.op_channels} -> "
                                  f"{pipe.out_channels}) but the model's projector / LM takes {self.adapter.op_channels}"
                                  f"; use ops that keep the width (selection, merging, pooling)")
            self._pipelines[key] = pipe
        return self._pipelines[key]

    def budget(self, n: int | None = None, grid: tuple[int, int] | None = None) -> int | None:
        """Visual tokens an image of ``n`` placeholders (default: the model's fixed count) keeps before the LLM;
        None when it depends on the data (e.g. PruMerge)."""
        n = n if n is not None else self.adapter.nominal_tokens()
        if n is None:
            raise ConfigError("this model's images have no fixed token count; pass n (and grid)")
        if not self.has_ops:
            return n
        if grid is None:
            g = int(round(n ** 0.5))
            grid = (g, g) if g * g == n else (1, n)
        return self._pipeline(n).expected_tokens([n], [grid])

    def _run_group(self, group) -> Any:
        t = group.tokens
        n = None if not bool(t.mask.all()) else t.x.shape[1]
        return self._pipeline(n)(t, OpContext(encoders=[group.encoder]))

    def encode(self, inputs: Mapping[str, Any]) -> tuple[Encoded, Kept]:
        """The model's own image embeddings and the tokens kept from them."""
        if not self.adapter.image_inputs(inputs):
            empty = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
            enc = Encoded(self.lm.get_input_embeddings().weight.new_zeros(0, self.adapter.text_config.hidden_size),
                          empty)
            return enc, Kept.everything(enc)
        if not self.has_ops:
            enc = self.adapter.encode(inputs)
            return enc, Kept.everything(enc)
        depth = self.adapter.num_encoder_layers()
        tap = self.adapter.tap_layer()
        layers = self._pipeline(self._nominal()).required_layers(tap, depth)[0]
        enc = self.adapter.encode(inputs, layers=layers)
        return enc, apply_ops(enc, self._run_group)

    # ---- one batch
    def _inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if "input_ids" not in inputs:
            raise InputError("compressed models take the processor's output (input_ids, attention_mask, pixel_values, "
                             "...); call processor(text=..., images=..., return_tensors='pt') first")
        dev = self.device
        return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in dict(inputs).items()}

    @torch.no_grad()
    def prepare(self, inputs: Mapping[str, Any]) -> Prepared:
        """Encode, compress and assemble one batch (left padded) for the Runner."""
        inputs = self._inputs(inputs)
        enc, kept = self.encode(inputs)
        lm = assemble(inputs, enc, kept, self.lm.get_input_embeddings(), self.adapter.image_token_id,
                      self.adapter.positions(inputs), self.positions)
        self._note(kept.notes)
        self.last = {"visual_tokens": lm.visual_counts.tolist(), "image_tokens": lm.image_counts.tolist(),
                     "image_tokens_before": lm.full_image_counts.tolist(),
                     "prompt_tokens": lm.attention_mask.sum(-1).tolist()}
        return Prepared(lm, self.adapter.persistent_policies(lm.extras, lm.visual_mask), kept.notes)

    def _note(self, notes: Iterable[str]) -> None:
        for note in notes:
            if note not in self.notes:
                self.notes.append(note)
                warnings.warn(note, CompactVLWarning, stacklevel=3)

    @torch.no_grad()
    def prefill(self, inputs: Mapping[str, Any], use_cache: bool = True,
                answer_rows: Sequence[int] | None = None) -> tuple[RunOutput, Prepared]:
        """Run the prompt; ``out.cache.lengths()`` are the tokens each decoder layer saw. ``answer_rows[b]``: how many
        of sample b's last rows are an answer held in the same forward (scoring), which text-reading policies then do
        not read (``RunState.prompt``), as when they run on the prompt alone."""
        p = self.prepare(inputs)
        signals = None
        if answer_rows is not None:  # the assembled rows are left padded: each sample ends in the last column
            L = p.lm.attention_mask.shape[1]
            signals = Signals(prompt_end=torch.tensor([L - n for n in answer_rows], device=self.device))
        out = self.runner.prefill(p.lm.inputs_embeds, p.lm.attention_mask, p.lm.visual_mask, p.lm.position_ids,
                                  use_cache=use_cache, policies=p.persistent + self.policies, signals=signals)
        return out, p

    @torch.no_grad()
    def logits(self, inputs: Mapping[str, Any],
               answer_rows: Sequence[int] | None = None) -> tuple[Tensor, RunState, Prepared]:
        """Logits of every row that reaches the last layer (``state.orig_index`` maps rows to the assembled input);
        ``answer_rows`` as in :meth:`prefill`."""
        out, p = self.prefill(inputs, use_cache=False, answer_rows=answer_rows)
        return self.runner.logits(out.hidden), out.state, p

    @torch.no_grad()
    def generate_ids(self, inputs: Mapping[str, Any], max_new_tokens: int = 32, *,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                     use_cache: bool = True, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, generator: torch.Generator | None = None) -> GenerateOutput:
        """Generate from processor outputs. ``eos_token_id=None`` never stops early (pass the model's EOS to stop).
        ``self.last_timing``: ``prepare_s`` (vision tower, token op, prompt assembly) and ``lm_s`` (prefill and
        decoding), in seconds."""
        t0 = time.perf_counter()
        p = self.prepare(inputs)
        pad = pad_token_id if pad_token_id is not None else (self._pad_id())
        t1 = time.perf_counter()
        out = self.runner.generate(p.lm.inputs_embeds, p.lm.attention_mask, p.lm.visual_mask,
                                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad,
                                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator, use_cache=use_cache, position_ids=p.lm.position_ids,
                                    persistent=p.persistent)
        self.last_timing = {"prepare_s": t1 - t0, "lm_s": time.perf_counter() - t1}
        return out

    def _pad_id(self) -> int:
        for src in (getattr(self.model, "generation_config", None), self.adapter.text_config, self.adapter.config):
            v = getattr(src, "pad_token_id", None)
            if v is not None:
                return int(v if isinstance(v, int) else v[0])
        return 0

    def _eos_ids(self) -> list[int]:
        for src in (getattr(self.model, "generation_config", None), self.adapter.text_config):
            v = getattr(src, "eos_token_id", None)
            if v is not None:
                return [int(v)] if isinstance(v, int) else [int(x) for x in v]
        return []

    # ---- text in, text out (eval / bench)
    def generate(self, prompts: Sequence[str | Sequence[tuple[str, str | None]]] | None = None,
                 images: Sequence[Any] | None = None, *, messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
                 max_new_tokens: int = 32, raw: bool = False, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """Answers for a batch, decoded; stops at the model's EOS. Same call as ``CompactVLM.generate``, so
        ``compactvl.evaluate.predict`` runs either model.

        ``prompts``: per sample a question string or a compactvl conversation ``[(user, assistant), ...]`` whose last
        answer is None; compactvl's ``<image>`` placeholder marks where images go (none: all images first). They are
        rendered with the processor's chat template (as the model was trained) or, without one, as plain text with
        the processor's image token. ``raw=True`` passes prompt strings to the processor verbatim (they must hold the
        processor's own image tokens). ``images``: per sample a PIL image, a list of them, or None. Or ``messages``:
        chat messages in the transformers format (``{"type": "image", "image": PIL}`` entries give images too)."""
        t0 = time.perf_counter()
        proc = self._processor()
        texts, flat = render_prompts(proc, prompts, images, messages, raw)
        flat = [load_image(im) for im in flat]  # the one safe loader: limits, EXIF orientation, RGB
        kw = {"images": flat} if flat else {}
        inputs = proc(text=texts, return_tensors="pt", padding=True, **kw)
        processed = time.perf_counter() - t0
        eos = self._eos_ids()
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None and do_sample else None
        out = self.generate_ids(inputs, max_new_tokens, eos_token_id=eos or None, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        self.last_timing["prepare_s"] += processed  # the processor resized and tokenized the inputs
        self.last_first_logprobs = out.first_logprobs
        return [s.strip() for s in proc.batch_decode(out.token_lists(eos or None), skip_special_tokens=True)]

    @torch.no_grad()
    def loglikelihood(self, prompts: Sequence[str | Sequence[tuple[str, str | None]]], images: Sequence[Any] | None,
                      answers: Sequence[str]) -> list[tuple[float, bool]]:
        """Per sample: the log-probability of ``answers[i]`` as the assistant's reply to ``prompts[i]`` (same inputs as
        ``generate``) under the method, and whether greedy decoding gives exactly those tokens. Scored: the answer's
        tokens in the conversation rendered with the chat template, not the template's end of turn
        (``compactvl.processor.answer_span``: what ``compactvl.lmms`` scores for a saved CompactVLM too)."""
        proc = self._processor()
        if len(answers) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
        if any(not str(a).strip() for a in answers):
            raise InputError("loglikelihood got an empty answer; give the text to score")
        convs = [[(p, None)] if isinstance(p, str) else list(p) for p in prompts]
        texts, flat = render_prompts(proc, [c[:-1] + [(c[-1][0], a)] for c, a in zip(convs, answers)], images, None,
                                     generation_prompt=False)
        empty, _ = render_prompts(proc, [c[:-1] + [(c[-1][0], "")] for c in convs], images, None,
                                  generation_prompt=False)
        tok = getattr(proc, "tokenizer", proc)
        ids_of = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        spans = [answer_span(ids_of(t), ids_of(e)) for t, e in zip(texts, empty)]
        inputs = proc(text=texts, return_tensors="pt", padding=True,
                      **({"images": [load_image(im) for im in flat]} if flat else {}))
        logits, state, p = self.logits(inputs, answer_rows=[k + tail for k, tail in spans])
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        labels = torch.full(p.lm.attention_mask.shape, IGNORE_INDEX, dtype=torch.long)
        end = labels.shape[1]  # the assembled rows are left padded: each ends in the last column
        for b, (k, tail) in enumerate(spans):
            real = ids[b][mask[b]]  # the row's tokens, whichever side the processor padded
            labels[b, end - tail - k:end - tail] = real[len(real) - tail - k:len(real) - tail]
        return answer_logprobs(logits, next_token_targets(state.orig_index, labels.to(state.orig_index.device)))

    def _processor(self) -> Any:
        if self.processor is None:
            raise ConfigError("text generation needs the model's processor; pass processor=AutoProcessor.from_pretrained"
                              "(path) to compress(), use load_compressed(path), or call generate_ids(processor outputs)")
        return self.processor

    # ---- MACs
    def schedule(self, visual: int, text: int, images: int = 1, grid: tuple[int, int] | None = None) -> Schedule:
        """Tokens entering each decoder layer for one sample of ``visual`` image placeholders (over ``images``
        images of equal size) and ``text`` other tokens — ``measure.macs`` counting, to compare with
        ``prefill(...)[0].cache.lengths()`` and to feed ``measure.llm_macs``."""
        L = self.runner.num_layers
        per = self.budget(visual // images, grid)
        if per is None:
            raise ConfigError(f"{self._pipeline(visual // images).describe()} keeps a data-dependent number of tokens; "
                              f"measure real runs with measure.counted instead")
        v = per * images
        if not self.policies:
            return Schedule([v + text] * L, [v] * L, text, method=self.method or "vanilla", visual_input=visual)
        if len(self.policies) > 1 or not hasattr(self.policies[0], "schedule_knobs"):
            raise ConfigError("a MACs schedule is defined for one pruning policy; measure real runs with "
                              "measure.counted")
        p = self.policies[0]
        s = schedule_for(p.method, L, v, text, **p.schedule_knobs())
        return Schedule(s.tokens, s.visual, text, method=s.method, knobs=s.knobs, visual_input=visual)


# ----------------------------------------------------------------------------------------------- entry points
def _default_positions(adapter: VLMAdapter, has_ops: bool, policies: Sequence[LayerPolicy]) -> str:
    """M-RoPE models keep their 3-D positions; a token op builds the shorter sequence (``compact``); otherwise the
    policies' reference position policy (``LayerPolicy.reference_positions``: PyramidDrop and SparseVLM renumber)."""
    if adapter.mrope:
        return "keep"
    if has_ops or any(p.reference_positions == "compact" for p in policies):
        return "compact"
    return "keep"


def compress(model: nn.Module, method: str | None = None, *, ops: Sequence[Mapping[str, Any]] | None = None,
             policies: Sequence[Mapping[str, Any] | LayerPolicy] | None = None, positions: str | None = None,
             processor: Any = None, **knobs: Any) -> CompressedVLM:
    """Wrap a loaded transformers VLM with a training-free compression method (see the module docstring).

    ``method``: a token op (``TOKEN_OPS``), a layer policy (``POLICIES``), ``"hte"`` (MoE LMs: router saliency),
    or None / ``"none"`` (no compression); ``knobs`` are its knobs (plus ``keep``). ``ops`` / ``policies``: recipe
    lists (``[{"op": "visionzip", "dominant": 54}]``, ``[{"policy": "fastv", "layer": 2}]`` or policy objects) to
    compose several. ``positions``: "keep" | "compact" (default: see the module docstring)."""
    adapter = adapter_for(model)
    if method in (None, "none", "vanilla"):
        if knobs:
            raise ConfigError(f"knobs {sorted(knobs)} given without a method; name the method they belong to")
        method = None
    op_knobs = None
    pol_objs: list[LayerPolicy] = []
    for spec in policies or []:
        if isinstance(spec, LayerPolicy):
            pol_objs.append(spec)
        else:
            pol_objs.append(build_policy(spec))
    if method is not None:
        if method == "hte" or method == "hte_native":
            if not adapter.has_native_moe:
                raise ConfigError(f"method 'hte' prunes by the LM's own MoE router; {adapter.family} has a dense LM. "
                                  f"Use an MoE model (qwen3_vl_moe), or train visual experts with compactvl's trainer")
            method = "hte_native"
        if method in TOKEN_OPS:
            if ops:
                raise ConfigError(f"give the token op either as method='{method}' or in ops=[...], not both")
            op_knobs = dict(knobs)
        elif method in POLICIES:
            pol_objs.insert(0, build_policy(policy_spec(method, knobs)))
        else:
            raise ConfigError(f"unknown method '{method}'; token ops: {', '.join(TOKEN_OPS.names())}; layer policies: "
                              f"{', '.join(POLICIES.names())}" + ("; hte" if adapter.has_native_moe else ""))
    op_specs = [dict(s) for s in ops] if ops else None
    if positions is None:
        positions = _default_positions(adapter, op_specs is not None or op_knobs is not None, pol_objs)
    return CompressedVLM(model, adapter, method=method, op_specs=op_specs, op_knobs=op_knobs, policies=pol_objs,
                         positions=positions, processor=processor)


def load_compressed(path_or_id: str, method: str | None = None, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, attn_implementation: str = "sdpa",
                    load_processor: bool = True, **knobs: Any) -> CompressedVLM:
    """Load a transformers VLM (a directory or hub id) with its processor and compress it with ``method``."""
    local_or_hub(path_or_id, "model")  # a mistyped local path fails here, not after the hub's retries
    try:
        config = AutoConfig.from_pretrained(str(path_or_id))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read a model config from '{path_or_id}': {e}; pass a directory holding "
                              f"config.json + weights (save_pretrained) or a hub id this machine can download") from e
    mt = getattr(config, "model_type", None)
    supported = supported_model_types()
    if mt not in ADAPTERS:
        raise ConfigError(f"'{path_or_id}' is a {mt!r} model; compactvl compresses these model types: "
                          f"{', '.join(supported)}")
    cls = getattr(transformers, ADAPTERS[mt].class_name(mt))
    try:
        kw = {"dtype": dtype} if dtype is not None else {}
        model = cls.from_pretrained(str(path_or_id), attn_implementation=attn_implementation, **kw)
    except OSError as e:
        raise CheckpointError(f"cannot load weights from '{path_or_id}': {e}") from e
    model = model.eval()
    if device is not None:
        model = model.to(device)
    processor = None
    if load_processor:
        try:
            processor = AutoProcessor.from_pretrained(str(path_or_id))
        except (OSError, ValueError, TypeError) as e:
            warnings.warn(f"no processor loaded from '{path_or_id}' ({e}); generate() needs one, generate_ids() "
                          f"takes processed inputs", CompactVLWarning, stacklevel=2)
    return compress(model, method, processor=processor, **knobs)
