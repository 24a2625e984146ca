"""YOLO / Ultralytics: a data.yaml (or, Darknet style, classes.txt / obj.names: CVAT's YOLO 1.1,
LabelImg; yolo_find says where each layout's files are) and one label .txt per image (by the
rule below, else beside the image), `class cx cy w h` normalised to 0..1.

Behaviour follows Ultralytics' documentation (its code is AGPL: nothing copied). The label of
an image is found by replacing the last `/images/` of its path with `/labels/` and its
extension with `.txt` (no `/images/`: beside the image). A missing or empty label file is an
image with no object; a missing one is counted in the summary line, and a part (train, val)
none of whose images has a label file fails (its labels are elsewhere or were not exported).
Two images with one label file (same.jpg, same.JPG) are both refused; label files without an
image are counted. A row of more than 5 values is a polygon: its box is the points' bounds;
in a pose dataset (`kpt_shape` in data.yaml) it is the box followed by the keypoints. Each row
is judged alone, never the whole image: a repeated row is dropped, a class id that is not a
whole number in 0..nc-1 is an unknown category, and a box reaching outside 0..1 is clipped to
the image (fully outside: dropped), all counted as COCO's boxes are. The data.yaml is read by
yolo_yaml (no aliases; names as written).

Labels hold no image size: each image's header is read (Pillow reads no pixels) to turn the
normalised boxes into pixels.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from . import yolo_yaml
from .common import (
    CLASS_LIST_FILES,
    Boundary,
    image_size,
    is_image,
    map_chunks,
    merge,
    read_text,
    records,
    relative,
    walk_files,
)
from .image_records import Category, CocoData, DataReport, safe_join
from .voc import split_by_folder
from .yolo_find import YAML_NAMES, darknet_parts, find, label_candidates, label_path, yaml_file

__all__ = ["NAME", "YAML_NAMES", "find", "label_path", "read"]

log = logging.getLogger(__name__)

NAME = "yolo"


def parse_labels(text: str, pose_numbers: int | None = None
                 ) -> tuple[list[tuple[str, list[float] | None]], int]:
    """Rows as (class, [cx, cy, w, h]; None when malformed) and the count of repeated rows.
    A pose dataset's rows hold `pose_numbers` numbers after the class: the box, then the
    keypoints (which are not a polygon)."""
    rows, seen, repeats = [], set(), 0
    for line in text.splitlines():
        values = line.split()
        if not values:
            continue
        try:
            numbers = [float(v) for v in values[1:]]
        except ValueError:
            numbers = []
        box = None
        if len(numbers) == 4 or (pose_numbers and len(numbers) == pose_numbers):
            box = numbers[:4]
        elif pose_numbers:
            pass  # neither a box nor a box with its keypoints: malformed
        elif len(numbers) >= 6 and len(numbers) % 2 == 0:
            xs, ys = numbers[0::2], numbers[1::2]
            box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        key = (values[0], tuple(box or values[1:]))
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        rows.append((values[0], box))
    return rows, repeats


def class_id(text: str, nc: int) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not value.is_integer() or not 0 <= value < nc:
        return None
    return int(value)


def _names(data: dict, path: Path) -> list[str]:
    names, nc = data.get("names"), data.get("nc")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            ids = None
        if ids is None or ids != list(range(len(ids))):
            raise UserInputError(
                f"'names' in {path} must map the class ids 0, 1, 2, ... to names, not "
                f"{shorten(names)}; number the classes from 0 without gaps."
            )
        names = [str(names[k] if k in names else names[str(k)]) for k in ids]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    elif names is None and isinstance(nc, int) and nc > 0:
        names = [str(k) for k in range(nc)]
    else:
        raise UserInputError(
            f"{path} has no class names: give 'names' as a list or a {{0: name}} map (or 'nc')."
        )
    if isinstance(nc, int) and nc != len(names):
        raise UserInputError(
            f"{path} says nc: {nc} but 'names' lists {len(names)} classes; make them agree."
        )
    return names


def _resolve(root: Path, entry: str, channel: Path, yaml_path: Path) -> Path:
    """A data.yaml entry inside the channel; Roboflow's '../valid/images' is retried without
    the '../' (as Ultralytics does). Fails naming the path tried."""
    tried = []
    for text in (entry, entry[3:] if entry.startswith("../") else None):
        if text is None:
            continue
        path = safe_join(root, text)
        if path is None or not str(path.resolve()).startswith(str(channel.resolve())):
            tried.append(f"{text} (outside the channel)")
            continue
        if path.exists():
            return path
        tried.append(str(path))
    raise UserInputError(
        f"{yaml_path} points to {shorten(entry)}, which is not in the channel (tried "
        f"{shorten('; '.join(tried), 300)}); give a folder or .txt list relative to the yaml's folder."
    )


def _images_of(source: Path, channel: Path, boundary: Boundary, report: DataReport) -> list[str]:
    """A folder (its images, recursively) or a .txt list (paths relative to the list's folder)."""
    if source.is_dir():
        return [relative(channel, p) for p in walk_files(source, is_image)]
    boundary.check(source, "image list")
    listed = []
    for line in read_text(source, "image list").splitlines():
        line = line.strip()
        if not line:
            continue
        path = safe_join(source.parent, line[2:] if line.startswith("./") else line)
        if path is None:
            report.add("image_skipped_unsafe_file_name", shorten(line))
            continue
        listed.append(os.path.normpath(relative(channel, path)))
    return listed


def _pose_numbers(data: dict, path: Path) -> int | None:
    """How many numbers follow the class in a row of a pose dataset (kpt_shape in data.yaml):
    the box's four, then the keypoints'."""
    shape = data.get("kpt_shape")
    if shape is None:
        return None
    if (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)
            and shape[0] > 0 and shape[1] in (2, 3)):
        return 4 + shape[0] * shape[1]
    raise UserInputError(
        f"'kpt_shape' in {path} must be [number of keypoints, 2 or 3], as Ultralytics writes it, "
        f"not {shorten(shape)}; fix it, or remove it if the labels hold boxes only."
    )


def _parts(channel: Path, boundary: Boundary, report: DataReport
           ) -> tuple[list[str], dict[str, list[str]], Path, int | None]:
    """The class names, the images of each part (train, val), the file naming the data, and
    the numbers in a pose row (None: not a pose dataset)."""
    yaml_path = yaml_file(channel)
    if yaml_path is None:
        return (*darknet_parts(channel, boundary, report), None)
    boundary.check(yaml_path, "data.yaml")
    data = yolo_yaml.load(yaml_path)
    names = _names(data, yaml_path)
    root = yaml_path.parent
    if isinstance(data.get("path"), str) and data["path"] not in ("", "."):
        inside = safe_join(root, data["path"])
        if inside is not None and inside.is_dir():
            root = inside
        else:  # another machine's dataset folder: the channel holds the data itself
            report.add("yaml_path_ignored", f"{yaml_path}: path {shorten(data['path'])}")
    parts: dict[str, list[str]] = {}
    for part, keys in (("train", ("train",)), ("val", ("val", "validation"))):
        entries = next((data[k] for k in keys if data.get(k)), None)
        if entries is None:
            continue
        images: list[str] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, str):
                raise UserInputError(
                    f"'{part}' in {yaml_path} must be a path or a list of paths, not {shorten(entry)}."
                )
            images += _images_of(_resolve(root, entry, channel, yaml_path), channel, boundary, report)
        parts[part] = images
    if "train" not in parts:
        raise UserInputError(f"{yaml_path} has no 'train' entry; give the training images' folder.")
    if parts.get("val") and not set(parts["val"]) - set(parts["train"]):
        # coco128's data.yaml points val at the training images: no image is left to validate
        # on, so the rule for a dataset without a split applies (val_fraction, at random).
        del parts["val"]
        report.add("split_yaml_val_is_train", str(yaml_path))
        log.warning("%s: 'val' holds only training images (as coco128's does); val_fraction of "
                    "the training images is held out at random instead", yaml_path)
    return names, parts, yaml_path, _pose_numbers(data, yaml_path)


def read(channel: Path, hp: Hyperparameters, report: DataReport,
         categories: list[Category] | None = None) -> CocoData:
    boundary = Boundary(channel)
    names, parts, source, pose_numbers = _parts(channel, boundary, report)
    seen: dict[str, str] = {}
    for part, images in parts.items():
        for image in images:
            if image in seen and seen[image] != part:
                report.add("split_image_in_train_and_val", image)  # used for training only
                continue
            seen.setdefault(image, part)
    images, annotations = [], []
    _count_labels_without_image(channel, list(seen), report)
    file_names = _one_image_per_label_file(channel, list(seen), report)
    found, part = map_chunks(read_images, file_names, str(channel), len(names), pose_numbers)
    merge(report, part)
    labelled = {}
    for file_name, (entry, boxes, has_label) in zip(file_names, found):
        labelled[file_name] = has_label
        if entry is None:
            continue
        images.append(entry)
        for category, bbox in boxes:
            annotations.append({"id": len(annotations), "image_id": file_name,
                                "category_id": category, "bbox": bbox})
    for part in parts:
        _check_labels_found(part, [f for f, p in seen.items() if p == part], labelled, source)
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}
    if set(parts) == {"train", "val"}:
        split = {part: {i for i, p in seen.items() if p == part} for part in parts}
        split["how"] = f"{source.name} train and val"
    else:
        split = split_by_folder(images)
    return records(channel, coco, source, report, categories, split=split)


# Text files that sit beside images in YOLO layouts without being labels.
NOT_LABELS = {*CLASS_LIST_FILES, "train.txt", "val.txt", "valid.txt", "test.txt"}


def _count_labels_without_image(channel: Path, file_names: list[str], report: DataReport) -> None:
    """Label files in the listed images' label folders that no listed image has (an image
    deleted or renamed after labelling): their boxes train nothing, so they are counted."""
    expected = {c for f in file_names for c in label_candidates(f)}
    image_folders = {os.path.dirname(f) for f in file_names}
    used = {found_label(channel, f) for f in file_names} - {None}
    folders = {os.path.dirname(label_path(f)) for f in file_names} | {os.path.dirname(u) for u in used}
    for folder in sorted(folders):
        try:
            with os.scandir(channel / folder) as entries:
                names = sorted(e.name for e in entries if e.name.endswith(".txt") and e.is_file())
        except OSError:
            continue
        beside = folder in image_folders  # labels beside their images: other .txt files too
        for name in names:
            path = os.path.join(folder, name)
            other = name in NOT_LABELS or name.lower().startswith("readme")
            if path in expected or (beside and other):
                continue
            report.add("label_files_without_image", path)


def _one_image_per_label_file(channel: Path, file_names: list[str], report: DataReport
                              ) -> list[str]:
    """The images without those whose label file another image has too (same.jpg and
    same.JPG, a.jpg and a.png): the file cannot say which image its boxes are on, so neither
    image is used."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for file_name in file_names:
        label = found_label(channel, file_name)
        if label is not None:
            by_label[label].append(file_name)
    shared = set()
    for label, group in by_label.items():
        if len(group) > 1:
            shared.update(group)
            report.add("images_listed", n=len(group))  # coco_records never sees them
            report.add("image_skipped_shared_label_file",
                       shorten(f"{', '.join(group)} -> {label}", 160), n=len(group))
    return [f for f in file_names if f not in shared] if shared else file_names


def _check_labels_found(part: str, file_names: list[str], labelled: dict, source: Path) -> None:
    """A part (train, val) none of whose images has a label file: the labels are elsewhere, or
    were not exported. Read as images without objects, it would train or score on nothing."""
    looked = [f for f in file_names if labelled.get(f) is not None]
    if not looked or any(labelled[f] for f in looked):
        return
    what = f"'{part}' in {source}" if part != "all" else f"{source.parent}"
    raise UserInputError(
        f"none of the {len(looked)} images of {what} has a label file (for {looked[0]} it "
        f"would be {' or '.join(label_candidates(looked[0]))}); put each image's .txt labels where Ultralytics "
        "looks for them: the image's path with its last images/ folder made labels/ (or the "
        "image's own folder) and its extension made .txt."
    )


def found_label(channel: Path, file_name: str) -> str | None:
    """The image's label file that exists, by the images -> labels rule first (yolo_find)."""
    return next((p for p in label_candidates(file_name) if os.path.lexists(channel / p)), None)


def read_images(file_names: list[str], channel: str, nc: int, pose_numbers: int | None = None
                ) -> tuple[list, DataReport]:
    """read_image for a chunk of images (in a worker process when there are many)."""
    report = DataReport()
    root = Path(channel)
    boundary = Boundary(root)
    return [read_image(root, f, nc, boundary, report, pose_numbers) for f in file_names], report


def read_image(channel: Path, file_name: str, nc: int, boundary: Boundary, report: DataReport,
               pose_numbers: int | None = None
               ) -> tuple[dict | None, list[tuple[Any, list[float] | None]], bool | None]:
    """One image's entry (its size from the header), its boxes in pixels, and whether it has
    a label file (None: not looked for); the entry is None when its label file cannot be used
    (the image is skipped: its boxes are unknown, not absent)."""
    entry: dict[str, Any] = {"id": file_name, "file_name": file_name}
    image = safe_join(channel, file_name)
    if image is None or not boundary.inside(image):
        return entry, [], None  # coco_records names and counts the image
    size = image_size(image)
    if size is None:
        return entry, [], None  # counted by coco_records as unreadable
    entry["width"], entry["height"] = width, height = size
    found = found_label(channel, file_name)
    if found is None:
        # Ultralytics' rule: an image without objects needs no label file; it is kept as a
        # negative, and counted in the summary line (a folder of labels may be missing).
        report.add("images_without_label_file", file_name)
        return entry, [], False
    label = channel / found
    if not boundary.per_image(label, report):
        return None, [], True
    try:
        rows, repeats = parse_labels(label.read_text(encoding="utf-8-sig"), pose_numbers)
    except (OSError, UnicodeDecodeError) as exc:
        report.add("image_skipped_unreadable_label_file", f"{label}: {shorten(str(exc), 80)}")
        return None, [], True
    if repeats:
        report.add("box_dropped_repeated_row", str(relative(channel, label)), n=repeats)
    boxes = []
    for text, box in rows:
        category = class_id(text, nc)
        bbox = None
        if box is not None:
            cx, cy, w, h = box
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            if not all(math.isfinite(v) for v in bbox):
                bbox = None
        boxes.append((category if category is not None else f"unknown: {text}", bbox))
    return entry, boxes, True
