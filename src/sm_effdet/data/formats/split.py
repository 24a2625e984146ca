"""The one split rule: training and validation records from a split file, from the format's own
split (by image ids), or at random, seeded."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ...errors import UserInputError, shorten
from .common import read_json_file
from .image_records import DataReport, ImageRecord, is_valid_id

log = logging.getLogger(__name__)


def _split_ids(split: dict, key: str, split_file: Path) -> list:
    ids = split[key]
    if not isinstance(ids, list) or not all(is_valid_id(i) for i in ids):
        raise UserInputError(
            f"'{key}' in split file {split_file} must be a flat list of image ids (the COCO "
            f"images' 'id' values, such as [1, 2, 3]), not {shorten(json.dumps(ids))}."
        )
    return ids


def _check_split_matches(split_ids: set, image_ids: set, split_file: Path) -> None:
    """No split id names a usable image: say how the ids differ, rather than leave the job
    to fail later on an empty training set."""
    if not split_ids or split_ids & image_ids:
        return
    kinds = {type(i) for i in image_ids}
    text_for_numbers = int in kinds and all(isinstance(i, str) for i in split_ids)
    hint = (
        " (the split file has them as text, such as \"1\"; the images' ids are numbers: write "
        "them without quotes)" if text_for_numbers else ""
    )
    raise UserInputError(
        f"none of the ids in split file {split_file} ({shorten(sorted(map(str, split_ids))[:5])}) "
        f"is the 'id' of a usable image (such as {shorten(sorted(image_ids, key=str)[:5])}){hint}; "
        "list the images' 'id' values from the COCO file, not their file names."
    )


def split_by_ids(
    records: list[ImageRecord], train_ids: set, val_ids: set, how: str, report: DataReport
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and validation records by image id (an id in both lists trains); images in
    neither list are counted, not used."""
    train = [r for r in records if r.image_id in train_ids]
    val = [r for r in records if r.image_id in val_ids and r.image_id not in train_ids]
    unused = len(records) - len(train) - len(val)
    if unused:
        report.add("split_images_in_neither_list", n=unused)
    report.split = {"how": how, "train": len(train), "val": len(val)}
    return train, val


def split_records(
    records: list[ImageRecord],
    *,
    split_file: Path | None,
    val_fraction: float,
    seed: int,
    report: DataReport,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split by a split file ({"train": [ids], "val": [ids]}) or at random, seeded."""
    if split_file is not None:
        split = read_json_file(split_file, "split file")
        val_key = next((k for k in ("val", "valid", "validation") if k in (split or {})), None)
        if not isinstance(split, dict) or "train" not in split or val_key is None:
            raise UserInputError(
                f"split file {split_file} must hold {{\"train\": [image ids], \"val\": [image ids]}}."
            )
        train_list, val_list = (_split_ids(split, key, split_file) for key in ("train", val_key))
        train_ids, val_ids = set(train_list), set(val_list)
        known = {r.image_id for r in records}
        _check_split_matches(train_ids | val_ids, known, split_file)
        unknown = (train_ids | val_ids) - known
        if unknown:
            report.add("split_ids_not_usable", shorten(sorted(map(str, unknown))[:5]), n=len(unknown))
        both = train_ids & val_ids & known
        if both:
            # Kept for training only; validating on trained images would flatter the scores.
            report.add("split_ids_in_both_lists", shorten(sorted(map(str, both))[:5]), n=len(both))
            log.warning(
                "split file %s lists %d image ids under both 'train' and '%s' (%s); they are "
                "used for training only", split_file, len(both), val_key,
                shorten(sorted(map(str, both))[:5]),
            )
        return split_by_ids(records, train_ids, val_ids, f"split file {split_file.name}", report)
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * val_fraction)
    if val_fraction > 0 and len(shuffled) >= 2:
        n_val = min(max(n_val, 1), len(shuffled) - 1)
    val, train = shuffled[:n_val], shuffled[n_val:]
    report.split = {
        "how": f"random, val_fraction={val_fraction}, seed={seed}",
        "train": len(train),
        "val": len(val),
    }
    return train, val
