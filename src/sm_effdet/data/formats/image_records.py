"""The image records every reader produces, the one validation they all go through (without
opening the images), and the data report.

Every reader turns its files into COCO-shaped data and hands it to `coco_records`. Icevision's
COCO parser opens every image to read its size (measured 32x slower than reading the JSON), so
the listed width and height are used here and checked when an image is loaded. Every image or
box that cannot be used is counted in a `DataReport`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ... import stops
from ...errors import UserInputError, shorten

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
# Larger images are refused unopened (decompression bombs); this is Pillow's own error limit.
MAX_IMAGE_PIXELS = 178_956_970


@dataclass(frozen=True)
class Category:
    id: Any  # the dataset's own id: need not be contiguous nor start at 1
    name: str


@dataclass
class ImageRecord:
    image_id: Any
    file_name: str
    path: Path
    width: int
    height: int
    # (N, 4) float32, x1 y1 x2 y2 in pixels of the picture width x height describes: as shown
    # (EXIF orientation applied), or as stored when the annotation gave the stored size
    # (data/dataset.py _decode).
    boxes: np.ndarray
    labels: np.ndarray  # (N,) int64, 1..K: position of the category in the sorted category list
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


# Counts that say nothing was lost or changed; every other count is in the summary line.
INFORMATIVE = frozenset({
    "images_listed", "boxes_listed", "images_used", "boxes_used", "image_size_read_from_file",
    "images_without_boxes_kept_as_negatives", "yaml_path_ignored",
})


@dataclass
class DataReport:
    """What was found in the data, what was fixed and what was skipped, and why."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sources: list[str] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # channel -> annotation format read

    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        if n:
            self.counts[reason] += n
        if example is not None and len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(example)

    def add_channel(self, name: str, channel: DataReport) -> None:
        """Fold one channel's report in: its counts join the totals and stay apart under
        `channels`, so that training and validation can be told apart."""
        self.channels[name] = dict(sorted(channel.counts.items()))
        self.counts.update(channel.counts)
        for reason, examples in channel.examples.items():
            for example in examples:
                self.add(reason, example if name == "training" else f"{name}: {example}", n=0)
        self.sources.extend(channel.sources)
        if channel.formats:
            self.formats[name] = next(iter(channel.formats.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "counts": dict(sorted(self.counts.items())),
            "channels": self.channels,
            "formats": self.formats,
            "examples": {k: v for k, v in sorted(self.examples.items()) if v},
            "split": self.split,
        }

    def summary(self) -> str:
        """The line the job logs: what was listed, then every count but the informative ones
        (images_without_label_file, images_without_xml_not_used, annotation_skipped_...
        included), so that data not used is never read as "all usable"."""
        problems = {k: v for k, v in sorted(self.counts.items()) if v and k not in INFORMATIVE}
        listed = (
            f"{self.counts['images_listed']} images and {self.counts['boxes_listed']} boxes listed"
        )
        if not problems:
            return f"data: {listed}; all usable"
        return f"data: {listed}; " + ", ".join(f"{k}={v}" for k, v in problems.items())

    def write(self, path: Path) -> None:
        from ...model.artifacts import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")


@dataclass
class CocoData:
    annotation_file: Path
    categories: list[Category]  # the classes trained: the file's own, or training's
    images: list[ImageRecord]
    file_categories: list[Category] = field(default_factory=list)  # as the file lists them
    # The format's own split ({"train": ids, "val": ids, "how": text}: VOC's ImageSets, a
    # data.yaml's train and val, Roboflow's split folders), or None.
    split: dict[str, Any] | None = None



def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _check_image_path(path: Path, real_root: str, real_dirs: dict[str, str]) -> str | None:
    """Why the image at `path` cannot be used, as a report reason, or None when it can.

    One lstat per image, as a plain existence check costs: a symlink is followed and must end
    inside the channel (like a '../', which safe_join refuses by its text); the folders on the
    way are resolved once each, a few per channel, to catch a linked folder.
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "image_skipped_missing_file"
    except (OSError, ValueError):  # a name the OS refuses: a component too long, a NUL byte
        return "image_skipped_invalid_file_name"
    parent, name = os.path.split(path)
    if stat.S_ISLNK(mode):
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            return "image_skipped_missing_file"
    else:
        if not stat.S_ISREG(mode):
            return "image_skipped_missing_file"
        if parent not in real_dirs:
            real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_dirs[parent], name)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        return "image_skipped_unsafe_file_name"
    return None


def safe_join(root: Path, relative: str) -> Path | None:
    """root/relative, or None when `relative` is absolute or climbs out of root."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        return None
    normal = os.path.normpath(relative)
    if normal == ".." or normal.startswith("../") or normal.startswith("/"):
        return None
    return root / normal


def _require_list(coco: dict, key: str, path: Path) -> list:
    value = coco.get(key)
    if not isinstance(value, list):
        raise UserInputError(
            f"COCO file {path} has no '{key}' list; it needs 'images', 'annotations' and "
            "'categories' as in the COCO format."
        )
    return value


def is_valid_id(value: Any) -> bool:
    """COCO ids are numbers; text ids occur in converted datasets. Nothing else is an id."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def read_categories(coco: dict, path: Path, report: DataReport | None = None) -> list[Category]:
    """The categories of a COCO file; a malformed one is skipped and counted (its boxes are
    then dropped as of an unknown category), two with one id fail, two with one name warn."""
    report = report if report is not None else DataReport()
    categories: dict[Any, Category] = {}
    for entry in _require_list(coco, "categories", path):
        if not isinstance(entry, dict) or not is_valid_id(entry.get("id")):
            report.add("category_skipped_malformed", shorten(entry))
            continue
        if entry["id"] in categories:
            raise UserInputError(
                f"COCO file {path} lists category id {shorten(entry['id'])} twice; give every "
                "category its own id."
            )
        categories[entry["id"]] = Category(entry["id"], str(entry.get("name", entry["id"])))
    if not categories:
        raise UserInputError(f"COCO file {path} has no usable categories; add the object classes.")
    names = Counter(c.name for c in categories.values())
    for name, n in names.items():
        if n > 1:
            ids = [c.id for c in categories.values() if c.name == name]
            report.add("category_duplicate_name", f"{shorten(name)}: ids {shorten(ids)}")
            log.warning(
                "%s: category name %r is used by %d ids (%s); they are trained as different "
                "classes", path, shorten(name), n, shorten(ids),
            )
    return sorted(categories.values(), key=lambda c: (str(type(c.id)), c.id))


def describe_categories(categories: list[Category], limit: int = 200) -> str:
    return shorten(", ".join(f"{c.id}: {c.name}" for c in categories), limit)


def check_same_categories(
    train: list[Category], train_file: Path, val: list[Category], val_file: Path
) -> None:
    """Validation boxes are scored by category id: every validation category must be one of
    training's, with the same id and name, or the scores are against the wrong classes."""
    train_names = {c.id: c.name for c in train}
    wrong = [c for c in val if train_names.get(c.id) != c.name]
    if not wrong:
        return
    raise UserInputError(
        f"the validation channel's categories in {val_file} do not match the training "
        f"channel's in {train_file} (by id and name): validation has "
        f"{describe_categories(wrong)} where training has {describe_categories(train)}; give "
        "the validation JSON the same categories, with the same ids and names, as the "
        "training JSON."
    )



def _image_root(channel: Path, annotation_file: Path, file_names: list[str]) -> Path:
    # COCO layouts put images beside the JSON, at the channel root or under images/; pick the
    # first base under which a sample of the listed files exists.
    bases = [channel, channel / "images", annotation_file.parent]
    sample = [n for n in file_names[:20] if safe_join(channel, n) is not None]
    for base in bases:
        if any(_is_file(base / n) for n in sample):
            return base
    return channel


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and 1 <= value <= MAX_IMAGE_PIXELS
    )


def _image_size(entry: dict, path: Path, report: DataReport) -> tuple[int, int] | None:
    width, height = entry.get("width"), entry.get("height")
    if _is_size(width) and _is_size(height):
        return int(width), int(height)
    # Only images whose JSON entry lacks a size are opened, and only their header is read.
    from PIL import Image

    try:
        with Image.open(path) as img:
            stops.pause_for_test("image-header")  # a stop must pass this `except Exception`
            report.add("image_size_read_from_file", entry.get("file_name"))
            return shown_size(img)
    except Exception:
        return None


# EXIF orientations (tag 0x0112) that turn the picture by a quarter: width and height swap.
QUARTER_TURNS = (5, 6, 7, 8)


def shown_size(img: Any) -> tuple[int, int]:
    """An opened image's (width, height) as viewers and labelling tools show it, read from its
    header alone (no pixel decoded): swapped when its EXIF orientation turns it a quarter.

    The rule of model/preprocessing.orientation, which decodes for training and serving (it
    cannot be imported here: it brings OpenCV); tests/test_exif.py holds the two to one answer.
    Pillow's base getexif reads the header's EXIF (a PNG's eXIf before the pixel data, as
    PngImageFile's own getexif would decode the image to look further); Pillow turns a TIFF
    itself, its size at open already the one shown.
    """
    from PIL import Image

    width, height = img.size
    if img.format == "TIFF":
        return width, height
    try:
        turn = Image.Image.getexif(img).get(0x0112, 1)
    except Exception:  # noqa: BLE001  (a malformed EXIF block: the picture as stored)
        return width, height
    return (height, width) if isinstance(turn, int) and turn in QUARTER_TURNS else (width, height)


def coco_records(
    channel: Path,
    coco: dict,
    annotation_file: Path,
    report: DataReport,
    categories: list[Category] | None = None,
    image_root: Path | None = None,
) -> CocoData:
    """Image records from COCO-shaped data: every other format's reader builds this dict, so that
    all formats share one validation and one report. `annotation_file` names the source in
    messages; `image_root` is where `file_name`s start (found by itself when None)."""
    report.sources.append(str(annotation_file))
    file_categories = read_categories(coco, annotation_file, report)
    categories = categories or file_categories
    label_of = {c.id: i + 1 for i, c in enumerate(categories)}

    image_entries = _require_list(coco, "images", annotation_file)
    annotations = _require_list(coco, "annotations", annotation_file)
    report.add("images_listed", n=len(image_entries))
    report.add("boxes_listed", n=len(annotations))

    names = [e.get("file_name") for e in image_entries if isinstance(e, dict)]
    root = image_root if image_root is not None else _image_root(channel, annotation_file, names)

    entries: dict[Any, dict] = {}
    for entry in image_entries:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not is_valid_id(image_id):
            report.add("image_skipped_malformed_entry", shorten(entry))
            continue
        if image_id in entries:
            report.add("image_skipped_duplicate_id", str(image_id))
            entries[image_id] = None  # ambiguous: neither copy is used
            continue
        entries[image_id] = entry

    sizes: dict[Any, tuple[int, int]] = {}
    paths: dict[Any, Path] = {}
    real_channel, real_dirs = os.path.realpath(channel), {}
    for image_id, entry in entries.items():
        if entry is None:
            continue
        file_name = entry.get("file_name")
        path = safe_join(root, file_name)
        if path is None:
            report.add("image_skipped_unsafe_file_name", shorten(file_name))
            continue
        problem = _check_image_path(path, real_channel, real_dirs)
        if problem:
            report.add(problem, shorten(file_name))
            continue
        size = _image_size(entry, path, report)
        if size is None:
            report.add("image_skipped_unreadable", str(file_name))
            continue
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            report.add("image_skipped_too_many_pixels", f"{file_name}: {size[0]}x{size[1]}")
            continue
        sizes[image_id], paths[image_id] = size, path

    records = [
        ImageRecord(image_id, entries[image_id]["file_name"], paths[image_id], width, height,
                    _NO_BOXES, _NO_LABELS)
        for image_id, (width, height) in sizes.items()
    ]
    _attach_boxes(records, entries, annotations, label_of, report)
    report.add("images_without_boxes_kept_as_negatives", n=sum(1 for r in records if not len(r.labels)))
    report.add("images_used", n=len(records))
    report.add("boxes_used", n=sum(len(r.labels) for r in records))
    return CocoData(annotation_file, categories, records, file_categories)


_NO_BOXES = np.zeros((0, 4), np.float32)
_NO_LABELS = np.zeros((0,), np.int64)


def _lookup(table: dict, keys: list, default: Any) -> list:
    try:
        return [table.get(k, default) for k in keys]
    except TypeError:  # an unhashable id (a list, say): it matches nothing
        return [table.get(k, default) if isinstance(k, Hashable) else default for k in keys]


# What COCO writers put in iscrowd: 0/1, booleans, and the same as text from some converters.
_CROWD_VALUES = {0: False, 1: True, "0": False, "1": True, "false": False, "true": True}


def _crowd_flag(value: Any) -> bool | None:
    """iscrowd as a flag; None when it is none of the accepted forms (the box is dropped as
    malformed: guessing could turn every box into an ignored crowd region)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, str)):
        return _CROWD_VALUES.get(value.strip().lower() if isinstance(value, str) else value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return value == 1.0
    return None


def _box_or_nan(bbox: Any) -> tuple[float, ...]:
    if (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) for v in bbox)
    ):
        return tuple(float(v) for v in bbox)
    return (math.nan,) * 4


def _attach_boxes(
    records: list[ImageRecord], entries: dict, annotations: list, label_of: dict,
    report: DataReport,
) -> None:
    """Check every annotation and give each record its boxes; vectorised for COCO's 860k boxes.

    Each annotation is counted under the first check it fails, in this order: not an object,
    duplicate id, unknown image, (image skipped: not counted again), unknown category,
    malformed bbox, zero or negative size, outside the image after clipping. Crowd regions are
    kept apart, as COCO does.
    """
    n = len(annotations)
    if n == 0:
        return
    is_dict = np.fromiter((isinstance(a, dict) for a in annotations), bool, n)
    dicts = [a if ok else {} for a, ok in zip(annotations, is_dict)]
    ann_ids = [a.get("id") for a in dicts]
    image_ids = [a.get("image_id") for a in dicts]
    category_ids = [a.get("category_id") for a in dicts]
    bbox_rows = [a.get("bbox") for a in dicts]
    crowd_flags = [_crowd_flag(a.get("iscrowd", 0)) for a in dicts]
    crowd = np.fromiter((c is True for c in crowd_flags), bool, n)
    bad_crowd = np.fromiter((c is None for c in crowd_flags), bool, n)

    duplicate = np.zeros(n, bool)
    named = [(k, i) for k, i in enumerate(ann_ids) if i is not None and is_dict[k]]
    if len({repr(i) for _, i in named}) != len(named):
        seen: set = set()
        for k, i in named:
            key = repr(i)
            duplicate[k] = key in seen
            seen.add(key)

    # Record position of each annotation's image: -1 when the image was skipped, -2 unknown.
    position = {image_id: -1 for image_id in entries}
    position.update({r.image_id: k for k, r in enumerate(records)})
    pos = np.asarray(_lookup(position, image_ids, -2), np.int64)
    labels = np.asarray(_lookup(label_of, category_ids, 0), np.int64)
    try:
        boxes = np.asarray(bbox_rows, np.float64)
        if boxes.shape != (n, 4):
            raise ValueError
    except (ValueError, TypeError):
        boxes = np.asarray([_box_or_nan(b) for b in bbox_rows], np.float64)

    sizes = np.asarray([(r.width, r.height) for r in records] or [(0, 0)], np.float64)
    width, height = sizes[np.maximum(pos, 0), 0], sizes[np.maximum(pos, 0), 1]
    x, y, w, h = boxes.T
    # x + w may overflow to inf (a 1e308 coordinate): such a box is judged like any other
    # (clipped, or dropped as outside), without numpy's warning in the log.
    with np.errstate(invalid="ignore", over="ignore"):
        x1, y1 = np.clip(x, 0, width), np.clip(y, 0, height)
        x2, y2 = np.clip(x + w, 0, width), np.clip(y + h, 0, height)
        finite = np.isfinite(boxes).all(axis=1)
        empty = ~(w > 0) | ~(h > 0)
        outside = (x2 - x1 < 1) | (y2 - y1 < 1)
        clipped = (x1 != x) | (y1 != y) | (x2 != x + w) | (y2 != y + h)

    remaining = np.ones(n, bool)

    def drop(mask: np.ndarray, reason: str | None, example, keep: bool = False) -> None:
        """Count the remaining annotations that `mask` hits; unless `keep`, drop them."""
        hit = remaining & mask
        if not keep:
            remaining[hit] = False
        if reason is not None and hit.any():
            for k in np.flatnonzero(hit)[:EXAMPLES_PER_REASON]:
                report.add(reason, example(k), n=0)
            report.add(reason, n=int(hit.sum()))

    def box_text(k: int) -> str:
        return f"annotation {ann_ids[k]}: bbox {bbox_rows[k]!r:.60}"

    drop(~is_dict, "box_dropped_malformed", lambda k: repr(annotations[k])[:80])
    drop(duplicate, "box_dropped_duplicate_id", lambda k: str(ann_ids[k]))
    drop(pos == -2, "box_dropped_unknown_image", lambda k: f"annotation {ann_ids[k]} -> image {image_ids[k]}")
    drop(pos == -1, None, None)  # the image itself was skipped and counted
    drop(labels == 0, "box_dropped_unknown_category",
         lambda k: f"annotation {ann_ids[k]} -> category {category_ids[k]}")
    drop(~finite, "box_dropped_malformed", box_text)
    drop(bad_crowd, "box_dropped_malformed", lambda k: f"annotation {ann_ids[k]}: iscrowd {shorten(repr(dicts[k].get('iscrowd')), 40)}")
    drop(empty, "box_dropped_zero_or_negative_size", box_text)
    drop(outside, "box_dropped_outside_image", box_text)
    drop(clipped, "box_clipped_to_image", box_text, keep=True)
    drop(crowd, "crowd_regions_ignored", lambda k: None, keep=True)

    xyxy = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    for mask, field_name in ((remaining & ~crowd, "boxes"), (remaining & crowd, "crowd_boxes")):
        index = np.flatnonzero(mask)
        index = index[np.argsort(pos[index], kind="stable")]
        ends = np.cumsum(np.bincount(pos[index], minlength=len(records)))
        chosen, chosen_labels = xyxy[index], labels[index]
        start = 0
        for k, end in enumerate(ends):
            if end > start:
                setattr(records[k], field_name, chosen[start:end])
                if field_name == "boxes":
                    records[k].labels = chosen_labels[start:end]
            start = end


def check_num_classes(num_classes: int | None, categories: list[Category]) -> None:
    """The seed's num_classes: the number of categories, or that plus one for the background."""
    if num_classes is None or num_classes in (len(categories), len(categories) + 1):
        return
    found = ", ".join(f"{c.id}: {c.name}" for c in categories[:20])
    more = f" and {len(categories) - 20} more" if len(categories) > 20 else ""
    raise UserInputError(
        f"hyperparameter 'num_classes' is {num_classes} but the data has {len(categories)} "
        f"categories ({found}{more}); set it to {len(categories)} (or {len(categories) + 1} "
        "counting the background) or leave it out."
    )
