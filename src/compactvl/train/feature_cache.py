"""Encoder-feature cache: with frozen encoders each image is encoded once, then read back — the largest CPU speed
lever in training (an epoch over N images costs N encoder passes once, not once per epoch) and in evaluating many
token budgets of one model.

Keys are (encoder fingerprint, image content): the fingerprint hashes the encoder's config and weights, the image
key hashes its pixels, so a cache may be shared by several models built on the same encoder (the demo evaluates
several token ops from one trained model) and is never fooled by two files with the same name. Entries hold, per
image, the tapped features, the CLS token and the grid; attention maps and keys that token ops ask for
(``EncoderOutput.attention(L)`` / ``keys(L)``) are stored the first time they are computed, and recomputed for
images that lack them. Values are bit-identical to an uncached run of the same image batches; ``dtype`` may store
them in half precision to halve memory (features are cast back on read).

Use ``FeatureCache().attach(model)``: it sets ``model.feature_cache`` to a view bound to that model's encoders
(``CompactVLM.encode_images`` then calls ``view.lookup(encoder_index, images, taps, run)``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ..encoders import EncoderOutput
from ..errors import ConfigError
from ..images import load_image

Run = Callable[[Sequence[Image.Image]], EncoderOutput]


def image_key(image: Image.Image) -> str:
    """Content hash of a PIL image (mode, size and pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Hash of an encoder's config and weights (a few hundred ms for DINOv2-S; computed once per attach)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = encoder.to_config() if hasattr(encoder, "to_config") else {"class": type(encoder).__name__}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Entry:
    grid: tuple[int, int]
    features: dict[int, Tensor] = field(default_factory=dict)  # tap -> [N, C]
    cls: dict[int, Tensor] = field(default_factory=dict)  # tap -> CLS token there (EncoderOutput.cls: the last tap's)
    has_cls: bool = False  # the encoder returns a CLS token (then a lookup whose last tap lacks one recomputes)
    extras: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # ("attention"|"keys", layer) -> tensor
    substitute: bool = False
    encoder: str = ""
    dtype: torch.dtype = torch.float32  # the encoder's output dtype (features are returned in it)
    extra_dtypes: dict[tuple[str, int], torch.dtype] = field(default_factory=dict)


class FeatureCache:
    """In-memory cache of encoder outputs. ``dtype``: storage dtype (None keeps the encoder's)."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._store: dict[tuple[str, str], _Entry] = {}
        self.hits = 0
        self.misses = 0

    def attach(self, model: nn.Module) -> "CacheView":
        """Bind to ``model``'s encoders and install as ``model.feature_cache``; returns the view."""
        view = CacheView(self, [encoder_fingerprint(e) for e in model.encoders])
        model.feature_cache = view
        return view

    def __len__(self) -> int:
        return len(self._store)

    def nbytes(self) -> int:
        total = 0
        for e in self._store.values():
            for t in [*e.features.values(), *e.extras.values(), *e.cls.values()]:
                total += t.numel() * t.element_size()
        return total

    def clear(self) -> None:
        self._store.clear()

    def retain(self, model: nn.Module) -> int:
        """Drop the entries of every encoder ``model`` lacks: a cache shared by several models in turn keeps only
        what the next one can read. Returns the number of entries dropped."""
        keep = {encoder_fingerprint(e) for e in model.encoders}
        gone = [k for k in self._store if k[0] not in keep]
        for k in gone:
            del self._store[k]
        return len(gone)

    def _keep(self, t: Tensor) -> Tensor:
        t = t.detach()
        return (t if self.dtype is None else t.to(self.dtype)).clone()


def _first_of_each(indices: list[int], keys: list) -> list[int]:
    """The indices whose key has not appeared at an earlier index of the list (duplicate images encode once)."""
    seen: set = set()
    out = []
    for i in indices:
        if keys[i] not in seen:
            seen.add(keys[i])
            out.append(i)
    return out


def _lacks(entry: _Entry, taps: Sequence[int]) -> bool:
    """Whether ``entry`` cannot answer a lookup at ``taps``: a tap's features, or the CLS token at the last tap (which
    an earlier lookup by a model with other taps did not store), are missing."""
    return any(t not in entry.features for t in taps) or (entry.has_cls and taps[-1] not in entry.cls)


class CacheView:
    """The object ``CompactVLM`` calls: ``lookup(encoder_index, images, taps, run) -> EncoderOutput``."""

    def __init__(self, cache: FeatureCache, fingerprints: list[str]):
        self.cache = cache
        self.fingerprints = fingerprints

    def lookup(self, encoder_index: int, images: Sequence[Image.Image], taps: Sequence[int], run: Run) -> EncoderOutput:
        store, cache = self.cache._store, self.cache
        keys = [(self.fingerprints[encoder_index], image_key(im)) for im in images]
        taps = list(taps)
        missing = _first_of_each([i for i, k in enumerate(keys) if k not in store or _lacks(store[k], taps)], keys)
        fresh = run([images[i] for i in missing]) if missing else None
        if fresh is not None:
            for j, i in enumerate(missing):
                e = store.setdefault(keys[i], _Entry(grid=tuple(fresh.grid)))
                for t in taps:
                    e.features[t] = cache._keep(fresh.features[t][j])
                e.dtype = fresh.features[taps[0]].dtype
                if fresh.cls is not None:
                    e.cls[taps[-1]], e.has_cls = cache._keep(fresh.cls[j]), True
                e.substitute, e.encoder = fresh.attention_substitute, fresh.encoder
        cache.hits += len(keys) - len(missing)
        cache.misses += len(missing)
        entries = [store[k] for k in keys]
        dtype = entries[0].dtype
        has_cls = all(taps[-1] in e.cls for e in entries)
        return EncoderOutput(
            features={t: torch.stack([e.features[t] for e in entries]).to(dtype) for t in taps},
            grid=entries[0].grid,
            cls=torch.stack([e.cls[taps[-1]] for e in entries]).to(dtype) if has_cls else None,
            attention_substitute=entries[0].substitute, encoder=entries[0].encoder,
            attention_fn=lambda layer: self._extra("attention", layer, keys, images, run, missing, fresh),
            keys_fn=lambda layer: self._extra("keys", layer, keys, images, run, missing, fresh),
        )

    def _extra(self, kind: str, layer: int, keys: list, images: Sequence[Image.Image], run: Run,
               fresh_idx: list[int], fresh: EncoderOutput | None) -> Tensor:
        """Attention / keys of ``layer`` for every image: stored, taken from this call's fresh output, or
        recomputed for the images that lack them."""
        store, slot = self.cache._store, (kind, layer)
        need = _first_of_each([i for i, k in enumerate(keys) if slot not in store[k].extras], keys)
        if need:
            if fresh is not None and set(need) <= set(fresh_idx):
                src, rows = fresh, [fresh_idx.index(i) for i in need]
            else:
                src, rows = run([images[i] for i in need]), list(range(len(need)))
            values = getattr(src, kind)(layer)
            for i, r in zip(need, rows):
                store[keys[i]].extras[slot] = self.cache._keep(values[r])
                store[keys[i]].extra_dtypes[slot] = values.dtype
        return torch.stack([store[k].extras[slot] for k in keys]).to(store[keys[0]].extra_dtypes[slot])


def encoder_runner(model, index: int) -> Run:
    """The function ``CompactVLM.encode_images`` hands the cache for encoder ``index`` (same device, dtype, taps)."""
    enc, taps = model.encoders[index], model.taps[index]

    def run(subset: Sequence[Image.Image]) -> EncoderOutput:
        param = next(enc.parameters(), None)
        pix = enc.preprocess(list(subset)).to(model.device, param.dtype if param is not None else torch.float32)
        return enc(pix, layers=taps)

    return run


@torch.no_grad()
def warm_cache(model, samples: Iterable, total: int | None = None, batch_size: int = 16,
               progress: bool = False) -> int:
    """Encode the images of ``samples`` (``Sample`` objects) into ``model.feature_cache`` in fixed chunks of
    ``batch_size`` images, in order — so a warm cache holds the same values on every run. Returns images seen."""
    view = model.feature_cache
    if view is None:
        raise ConfigError("warm_cache needs a feature cache on the model: FeatureCache().attach(model)")
    buf: list[Image.Image] = []
    seen = 0

    def flush() -> None:
        pil = [load_image(im, model.config.max_pixels) for im in buf]
        for i in range(len(model.encoders)):
            view.lookup(i, pil, model.taps[i], encoder_runner(model, i))
        buf.clear()

    for s in tqdm(samples, total=total, disable=not progress, desc="encoding images", unit="sample"):
        ims = s.load_images()
        buf.extend(ims)
        seen += len(ims)
        if len(buf) >= batch_size:
            flush()
    if buf:
        flush()
    return seen


def cache_for_training(model, data, indices: Sequence[int], mode: str, limit_gb: float, batch_size: int,
                       autocast: Callable[[], ContextManager] = contextlib.nullcontext, progress: bool = False,
                       log: Callable[[str], None] = print,
                       cache: FeatureCache | None = None) -> tuple[FeatureCache | None, float | None]:
    """The trainer's cache (``train.feature_cache``): ``off`` → none; ``lazy`` → attached, filled as training reads
    images; ``precompute`` → the images of ``data[i]`` for ``indices`` (what this run trains on) encoded once now;
    ``auto`` → ``precompute`` when the estimated size fits ``limit_gb`` GiB (estimated from the first sample), else
    none. ``autocast()``: the precision the encoders would run in uncached. ``cache``: a cache shared with earlier
    runs (``compactvl demo --compare``), whose entries for these encoders and images are read, not encoded again;
    None → a new one. Returns (cache or None, encoder seconds per image encoded while filling it, or None)."""
    if mode == "off":
        return None, None
    shared = cache is not None
    cache = cache if cache is not None else FeatureCache()
    if mode == "auto":
        probe = FeatureCache() if shared else cache  # sized on its own: a shared cache holds other runs' entries
        probe.attach(model)
        with autocast():
            warm_cache(model, [data[indices[0]]])
        need = probe.nbytes() * len(indices) / 2**30
        if need > limit_gb:
            log(f"feature cache off: the training set would need ~{need:.1f} GiB (> train.feature_cache_gb "
                f"{limit_gb}); set train.feature_cache: lazy or raise the limit")
            probe.clear()
            model.feature_cache = None
            return None, None
    cache.attach(model)
    if mode == "lazy":
        return cache, None
    misses, t0 = cache.misses, time.perf_counter()
    with autocast():
        warm_cache(model, (data[i] for i in indices), total=len(indices), batch_size=batch_size, progress=progress)
    took = time.perf_counter() - t0
    encoded = cache.misses - misses if shared else len(cache)  # a new cache also holds the auto probe's sample
    reused = f"; {len(cache) - encoded} read from a cache shared with earlier runs" if shared else ""
    log(f"feature cache: {encoded} images of {len(indices)} training samples encoded once in {took:.1f}s "
        f"({cache.nbytes() / 2**20:.0f} MiB{reused})")
    return cache, took / encoded if encoded else None
