"""The built-in Object Detection algorithm's image format: images in the `train` and `validation`
channels, one JSON per image in `train_annotation` and `validation_annotation`:
{"file", "image_size": [{"width", "height", "depth"}], "annotations": [{"class_id", "left",
"top", "width", "height"}], "categories": [{"class_id", "name"}]}. A built-in job's channels
work unchanged. Class ids are kept (model.json maps labels back to them); names come from the
files' `categories`, else the id as text.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from .common import Boundary, is_image, read_json_file, records, refuse_shared_files, walk_files
from .image_records import Category, CocoData, DataReport, is_valid_id, safe_join

NAME = "builtin"
ANNOTATION_SUFFIX = "_annotation"
# The built-in algorithm's channel names: annotations -> images.
CHANNELS = {"train_annotation": "train", "validation_annotation": "validation"}


def image_channel(annotation_channel: Path) -> Path:
    name = annotation_channel.name
    return annotation_channel.with_name(name[: -len(ANNOTATION_SUFFIX)]) if name.endswith(ANNOTATION_SUFFIX) else annotation_channel


def find(channel: Path) -> list[Path]:
    """Per-image JSONs with "file" and "annotations", in an annotation channel."""
    if not channel.name.endswith(ANNOTATION_SUFFIX):
        return []
    return walk_files(channel, lambda f: f.lower().endswith(".json"))[:3]


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _class_id(value: Any) -> Any:
    """class_id as a number; some writers put it as text."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value if is_valid_id(value) else None


def read(channel: Path, hp: Hyperparameters, report: DataReport,
         categories: list[Category] | None = None) -> CocoData:
    images_channel = image_channel(channel)
    if not images_channel.is_dir():
        raise UserInputError(
            f"the annotation channel {channel.name} has no image channel {images_channel.name} "
            f"({images_channel} does not exist); give the images as a channel named "
            f"'{images_channel.name}', as the built-in algorithm expects."
        )
    boundary = Boundary(channel)
    images, annotations, names = [], [], {}
    by_name: dict[str, list[str]] | None = None
    for path in walk_files(channel, lambda f: f.lower().endswith(".json")):
        if not boundary.per_image(path, report):
            continue
        try:
            item = read_json_file(path, "annotation file")
        except UserInputError as exc:
            report.add("annotation_skipped_unreadable_json", shorten(str(exc), 200))
            continue
        file = item.get("file") if isinstance(item, dict) else None
        if not isinstance(file, str) or safe_join(images_channel, file) is None:
            report.add("image_skipped_malformed_entry", f"{path.name}: file {shorten(file)}")
            continue
        entry: dict[str, Any] = {"id": file, "file_name": file}
        if not os.path.lexists(images_channel / file):
            # AWS's own example names "your_image_directory/sample_image1.jpg" for an image
            # at the channel's root: a file of that name, if there is exactly one, is it.
            if by_name is None:
                by_name = _images_by_name(images_channel)
            found = by_name.get(posixpath.basename(file), [])
            if len(found) == 1:
                entry["file_name"] = found[0]
                report.add("image_found_by_file_name", f"{shorten(file)} -> {shorten(found[0])}")
        size = item.get("image_size")
        size = size[0] if isinstance(size, list) and size and isinstance(size[0], dict) else {}
        if (w := _number(size.get("width"))) and (h := _number(size.get("height"))):
            entry["width"], entry["height"] = w, h
        images.append(entry)
        for cat in item.get("categories") or []:
            if isinstance(cat, dict) and _class_id(cat.get("class_id")) is not None and "name" in cat:
                names.setdefault(_class_id(cat["class_id"]), str(cat["name"]).strip())
        boxes = item.get("annotations") or []
        for ann in boxes if isinstance(boxes, list) else [None]:
            ann = ann if isinstance(ann, dict) else {}
            left, top, width, height = (_number(ann.get(k)) for k in ("left", "top", "width", "height"))
            bbox = None if None in (left, top, width, height) else [left, top, width, height]
            annotations.append({"id": len(annotations), "image_id": file,
                                "category_id": _class_id(ann.get("class_id")), "bbox": bbox})
    used = {a["category_id"] for a in annotations if a["category_id"] is not None}
    ids = sorted(used | set(names), key=lambda i: (str(type(i)), i))
    if not ids:
        raise UserInputError(
            f"the annotation files in {channel} have no class_id; give each annotation its "
            "'class_id' and each file its 'categories'."
        )
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": names.get(i, str(i))} for i in ids]}
    refuse_shared_files(coco, report)  # two JSONs found one file by its name
    return records(images_channel, coco, channel, report, categories, image_root=images_channel)


def _images_by_name(images_channel: Path) -> dict[str, list[str]]:
    """The image channel's images by file name (walked once, when a "file" is not found)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in walk_files(images_channel, is_image):
        found[path.name].append(os.path.relpath(path, images_channel))
    return found
