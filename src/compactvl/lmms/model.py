"""``lmms-eval --model compactvl``: a saved CompactVLM, the reference model or a transformers VLM, compressed with any
compactvl method, as an lmms-eval model (docs/lmms-eval.md).

    lmms-eval --model compactvl --model_args pretrained=reference,method=visionzip,tokens=16,batch_size=8 ...

Model args: ``pretrained`` (required), ``method`` and its knobs (``compactvl.lmms.loading``), ``batch_size``
(default 1; lmms-eval's ``--batch_size`` when not a model arg), ``device``, ``dtype`` (float32 | bfloat16 | auto),
``max_new_tokens`` (default 8, when a task gives none). Prompts: the context follows the request's images (one
``<image>`` placeholder per image put first unless the context holds them), as one user turn; the answer is
greedy unless the task asks for sampling, cut at the task's ``until`` strings. A batch of N gives the answers of
batch 1 (left padding; tests/test_lmms.py).

``loglikelihood``: the log-probability of the continuation as the assistant's answer to the context, i.e. of the
answer tokens the chat template puts before its end-of-turn marker, and whether greedy decoding would produce
exactly them (a transformers VLM: ``CompressedVLM.loglikelihood``, the same span through its processor's chat
template). ``generate_until_multi_round``: each round is a further turn of the same conversation (earlier
answers included), with the task's ``doc_to_text`` giving the next context (lmms-eval's multi-round protocol).

Timing, fed to lmms-eval's throughput summary (``log_metrics``): the generation time of each call, the tokens
generated, and as additional metrics ``ttft`` (mean time to the first generated token per batch: image encoding,
compression, prefill and the first step; CompactVLM only), ``prepare_s`` and ``lm_s`` (compactvl's split: inputs
prepared vs the LM's prefill and decoding). Each answer reports its generated tokens (``TokenCounts``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from tqdm import tqdm

from ..errors import ConfigError, InputError
from ..losses.next_token import answer_logprobs, next_token_targets
from ..processor import IGNORE_INDEX, IMAGE_PLACEHOLDER, answer_span
from .loading import Loaded, load, parse_int

Turns = list[tuple[str, str | None]]


class CompactVL(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str | None = None, batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "float32", max_new_tokens: int | str = 8,
                 max_batch_size: int | None = None, **knobs: Any) -> None:
        super().__init__()
        self.batch_size_per_gpu = parse_int("batch_size", batch_size)
        self.max_new_tokens = parse_int("max_new_tokens", max_new_tokens)
        self.loaded: Loaded = load(pretrained, method, knobs, device, str(dtype))
        self.model = self.loaded.model

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "CompactVL":
        """lmms-eval's CLI passes ``batch_size`` / ``device`` beside the model args; a model arg wins (the base class
        would fail on the duplicate)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def image_token(self) -> str:
        return self.model.config.image_token if self.loaded.kind == "compactvl" else IMAGE_PLACEHOLDER

    # ------------------------------------------------------------------ helpers
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> list:
        vis = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        vis = [] if vis is None else list(vis) if isinstance(vis, (list, tuple)) else [vis]
        if any(isinstance(v, str) for v in vis):
            raise InputError(f"task {task}: a visual is a path ({next(v for v in vis if isinstance(v, str))}); "
                             "compactvl takes images (PIL), not video or audio files")
        return [v.convert("RGB") for v in vis]

    def _user(self, context: str, n_images: int) -> str:
        """The user turn: one placeholder per image put first, unless the context already holds them."""
        tok = self.image_token
        if n_images and tok not in context:
            return f"{tok}\n" * n_images + context
        return context

    @staticmethod
    def _settings(gen_kwargs: dict, default_max: int) -> tuple[int, dict, list[str]]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(g.get("num_beams", 1) or 1) > 1:
            raise ConfigError(f"num_beams={g['num_beams']}: compactvl decodes greedily or samples; use num_beams 1")
        max_new = parse_int("max_new_tokens", g.get("max_new_tokens") or default_max)
        temp = float(g.get("temperature") or 0.0)
        kw: dict[str, Any] = {}
        if g.get("do_sample") or temp > 0:
            kw = {"do_sample": True, "temperature": temp if temp > 0 else 1.0, "top_p": float(g.get("top_p") or 1.0)}
        return max_new, kw, until

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        for s in until:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    def _generate(self, convs: list[Turns], images: list[list], max_new: int, kw: dict) -> tuple[list[str], dict]:
        """One batch through the model under its method: answers and the batch's timing / token counts."""
        tokens = torch.zeros(len(convs), dtype=torch.long)
        first: list[float] = []
        t0 = time.perf_counter()

        def on_step(nxt: torch.Tensor, done: torch.Tensor) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            tokens.add_((~done).long().cpu())  # a token that is not the row's EOS

        with torch.no_grad(), self.loaded.context() as model, self.loaded.autocast():
            if self.loaded.kind == "compactvl":
                out = model.generate(convs, images, max_new_tokens=max_new, on_step=on_step, **kw)
                counts = tokens.tolist()
            else:
                out = model.generate(convs, images, max_new_tokens=max_new, **kw)
                tok = model.processor.tokenizer if hasattr(model.processor, "tokenizer") else model.processor
                counts = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in out]
        timing = dict(getattr(model, "last_timing", None) or {})
        return out, {"seconds": time.perf_counter() - t0, "ttft": first[0] if first else None, "tokens": counts,
                     "prepare_s": timing.get("prepare_s"), "lm_s": timing.get("lm_s")}

    @staticmethod
    def _log(stats: list[dict]) -> None:
        """One throughput record per request list for lmms-eval's summary."""
        if not stats:
            return
        total = sum(s["seconds"] for s in stats)
        gen = sum(sum(s["tokens"]) for s in stats)
        extra: dict[str, float] = {}
        ttft = [s["ttft"] for s in stats if s["ttft"] is not None]
        if ttft:
            extra["ttft"] = sum(ttft) / len(ttft)
        for k in ("prepare_s", "lm_s"):
            vals = [s[k] for s in stats if s[k] is not None]
            if vals:
                extra[k] = sum(vals)
        log_metrics(total_elapsed_time=total, total_gen_tokens=gen, avg_speed=gen / total if total > 0 else 0.0,
                    additional_metrics=extra)

    def _batches(self, requests: Sequence[Instance], key) -> list[list[int]]:
        """Request indices in batches of ``batch_size``, each batch one generation setting (in request order)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(key(r), []).append(i)
        bs = self.batch_size
        return [idx[j:j + bs] for idx in groups.values() for j in range(0, len(idx), bs)]

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        res: list[GenerationResult | None] = [None] * len(requests)
        stats: list[dict] = []
        batches = self._batches(requests, lambda r: json.dumps(r.args[1], sort_keys=True, default=str))
        for idx in tqdm(batches, disable=self.rank != 0, desc="compactvl"):
            convs, images = [], []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                convs.append([(self._user(context, len(vis)), None)])
                images.append(vis)
            max_new, kw, until = self._settings(requests[idx[0]].args[1], self.max_new_tokens)
            out, st = self._generate(convs, images, max_new, kw)
            stats.append(st)
            for i, text, n in zip(idx, out, st["tokens"]):
                res[i] = GenerationResult(text=self._cut(text, until), token_counts=TokenCounts(output_tokens=int(n)))
        self._log(stats)
        return res

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        res: list[list[str] | None] = [None] * len(requests)
        stats: list[dict] = []
        batches = self._batches(requests, lambda r: json.dumps(r.args[1], sort_keys=True, default=str))
        for idx in tqdm(batches, disable=self.rank != 0, desc="compactvl multi-round"):
            max_new, kw, until = self._settings(requests[idx[0]].args[1], self.max_new_tokens)
            live = []  # per request: [i, turns, images, doc_to_text, doc, answers, info]
            for i in idx:
                context, _, doc_to_visual, doc_to_text, doc_id, task, split = requests[i].args
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                live.append([i, [(self._user(context, len(vis)), None)], vis, doc_to_text,
                             self.task_dict[task][split][doc_id], [], None])
            round_idx = 0
            while live:
                out, st = self._generate([x[1] for x in live], [x[2] for x in live], max_new, kw)
                stats.append(st)
                round_idx += 1
                nxt = []
                for x, text in zip(live, out):
                    text = self._cut(text, until)
                    x[5].append(text)
                    x[1][-1] = (x[1][-1][0], text)
                    visuals, context, terminal, previous, x[6] = x[3](x[4], previous_output=list(x[5]),
                                                                      round_idx=round_idx, previous_round_info=x[6])
                    if previous is not None:
                        x[5] = list(previous)
                    if terminal or context is None:
                        res[x[0]] = list(x[5])
                        continue
                    vis = [v.convert("RGB") for v in (visuals or []) if not isinstance(v, str)]
                    x[2] = x[2] + vis
                    x[1].append((self._user(context, len(vis)) if vis else context, None))
                    nxt.append(x)
                live = nxt
        self._log(stats)
        return res

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        for idx in tqdm(self._batches(requests, lambda r: ""), disable=self.rank != 0, desc="compactvl loglik"):
            items = []
            for i in idx:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self.task_dict[task][split][doc_id]
                continuation = target(doc) if callable(target) else target  # a string, or the task's doc_to_target
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                items.append((self._user(context, len(vis)), str(continuation).strip(), vis))
            for i, r in zip(idx, self._loglik_batch(items)):
                res[i] = r
        return res

    def _answer_tail(self, user: str, answer: str) -> int:
        """How many labelled tokens at the conversation's end are the template's end of turn (not scored)."""
        proc = self.model.processor
        full, empty = ([y for y in proc.encode_conversation([(user, a)]).labels if y != IGNORE_INDEX]
                       for a in (answer, ""))
        return answer_span(full, empty)[1]

    @torch.no_grad()
    def _loglik_batch(self, items: list[tuple[str, str, list]]) -> list[tuple[float, bool]]:
        if any(not a for _, a, _ in items):
            raise InputError("loglikelihood got an empty continuation; the task must give a target")
        with self.loaded.context() as model, self.loaded.autocast():
            if self.loaded.kind != "compactvl":  # a transformers VLM: its chat template, the same answer span
                return model.loglikelihood([u for u, _, _ in items], [v for _, _, v in items], [a for _, a, _ in items])
            inputs = model.prepare([[(u, a)] for u, a, _ in items], [v for _, _, v in items], with_labels=True)
            labels = inputs.labels.clone()
            for b, (u, a, _) in enumerate(items):
                n_tail = self._answer_tail(u, a)
                pos = (labels[b] != IGNORE_INDEX).nonzero().flatten()
                if n_tail:
                    labels[b, pos[len(pos) - n_tail:]] = IGNORE_INDEX
            out = model.forward(dataclasses.replace(inputs, labels=None))
        return answer_logprobs(out.logits, next_token_targets(out.state.orig_index, labels))
