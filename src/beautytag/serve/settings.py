"""Settings of the service and its small shared constants."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("beautytag.serve")


OPEN_PATHS = frozenset({"/", "/healthz", "/openapi.json"})


RAW_NAME = "<body>"


@dataclass
class ServeSettings:
    """Limits and knobs of the service."""

    max_batch: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long a batch waits for company after its first image
    queue_size: int = 64  # decoded images waiting for the model; more -> 503
    max_request_bytes: int = 20 * 1024 * 1024  # request body; more -> 413
    max_pixels: int = 40_000_000  # width * height of one image; more -> 413
    timeout_s: float = 10.0  # whole request; longer -> 504
    api_key: str | None = None  # required in X-API-Key when set
    workers: int = 2  # decoding threads

    def __post_init__(self) -> None:
        """Refuse settings the service cannot run with (ValueError naming the setting)."""
        counts = ["max_batch", "queue_size", "workers"]
        for name in [*counts, "max_request_bytes", "max_pixels"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be more than 0, got {self.timeout_s}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")
