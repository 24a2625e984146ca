"""Request bodies -> image bytes and options; every client mistake becomes a ClientError.

Content types: image/jpeg, image/png, application/x-image (one image, raw bytes, as the built-in
algorithm takes) and application/json / application/jsonlines carrying base64 images:

    application/json       {"images": ["<base64>", ...], "score_threshold": 0.5, "max_detections": 10}
                           (or "image": "<base64>" for one)
    application/jsonlines  one {"image": "<base64>"} per line (Batch Transform's SplitType Line)

Options also travel in CustomAttributes (X-Amzn-SageMaker-Custom-Attributes:
`score_threshold=0.5,max_detections=10`); the JSON body wins over the header.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_TYPES = ("application/json",)
JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines")
OPTIONS = ("score_threshold", "max_detections")


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Options:
    score_threshold: float | None = None
    max_detections: int | None = None
    set_by: dict[str, str] = field(default_factory=dict)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def _option(name: str, value: Any, where: str) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer of 400 digits
        number = float("nan")
    if name == "score_threshold" and 0 <= number <= 1:
        return number
    # inf and 1e400 (inf once parsed) fail the first test, never reaching int().
    if name == "max_detections" and 1 <= number < 2**53 and number == int(number):
        return int(number)
    allowed = "a number from 0 to 1" if name == "score_threshold" else "a whole number from 1"
    raise ClientError(400, f"{where} sets {name} to {str(value)[:40]!r}; give {allowed}.")


def custom_attributes(header: str | None) -> Options:
    """`score_threshold=0.5,max_detections=10`; unknown keys are left for other tools."""
    options = Options()
    for part in (header or "").split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if sep and key in OPTIONS:
            setattr(options, key, _option(key, value.strip(), "X-Amzn-SageMaker-Custom-Attributes"))
    return options


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("b64", value.get("image", value.get("data")))
    if not isinstance(value, str) or not value:
        raise ClientError(400, f"{where} is not a base64 string; send each image as base64 text.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{where} is not valid base64; encode the image bytes with standard base64.") from None


def _json_document(text: bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ClientError(400, f"{where} is not valid JSON ({str(exc)[:80]}); send a JSON object with base64 images.") from None
    except RecursionError:
        raise ClientError(400, f"{where} is nested too deeply to read; send a JSON object with base64 images.") from None


def _apply_body_options(document: dict[str, Any], options: Options, where: str) -> None:
    for key in OPTIONS:
        if key in document:
            setattr(options, key, _option(key, document[key], where))


def decode_body(body: bytes, content_type: str | None, header_options: Options) -> tuple[list[bytes], Options]:
    """The request's images (encoded bytes, not yet decoded) and its options."""
    kind = media_type(content_type)
    options = header_options
    if not body:
        raise ClientError(400, "the request body is empty; send an image or a JSON document of base64 images.")
    if kind in RAW_IMAGE_TYPES:
        return [body], options
    if kind in JSON_TYPES:
        document = _json_document(body, "the JSON body")
        if not isinstance(document, dict):
            raise ClientError(400, 'the JSON body is not an object; send {"images": ["<base64>", ...]}.')
        _apply_body_options(document, options, "the JSON body")
        if "images" in document:
            items = document["images"]
            if not isinstance(items, list) or not items:
                raise ClientError(400, 'the JSON body\'s "images" is not a non-empty list; send a list of base64 strings.')
            return [_b64(item, f"images[{i}]") for i, item in enumerate(items)], options
        if "image" in document:
            return [_b64(document["image"], '"image"')], options
        raise ClientError(400, 'the JSON body has no "images" or "image" key; send {"images": ["<base64>", ...]}.')
    if kind in JSONLINES_TYPES:
        images = []
        for number, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            document = _json_document(line, f"line {number}")
            if isinstance(document, str):
                images.append(_b64(document, f"line {number}"))
                continue
            if not isinstance(document, dict):
                raise ClientError(400, f'line {number} is not a JSON object; send one {{"image": "<base64>"}} per line.')
            _apply_body_options(document, options, f"line {number}")
            images.append(_b64(document.get("image", document.get("b64")), f"line {number}'s image"))
        if not images:
            raise ClientError(400, 'the JSON Lines body holds no image; send one {"image": "<base64>"} per line.')
        return images, options
    shown = kind or "(none)"
    raise ClientError(
        415,
        f"Content-Type {shown[:60]} is not supported; use image/jpeg, image/png, application/x-image, "
        "application/json or application/jsonlines.",
    )
