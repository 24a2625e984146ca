"""CreateML: a JSON list of {"image", "annotations": [{"label", "coordinates": {x, y, width,
height}}]}, pixels, (x, y) the box's centre. Roboflow writes `_annotations.createml.json` in
each of its train/ valid/ test/ folders. Images are found beside the JSON; the format has no
image size, so each image's header is read. Classes are named only: ids 1..K by sorted name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from .common import (
    Boundary,
    categories_by_name,
    first_char,
    image_size,
    is_image,
    read_json_file,
    records,
    relative,
    walk_files,
)
from .image_records import Category, CocoData, DataReport, safe_join
from .scan import head
from .voc import SPLIT_FOLDERS, split_by_folder

NAME = "createml"
ROBOFLOW_NAME = "_annotations.createml.json"


def find(channel: Path) -> list[Path]:
    """`*.createml.json` at the root or in a split folder, or a root JSON holding a list that
    is not Label Studio's (its exports are lists too)."""
    found = []
    boundary = Boundary(channel)
    for folder in (channel, *(channel / s for s in SPLIT_FOLDERS)):
        if folder.is_dir():
            found += [p for p in sorted(folder.glob("*.json"))
                      if p.name.endswith(".createml.json") or (
                          folder == channel and first_char(p) == "[" and not label_studio(p, boundary))]
    return found


# Label Studio's JSON export: tasks with "data" and "annotations": [{"result": [{"from_name",
# "value": {"x", ..., "rectanglelabels"}}]}]; its JSON-MIN export: {"image", "label": [{...,
# "rectanglelabels"}]}. Coordinates in percent of the image: not CreateML's pixels.
_LABEL_STUDIO = re.compile(rb'"(rectangle|polygon|keypoint|ellipse|brush)labels"|"from_name"\s*:')


def label_studio(path: Path, boundary: Boundary) -> bool:
    data = head(path, boundary.inside, 65536)
    return bool(data and _LABEL_STUDIO.search(data))


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read(channel: Path, hp: Hyperparameters, report: DataReport,
         categories: list[Category] | None = None) -> CocoData:
    boundary = Boundary(channel)
    files = find(channel)
    images, boxes = [], []
    for path in files:
        boundary.check(path, "CreateML file")
        entries = read_json_file(path, "CreateML file")
        if not isinstance(entries, list):
            raise UserInputError(
                f"CreateML file {path} must hold a JSON list of {{\"image\", \"annotations\"}} entries."
            )
        for item in entries:
            name = item.get("image") if isinstance(item, dict) else None
            image = safe_join(path.parent, name) if isinstance(name, str) else None
            if image is None:
                report.add("image_skipped_malformed_entry", shorten(item))
                continue
            file_name = relative(channel, image)
            entry: dict[str, Any] = {"id": file_name, "file_name": file_name}
            if boundary.inside(image) and (size := image_size(image)):
                entry["width"], entry["height"] = size
            images.append(entry)
            annotations = item.get("annotations") or []
            for ann in annotations if isinstance(annotations, list) else [None]:
                ann = ann if isinstance(ann, dict) else {}
                c = ann.get("coordinates") if isinstance(ann.get("coordinates"), dict) else {}
                x, y, w, h = (_number(c.get(k)) for k in ("x", "y", "width", "height"))
                bbox = None if None in (x, y, w, h) else [x - w / 2, y - h / 2, w, h]
                boxes.append((file_name, str(ann.get("label", "")).strip(), bbox))
    names = sorted({name for _, name, _ in boxes if name})
    if not names:
        raise UserInputError(
            f"the CreateML files in {channel} ({shorten(', '.join(map(str, files)), 200)}) label "
            "no object; give each annotation a 'label'."
        )
    coco_categories = categories_by_name(names)
    id_of = {c["name"]: c["id"] for c in coco_categories}
    annotations = [
        {"id": k, "image_id": file_name, "category_id": id_of.get(name), "bbox": bbox}
        for k, (file_name, name, bbox) in enumerate(boxes)
    ]
    listed = {e["file_name"] for e in images}
    on_disk = (relative(channel, p) for p in walk_files(channel, is_image))
    unlisted = [f for f in on_disk if f not in listed]
    if unlisted:  # an image the JSON does not list has unknown boxes: not used, and said so
        report.add("images_not_in_json_not_used", shorten(", ".join(unlisted[:3]), 160),
                   n=len(unlisted))
    coco = {"images": images, "annotations": annotations, "categories": coco_categories}
    return records(channel, coco, files[0], report, categories, split=split_by_folder(images))
