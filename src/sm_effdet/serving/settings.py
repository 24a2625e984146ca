"""The server's settings, from environment variables (SageMaker's ContainerDefinition.Environment).

Every number is range-checked at start: a value that would make every answer empty or every
request hang (SERVE_SCORE_THRESHOLD=5, SERVE_BATCH_WAIT_MS=inf) is refused with one sentence.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..environment import paths_from_env


class SettingsError(ValueError):
    pass


def _number(name: str, default: float, kind: type, low: float, high: float) -> float:
    """The variable as an int or float within [low, high]; unset or empty gives the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise SettingsError(
            f"environment variable {name}={raw[:40]!r} is not {what}; unset it or give {what} "
            f"from {low:g} to {high:g}."
        )
    if not low <= value <= high:
        raise SettingsError(
            f"environment variable {name}={raw[:40]!r} is out of range; give {what} from "
            f"{low:g} to {high:g}, or unset it."
        )
    return value


@dataclass(frozen=True)
class Settings:
    model_dir: str
    port: int
    backend: str
    max_batch_size: int
    batch_wait_ms: float
    max_queue_images: int
    max_payload_mb: float
    max_image_pixels: int
    max_images_per_request: int
    score_threshold: float | None  # None: model.json's recommendation, else 0.3
    max_detections: int
    response_format: str  # what plain application/json answers: "json" or "builtin"
    max_concurrent_transforms: int
    header_timeout_s: float  # a request's line and headers must arrive within this
    body_timeout_s: float  # and its whole body within this
    max_connections: int  # open connections; beyond it the longest-waiting idle one is closed
    max_decode_pixels: int  # pixels being decoded at once, all requests together
    drain_timeout_s: float  # SIGTERM: requests still running after this get a 503


def read_settings() -> Settings:
    threshold = os.environ.get("SERVE_SCORE_THRESHOLD", "").strip()
    response_format = os.environ.get("SERVE_DEFAULT_FORMAT", "json").strip().lower() or "json"
    if response_format not in ("json", "builtin"):
        raise SettingsError(f"environment variable SERVE_DEFAULT_FORMAT={response_format[:40]!r} is unknown; use json or builtin.")
    backend = os.environ.get("SERVE_BACKEND", "auto").strip().lower() or "auto"
    if backend not in ("torch", "onnx", "auto"):
        raise SettingsError(f"environment variable SERVE_BACKEND={backend[:40]!r} is unknown; use torch, onnx or auto.")
    return Settings(
        model_dir=str(paths_from_env().model_dir),
        port=int(_number("SAGEMAKER_BIND_TO_PORT", 8080, int, 1, 65535)),
        backend=backend,
        max_batch_size=int(_number("SERVE_MAX_BATCH_SIZE", 8, int, 1, 1024)),
        batch_wait_ms=float(_number("SERVE_BATCH_WAIT_MS", 5.0, float, 0, 10_000)),
        max_queue_images=int(_number("SERVE_MAX_QUEUE", 256, int, 1, 100_000)),
        max_payload_mb=float(_number("SERVE_MAX_PAYLOAD_MB", 100.0, float, 0.001, 10_000)),
        max_image_pixels=int(_number("SERVE_MAX_IMAGE_PIXELS", 40_000_000, int, 1, 1_000_000_000)),
        max_images_per_request=int(_number("SERVE_MAX_IMAGES_PER_REQUEST", 256, int, 1, 100_000)),
        score_threshold=float(_number("SERVE_SCORE_THRESHOLD", 0.0, float, 0, 1)) if threshold else None,
        max_detections=int(_number("SERVE_MAX_DETECTIONS", 100, int, 1, 100_000)),
        response_format=response_format,
        max_concurrent_transforms=int(_number("SERVE_MAX_CONCURRENT_TRANSFORMS", 8, int, 1, 1024)),
        header_timeout_s=float(_number("SERVE_HEADER_TIMEOUT_S", 10.0, float, 0.1, 3600)),
        body_timeout_s=float(_number("SERVE_BODY_TIMEOUT_S", 60.0, float, 0.1, 3600)),
        max_connections=int(_number("SERVE_MAX_CONNECTIONS", 1024, int, 2, 100_000)),
        max_decode_pixels=int(_number("SERVE_MAX_DECODE_PIXELS", 80_000_000, int, 1, 10_000_000_000)),
        drain_timeout_s=float(_number("SERVE_DRAIN_TIMEOUT_S", 25.0, float, 0, 3600)),
    )
