"""Dynamic batching for ``compactvl serve``: one worker thread owns the model; requests wait in a bounded queue.

The worker takes the oldest waiting request, waits up to ``batch_wait_ms`` for more, and decodes together up to
``max_batch`` requests that can share one ``Runner.generate`` call: the same compression variant and the same
sampling settings (greedy requests always batch with each other). It decodes the batch for the largest ``max_tokens``
among them and cuts each answer at its own, so a greedy answer is the one the request would get alone (left-padded
batches give each row the logits it gets alone: tests/test_model.py). A batch that fails (a prompt the context cannot
hold after all) is retried one request at a time, so each request gets its own answer or its own error.

The queue is bounded: a request arriving at a full queue gets 429 at once; after :meth:`Engine.close` starts
(shutdown), new requests get 503 while the ones already queued are still decoded.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CompactVLError
from ..model import CompactVLM
from ..variants import VariantError, compression_variant, visual_tokens_per_image
from .protocol import ApiError, ChatRequest
from .settings import ServeSettings

log = logging.getLogger("compactvl.serve")


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    usage: dict


@dataclass
class Job:
    request: ChatRequest
    max_tokens: int
    variant: dict  # {"token_ops": [...]} and/or {"policies": [...]}; {} = the model as saved
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # streaming: each token as decoded, then None (after the future is set)
    streamed: int = 0  # tokens pushed to ``events`` so far
    cancelled: bool = False  # the client went away before the job was decoded: skip it
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> str:
        r = self.request
        sampling = (r.temperature, r.top_p, r.seed) if r.temperature > 0 else "greedy"
        return json.dumps([self.variant, sampling], sort_keys=True, default=str)

    def push(self, item: int | None) -> None:
        """From the worker: a decoded token (None: the end) to a streaming request."""
        if self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is already closed: nobody is reading
            pass

    def finish(self, outcome: Any) -> None:
        def put() -> None:
            if self.future.done():  # the awaiting handler was cancelled (client disconnect)
                return
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)
        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is already closed: nobody is waiting
            pass
        self.push(None)  # after the result: a stream reading None finds the future set


class Engine:
    """Owns ``model``; ``submit`` (from the event loop) → an awaitable :class:`Result`."""

    def __init__(self, model: CompactVLM, settings: ServeSettings):
        self.model, self.settings = model.eval(), settings
        self.context = model.runner.max_positions
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.active = 0  # requests in the batch being decoded now
        self.batch_sizes: list[int] = []  # every decoded batch's size, for the load test's report
        self.visual_per_image = visual_tokens_per_image(model)  # kept per image by the saved recipe
        self.visual_in_per_image = sum(h * w for h, w in (e.grid_for(layer) for e, layer in
                                                            zip(model.encoders, model.layers)))
        self._thread = threading.Thread(target=self._work, name="compactvl-serve-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- request side (event loop)
    def variant_for(self, compression: dict | None) -> dict:
        """The model variant a request's compression override asks for (checked now, before queueing)."""
        try:
            return compression_variant(self.model, compression, self.visual_per_image)
        except VariantError as e:
            raise ApiError(400, str(e), param="compression") from e

    def max_tokens_for(self, request: ChatRequest) -> int:
        """The request's ``max_tokens`` after the context check (400 when prompt + max_tokens exceed it)."""
        enc = self.model.processor.encode_conversation(request.turns)
        text = sum(1 for i in enc.ids if i >= 0)
        prompt = text + len(request.images) * self.visual_per_image
        want = request.max_tokens
        if self.context is None:
            return want or self.settings.default_max_tokens
        room = self.context - prompt
        if room < 1:
            raise ApiError(400, f"the prompt needs {prompt} positions ({text} text + {len(request.images)} image(s) x "
                                f"{self.visual_per_image} visual tokens) but the model's context is {self.context}; "
                                "shorten the conversation or send fewer images", param="messages",
                           code="context_length_exceeded")
        if want is not None and prompt + want > self.context:
            raise ApiError(400, f"max_tokens {want} + the prompt's {prompt} positions exceed the model's context of "
                                f"{self.context}; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return want if want is not None else min(self.settings.default_max_tokens, room)

    def submit(self, request: ChatRequest, variant: dict, max_tokens: int) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(request, max_tokens, variant, loop, loop.create_future())
        if request.stream and not request.stop:  # with stop strings the text is only final at the end
            job.events = asyncio.Queue()
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry on another instance", kind="server_error",
                               code="shutting_down")
            if len(self._queue) >= self.settings.max_queue:
                raise ApiError(429, f"the server is busy ({len(self._queue)} requests waiting, --max-queue "
                                    f"{self.settings.max_queue}); retry shortly", kind="rate_limit_error",
                               code="queue_full")
            self._queue.append(job)
            self._cond.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, decode the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- worker thread
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            while len(self._queue) < self.settings.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._queue[0].key
            batch = [j for j in self._queue if j.key == key][: self.settings.max_batch]
            for j in batch:
                self._queue.remove(j)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.active = len(batch)
            try:
                self._run(batch)
            finally:
                self.active = 0

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self._decode(batch)
        except Exception as e:  # noqa: BLE001 - each request then gets its own answer or error
            if len(batch) > 1:
                for job in batch:
                    if job.streamed:  # its client already has tokens: decoding it again would repeat them
                        job.finish(_as_api_error(e))
                    else:
                        self._run([job])
                return
            err = _as_api_error(e)
            compression = batch[0].request.compression
            if compression and err.status == 400:  # a knob only the model can check (a layer it lacks)
                err = ApiError(400, f"compression {compression}: {err.message}", param="compression")
            batch[0].finish(err)
            return
        self.batch_sizes.append(len(batch))
        for job, result in zip(batch, results):
            job.finish(result)

    @torch.no_grad()
    def _decode(self, batch: list[Job]) -> list[Result]:
        model, first = self.model, batch[0].request
        ctx = model.variant(**batch[0].variant) if batch[0].variant else nullcontext(model)
        with ctx:
            inputs = model.prepare([j.request.turns for j in batch], [j.request.images for j in batch])
            eos = model.eos_token_ids()
            kw: dict[str, Any] = {"on_step": _streamer(batch, set(eos))}
            if first.temperature > 0:
                kw.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
                if first.seed is not None:
                    kw["generator"] = torch.Generator(device=model.device).manual_seed(first.seed)
            out = model.runner.generate(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask,
                                        max_new_tokens=max(j.max_tokens for j in batch), eos_token_id=eos,
                                        pad_token_id=model.processor.pad_token_id, **kw)
        state = out.state
        last_layer = (state.visual & state.mask).sum(-1).tolist()
        prompt_lens = inputs.attention_mask.sum(-1).tolist()
        results = []
        for b, job in enumerate(batch):
            n = int(out.lengths[b])
            row = out.sequences[b, :n].tolist()
            finish = "length"
            if row and row[-1] in eos and n <= job.max_tokens:
                row, finish = row[:-1], "stop"
            if len(row) >= job.max_tokens:
                row, finish = row[: job.max_tokens], "length"
            text = model.processor.decode(row)
            for s in job.request.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            kept = sum(inputs.visual_counts[b])
            usage = {"prompt_tokens": int(prompt_lens[b]), "completion_tokens": len(row),
                     "total_tokens": int(prompt_lens[b]) + len(row),
                     "visual_tokens_in": self.visual_in_per_image * len(job.request.images),
                     "visual_tokens_kept": int(kept), "visual_tokens_last_layer": int(last_layer[b])}
            results.append(Result(text, row, finish, usage))
        return results


def _streamer(batch: list[Job], eos: set[int]):
    """``Runner.generate``'s ``on_step``: each streaming job's new token, until its EOS or its own max_tokens."""
    live = [(b, job) for b, job in enumerate(batch) if job.events is not None]
    if not live:
        return None
    ended = [False] * len(batch)

    def on_step(tokens: torch.Tensor, done: torch.Tensor) -> None:
        row = tokens.tolist()
        for b, job in live:
            if ended[b] or row[b] in eos or job.streamed >= job.max_tokens:
                ended[b] = True
                continue
            job.streamed += 1
            job.push(row[b])
    return on_step


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, CompactVLError):  # a prompt the context cannot hold after all, a method that cannot run here
        return ApiError(400, str(e))
    log.error("a batch failed", exc_info=e)  # the traceback goes to the server log, never to the client
    return ApiError(500, f"the model failed on this request ({type(e).__name__}); see the server log",
                    kind="server_error")
