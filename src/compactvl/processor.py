"""Text side of the VLM: chat template, image placeholders, label masking, and batch assembly.

A prompt or conversation is rendered with the tokenizer's chat template (a plain ``User:/Assistant:`` template
when the tokenizer has none), split at the image placeholder (``<image>``), and tokenized segment by segment, so no
image token has to exist in the vocabulary. ``assemble`` then lays out a left-padded batch where each image
placeholder is expanded to the number of visual tokens its image kept; the visual embeddings are written into those
slots by one masked scatter in the model.

Labels: only assistant answers (and the end-of-turn text the template puts after them) are trained; everything else
is ``IGNORE_INDEX``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class EncodedConversation:
    """One sample's rendered conversation as token ids: ``ids`` with ``IMAGE_SLOT`` entries (value -1) where an image
    goes, the training ``labels`` aligned with them, and the user-turn text ids ``prompt_ids``."""

    ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)  # text of the user turns (for text-conditioned token ops)

    @property
    def num_images(self) -> int:
        return sum(1 for i in self.ids if i == IMAGE_SLOT)


IMAGE_SLOT = -1


def answer_span(with_answer: Sequence[int], with_empty: Sequence[int]) -> tuple[int, int]:
    """Where an answer's tokens lie in a rendered conversation: ``(k, tail)``, the answer's ``k`` tokens end ``tail``
    tokens before the end of ``with_answer``. ``with_empty`` is the same conversation rendered with an empty answer;
    what it has after the part both share is the template's end of turn (the tail), unless the template ends turns in a
    way that depends on the answer (then the tail is 0 and the whole rest is scored). Used by ``loglikelihood``
    (``compactvl.lmms``, ``CompressedVLM.loglikelihood``) so both kinds of model score the same tokens."""
    p = 0
    while p < min(len(with_answer), len(with_empty)) and with_answer[p] == with_empty[p]:
        p += 1
    span, tail = list(with_answer[p:]), list(with_empty[p:])
    if tail and span[len(span) - len(tail):] != tail:
        tail = []
    if len(span) - len(tail) <= 0:
        raise InputError("the answer renders to no tokens of its own; loglikelihood needs a non-empty answer")
    return len(span) - len(tail), len(tail)


class ConversationTooLong(InputError):
    """A conversation needs more positions than the LM's context (raised by :meth:`Processor.check_conversation`)."""


@dataclass
class Batch:
    ids: Tensor  # [B, L] token ids (pad_token_id in pads and visual slots)
    attention_mask: Tensor  # [B, L] bool
    visual_mask: Tensor  # [B, L] bool
    labels: Tensor | None  # [B, L] or None


class Processor:
    def __init__(self, tokenizer, image_token: str = IMAGE_PLACEHOLDER, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.system_prompt = system_prompt
        self.template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    # ---------------------------------------------------------------- rendering
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _tokens(self, text: str, label: bool, out: EncodedConversation) -> None:
        parts = text.split(self.image_token)
        for j, part in enumerate(parts):
            if j:
                out.ids.append(IMAGE_SLOT)
                out.labels.append(IGNORE_INDEX)
            if part:
                ids = self.tokenizer(part, add_special_tokens=False)["input_ids"]
                out.ids.extend(ids)
                out.labels.extend(ids if label else [IGNORE_INDEX] * len(ids))

    def encode_conversation(self, turns: Sequence[tuple[str, str | None]]) -> EncodedConversation:
        """``turns`` = [(user, assistant), ...]; the last assistant may be None (generation prompt)."""
        if not turns:
            raise InputError("empty conversation: give at least one user turn")
        out = EncodedConversation(ids=[], labels=[])
        messages: list[dict] = []
        done = ""
        for t, (user, answer) in enumerate(turns):
            if not isinstance(user, str) or not user.strip():
                raise InputError(f"turn {t}: the user text is empty; every turn needs a question")
            messages.append({"role": "user", "content": user})
            prefix = self._render(messages, add_generation_prompt=True)
            if not prefix.startswith(done):
                raise InputError("the chat template does not render turns as a prefix of the conversation; "
                                 "pass a simpler chat template to the processor")
            self._tokens(prefix[len(done):], False, out)
            out.prompt_ids.extend(self.tokenizer(user.replace(self.image_token, " "), add_special_tokens=False)["input_ids"])
            done = prefix
            if answer is None:
                if t != len(turns) - 1:
                    raise InputError(f"turn {t} has no answer but is not the last turn")
                break
            messages.append({"role": "assistant", "content": answer})
            full = self._render(messages, add_generation_prompt=False)
            self._tokens(full[len(done):], True, out)
            done = full
        return out

    def check_conversation(self, turns: Sequence[tuple[str, str]], n_images: int, max_length: int | None = None,
                           visual_tokens_per_image: int = 0) -> int:
        """Encode ``turns`` exactly as training does and return the positions the sample needs (its text tokens plus
        ``visual_tokens_per_image`` per image). Raises InputError where training would fail on it: an empty user
        turn, text the tokenizer cannot encode (e.g. an unpaired surrogate), a placeholder count other than
        ``n_images`` (``<image>`` in an answer), no answer token to train on, or — :class:`ConversationTooLong` —
        more than ``max_length`` positions. Data validation calls it through ``LlavaDataset(validator=...)``."""
        try:
            enc = self.encode_conversation(turns)
        except (TypeError, ValueError) as e:  # tokenizers refuse unencodable text (lone surrogates) with TypeError
            raise InputError(f"the tokenizer cannot encode the text ({type(e).__name__}: {str(e)[:200]}); remove "
                             "unpaired surrogates and other unencodable characters") from None
        if enc.num_images != n_images:
            raise InputError(f"the rendered conversation holds {enc.num_images} '{self.image_token}' placeholder(s) "
                             f"but the record has {n_images} image(s); '{self.image_token}' may appear only in the "
                             "human turns, once per image")
        if all(y == IGNORE_INDEX for y in enc.labels[1:]):
            raise InputError("the answer has no token to train on; give a non-empty answer")
        n = len(enc.ids) - enc.num_images + n_images * visual_tokens_per_image
        if max_length is not None and n > max_length:
            raise ConversationTooLong(f"the sample needs {n} positions ({n_images} image(s) at "
                                      f"{visual_tokens_per_image} visual tokens each) but the LM's context is "
                                      f"{max_length}; shorten the conversation or drop the record")
        return n

    # ---------------------------------------------------------------- batching
    def assemble(self, encoded: Sequence[EncodedConversation], visual_counts: Sequence[Sequence[int]],
                 with_labels: bool = False) -> Batch:
        """Left-padded batch; image slot j of sample b becomes ``visual_counts[b][j]`` visual positions."""
        if len(encoded) == 0:
            raise InputError("empty batch: give at least one sample")
        rows, labs, vis = [], [], []
        for b, (enc, counts) in enumerate(zip(encoded, visual_counts)):
            if enc.num_images != len(counts):
                raise InputError(
                    f"sample {b}: the prompt has {enc.num_images} image placeholder(s) ('{self.image_token}') but "
                    f"{len(counts)} image(s) were given; give one image per placeholder"
                )
            it = iter(counts)
            ids, lab, v = [], [], []
            for tok, y in zip(enc.ids, enc.labels):
                if tok == IMAGE_SLOT:
                    n = next(it)
                    ids += [self.pad_token_id] * n
                    lab += [IGNORE_INDEX] * n
                    v += [True] * n
                else:
                    ids.append(tok)
                    lab.append(y)
                    v.append(False)
            rows.append(ids)
            labs.append(lab)
            vis.append(v)
        L = max(len(r) for r in rows)
        B = len(rows)
        ids_t = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        lab_t = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        vmask = torch.zeros(B, L, dtype=torch.bool)
        for b, (r, y, v) in enumerate(zip(rows, labs, vis)):
            n = len(r)
            ids_t[b, L - n:] = torch.tensor(r, dtype=torch.long)
            lab_t[b, L - n:] = torch.tensor(y, dtype=torch.long)
            mask[b, L - n:] = True
            vmask[b, L - n:] = torch.tensor(v, dtype=torch.bool)
        return Batch(ids_t, mask, vmask, lab_t if with_labels else None)

    def text_batch(self, encoded: Sequence[EncodedConversation]) -> tuple[Tensor, Tensor]:
        """User-turn text ids [B, T] (left padded) and mask: what text-conditioned token ops (CoTR) may read.
        Answers are never included, so training cannot leak them into the visual tokens."""
        T = max(1, max(len(e.prompt_ids) for e in encoded))
        text = torch.full((len(encoded), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for b, e in enumerate(encoded):
            if e.prompt_ids:
                text[b, T - len(e.prompt_ids):] = torch.tensor(e.prompt_ids, dtype=torch.long)
                mask[b, T - len(e.prompt_ids):] = True
        return text, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
