"""From dataset samples to model inputs (used by training, evaluation and the demo).

``collate(samples)`` turns :class:`~compactvl.data.Sample` objects into a :class:`SampleBatch` of conversations and
PIL images (cheap, picklable, safe in DataLoader workers). ``Collator(model)`` goes on to ``CompactVLM.prepare``:
the chat template, label masking (only assistant answers are trained), left padding, and the images through each
encoder's own preprocessing. With ``for_generation=True`` the final answer is cut off so the model must produce it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from .llava import Sample, check_placeholders, split_turns
from ..errors import InputError

Turns = list[tuple[str, "str | None"]]


@dataclass
class SampleBatch:
    ids: list[str]
    conversations: list[Turns]  # [(user, assistant), ...]; the last assistant is None when for_generation
    images: list[list[Image.Image]]
    answers: list[str | None]
    categories: list[str | None]
    questions: list[str]
    meta: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ids)


def sample_turns(sample: Sample, for_generation: bool = False) -> Turns:
    """The sample's (user, assistant) turns; raises InputError naming the sample when it is malformed."""
    try:
        turns: Turns = list(split_turns(sample.conversations))
    except InputError as e:
        raise InputError(f"sample {sample.id}: {e}") from None
    try:
        check_placeholders(sample.conversations, len(sample.images))
    except InputError as e:
        raise InputError(f"sample {sample.id}: {e}") from None
    if for_generation:
        turns[-1] = (turns[-1][0], None)
    return turns


def collate(samples: Sequence[Sample], for_generation: bool = False) -> SampleBatch:
    """Group samples; images are opened (paths) and converted to RGB here."""
    if not samples:
        raise InputError("empty batch: the data loader gave no samples; check the dataset is not empty")
    images = []
    for s in samples:
        try:
            images.append(s.load_images())
        except InputError as e:
            raise InputError(f"sample {s.id}: {e}") from None
    return SampleBatch(
        ids=[s.id for s in samples],
        conversations=[sample_turns(s, for_generation) for s in samples],
        images=images,
        answers=[s.answer for s in samples],
        categories=[s.category for s in samples],
        questions=[s.question for s in samples],
        meta=[dict(s.meta) for s in samples],
    )


class Collator:
    """``Collator(model)(samples) -> VLMInputs`` with labels (training) or without (``for_generation``)."""

    def __init__(self, model, for_generation: bool = False):
        self.model = model
        self.for_generation = for_generation

    def __call__(self, samples: Sequence[Sample] | SampleBatch):
        batch = samples if isinstance(samples, SampleBatch) else collate(samples, self.for_generation)
        return self.model.prepare(batch.conversations, batch.images, with_labels=not self.for_generation)
