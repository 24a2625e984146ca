"""Response bodies, chosen by the request's Accept header.

application/json (default)   {"predictions": [{"width": W, "height": H, "detections": [
                                 {"box": [x1, y1, x2, y2] (pixels), "box_normalized": [...] (0..1),
                                  "score": s, "class_name": "...", "category_id": id, "label": k}]}]}
application/jsonlines        one {"width", "height", "detections"} line per image (Batch Transform's
                             AssembleWith Line)
application/x-sagemaker-object-detection
                             the built-in object detection algorithm's format: one image
                             {"prediction": [[class_index, score, xmin, ymin, xmax, ymax], ...]}
                             (class_index 0-based, coordinates normalised); several images
                             {"predictions": [{"prediction": [...]}, ...]}
"""

from __future__ import annotations

import json
from typing import Any

from .decoding import ClientError, media_type

JSON = "application/json"
JSONLINES = "application/jsonlines"
BUILTIN = "application/x-sagemaker-object-detection"
ACCEPTED = (JSON, JSONLINES, BUILTIN)


def choose_format(accept: str | None, default_format: str) -> str:
    """The first supported type in Accept; */* and none give the default (json or builtin)."""
    default = BUILTIN if default_format == "builtin" else JSON
    if not accept or not accept.strip():
        return default
    for part in accept.split(","):
        kind = media_type(part)
        if kind in ("*/*", "application/*", JSON):
            return default
        if kind in ("application/jsonl", "application/x-jsonlines"):
            return JSONLINES
        if kind in ACCEPTED:
            return kind
    raise ClientError(
        406, f"Accept {accept.strip()[:60]} is not supported; use {JSON}, {JSONLINES} or {BUILTIN}."
    )


def _builtin(detections: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prediction": [[d["label"] - 1, d["score"], *d["box_normalized"]] for d in detections]}


def render(kind: str, per_image: list[tuple[tuple[int, int], list[dict[str, Any]]]]) -> bytes:
    if kind == BUILTIN:
        if len(per_image) == 1:
            return json.dumps(_builtin(per_image[0][1])).encode()
        return json.dumps({"predictions": [_builtin(d) for _, d in per_image]}).encode()
    images = [{"width": w, "height": h, "detections": d} for (w, h), d in per_image]
    if kind == JSONLINES:
        return "".join(json.dumps(image) + "\n" for image in images).encode()
    return json.dumps({"predictions": images}).encode()
