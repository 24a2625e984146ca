"""COCO: a JSON object of images, annotations and categories, at the channel's root or in its
annotations/ folder; the images beside it, at the root or under images/. The file is read here;
its records are made and checked by `image_records.coco_records`, as every format's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ...errors import UserInputError, shorten
from .common import Boundary, first_char, match_by_name, read_json_file
from .image_records import (
    Category,
    CocoData,
    DataReport,
    coco_records,
    is_valid_id,
    read_categories,
    safe_join,
)

NAME = "coco"
ANNOTATIONS_FOLDER = "annotations"


def find_annotation_file(
    channel: Path, annotations_file: str | None, exclude: Iterable[str] = (), nameable: bool = True
) -> Path:
    """The COCO JSON of a channel: the one named, else the only .json at the root or in annotations/.

    `nameable`: whether the annotations_file hyperparameter can name it (the training channel
    only); the advice differs.
    """
    if annotations_file:
        path = safe_join(channel, annotations_file)
        if path is None or not _exists(path):
            raise UserInputError(
                f"annotations_file '{shorten(annotations_file)}' was not found in {channel}; "
                "give a path relative to the channel's root."
            )
        return path
    excluded = {(channel / e).resolve() for e in exclude}
    candidates = [
        p
        for folder in (channel, channel / ANNOTATIONS_FOLDER)
        if folder.is_dir()
        for p in sorted(folder.glob("*.json"))
        if p.resolve() not in excluded
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        where = (
            f"no COCO annotation file (.json) found at the root of {channel} nor in its "
            f"{ANNOTATIONS_FOLDER}/ folder, nor another format's files (a Ground Truth manifest, "
            "Pascal VOC XMLs, a YOLO data.yaml, a CreateML JSON; see docs/data.md, Annotation "
            "formats)"
        )
        if nameable:
            raise UserInputError(
                f"{where}; add the annotations, or name a COCO JSON with the annotations_file "
                "hyperparameter."
            )
        raise UserInputError(f"{where}; add the channel's annotations there.")
    names = shorten(", ".join(str(p.relative_to(channel)) for p in candidates), 200)
    if nameable:
        raise UserInputError(
            f"several JSON files in {channel} ({names}); name the COCO annotations with the "
            "annotations_file hyperparameter."
        )
    raise UserInputError(
        f"several JSON files in {channel} ({names}); leave only the channel's COCO annotations "
        f"there (at its root or in {ANNOTATIONS_FOLDER}/)."
    )


def _exists(path: Path) -> bool:
    """Whether anything is at `path`; a name the OS refuses (too long, a NUL) is nothing."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def find(channel: Path) -> list[Path]:
    """COCO JSONs (a JSON object, not CreateML's list) at the root or in annotations/. A
    channel named like the built-in algorithm's (`*_annotation`) holds its per-image JSONs."""
    if channel.name.endswith("_annotation"):
        return []
    return [
        p for folder in (channel, channel / ANNOTATIONS_FOLDER) if folder.is_dir()
        for p in sorted(folder.glob("*.json")) if first_char(p) == "{"
    ]


def read(channel: Path, hp, report: DataReport, categories: list[Category] | None = None) -> CocoData:
    """The channel's COCO JSON (the annotations_file hyperparameter names it in training)."""
    excluded = [hp.split_file] if hp.split_file else []
    if categories is None:
        annotation_file = find_annotation_file(channel, hp.annotations_file, excluded)
    else:
        annotation_file = find_annotation_file(channel, None, excluded, nameable=False)
    return load_coco(channel, annotation_file, report, categories)


def load_coco(
    channel: Path,
    annotation_file: Path,
    report: DataReport,
    categories: list[Category] | None = None,
) -> CocoData:
    """Read a COCO file into image records; `categories` given (validation) fixes the class list:
    matched by id when the file's categories are training's (same ids and names), else by name
    (training came in another format)."""
    Boundary(channel).check(annotation_file, "COCO file")
    coco = read_json_file(annotation_file, "COCO file")
    if not isinstance(coco, dict):
        raise UserInputError(f"COCO file {annotation_file} must hold a JSON object.")
    _drop_placeholder_category(coco, report)
    if categories is not None:
        own = read_categories(coco, annotation_file)
        if not set((c.id, c.name) for c in own) <= set((c.id, c.name) for c in categories):
            data_own = own
            coco = match_by_name(coco, categories, annotation_file, report)
            data = coco_records(channel, coco, annotation_file, report, categories)
            data.file_categories = data_own
            return data
    return coco_records(channel, coco, annotation_file, report, categories)


def _drop_placeholder_category(coco: dict, report: DataReport) -> None:
    """Roboflow's COCO export lists a category (supercategory "none", usually id 0, named after
    the dataset) that no box uses; trained, it would be a class the model never sees."""
    categories, annotations = coco.get("categories"), coco.get("annotations")
    if not isinstance(categories, list) or not isinstance(annotations, list) or len(categories) < 2:
        return
    used = {repr(a.get("category_id")) for a in annotations if isinstance(a, dict)}
    placeholders = [
        c for c in categories
        if isinstance(c, dict) and c.get("supercategory") == "none" and is_valid_id(c.get("id"))
        and repr(c["id"]) not in used
    ]
    if placeholders and len(placeholders) < len(categories):
        coco["categories"] = [c for c in categories if c not in placeholders]
        for c in placeholders:
            report.add("category_dropped_unused_placeholder", f"{c['id']}: {shorten(c.get('name'))}")
