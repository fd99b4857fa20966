"""The OpenAI chat-completions request, checked and turned into what the model takes: conversation turns, decoded
images, sampling settings and an optional compression override. Every refusal is an :class:`ApiError` with its HTTP
status and an OpenAI-style body; nothing here touches the model (the token and compression checks that need it are
``compactvl.serve.engine``'s).

Accepted ``messages``: an optional leading ``system`` message (its text goes in front of the first user turn: a
saved CompactVLM carries its own system prompt in its config), then ``user`` / ``assistant`` turns alternating and
ending with ``user``. A message's ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": ...}}``; each image part becomes the model's image placeholder where it
stands. Image URLs: ``data:image/...;base64,...`` always; a local path (``file:///abs/path`` or ``/abs/path``) only
inside the folder the server names with ``--allow-local-images`` (403 elsewhere); ``http(s)://`` never (400: the
server does not fetch URLs).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..images import FORMATS, load_image
from .settings import ServeSettings


class ApiError(Exception):
    """A refusal the client sees as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    turns: list[tuple[str, str | None]]  # [(user, assistant), ...], the last assistant None
    images: list[Image.Image]
    max_tokens: int | None  # None: the server's default, within what the context leaves
    temperature: float  # 0: greedy
    top_p: float
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    compression: dict | None = None  # {"method": name, **knobs}


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}], got {value!r}", param=name)
    return float(value)


def parse_chat_request(body: Any, settings: ServeSettings, image_token: str) -> ChatRequest:
    """Check a decoded JSON body of ``POST /v1/chat/completions``; decode its images within the limits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"model '{model}' is not served here; this server serves '{settings.model_name}' "
                            "(GET /v1/models)", param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported; send several requests instead", param="n")
    for name in ("tools", "functions", "logprobs", "response_format"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"'max_tokens' is {max_tokens}, above this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    compression = body.get("compression")
    if compression is not None:
        if not isinstance(compression, dict) or not isinstance(compression.get("method"), str):
            raise ApiError(400, "'compression' must be an object with a 'method' name and its knobs, e.g. "
                                '{"method": "fastv", "layer": 2, "keep": 0.5}', param="compression")
        if compression["method"] not in settings.allowed_methods:
            allowed = ", ".join(settings.allowed_methods) or "none (start the server with --allow-method NAME)"
            raise ApiError(400, f"compression method '{compression['method']}' is not allowed on this server; "
                                f"allowed: {allowed}", param="compression")
    turns, images = _conversation(body.get("messages"), settings, image_token)
    return ChatRequest(turns, images, max_tokens, temperature, top_p, stream, bool(options.get("include_usage")),
                       stop, seed, compression)


def _conversation(messages: Any, settings: ServeSettings, image_token: str):
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    system, turns, images, user = [], [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           param=f"messages[{i}]")
        role, text = m["role"], _content(m.get("content"), i, settings, image_token, images)
        if role in ("system", "developer"):
            if turns or user is not None:
                raise ApiError(400, f"messages[{i}]: a system message may only come first", param=f"messages[{i}]")
            system.append(text)
        elif role == "user":
            if user is not None:
                raise ApiError(400, f"messages[{i}]: two user messages in a row; alternate user and assistant",
                               param=f"messages[{i}]")
            user = "\n".join([*system, text]) if not turns else text
        else:
            if user is None:
                raise ApiError(400, f"messages[{i}]: an assistant message must follow a user message",
                               param=f"messages[{i}]")
            turns.append((user, text))
            user = None
    if user is None:
        raise ApiError(400, "the last message must be a user message", param="messages")
    if len(images) > settings.max_images:
        raise ApiError(400, f"{len(images)} images in one request; this server takes at most {settings.max_images}",
                       param="messages")
    return [*turns, (user, None)], images


def _content(content: Any, i: int, settings: ServeSettings, image_token: str, images: list) -> str:
    where = f"messages[{i}].content"
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if image_token in part["text"]:
                raise ApiError(400, f"{where}[{j}]: the text contains '{image_token}', the model's image "
                                    "placeholder; send images as image_url parts instead", param=where)
            out.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"{where}[{j}]: image_url needs a 'url' string", param=where)
            if len(images) >= settings.max_images:
                raise ApiError(400, f"more than {settings.max_images} images in one request; this server takes at "
                                    f"most {settings.max_images}", param="messages")
            images.append(load_request_image(url, settings, f"{where}[{j}]"))
            out.append(image_token)
        else:
            raise ApiError(400, f"{where}[{j}]: a part must be {{'type': 'text', 'text': ...}} or "
                                "{'type': 'image_url', 'image_url': {'url': ...}}", param=where)
    return "\n".join(out)


def load_request_image(url: str, settings: ServeSettings, where: str) -> Image.Image:
    """A data URL or an allowed local path → an upright RGB image within the pixel limit (checked on the header,
    before decoding)."""
    low = url[:16].lower()
    if low.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: this server does not fetch image URLs; send the image as a base64 data URL "
                            "(data:image/png;base64,...)", param=where, code="image_url_not_allowed")
    if low.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64") or not header[5:].lower().startswith("image/"):
            raise ApiError(400, f"{where}: a data URL must look like data:image/png;base64,<data>", param=where)
        if len(payload) * 3 // 4 > settings.max_image_bytes + 3:  # refused before decoding the base64 itself
            raise ApiError(413, f"{where}: the image is over {settings.max_image_bytes} bytes (--max-image-bytes)",
                           param=where, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: the data URL is not valid base64 ({e})", param=where) from e
        if len(data) > settings.max_image_bytes:
            raise ApiError(413, f"{where}: the image is {len(data)} bytes, over {settings.max_image_bytes} "
                                "(--max-image-bytes)", param=where, code="image_too_large")
        return _decode(data, settings, where)
    return _local(url, settings, where)


def _decode(data: bytes, settings: ServeSettings, where: str) -> Image.Image:
    Image.init()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: our pixel limit below is the stricter one
            img = Image.open(io.BytesIO(data), formats=[f for f in FORMATS if f in Image.OPEN])
            return load_image(img, max_pixels=settings.max_image_pixels)
    except InputError as e:
        raise ApiError(400, f"{where}: {e}", param=where, code="invalid_image") from e
    except Exception as e:  # untrusted bytes: Pillow's header parsers raise many kinds (bombs included)
        raise ApiError(400, f"{where}: not a readable image ({type(e).__name__}: {e}); send PNG, JPEG, WebP, GIF, "
                            "BMP or TIFF", param=where, code="invalid_image") from e


def _local(url: str, settings: ServeSettings, where: str) -> Image.Image:
    if settings.local_image_dir is None:
        raise ApiError(400, f"{where}: local image paths are not enabled on this server (start it with "
                            "--allow-local-images FOLDER) and the URL is not a data URL", param=where,
                       code="image_url_not_allowed")
    raw = url[len("file://"):] if url.lower().startswith("file://") else url
    if "://" in raw or not os.path.isabs(raw):
        raise ApiError(400, f"{where}: give an absolute path inside {settings.local_image_dir} (or file:///...)",
                       param=where, code="image_url_not_allowed")
    path = Path(raw).resolve()  # symlinks and .. resolved before the folder check
    if not path.is_relative_to(settings.local_image_dir):
        raise ApiError(403, f"{where}: {raw} is outside the folder this server reads images from", param=where,
                       code="image_path_not_allowed")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ApiError(400, f"{where}: cannot read {raw} ({e.strerror})", param=where, code="invalid_image") from e
    if size > settings.max_image_bytes:
        raise ApiError(413, f"{where}: the image is {size} bytes, over {settings.max_image_bytes} (--max-image-bytes)",
                       param=where, code="image_too_large")
    try:
        return load_image(path, max_pixels=settings.max_image_pixels)
    except InputError as e:
        raise ApiError(400, f"{where}: {e}", param=where, code="invalid_image") from e
