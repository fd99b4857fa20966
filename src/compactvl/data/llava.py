"""LLaVA conversation data: records, validation, loading and writing.

The format LLaVA-558K/665K use: a JSON list (``.json``) or one record per line (``.jsonl``) of

    {"id": "000001", "image": "coco/000001.jpg",            # a string, a list of strings, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

plus an image folder the ``image`` paths are relative to. Turns alternate human/gpt, start with human and end
with gpt (the answer); the human turns hold one ``<image>`` placeholder per image. compactvl adds two optional
keys, ``category`` (for per-category accuracy) and ``meta`` (a dict, e.g. synthvqa's difficulty).

Every record is validated up front — types, sizes, turns, placeholders and, given a ``validator`` built from the
model, tokenisation and context length — so a record that loads is one training can use; a malformed one raises
:class:`InputError` naming the file, record index and id, or — with ``skip_malformed=True`` — is skipped, listed in
``dataset.skipped`` and counted by reason in ``dataset.skip_reasons`` / ``dataset.report()``. Images are opened
when a sample is read (and decoded while loading with ``check_images``).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from tqdm import tqdm

from ..atomic import write_file_atomically
from ..errors import InputError
from ..images import load_image

from ..processor import IMAGE_PLACEHOLDER, ConversationTooLong  # one definition, shared with the text side
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


MAX_DEPTH = 32  # nesting levels a record may have (LLaVA records use 4)
MAX_STRING = 1_000_000  # characters in one string of a record
MAX_NAME = 4096  # characters in one image name
MAX_DIGITS = 4300  # digits in one JSON integer (Python's int/str conversion limit)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BigInt(NamedTuple):  # a JSON integer over MAX_DIGITS digits: the record holding it fails alone
    digits: int


_DECODER = json.JSONDecoder(parse_int=lambda t: _BigInt(len(t)) if len(t.lstrip("-")) > MAX_DIGITS else int(t))


def _bad(kind: str, error: str | InputError) -> InputError:
    """An InputError tagged with its reason class (``LlavaDataset.skip_reasons`` counts them; a tag stays)."""
    e = InputError(error) if isinstance(error, str) else error
    if not hasattr(e, "kind"):
        e.kind = kind  # type: ignore[attr-defined]
    return e


def _short(x: Any, n: int = 60) -> str:
    """``repr`` of a string cut to ``n`` characters (messages stay readable and printable), else its JSON type."""
    kinds = {dict: "object", list: "list", bool: "boolean", type(None): "null", _BigInt: "number"}
    r = repr(x) if isinstance(x, str) else f"a JSON {kinds.get(type(x), 'number')}"
    return r if len(r) <= n else r[:n - 4] + "...'"


def _where(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{_clean(k, 40)}" for k in path).lstrip(".") or "the record"


def check_values(rec: Any) -> None:
    """Raise InputError (iteratively, so any depth is safe) for nesting deeper than MAX_DEPTH, a string over
    MAX_STRING characters, an unpaired surrogate (no UTF-8 encoding exists: tokenizers refuse it) or an integer
    over MAX_DIGITS digits anywhere in a record, naming where."""
    stack: list[tuple[Any, tuple]] = [(rec, ())]
    while stack:
        x, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise _bad("too large", f"{_where(path[:MAX_DEPTH])} nests deeper than {MAX_DEPTH} levels; flatten it")
        if isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, path + ("<key>",)))
                stack.append((v, path + (k if not _SURROGATE.search(k) else "<key>",)))
        elif isinstance(x, list):
            stack.extend((v, path + (j,)) for j, v in enumerate(x))
        elif isinstance(x, str):
            if len(x) > MAX_STRING:
                raise _bad("too large", f"{_where(path)} is a string of {len(x):,} characters, over the "
                                        f"{MAX_STRING:,} limit; shorten it")
            m = _SURROGATE.search(x)
            if m:
                raise _bad("text encoding", f"{_where(path)} holds an unpaired surrogate (\\u{ord(m.group()):04x} at "
                                            f"character {m.start()}), which has no UTF-8 encoding; fix the text")
        elif isinstance(x, _BigInt):
            raise _bad("too large", f"{_where(path)} is an integer of {x.digits:,} digits, over the {MAX_DIGITS:,} "
                                    "limit; write it as a string")


def split_turns(conversations: Any) -> list[tuple[str, str]]:
    """``[(user_text, assistant_text), ...]`` from LLaVA turns; raises InputError unless they alternate
    human/gpt (``user``/``assistant`` accepted too), start with human, have no blank human turn and end with a
    non-empty gpt answer."""
    if not isinstance(conversations, list) or not conversations:
        raise _bad("conversation", "'conversations' is missing or empty; give a list of human/gpt turns ending "
                                   "with the gpt answer")
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise _bad("field type", f"turn {j} is not an object with 'from' and a string 'value'; write turns as "
                                     '{"from": "human", "value": "..."}')
        if not isinstance(turn["from"], str):
            raise _bad("field type", f"turn {j}: 'from' is {_short(turn['from'])}, not a string; write "
                                     "\"from\": \"human\" or \"from\": \"gpt\"")
        want, allowed = ("human", _USER) if j % 2 == 0 else ("gpt", _ASSISTANT)
        if turn["from"] not in allowed:
            raise _bad("conversation", f"turn {j} is from {_short(turn['from'])} but should be from '{want}'; "
                                       "turns must alternate human, gpt, human, gpt, ...")
        if j % 2 == 0 and not turn["value"].strip():
            raise _bad("conversation", f"turn {j} (human) is blank; every human turn needs a question")
    if len(conversations) % 2:
        raise _bad("conversation", "the last turn is from 'human', so the record has no answer; end it with a "
                                   "'gpt' turn")
    if not conversations[-1]["value"].strip():
        raise _bad("conversation", "the last gpt turn (the answer) is empty; give it the answer text")
    return [(conversations[j]["value"], conversations[j + 1]["value"]) for j in range(0, len(conversations), 2)]


def check_placeholders(conversations: list[dict[str, str]], n_images: int) -> None:
    """Raise InputError unless the human turns hold exactly one ``<image>`` per image and no gpt turn holds one."""
    for j, t in enumerate(conversations):
        if t["from"] not in _USER and IMAGE_PLACEHOLDER in t["value"]:
            raise _bad("placeholders", f"turn {j} (gpt) holds '{IMAGE_PLACEHOLDER}'; placeholders belong in the "
                                       "human turns only: remove it from the answer")
    n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] in _USER)
    if n != n_images:
        raise _bad("placeholders", f"the human turns hold {n} '{IMAGE_PLACEHOLDER}' placeholder(s) but the record "
                                   f"has {n_images} image(s); put exactly one '{IMAGE_PLACEHOLDER}' per image in the "
                                   "human turns")


Validator = Callable[[list[tuple[str, str]], int], Any]


class LlavaDataset(Dataset):
    """A LLaVA ``.json``/``.jsonl`` file as a dataset of :class:`Sample` (images opened on access).

    ``image_folder`` defaults to the JSON file's folder; ``limit`` reads only the first records. ``check_images``
    decodes every image while loading (default: when ``skip_malformed``, so an unreadable image is a malformed
    record that is skipped, not an error at that sample during training or evaluation; ``data check`` always does).
    ``validator(turns, n_images)`` (optional) checks each record the way the model will prepare it and raises
    InputError where training would fail; training builds it from the model (tokenisation and the LM's context
    length: ``compactvl.train.factories.data_validator``). ``skip_reasons`` counts skipped records by reason.
    """

    def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                 skip_malformed: bool = False, limit: int | None = None, check_images: bool | None = None,
                 validator: Validator | None = None):
        self.check_images = skip_malformed if check_images is None else check_images
        self.path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.skip_malformed = skip_malformed
        self.skipped: list[tuple[int, str]] = []
        self.skip_reasons: Counter[str] = Counter()
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
                    raise _bad("invalid JSON", rec.reason)
                self.samples.append(self._parse(i, rec, validator))
                self._index.append(i)
            except InputError as e:
                if not skip_malformed:
                    raise InputError(f"{self.path}: record {i}{_id_part(rec)}: {e} "
                                     "(or pass skip_malformed=True / --skip-malformed to skip such records)") from None
                self.skipped.append((i, str(e)))
                self.skip_reasons[getattr(e, "kind", "other")] += 1
        if not self.samples:
            if self.skipped:
                i, why = self.skipped[0]
                raise InputError(f"{self.path}: all {len(self.skipped)} records are malformed and were skipped "
                                 f"(first, record {i}: {why}); fix the file")
            raise InputError(f"{self.path}: the dataset is empty (no records); a LLaVA data file is a JSON list "
                             "of records with 'id', 'image' and 'conversations'")

    def _records(self, limit: int | None) -> Iterable[Any]:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {self.path}: {e}; check the file is readable UTF-8 text") from None
        if self.path.suffix == ".jsonl":  # split on \n only: U+2028, NEL etc. are valid inside JSON strings
            lines = [(n, ln) for n, ln in enumerate(text.split("\n"), 1) if ln.strip(" \t\r")][:limit]
            for n, ln in lines:
                try:
                    yield _DECODER.decode(ln)
                except json.JSONDecodeError as e:
                    yield _BadLine(f"line {n} is not valid JSON ({e.msg} at column {e.colno}); fix that line")
                except RecursionError:
                    yield _BadLine(f"line {n} nests too deeply to parse; flatten the record")
            return
        try:
            data = _DECODER.decode(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{self.path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the "
                             "file, or write one record per line as .jsonl to skip bad lines") from None
        except RecursionError:
            raise InputError(f"{self.path}: the JSON nests too deeply to parse; flatten the records (a record "
                             f"may nest {MAX_DEPTH} levels), or write one record per line as .jsonl to skip bad "
                             "lines") from None
        if not isinstance(data, list):
            raise InputError(f"{self.path}: the top level is a JSON {type(data).__name__}, not a list of records; "
                             "wrap the records in [...]")
        yield from data[:limit]

    def _parse(self, i: int, rec: Any, validator: Validator | None) -> Sample:
        if not isinstance(rec, dict):
            raise _bad("not an object", f"the record is a JSON {type(rec).__name__}, not an object; write it as "
                                        '{"id": ..., "image": ..., "conversations": [...]}')
        check_values(rec)
        rid = rec.get("id", i)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise _bad("field type", f"'id' is {_short(rid)}; give a string or an integer")
        conv = rec.get("conversations")
        turns = split_turns(conv)
        image = rec.get("image")
        names = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _bad("field type", "'image' must be a file name or a list of file names")
        check_placeholders(conv, len(names))
        if validator is not None:
            try:
                validator(turns, len(names))
            except ConversationTooLong as e:
                raise _bad("too long for the context", e) from None
            except InputError as e:
                raise _bad("tokenisation", e) from None
        paths = [self._image_path(name) for name in names]
        if self.check_images:
            for p in paths:
                try:
                    load_image(p)
                except InputError as e:
                    raise _bad("image unreadable", e) from None
        cat, meta = rec.get("category"), rec.get("meta")
        return Sample(id=str(rid), images=paths, conversations=conv,
                      category=cat if isinstance(cat, str) else None, meta=meta if isinstance(meta, dict) else {})

    def _image_path(self, name: str) -> str:
        if "\x00" in name or len(name) > MAX_NAME:
            raise _bad("image name", f"image name {_short(name)} holds a NUL character or is over {MAX_NAME} "
                                     "characters; fix the name")
        try:
            p = (self.image_folder / name).resolve()
            found = p.is_file()
        except (OSError, ValueError) as e:  # e.g. ENAMETOOLONG for a part over the file system's limit
            raise _bad("image name", f"image name {_short(name)} is not a usable path ({e.__class__.__name__}: "
                                     f"{getattr(e, 'strerror', None) or e}); fix the name") from None
        if not found:
            raise _bad("image missing", f"image file '{name}' not found at {p}; pass the image folder it is "
                                        "relative to (image_folder= / --image-folder) or remove the record")
        return str(p)

    def __len__(self) -> int:
        return len(self.samples)

    def question_answers(self) -> list[tuple[str, str | None]]:
        """(``Sample.question``, ``Sample.answer``) of every record kept, in order, without loading any image."""
        return [(s.question, s.answer) for s in self.samples]

    def location(self, idx: int) -> str:
        """``FILE: record I (id X)`` of sample ``idx``: what an error about that sample should name."""
        return f"{self.path}: record {self._index[idx]} (id {_clean(self.samples[idx].id)})"

    def __getitem__(self, idx: int) -> Sample:
        s = self.samples[idx]
        try:
            return dataclasses.replace(s, images=s.load_images(), meta=dict(s.meta))
        except InputError as e:
            raise InputError(f"{self.location(idx)}: {e}") from None

    def report(self) -> str:
        """One line of counts, then the first skipped records with their reasons, then the counts by reason."""
        lines = [f"{self.path}: {len(self.samples)} records loaded, {len(self.skipped)} malformed skipped"]
        lines += [f"  record {i}: {why}" for i, why in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more")
        if self.skip_reasons:
            lines.append("  skipped by reason: " + ", ".join(f"{k} {n}" for k, n in self.skip_reasons.most_common()))
        return "\n".join(lines)


def sample_location(data: Dataset, idx: int) -> str:
    """Where sample ``idx`` of ``data`` comes from, for error messages: ``FILE: record I (id X)`` for a
    LlavaDataset (also inside a ConcatDataset), ``sample idx`` otherwise."""
    if isinstance(data, ConcatDataset):
        part = bisect.bisect_right(data.cumulative_sizes, idx)
        return sample_location(data.datasets[part], idx - (data.cumulative_sizes[part - 1] if part else 0))
    if isinstance(data, LlavaDataset):
        return data.location(idx)
    return f"sample {idx}"


class _BadLine(NamedTuple):
    reason: str


def _clean(x: Any, n: int = 80) -> str:
    s = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(x))
    return s if len(s) <= n else s[:n - 3] + "..."


def _id_part(rec: Any) -> str:
    ok = isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and not isinstance(rec.get("id"), bool)
    return f" (id {_clean(rec['id'])})" if ok else ""


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
