"""The Runner: owns the decoder-layer loop of a Llama-family transformers causal LM (docs/design.md, "The one picture").

It calls the library's own decoder layers (so SDPA / eager attention, RoPE and the MLP are exactly transformers'),
but it decides what enters each layer: between layers, ``LayerPolicy`` objects may drop tokens (``state.select``),
read signals, or rewrite the state. Masks are built here, per layer, from each sample's real tokens and the KV cache
of that layer, so a batch with left padding, different kept counts per sample and layers of different cache lengths
all run in one batched call per layer. Nothing is monkey-patched: the cache object only implements the ``update``
method the attention modules call.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM (SmolLM is Llama) and any model
whose ``.model`` has ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and whose layers take
``(hidden_states, attention_mask, position_ids, <cache>, use_cache, position_embeddings)``, where ``<cache>`` is the
keyword the layer declares: ``cache`` (transformers >= 5.2x, which renames ``past_key_values`` until 5.40) or
``past_key_values`` (earlier releases). It is read once from the layer's signature, so a release that stops renaming
the old keyword cannot silently drop the cache; a cached prefill that leaves the cache empty raises instead.
Attention implementations: ``sdpa`` (default; a boolean mask, or none at all when a batch has no padding so PyTorch
can pick its flash kernel) and ``eager`` (additive float mask).

Modules inside a layer that need the Runner's view of the rows (MoE experts that only serve visual tokens, router
taps) get it explicitly, never through a global: while layer ``i`` runs, ``runner.active`` is its
:class:`LayerContext` ``(layer_idx, state)``, and when the layer's ``mlp`` is a :class:`LayerStateModule` the Runner
sets ``mlp.layer_context`` to the same context for that call (and back to None after it). A module called outside
the Runner (a plain ``lm(...)``) sees ``None``. The binding is per Runner call, so one model must not be run by two
threads at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..compat import transformers_version
from ..errors import ConfigError, InputError
from ..schedules import Budget, no_budget
from .layer import LayerContext, LayerStateModule, cache_keyword
from .state import RunnerCache, RunState, Signals, check_position_policy, positions_from_mask

SUPPORTED_ATTENTION = ("sdpa", "eager")


class LayerPolicy(nn.Module):
    """Acts between decoder layers during prefill (never on decode steps).

    ``before_layer(i, state, runner)`` runs before layer ``i`` and returns the state layer ``i`` will see (for example
    ``state.select(keep, layer=i)``); ``after_layer`` runs after it. ``reset()`` is called at the start of each
    prefill. A policy that drops tokens reports what it kept through ``state.trace``.

    A registered method also declares, in its own file, what the tools read from it (``compactvl.schedules``):
    ``macs_schedule`` (a static method ``(num_layers, visual, text, **knobs) -> Schedule | list[int]``, with
    ``macs_help`` and ``macs_knobs``) for ``compactvl macs`` / ``bench``; ``budget_knobs(budget)`` mapping a
    :class:`~compactvl.schedules.Budget` (``keep`` fraction or ``tokens`` count) onto its knobs for ``compress`` /
    ``eval`` / ``bench``; and ``reference_positions`` ("keep" | "compact"), the position policy its reference code uses.
    """

    reference_positions: str | None = None  # None: no preference (the Runner's default)
    macs_schedule = None
    macs_help: str = ""
    macs_knobs: dict[str, str] = {}

    @classmethod
    def budget_knobs(cls, budget: Budget) -> dict[str, Any]:
        """This method's knobs for ``budget``; the default: the method has no budget knob."""
        raise no_budget(getattr(cls, "method", cls.__name__), [])

    def reset(self) -> None:
        pass

    def before_layer(self, layer_idx: int, state: RunState, runner: "Runner") -> RunState:
        return state

    def after_layer(self, layer_idx: int, state: RunState, runner: "Runner") -> RunState:
        return state

    def check(self, runner: "Runner") -> None:
        """Validate knobs against the model (layer indices, ...); raise ConfigError naming the fix."""


class ReplayPolicy(LayerPolicy):
    """Re-applies the kept sets recorded in a prefill's ``trace`` (by original index) to a longer input.

    Tokens at original index >= ``prompt_len`` (appended later, e.g. generated tokens) are always kept. This makes
    uncached recomputation of a pruned model comparable with cached decoding.
    """

    def __init__(self, trace: Sequence[tuple[int, Tensor]], prompt_len: int):
        super().__init__()
        self.steps = {layer: kept for layer, kept in trace}
        self.prompt_len = prompt_len

    def before_layer(self, layer_idx: int, state: RunState, runner: "Runner") -> RunState:
        kept = self.steps.get(layer_idx)
        if kept is None:
            return state
        idx = state.orig_index
        hit = (idx[:, :, None] == kept[:, None, :]).any(-1) & (idx >= 0)
        return state.select(hit | (idx >= self.prompt_len), layer=layer_idx)


@dataclass
class RunOutput:
    hidden: Tensor  # [B, L', D] after the final norm (L' = tokens left after the last layer)
    state: RunState  # state after the last layer (orig_index maps rows back to the input)
    cache: RunnerCache | None


@dataclass
class GenerateOutput:
    sequences: Tensor  # [B, T] generated ids, pad_token_id after a sample's EOS
    lengths: Tensor  # [B] generated tokens per sample, EOS included
    cache: RunnerCache | None
    state: RunState  # prefill's final state (kept tokens, trace)
    first_logprobs: Tensor | None = None  # [B, V] float32 log-softmax of the first generated token's logits

    def token_lists(self, eos_token_id: int | Iterable[int] | None = None) -> list[list[int]]:
        eos = _eos_set(eos_token_id)
        out = []
        for row, n in zip(self.sequences.tolist(), self.lengths.tolist()):
            row = row[:n]
            if row and row[-1] in eos:
                row = row[:-1]
            out.append(row)
        return out


def _eos_set(eos: int | Iterable[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


class Runner:
    def __init__(self, lm: nn.Module, policies: Sequence[LayerPolicy] = (), position_policy: str = "keep"):
        base = getattr(lm, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, n) for n in needed) or not hasattr(lm, "lm_head"):
            raise ConfigError(
                f"{type(lm).__name__} is not a Llama-family causal LM (need .model.{{{', '.join(needed)}}} and "
                ".lm_head); load Llama, Qwen2, Qwen3, Mistral or SmolLM with AutoModelForCausalLM"
            )
        impl = getattr(lm.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ConfigError(
                f"the Runner supports attention implementations {SUPPORTED_ATTENTION}, not '{impl}'; load the LM with "
                "attn_implementation='sdpa'"
            )
        self.lm = lm
        self.base = base
        self.layers = base.layers
        self.attn_impl = impl
        self.policies = list(policies)
        self.position_policy = check_position_policy(position_policy)
        self.max_positions = getattr(lm.config, "max_position_embeddings", None)
        layer_types = getattr(lm.config, "layer_types", None) or []
        window = getattr(lm.config, "sliding_window", None)
        uses_window = "sliding_attention" in layer_types or (
            window is not None and getattr(lm.config, "use_sliding_window", True) and lm.config.model_type == "mistral"
        )
        self.sliding_window = window if uses_window else None
        self.cache_kwarg = cache_keyword(self.layers[0]) if len(self.layers) else "past_key_values"
        self.active: LayerContext | None = None  # the layer running now (see the module docstring)
        for p in self.policies:
            p.check(self)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.lm.config

    def embed(self, ids: Tensor) -> Tensor:
        return self.base.embed_tokens(ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm.lm_head(hidden)

    # ------------------------------------------------------------------ masks
    def _mask(self, q_mask: Tensor, k_mask: Tensor, offset: int) -> Tensor | None:
        """Mask for queries ``q_mask [B,T]`` (placed after ``offset`` cached keys) over keys ``k_mask [B,offset+T]``."""
        T, K = q_mask.shape[1], k_mask.shape[1]
        if self.attn_impl == "sdpa" and bool(k_mask.all()) and (offset == 0 or T == 1):
            return None  # SDPA's own causal path (flash / mem-efficient kernels stay available)
        qi = torch.arange(T, device=q_mask.device)[:, None] + offset
        ki = torch.arange(K, device=q_mask.device)[None, :]
        allowed = (ki <= qi)[None] & k_mask[:, None, :]
        allowed = allowed | (ki == qi)[None]  # a padding query sees itself: no all-masked rows, no NaN
        allowed = allowed[:, None]  # [B, 1, T, K]
        if self.attn_impl == "eager":
            dtype = self.lm.dtype if self.lm.dtype.is_floating_point else torch.float32
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    def _check_length(self, total: int) -> None:
        if self.max_positions is not None and total > self.max_positions:
            raise InputError(
                f"the input needs {total} positions but the LM's context is {self.max_positions} "
                "(max_position_embeddings); shorten the prompt, use fewer visual tokens, or lower max_new_tokens"
            )
        if self.sliding_window is not None and total > self.sliding_window:
            raise ConfigError(
                f"the input ({total} tokens) exceeds the LM's sliding window ({self.sliding_window}); the Runner "
                "implements full attention only, so keep inputs within the window"
            )

    # ------------------------------------------------------------------ layer loop
    def _layer(self, i: int, state: RunState, cache: RunnerCache | None, mask: Tensor | None) -> Tensor:
        if state.position_embeddings is None:
            state.position_embeddings = self.base.rotary_emb(state.hidden, state.position_ids)
        before = None if cache is None else cache.get_seq_length(i)
        ctx = LayerContext(i, state)
        mlp = getattr(self.layers[i], "mlp", None)
        bound = mlp if isinstance(mlp, LayerStateModule) else None
        self.active = ctx
        if bound is not None:
            bound.layer_context = ctx
        try:
            out = self.layers[i](
                state.hidden,
                attention_mask=mask,
                position_ids=state.position_ids,
                use_cache=cache is not None,
                position_embeddings=state.position_embeddings,
                **{self.cache_kwarg: cache},
            )
        finally:
            self.active = None
            if bound is not None:
                bound.layer_context = None
        if cache is not None and cache.get_seq_length(i) == before and state.hidden.shape[1] > 0:
            raise ConfigError(
                f"decoder layer {i} ({type(self.layers[i]).__name__}) did not write its keys and values into the KV "
                f"cache passed as '{self.cache_kwarg}=' (transformers {transformers_version()}); cached generation "
                "would return wrong tokens. This transformers release is outside compactvl's supported range; "
                "install the version in requirements/lock.txt (./run setup) or pass use_cache=False"
            )
        return out[0] if isinstance(out, tuple) else out

    def prefill(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        visual_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool = True,
        policies: Sequence[LayerPolicy] | None = None,
        signals: Signals | None = None,
    ) -> RunOutput:
        """Run the whole prompt. ``attention_mask [B,L]`` marks real tokens (left padding expected); ``signals``
        seeds ``state.signals`` (e.g. ``Signals(visual_pos=...)``, ``[B, L, 2]``, the grid position of every input
        row, read by SIP); it is copied, never written to."""
        B, L, _ = inputs_embeds.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None else attention_mask.bool()
        visual = torch.zeros_like(mask) if visual_mask is None else visual_mask.bool() & mask
        if position_ids is None:
            position_ids = positions_from_mask(mask)
        self._check_length(int(mask.sum(-1).max()))
        arange = torch.arange(L, device=mask.device).expand(B, L)
        state = RunState(
            hidden=inputs_embeds,
            position_ids=position_ids,
            mask=mask,
            visual=visual,
            orig_index=torch.where(mask, arange, torch.full_like(arange, -1)),
            position_policy=self.position_policy,
            signals=Signals() if signals is None else signals.copy(),
        )
        if policies is None:
            policies = self.policies
        else:  # per-call policies are validated against this model like the Runner's own
            policies = list(policies)
            for p in policies:
                if not any(p is q for q in self.policies):
                    p.check(self)
        for p in policies:
            p.reset()
        cache = RunnerCache(self.num_layers) if use_cache else None
        for i in range(self.num_layers):
            for p in policies:
                state = p.before_layer(i, state, self)
            if cache is not None:
                cache.record(i, state)
            state.hidden = self._layer(i, state, cache, self._mask(state.mask, state.mask, 0))
            for p in policies:
                state = p.after_layer(i, state, self)
        state.hidden = self.base.norm(state.hidden)
        return RunOutput(hidden=state.hidden, state=state, cache=cache)

    def extend(self, inputs_embeds: Tensor, cache: RunnerCache, attention_mask: Tensor | None = None) -> RunOutput:
        """Append tokens to a cache (a decode step, or a follow-up turn). No policy acts: what earlier prefills
        dropped stays dropped. Each layer continues from its own next position (see ``RunnerCache``)."""
        B, T, _ = inputs_embeds.shape
        new_mask = torch.ones(B, T, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None else attention_mask.bool()
        step = positions_from_mask(new_mask)
        self._check_length(int(cache.next_pos[0].max()) + T)  # layer 0 holds the largest positions
        state = RunState(
            hidden=inputs_embeds, position_ids=step, mask=new_mask, visual=torch.zeros_like(new_mask),
            orig_index=torch.full_like(step, -1), position_policy=self.position_policy,
        )
        prev_pos = None
        for i in range(self.num_layers):
            pos = cache.next_pos[i][:, None] + step
            if cache.position_axes:  # M-RoPE: the same position on every axis, shaped [k, B, T] as the model expects
                pos = pos.expand(cache.position_axes, B, T)
            if prev_pos is None or not torch.equal(pos, prev_pos):
                state.position_ids, state.position_embeddings, prev_pos = pos, None, pos
            offset = cache.get_seq_length(i)
            k_mask = torch.cat([cache.key_mask[i], new_mask], dim=-1)
            cache.record(i, state)
            state.hidden = self._layer(i, state, cache, self._mask(new_mask, k_mask, offset))
        state.hidden = self.base.norm(state.hidden)
        return RunOutput(hidden=state.hidden, state=state, cache=cache)

    def forward_logits(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, visual_mask: Tensor | None = None,
                       policies: Sequence[LayerPolicy] | None = None,
                       position_ids: Tensor | None = None,
                       signals: Signals | None = None) -> tuple[Tensor, RunState]:
        """Logits for every row that survives to the last layer (``state.orig_index`` maps rows to input indices)."""
        out = self.prefill(inputs_embeds, attention_mask, visual_mask, position_ids, use_cache=False, policies=policies,
                           signals=signals)
        return self.logits(out.hidden), out.state

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        visual_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        policies: Sequence[LayerPolicy] | None = None,
        position_ids: Tensor | None = None,
        persistent: Sequence[LayerPolicy] = (),
        on_step: Callable[[Tensor, Tensor], None] | None = None,
    ) -> GenerateOutput:
        """Greedy or sampled generation. ``use_cache=False`` recomputes the whole sequence at every step (replaying the
        prefill's pruning decisions, through the first policy's ``replay(prefill_state, prompt_len)`` when it has one,
        else :class:`ReplayPolicy`), the reference that cached decoding must equal.

        ``position_ids`` (``[B, L]`` or ``[k, B, L]``) are the prompt's positions (default: 0..n-1 over real tokens);
        generated tokens continue from the largest one plus 1 on every axis. ``persistent`` policies run before the
        others in the prefill AND in every uncached recomputation (e.g. features a model adds after a layer, such as
        Qwen3-VL's deepstack); they must not drop tokens. ``on_step(tokens [B], done [B])``: after each step (streaming)."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ConfigError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
        B, L, _ = inputs_embeds.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None else attention_mask.bool()
        self._check_length(int(mask.sum(-1).max()) + max_new_tokens)
        eos = torch.tensor(sorted(_eos_set(eos_token_id)), dtype=torch.long, device=inputs_embeds.device)
        persistent = list(persistent)
        policies = persistent + list(self.policies if policies is None else policies)
        out = self.prefill(inputs_embeds, mask, visual_mask, position_ids, use_cache=use_cache, policies=policies)
        prefill_state, cache = out.state, out.cache
        logits = self.logits(out.hidden[:, -1])
        first_logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens, done = [], torch.zeros(B, dtype=torch.bool, device=mask.device)
        lengths = torch.zeros(B, dtype=torch.long, device=mask.device)
        embeds, gen_mask, gen_pos = inputs_embeds, mask, position_ids
        if position_ids is not None:  # uncached steps: appended tokens continue from the largest prompt position
            top = position_ids if position_ids.dim() == 2 else position_ids.amax(0)
            next_pos = torch.where(mask, top, torch.zeros_like(top)).amax(-1) + 1  # [B]
        # uncached steps replay the prefill's decisions; a policy that does more than drop tokens (SparseVLM's recycled
        # tokens) provides its own ``replay(prefill_state, prompt_len)``
        custom = [p for p in policies if callable(getattr(p, "replay", None))]
        replay = persistent + [custom[0].replay(prefill_state, L) if custom else ReplayPolicy(prefill_state.trace, L)]
        for step in range(max_new_tokens):
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens.append(nxt)
            lengths += (~done).long()
            if eos.numel():
                done = done | torch.isin(nxt, eos)
            if on_step is not None:
                on_step(nxt, done)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            new = self.embed(nxt[:, None])
            if use_cache:
                logits = self.logits(self.extend(new, cache).hidden[:, -1])
            else:
                embeds = torch.cat([embeds, new], dim=1)
                gen_mask = torch.cat([gen_mask, torch.ones_like(mask[:, :1])], dim=1)
                vis = None if visual_mask is None else torch.cat([visual_mask.bool(), torch.zeros_like(gen_mask[:, L:])], 1)
                if gen_pos is not None:
                    new_pos = (next_pos + step)[:, None]
                    gen_pos = torch.cat([gen_pos, new_pos.expand(gen_pos.shape[:-2] + new_pos.shape)], dim=-1)
                full = self.prefill(embeds, gen_mask, vis, gen_pos, use_cache=False, policies=replay)
                logits = self.logits(full.hidden[:, -1])
        return GenerateOutput(sequences=torch.stack(tokens, 1), lengths=lengths, cache=cache, state=prefill_state,
                              first_logprobs=first_logprobs)

    @staticmethod
    def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
              generator: torch.Generator | None) -> Tensor:
        if not do_sample:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, idx = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
