"""``compactvl serve`` end to end on a tiny random CompactVLM, served in-process on 127.0.0.1 and driven with the
official ``openai`` client (sync, async, streaming) and with httpx for what the client refuses to send.

Answers are compared with ``CompactVLM.generate`` on a second copy of the same saved model (greedy), so batching,
compression overrides and streaming must give exactly the answer the model gives alone."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from compactvl.errors import ConfigError  # noqa: E402
from compactvl.model import CompactVLM  # noqa: E402
from compactvl.serve import ApiError, ServeSettings, ServerThread  # noqa: E402
from compactvl.serve.protocol import ChatRequest  # noqa: E402

CONTEXT = 512  # tiny_lm's max_position_embeddings


def _image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(img)).decode()


def _msg(text: str, *images: Image.Image) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _url(im)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _prompt(text: str, n_images: int) -> str:
    """What the server makes of _msg: one placeholder per image part, parts joined by newlines."""
    return "\n".join(["<image>"] * n_images + [text])


class Gate:
    """Holds the batcher before its next batch until ``open()``: lets a test fill the queue deterministically."""

    def __init__(self, engine):
        self.engine, self.decode, self.event = engine, engine._decode, threading.Event()
        engine._decode = self._decode

    def _decode(self, batch):
        self.event.wait(60)
        return self.decode(batch)

    def open(self):
        self.event.set()

    def close(self):
        self.engine._decode = self.decode
        self.event.set()


def _wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(saved):
    """A second copy of the served model: the serial, in-process answers."""
    return CompactVLM.from_pretrained(saved)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    _image(7).save(folder / "inside.png")
    return folder


@pytest.fixture(scope="module")
def server(saved, image_dir):
    settings = ServeSettings(model_name="tiny", max_request_bytes=1_000_000, max_image_bytes=200_000,
                             max_image_pixels=1_000_000, max_images=2, max_tokens_limit=1000, default_max_tokens=8,
                             max_batch=8, batch_wait_ms=2, max_queue=128, local_image_dir=image_dir,
                             allowed_methods=("fastv", "avgpool"))
    with ServerThread(CompactVLM.from_pretrained(saved), settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=60, **kw)


def _still_serving(client):
    r = client.chat.completions.create(model="tiny", messages=_msg("still there?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------------- answers
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_sync_answer_equals_the_model_alone_with_usage_counting_visual_tokens(client, reference, n_images):
    ims = [_image(s) for s in range(n_images)]
    r = client.chat.completions.create(model="tiny", messages=_msg("What is it?", *ims), max_tokens=7)
    want = reference.generate([_prompt("What is it?", n_images)], [ims], max_new_tokens=7)[0]
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    per_image = reference.prepare([[("<image>\nx", None)]], [[ims[0] if ims else _image(0)]]).visual_counts[0][0]
    grid = reference.encoders[0].grid_for()
    u = r.usage
    assert u.visual_tokens_in == n_images * grid[0] * grid[1]
    assert u.visual_tokens_kept == u.visual_tokens_last_layer == n_images * per_image
    inputs = reference.prepare([[(_prompt("What is it?", n_images), None)]], [ims])
    assert u.prompt_tokens == int(inputs.attention_mask.sum())
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 7


def test_finish_reason_and_max_tokens_cut(client, reference):
    r = client.chat.completions.create(model="tiny", messages=_msg("Count"), max_tokens=3)
    want = reference.generate(["Count"], [[]], max_new_tokens=3)[0]
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_async_client(server, reference):
    async def go():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await c.chat.completions.create(model="tiny", messages=_msg("Async?", _image(3)), max_tokens=5)
        finally:
            await c.close()

    r = asyncio.run(go())
    assert r.choices[0].message.content == reference.generate([_prompt("Async?", 1)], [[_image(3)]],
                                                              max_new_tokens=5)[0]


def test_streaming_deltas_join_to_the_answer_and_end_with_usage(client, reference):
    stream = client.chat.completions.create(model="tiny", messages=_msg("Stream it", _image(1)), max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.generate([_prompt("Stream it", 1)], [[_image(1)]], max_new_tokens=6)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.visual_tokens_kept > 0
    assert len({c.id for c in chunks}) == 1


def test_streaming_sends_tokens_while_the_batch_is_still_decoding(server, monkeypatch):
    """Live streaming: decoding is held after every step until the client has read a text delta, so that delta
    must have been sent while the request was still decoding."""
    from compactvl.serve import engine as engine_module

    seen, real = threading.Event(), engine_module._streamer

    def held(batch, eos):
        inner = real(batch, eos)

        def on_step(tokens, done):
            inner(tokens, done)
            seen.wait(10)
        return on_step if inner is not None else None

    monkeypatch.setattr(engine_module, "_streamer", held)
    body = {"messages": [{"role": "user", "content": "Stream live"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        for line in lines:
            if line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        decoding = server.engine.active
        seen.set()
        rest = list(lines)
    assert decoding == 1 and rest[-1] == "data: [DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, reference, stream):
    full = reference.generate(["Stop here"], [[]], max_new_tokens=8)[0]
    stop = full[3:5]
    kw = dict(model="tiny", messages=_msg("Stop here"), max_tokens=8, stop=[stop])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert text == full[: full.index(stop)] and finish == ["stop"]


def test_system_message_goes_in_front_of_the_first_user_turn(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    want = reference.generate([[("Be brief.\nHi", "Hello"), ("Again", None)]], [[]], max_new_tokens=4)[0]
    assert r.choices[0].message.content == want


def test_local_image_inside_the_allowed_folder(client, reference, image_dir):
    path = str(image_dir / "inside.png")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://" + path}},
                                             {"type": "text", "text": "Local"}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert r.choices[0].message.content == reference.generate([_prompt("Local", 1)], [[_image(7)]],
                                                              max_new_tokens=4)[0]


# ----------------------------------------------------------------------------------------------- compression
def test_a_layer_policy_override_prunes_inside_the_lm_and_equals_the_variant(client, reference):
    comp = {"method": "fastv", "layer": 2, "keep": 0.25}
    r = client.chat.completions.create(model="tiny", messages=_msg("Pruned?", _image(2)), max_tokens=6,
                                       extra_body={"compression": comp})
    with reference.variant(policies=[{"policy": "fastv", "layer": 2, "keep": 0.25}]) as v:
        want = v.generate([_prompt("Pruned?", 1)], [[_image(2)]], max_new_tokens=6)[0]
    assert r.choices[0].message.content == want
    assert r.usage.visual_tokens_kept == 16 and r.usage.visual_tokens_last_layer == 4  # 16 * 0.25 after layer 2
    plain = client.chat.completions.create(model="tiny", messages=_msg("Pruned?", _image(2)), max_tokens=6)
    assert plain.usage.visual_tokens_last_layer == 16  # the override did not stick to the served model


def test_a_token_op_override_keeps_fewer_tokens_and_equals_the_variant(client, reference):
    r = client.chat.completions.create(model="tiny", messages=_msg("Pooled?", _image(4)), max_tokens=6,
                                       extra_body={"compression": {"method": "avgpool", "k": 2}})
    with reference.variant(token_ops=[{"op": "avgpool", "k": 2}]) as v:
        want = v.generate([_prompt("Pooled?", 1)], [[_image(4)]], max_new_tokens=6)[0]
        kept = v.prepare([[(_prompt("Pooled?", 1), None)]], [[_image(4)]]).visual_counts[0][0]
    assert r.choices[0].message.content == want
    assert r.usage.visual_tokens_in == 16 and r.usage.visual_tokens_kept == kept == 4


# ----------------------------------------------------------------------------------------------- bad input
def _bomb_png() -> bytes:
    """A small PNG whose header claims 1200 x 1000 pixels (over the test server's 1 MP), 1-bit so it stays tiny."""
    return _png(Image.new("1", (1200, 1000)))


def _noise_png() -> bytes:
    return _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))


def _with_url(url: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}], **extra}


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD = {
    "invalid json": (b"{not json", 400, "not valid JSON"),
    "body not an object": ([1, 2], 400, "JSON object"),
    "no messages": ({"model": "tiny", "messages": []}, 400, "non-empty list"),
    "last message not user": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                              "content": "b"}]}, 400, "last message"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}, 404, "not served here"),
    "empty user turn": ({"messages": [{"role": "user", "content": "   "}]}, 400, "user text is empty"),
    "n > 1": ({"messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "only n=1"),
    "temperature out of range": ({"messages": [{"role": "user", "content": "a"}], "temperature": 5}, 400,
                                 "temperature"),
    "top_p zero": ({"messages": [{"role": "user", "content": "a"}], "top_p": 0}, 400, "top_p"),
    "placeholder in text": ({"messages": [{"role": "user", "content": "<image> hi"}]}, 400, "image placeholder"),
    "http url": (_with_url("https://example.com/cat.png"), 400, "does not fetch image URLs"),
    "local path outside folder": (_with_url("file:///etc/hostname"), 403, "outside the folder"),
    "relative path": (_with_url("cat.png"), 400, "absolute path"),
    "bad base64": (_with_url("data:image/png;base64,@@@@"), 400, "not valid base64"),
    "not an image": (_with_url(_b64(b"hello, not a picture")), 400, "not a readable image"),
    "decompression bomb": (_with_url(_b64(_bomb_png())), 400, "decompression bomb"),
    "image bytes": (_with_url(_b64(_noise_png())), 413, "--max-image-bytes"),
    "request bytes": ({"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, "--max-request-bytes"),
    "too many images": ({"messages": _msg("three", _image(0), _image(1), _image(2))}, 400, "at most 2"),
    "max_tokens over the server limit": ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 1001}, 400,
                                         "limit of 1000"),
    "max_tokens beyond the context": ({"messages": [{"role": "user", "content": "a"}], "max_tokens": CONTEXT}, 400,
                                      "exceed the model's context"),
    "prompt beyond the context": ({"messages": [{"role": "user", "content": "y" * (CONTEXT + 10)}]}, 400,
                                  "context is 512"),
    "method not allowed": ({"messages": [{"role": "user", "content": "a"}], "compression": {"method": "random"}}, 400,
                           "not allowed on this server"),
    "bad knob": ({"messages": [{"role": "user", "content": "a"}], "compression": {"method": "fastv", "layer": 99}},
                 400, "layer 99"),
    "compression not an object": ({"messages": [{"role": "user", "content": "a"}], "compression": "fastv"}, 400,
                                  "'method' name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_style_4xx_and_the_server_keeps_serving(server, client, case):
    body, status, words = BAD[case]
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "Traceback" not in r.text
    _still_serving(client)


def test_the_openai_client_raises_its_own_error_types_on_4xx(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=_msg("a"), max_tokens=CONTEXT)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=_msg("a"))


def test_unknown_routes_and_methods_are_json_errors(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_a_local_path_without_the_flag_is_refused(saved, tmp_path):
    _image(0).save(tmp_path / "a.png")
    with ServerThread(CompactVLM.from_pretrained(saved), ServeSettings(model_name="tiny")) as srv:
        r = _post(srv, _with_url(str(tmp_path / "a.png")))
        assert r.status_code == 400 and "--allow-local-images" in r.json()["error"]["message"]
        r = _post(srv, {"messages": [{"role": "user", "content": "a"}], "compression": {"method": "fastv"}})
        assert r.status_code == 400 and "--allow-method" in r.json()["error"]["message"]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="max_queue must be a positive integer"):
        ServeSettings(max_queue=0)
    with pytest.raises(ConfigError, match="not a folder"):
        ServeSettings(local_image_dir="/no/such/folder")


# ----------------------------------------------------------------------------------------------- batching
def test_concurrent_answers_equal_serial_answers_and_are_batched(server, client, reference):
    prompts = [(f"Question number {i}?", [_image(i)] if i % 3 else []) for i in range(12)]
    serial = [client.chat.completions.create(model="tiny", messages=_msg(p, *ims), max_tokens=3 + i % 4)
              .choices[0].message.content for i, (p, ims) in enumerate(prompts)]
    alone = [reference.generate([_prompt(p, len(ims))], [ims], max_new_tokens=3 + i % 4)[0]
             for i, (p, ims) in enumerate(prompts)]
    assert serial == alone
    engine = server.engine
    gate, before = Gate(engine), len(engine.batch_sizes)
    out: dict[int, str] = {}

    def ask(i, p, ims):
        out[i] = client.chat.completions.create(model="tiny", messages=_msg(p, *ims),
                                                max_tokens=3 + i % 4).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, p, ims)) for i, (p, ims) in enumerate(prompts)]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: engine.queued + engine.active == len(prompts), "all requests queued")
        gate.open()
        for t in threads:
            t.join(60)
    finally:
        gate.close()
    assert [out[i] for i in range(len(prompts))] == serial
    sizes = engine.batch_sizes[before:]
    assert sum(sizes) == len(prompts) and 1 < max(sizes) <= engine.settings.max_batch


def _refused(srv) -> bool:
    try:
        httpx.get(srv.url + "/health", timeout=1)
    except httpx.TransportError:
        return True
    return False


def test_a_full_queue_gets_429_and_shutdown_finishes_in_flight_requests(saved):
    settings = ServeSettings(model_name="tiny", max_batch=1, max_queue=2, batch_wait_ms=0)
    srv = ServerThread(CompactVLM.from_pretrained(saved), settings).start()
    gate = Gate(srv.engine)
    results: dict[int, httpx.Response] = {}

    def ask(i):
        results[i] = _post(srv, {"messages": [{"role": "user", "content": f"in flight {i}"}], "max_tokens": 4})

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        _wait_for(lambda: srv.engine.active == 1 and srv.engine.queued == 2, "one decoding, two queued")
        full = _post(srv, {"messages": [{"role": "user", "content": "one too many"}]})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        stopper = threading.Thread(target=srv.stop)
        stopper.start()  # graceful: stops accepting, waits for the three requests
        _wait_for(lambda: _refused(srv), "the server to stop accepting connections")
        gate.open()
        for t in threads:
            t.join(60)
        stopper.join(60)
    finally:
        gate.close()
        srv.stop()
    assert [results[i].status_code for i in range(3)] == [200, 200, 200]
    assert all(results[i].json()["choices"][0]["message"]["content"] is not None for i in range(3))
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        _post(srv, {"messages": [{"role": "user", "content": "after"}]})


def test_after_close_the_engine_refuses_with_503(saved):
    srv = ServerThread(CompactVLM.from_pretrained(saved), ServeSettings(model_name="tiny"))
    srv.engine.close()

    async def submit():
        srv.engine.submit(ChatRequest([("a", None)], [], 2, 0.0, 1.0, False, False), {}, 2)

    with pytest.raises(ApiError, match="shutting down") as e:
        asyncio.run(submit())
    assert e.value.status == 503


def test_clients_that_disconnect_mid_stream_or_while_queued_do_not_break_the_server(server, client):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "bye"}], "max_tokens": 20, "stream": True}) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    engine = server.engine
    gate = Gate(engine)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits for the model
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "gone"}], "stream": True})
    finally:
        gate.close()
    _still_serving(client)


def test_bounded_load_has_no_errors(server, reference):
    n, prompts = 100, [f"load {i}" for i in range(100)]

    async def one(c, i):
        t0 = time.perf_counter()
        r = await c.chat.completions.create(model="tiny", messages=_msg(prompts[i], *([_image(i)] if i % 2 else [])),
                                            max_tokens=4)
        return r.choices[0].message.content, time.perf_counter() - t0

    async def go():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(n)), return_exceptions=True), 600)
        finally:
            await c.close()

    before = len(server.engine.batch_sizes)
    t0 = time.perf_counter()
    out = asyncio.run(go())
    wall = time.perf_counter() - t0
    errors = [o for o in out if isinstance(o, BaseException)]
    assert not errors, errors[:3]
    lat = sorted(t for _, t in out)
    sizes = server.engine.batch_sizes[before:]
    print(f"\nload: {n} requests in {wall:.2f} s ({n / wall:.1f} req/s), p50 {statistics.median(lat) * 1000:.0f} ms, "
          f"p95 {lat[int(0.95 * n) - 1] * 1000:.0f} ms, {len(sizes)} batches, sizes {sorted(sizes, reverse=True)}")
    assert sum(sizes) == n
    for i in (0, 1, 50, 99):
        ims = [_image(i)] if i % 2 else []
        assert out[i][0] == reference.generate([_prompt(prompts[i], len(ims))], [ims], max_new_tokens=4)[0]
