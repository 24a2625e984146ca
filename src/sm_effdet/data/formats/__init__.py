"""A channel's annotations, in whatever format the user has, as the job's image records.

`read_dataset` is the one entry point: the training job and the launcher's local data check
call it, and neither knows which format it got. Every reader (one module per format, each with
NAME, find and read) turns its files into COCO-shaped data and hands it to
`image_records.coco_records`, so that all formats share one validation and one data report;
`split` holds the one split rule. Each format's files are found by content in one bounded walk
of the channel that every reader shares (`scan`); when none is found, the message says where
the job looked and what the channel holds instead (`inventory`). Nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from . import builtin, coco, createml, groundtruth, inventory, scan, voc, yolo
from .common import Boundary
from .image_records import (
    MAX_IMAGE_PIXELS,
    Category,
    CocoData,
    DataReport,
    ImageRecord,
    check_num_classes,
    check_same_categories,
    safe_join,
)
from .split import split_by_ids, split_records

__all__ = [
    "MAX_IMAGE_PIXELS", "REPORT_FILE", "Category", "DataReport", "Dataset", "ImageRecord",
    "read_dataset",
]

log = logging.getLogger(__name__)

# Where the job writes the data report, relative to the output folder (named in messages).
REPORT_FILE = "data_report.json"
TRAINING, VALIDATION = "training", "validation"

# Detection order: each channel is offered to every reader; more than one finding its files
# fails (naming both) rather than pick one silently.
READERS = (
    coco,
    groundtruth,
    builtin,
    voc,
    yolo,
    createml,
)
FORMATS = {m.NAME: m for m in READERS}
DESCRIPTIONS = {
    "coco": "a COCO JSON at the root or in annotations/",
    "groundtruth": "a Ground Truth manifest (.manifest or .jsonl)",
    "builtin": "the built-in algorithm's per-image JSONs in a *_annotation channel",
    "voc": "Pascal VOC XMLs (files with an <annotation> root, anywhere in it)",
    "yolo": "a YOLO data.yaml, or classes.txt / obj.names with label files (rows of class cx cy w "
            "h) in labels/ or beside the images",
    "createml": "a CreateML JSON list (*.createml.json)",
}
NAMES = {"coco": "COCO", "groundtruth": "Ground Truth", "builtin": "built-in algorithm",
         "voc": "Pascal VOC", "yolo": "YOLO", "createml": "CreateML"}


@dataclass
class Dataset:
    categories: list[Category]  # the classes trained, in label order (label k is categories[k-1])
    train: list[ImageRecord]
    val: list[ImageRecord]


def detect(channel: Path, hp: Hyperparameters, name: str):
    """The reader for a channel: the one annotation_format names, else the one whose files are
    there (COCO when none is: its message says what is missing)."""
    chosen = hp.annotation_format
    if chosen != "auto":
        reader = FORMATS[chosen]  # the hyperparameter parser allows only these
        if reader is not coco and not reader.find(channel):
            raise UserInputError(
                f"annotation_format is '{chosen}' but the '{name}' channel ({channel}) does not "
                f"hold {DESCRIPTIONS[chosen]} (the job {inventory.where(channel)}; it holds "
                f"{inventory.holds(channel)}); add them, or set annotation_format to auto."
            )
        return reader
    if hp.annotations_file and name == TRAINING:
        return coco
    excluded = {hp.split_file} if hp.split_file else set()
    found = []
    for reader in READERS:
        files = [f for f in reader.find(channel) if str(f.relative_to(channel)) not in excluded]
        if files:
            found.append((reader, files))
    if len(found) > 1:
        both = "; ".join(
            f"{NAMES[r.NAME]} ({shorten(', '.join(str(f.relative_to(channel)) for f in files[:2]), 120)})"
            for r, files in found
        )
        raise UserInputError(
            f"the '{name}' channel ({channel}) holds annotations in more than one format: {both}; "
            "keep one format per channel, or choose one with the annotation_format hyperparameter."
        )
    if found:
        return found[0][0]
    return _nothing_found(channel, hp, name)


def _nothing_found(channel: Path, hp: Hyperparameters, name: str):
    """COCO when the channel has JSONs where COCO's are (its messages say what is wrong with
    them); else one sentence: where the job looked and what the channel holds instead."""
    jsons = [p for folder in (channel, channel / coco.ANNOTATIONS_FOLDER) if folder.is_dir()
             for p in sorted(folder.glob("*.json")) if str(p.relative_to(channel)) != hp.split_file]
    boundary = Boundary(channel)
    studio = next((p for p in jsons if createml.label_studio(p, boundary)), None)
    if studio is not None:
        raise UserInputError(
            f"{studio} in the '{name}' channel looks like a Label Studio JSON export (tasks whose "
            "'annotations' hold 'result' boxes in percent of the image), which this job does not "
            "read; export the project from Label Studio as COCO, Pascal VOC or YOLO instead."
        )
    if jsons:
        return coco
    advice = (", or name a COCO JSON with the annotations_file hyperparameter"
              if name == TRAINING else "")
    raise UserInputError(
        f"no COCO annotation file (.json) found at the root of {channel} nor in its "
        f"{coco.ANNOTATIONS_FOLDER}/ folder, nor another format's files anywhere in it (the job "
        f"{inventory.where(channel)}, reading XMLs, label files and JSONs for their content); it "
        f"holds {inventory.holds(channel)}; add the '{name}' channel's annotations (see docs/data.md, "
        f"Annotation formats){advice}."
    )


def read_channel(name: str, channel: Path, hp: Hyperparameters, report: DataReport,
                 categories: list[Category] | None = None) -> tuple[CocoData, str]:
    reader = detect(channel, hp, name)
    channel_report = DataReport()
    channel_report.formats[name] = reader.NAME
    try:
        data = reader.read(channel, hp, channel_report, categories)
        listing = scan.cached(channel)
        if listing is not None and listing.deep_folders:
            channel_report.add("folders_below_depth_limit_not_searched", listing.deep_folders[0],
                               n=len(listing.deep_folders))
            log.warning("channel '%s': folders more than %d levels deep were not searched (%d, "
                        "such as %s)", name, scan.MAX_DEPTH, len(listing.deep_folders),
                        listing.deep_folders[0])
    finally:  # a reader that refuses the data leaves its counts for the job to log and write
        report.add_channel(name, channel_report)
    log.info("channel '%s': %s annotations (%s)", name, NAMES[reader.NAME], data.annotation_file)
    return data, reader.NAME


def _channel_names(channels: Mapping[str, Path]) -> tuple[str, str | None]:
    """The training channel and the validation channel: 'training' and 'validation', or the
    built-in algorithm's 'train_annotation' and 'validation_annotation' (whose images are in
    'train' and 'validation')."""
    if TRAINING in channels:
        validation = next((n for n in ("validation_annotation", VALIDATION) if n in channels), None)
        return TRAINING, validation
    if "train_annotation" in channels:
        return "train_annotation", "validation_annotation" if "validation_annotation" in channels else None
    raise UserInputError(
        f"the job has no '{TRAINING}' channel (channels given: "
        f"{shorten(', '.join(sorted(channels)) or 'none')}); give the annotations and their "
        f"images as a channel named '{TRAINING}' (or the built-in algorithm's 'train' and "
        "'train_annotation')."
    )


def read_dataset(channels: Mapping[str, Path], hp: Hyperparameters, report: DataReport) -> Dataset:
    """Read the channels' annotations (by channel name: "training", "validation", ...; local
    folders) and split; fail when nothing usable is left. `report` receives the counts per
    channel and the split."""
    with scan.session():
        return _read_dataset(channels, hp, report)


def _read_dataset(channels: Mapping[str, Path], hp: Hyperparameters, report: DataReport) -> Dataset:
    training_name, validation_name = _channel_names(channels)
    training, validation = channels[training_name], channels.get(validation_name or "")
    split_path = None
    if hp.split_file:
        split_path = safe_join(training, hp.split_file)
        if split_path is None or not split_path.is_file():
            raise UserInputError(
                f"split_file '{hp.split_file}' was not found in the training channel {training}; "
                "give a path relative to the channel's root or leave split_file out."
            )
        Boundary(training).check(split_path, "split file")
    train_data, train_format = read_channel(training_name, training, hp, report)
    annotation_file = train_data.annotation_file
    check_num_classes(hp.num_classes, train_data.categories)

    if split_path is not None:
        train, val = split_records(
            train_data.images, split_file=split_path, val_fraction=0, seed=hp.seed, report=report
        )
        val_source = f"split file {split_path}"
    elif validation is not None:
        val_data, val_format = read_channel(
            validation_name, validation, hp, report, categories=train_data.categories
        )
        if train_format == val_format == "coco":
            check_same_categories(train_data.categories, annotation_file,
                                  val_data.file_categories, val_data.annotation_file)
        train, val = train_data.images, val_data.images
        report.split = {"how": "validation channel", "train": len(train), "val": len(val)}
        val_source = f"validation channel's {val_data.annotation_file}"
    elif train_data.split is not None:
        # The format's own split (VOC ImageSets, a data.yaml's train and val, split folders).
        split = train_data.split
        train, val = split_by_ids(
            train_data.images, split["train"], split["val"], split["how"], report
        )
        val_source = f"{train_data.split['how']} in {training}"
    else:
        train, val = split_records(
            train_data.images, split_file=None, val_fraction=hp.val_fraction, seed=hp.seed,
            report=report,
        )
        val_source = f"random split (val_fraction={hp.val_fraction}, seed={hp.seed})"

    if not any(len(r.labels) for r in train):
        raise UserInputError(
            f"no usable training image with boxes is left in {annotation_file} (see "
            f"output/data/{REPORT_FILE}: {report.summary()}); check file_name paths, boxes and "
            "category ids."
        )
    if (split_path is not None or validation is not None or train_data.split is not None) and not val:
        raise UserInputError(
            f"the validation set from the {val_source} is empty (see output/data/{REPORT_FILE}: "
            f"{report.summary()}); give it usable images, or remove the split file or the "
            "validation channel to hold out val_fraction of the training images at random."
        )
    if val and not any(len(r.labels) for r in val):
        # Scores on no boxes are 0 or undefined: every epoch would tie, and the "best" model
        # would be picked on nothing.
        raise UserInputError(
            f"the validation set from the {val_source} has {len(val)} "
            f"image{'s' if len(val) != 1 else ''} but no usable box "
            f"(see output/data/{REPORT_FILE}: {report.summary()}); "
            + ("choose another seed or a larger val_fraction, or set val_fraction to 0 to train "
               "without validation." if val_source.startswith("random") else
               "give the validation images their labels, or remove the validation channel or "
               "split to hold out val_fraction of the training images at random.")
        )
    return Dataset(train_data.categories, train, val)

