"""Prompts for a transformers VLM's processor: compactvl questions and conversations (``<image>`` placeholders) or
transformers chat messages, rendered with the processor's chat template (or as plain text with its image token)."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ConfigError, InputError
from ..processor import IMAGE_PLACEHOLDER


def to_messages(prompt: str | Sequence[tuple[str, str | None]], n_images: int) -> list[dict]:
    """A question or a compactvl conversation -> transformers chat messages; ``<image>`` placeholders become image
    entries (where there are none, the sample's images go first in the first user turn)."""
    turns = [(prompt, None)] if isinstance(prompt, str) else list(prompt)
    placed = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in turns)
    if placed not in (0, n_images):
        raise InputError(f"the prompt has {placed} '{IMAGE_PLACEHOLDER}' placeholder(s) but {n_images} image(s); give "
                         f"one placeholder per image, or none to put the images first")
    out = []
    for i, (user, answer) in enumerate(turns):
        parts = user.split(IMAGE_PLACEHOLDER)
        content = [{"type": "image"}] * n_images if i == 0 and placed == 0 and n_images else []
        for j, part in enumerate(parts):
            if j:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        out.append({"role": "user", "content": content})
        if answer is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def render_prompts(proc: Any, prompts, images, messages, raw: bool = False,
                   generation_prompt: bool = True) -> tuple[list[str], list[Any]]:
    """(prompt strings for ``proc``, the images in order) — see ``CompressedVLM.generate`` for the inputs.
    ``generation_prompt=False`` renders conversations that end with an answer (``CompressedVLM.loglikelihood``)."""
    if (prompts is None) == (messages is None):
        raise InputError("give either prompts (strings / conversations) or messages (chat messages), not both or "
                         "neither")
    n = len(prompts if prompts is not None else messages)
    images = [None] * n if images is None else list(images)
    if len(images) != n:
        raise InputError(f"got {n} prompts but {len(images)} image entries; give one entry (an image, a list of "
                         f"images or None) per prompt")
    per = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    if messages is not None:
        convs = [list(conv) for conv in messages]
        for conv, ims in zip(convs, per):
            for turn in conv:
                content = turn.get("content")
                if isinstance(content, list):
                    ims.extend(c["image"] for c in content if c.get("type") == "image" and "image" in c)
    elif raw:
        if not all(isinstance(p, str) for p in prompts):
            raise InputError("raw=True takes prompt strings; render conversations without raw")
        return list(prompts), [im for ims in per for im in ims]
    else:
        convs = [to_messages(p, len(ims)) for p, ims in zip(prompts, per)]
    if getattr(proc, "chat_template", None):
        texts = [proc.apply_chat_template(conv, add_generation_prompt=generation_prompt, tokenize=False)
                 for conv in convs]
    elif messages is not None:
        raise ConfigError("the processor has no chat template to render messages with; pass prompts instead")
    else:
        token = getattr(proc, "image_token", None) or IMAGE_PLACEHOLDER
        texts = ["\n".join("".join(token if c["type"] == "image" else c["text"] for c in turn["content"])
                           for turn in conv) for conv in convs]
    return texts, [im for ims in per for im in ims]
