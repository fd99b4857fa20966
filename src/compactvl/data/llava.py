"""LLaVA conversation data: records, validation, loading and writing.

The format LLaVA-558K/665K use: a JSON list (``.json``) or one record per line (``.jsonl``) of

    {"id": "000001", "image": "coco/000001.jpg",            # a string, a list of strings, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

plus an image folder the ``image`` paths are relative to. Turns alternate human/gpt, start with human and end
with gpt (the answer); the human turns hold one ``<image>`` placeholder per image. compactvl adds two optional
keys, ``category`` (for per-category accuracy) and ``meta`` (a dict, e.g. synthvqa's difficulty).

Every record is validated up front; a malformed one raises :class:`InputError` naming the file and record
index, or — with ``skip_malformed=True`` — is skipped and listed in ``dataset.skipped`` / ``dataset.report()``.
Images are opened when a sample is read, not when the file is loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..atomic import write_file_atomically
from ..errors import InputError
from ..images import load_image

from ..processor import IMAGE_PLACEHOLDER  # one definition, shared with the text side
_USER, _ASSISTANT = {"human", "user"}, {"gpt", "assistant"}


@dataclass
class Sample:
    """One training/eval example. ``images`` hold PIL images or paths; ``answer`` is the final gpt turn."""

    id: str
    images: list[Image.Image | str]
    conversations: list[dict[str, str]]
    category: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer is None and self.conversations and self.conversations[-1].get("from") in _ASSISTANT:
            self.answer = self.conversations[-1].get("value")

    @property
    def question(self) -> str:
        """The first human turn without its image placeholders."""
        return self.conversations[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()

    def load_images(self) -> list[Image.Image]:
        """The images as RGB PIL images, through the one safe loader (``compactvl.images.load_image``: pixel limit,
        bombs refused, every error an InputError naming the file)."""
        return [load_image(im) for im in self.images]


def split_turns(conversations: Any) -> list[tuple[str, str]]:
    """``[(user_text, assistant_text), ...]`` from LLaVA turns; raises InputError unless they alternate
    human/gpt (``user``/``assistant`` accepted too), start with human and end with a non-empty gpt answer."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError("'conversations' is missing or empty; give a list of human/gpt turns ending with "
                         "the gpt answer")
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise InputError(f"turn {j} is not an object with 'from' and a string 'value'; write turns as "
                             '{"from": "human", "value": "..."}')
        want, allowed = ("human", _USER) if j % 2 == 0 else ("gpt", _ASSISTANT)
        if turn["from"] not in allowed:
            raise InputError(f"turn {j} is from {turn['from']!r} but should be from '{want}'; turns must "
                             "alternate human, gpt, human, gpt, ...")
    if len(conversations) % 2:
        raise InputError("the last turn is from 'human', so the record has no answer; end it with a 'gpt' turn")
    if not conversations[-1]["value"].strip():
        raise InputError("the last gpt turn (the answer) is empty; give it the answer text")
    return [(conversations[j]["value"], conversations[j + 1]["value"]) for j in range(0, len(conversations), 2)]


def check_placeholders(conversations: list[dict[str, str]], n_images: int) -> None:
    """Raise InputError unless the human turns hold exactly one ``<image>`` per image."""
    n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] in _USER)
    if n != n_images:
        raise InputError(f"the human turns hold {n} '{IMAGE_PLACEHOLDER}' placeholder(s) but the record has "
                         f"{n_images} image(s); put exactly one '{IMAGE_PLACEHOLDER}' per image in the human turns")


class LlavaDataset(Dataset):
    """A LLaVA ``.json``/``.jsonl`` file as a dataset of :class:`Sample` (images opened on access).

    ``image_folder`` defaults to the JSON file's folder; ``limit`` reads only the first records. ``check_images``
    decodes every image while loading (default: when ``skip_malformed``, so an unreadable image is a malformed
    record that is skipped, not an error at that sample during training or evaluation; ``data check`` always does).
    """

    def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                 skip_malformed: bool = False, limit: int | None = None, check_images: bool | None = None):
        self.check_images = skip_malformed if check_images is None else check_images
        self.path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.skip_malformed = skip_malformed
        self.skipped: list[tuple[int, str]] = []
        self.samples: list[Sample] = []
        self._index: list[int] = []  # record index of each kept sample
        if not self.path.is_file():
            raise InputError(f"LLaVA data file {self.path} does not exist; pass the path of a .json/.jsonl file")
        if not self.image_folder.is_dir():
            raise InputError(f"image folder {self.image_folder} does not exist; pass the folder the records' "
                             "'image' paths are relative to")
        for i, rec in enumerate(self._records(limit)):
            try:
                if isinstance(rec, _BadLine):
                    raise InputError(rec.reason)
                self.samples.append(self._parse(i, rec))
                self._index.append(i)
            except InputError as e:
                if not skip_malformed:
                    raise InputError(f"{self.path}: record {i}{_id_part(rec)}: {e} "
                                     "(or pass skip_malformed=True / --skip-malformed to skip such records)") from None
                self.skipped.append((i, str(e)))
        if not self.samples:
            if self.skipped:
                i, why = self.skipped[0]
                raise InputError(f"{self.path}: all {len(self.skipped)} records are malformed and were skipped "
                                 f"(first, record {i}: {why}); fix the file")
            raise InputError(f"{self.path}: the dataset is empty (no records); a LLaVA data file is a JSON list "
                             "of records with 'id', 'image' and 'conversations'")

    def _records(self, limit: int | None) -> Iterable[Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {self.path}: {e}; check the file is readable UTF-8 text") from None
        if self.path.suffix == ".jsonl":
            lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()][:limit]
            for n, ln in lines:
                try:
                    yield json.loads(ln)
                except json.JSONDecodeError as e:
                    yield _BadLine(f"line {n} is not valid JSON ({e.msg} at column {e.colno}); fix that line")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{self.path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the "
                             "file, or write one record per line as .jsonl to skip bad lines") from None
        if not isinstance(data, list):
            raise InputError(f"{self.path}: the top level is a JSON {type(data).__name__}, not a list of records; "
                             "wrap the records in [...]")
        yield from data[:limit]

    def _parse(self, i: int, rec: Any) -> Sample:
        if not isinstance(rec, dict):
            raise InputError(f"the record is a JSON {type(rec).__name__}, not an object; write it as "
                             '{"id": ..., "image": ..., "conversations": [...]}')
        conv = rec.get("conversations")
        split_turns(conv)
        image = rec.get("image")
        names = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise InputError("'image' must be a file name or a list of file names")
        check_placeholders(conv, len(names))
        paths = []
        for name in names:
            p = (self.image_folder / name).resolve()
            if not p.is_file():
                raise InputError(f"image file '{name}' not found at {p}; pass the image folder it is relative "
                                 "to (image_folder= / --image-folder) or remove the record")
            if self.check_images:
                load_image(p)
            paths.append(str(p))
        cat, meta = rec.get("category"), rec.get("meta")
        return Sample(id=str(rec.get("id", i)), images=paths, conversations=conv,
                      category=cat if isinstance(cat, str) else None, meta=meta if isinstance(meta, dict) else {})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Sample:
        s = self.samples[idx]
        try:
            return dataclasses.replace(s, images=s.load_images(), meta=dict(s.meta))
        except InputError as e:
            raise InputError(f"{self.path}: record {self._index[idx]} (id {s.id}): {e}") from None

    def report(self) -> str:
        """One line of counts, then the first skipped records with their reasons."""
        lines = [f"{self.path}: {len(self.samples)} records loaded, {len(self.skipped)} malformed skipped"]
        lines += [f"  record {i}: {why}" for i, why in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more")
        return "\n".join(lines)


class _BadLine(NamedTuple):
    reason: str


def _id_part(rec: Any) -> str:
    return f" (id {rec['id']})" if isinstance(rec, dict) and "id" in rec else ""


class Written(NamedTuple):
    json_path: Path
    records: int
    images: int


def write_llava(samples: Iterable[Sample], out_dir: str | os.PathLike, name: str = "data",
                progress: bool = False) -> Written:
    """Write samples as ``out_dir/<name>.json`` plus PNGs under ``out_dir/images/`` (each file written to a
    temp name and renamed; the JSON last). Identical images are written once. Reload with
    ``LlavaDataset(out_dir / f"{name}.json")``."""
    out = Path(out_dir)
    if not re.fullmatch(r"[\w.-]+", name):
        raise InputError(f"export name {name!r} must be a plain file name (letters, digits, '_', '-', '.')")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise InputError(f"cannot write to output directory {out} ({e.strerror or e}); choose a writable "
                         "directory for --out / out_dir") from None
    records, written, used = [], {}, set()
    total = len(samples) if hasattr(samples, "__len__") else None
    for i, s in enumerate(tqdm(samples, total=total, disable=not progress, desc=f"writing {name}", unit="sample")):
        try:
            split_turns(s.conversations)
            check_placeholders(s.conversations, len(s.images))
        except InputError as e:
            raise InputError(f"cannot export sample {i} (id {s.id}): {e}") from None
        rels = []
        try:
            images = s.load_images()
        except InputError as e:
            raise InputError(f"cannot export sample {i} (id {s.id}): {e}") from None
        for k, im in enumerate(images):
            key = hashlib.blake2b(f"{im.mode}{im.size}".encode() + im.tobytes(), digest_size=16).hexdigest()
            if key not in written:
                stem = re.sub(r"[^\w.-]", "_", s.id) + (f"_{k}" if len(s.images) > 1 else "")
                rel, n = f"images/{stem}.png", 1
                while rel in used:
                    rel, n = f"images/{stem}-{n}.png", n + 1
                used.add(rel)
                png = io.BytesIO()
                im.save(png, format="PNG")
                write_file_atomically(out / rel, png.getvalue())
                written[key] = rel
            rels.append(written[key])
        rec: dict[str, Any] = {"id": s.id}
        if rels:
            rec["image"] = rels[0] if len(rels) == 1 else rels
        rec["conversations"] = s.conversations
        if s.category is not None:
            rec["category"] = s.category
        if s.meta:
            rec["meta"] = s.meta
        records.append(rec)
    if not records:
        raise InputError("nothing to export: the sample list is empty; ask for at least one sample")
    path = out / f"{name}.json"
    write_file_atomically(path, json.dumps(records, indent=1, ensure_ascii=False))
    return Written(path, len(records), len(written))
