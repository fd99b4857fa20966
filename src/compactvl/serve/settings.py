"""What ``compactvl serve`` allows and how it batches: one immutable record, filled from the command line
(``compactvl.cli.serve``) or in code (tests), read by the request parser, the batcher and the app."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "compactvl"  # the id /v1/models lists and requests name
    max_request_bytes: int = 20_000_000  # the whole JSON body (413 above)
    max_image_bytes: int = 8_000_000  # one image's encoded bytes (413 above)
    max_image_pixels: int = 16_000_000  # one image's width x height, read from its header before decoding (400 above)
    max_images: int = 4  # images in one request (400 above)
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for (400 above)
    default_max_tokens: int = 64  # max_tokens when a request gives none (capped by what the context leaves)
    max_batch: int = 8  # requests decoded together in one batch
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first of a batch
    max_queue: int = 64  # requests waiting for the model; one more is refused with 429
    local_image_dir: Path | None = None  # local image paths allowed only inside this folder (None: none allowed)
    allowed_methods: tuple[str, ...] = field(default_factory=tuple)  # per-request compression methods allowed

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_tokens_limit",
                     "default_max_tokens", "max_batch", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve setting {name} must be a positive integer, got {value!r}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"serve setting batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.local_image_dir is not None:
            folder = Path(self.local_image_dir).expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(f"--allow-local-images {self.local_image_dir}: not a folder; name an existing "
                                  "folder that holds the images clients may refer to")
            object.__setattr__(self, "local_image_dir", folder)
