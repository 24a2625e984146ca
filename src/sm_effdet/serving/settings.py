"""The server's settings, from environment variables (SageMaker's ContainerDefinition.Environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..environment import paths_from_env


class SettingsError(ValueError):
    pass


def _number(name: str, default: float, kind: type = int, minimum: float = 0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name}={raw!r} is not a {kind.__name__}; unset it or give a number.") from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={raw!r} is below {minimum}; give a larger value.")
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


def read_settings() -> Settings:
    threshold = os.environ.get("SERVE_SCORE_THRESHOLD", "").strip()
    response_format = os.environ.get("SERVE_DEFAULT_FORMAT", "json").strip().lower() or "json"
    if response_format not in ("json", "builtin"):
        raise SettingsError(f"environment variable SERVE_DEFAULT_FORMAT={response_format!r} is unknown; use json or builtin.")
    return Settings(
        model_dir=str(paths_from_env().model_dir),
        port=int(_number("SAGEMAKER_BIND_TO_PORT", 8080, int, 1)),
        backend=os.environ.get("SERVE_BACKEND", "auto").strip().lower() or "auto",
        max_batch_size=int(_number("SERVE_MAX_BATCH_SIZE", 8, int, 1)),
        batch_wait_ms=float(_number("SERVE_BATCH_WAIT_MS", 5.0, float, 0)),
        max_queue_images=int(_number("SERVE_MAX_QUEUE", 256, int, 1)),
        max_payload_mb=float(_number("SERVE_MAX_PAYLOAD_MB", 100.0, float, 0.001)),
        max_image_pixels=int(_number("SERVE_MAX_IMAGE_PIXELS", 40_000_000, int, 1)),
        max_images_per_request=int(_number("SERVE_MAX_IMAGES_PER_REQUEST", 256, int, 1)),
        score_threshold=float(_number("SERVE_SCORE_THRESHOLD", 0.0, float, 0)) if threshold else None,
        max_detections=int(_number("SERVE_MAX_DETECTIONS", 100, int, 1)),
        response_format=response_format,
        max_concurrent_transforms=int(_number("SERVE_MAX_CONCURRENT_TRANSFORMS", 8, int, 1)),
    )
