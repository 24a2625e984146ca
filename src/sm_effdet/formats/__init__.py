"""A channel's annotations, in whatever format the user has, as the job's image records.

`read_dataset` is the one entry point: the training job and the launcher's local data check
call it, and neither knows which format it got. Every reader turns its files into COCO-shaped
data and hands it to `coco.coco_records`, so that all formats share one validation, one data
report and one split rule. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from ..hyperparameters import Hyperparameters
from . import coco, groundtruth
from .coco import MAX_IMAGE_PIXELS, Category, DataReport, ImageRecord

__all__ = [
    "MAX_IMAGE_PIXELS", "REPORT_FILE", "Category", "DataReport", "Dataset", "ImageRecord",
    "read_dataset",
]

# Where the job writes the data report, relative to the output folder (named in messages).
REPORT_FILE = "data_report.json"
TRAINING, VALIDATION = "training", "validation"


@dataclass
class Dataset:
    categories: list[Category]  # the classes trained, in label order (label k is categories[k-1])
    train: list[ImageRecord]
    val: list[ImageRecord]


def read_dataset(channels: Mapping[str, Path], hp: Hyperparameters, report: DataReport) -> Dataset:
    """Read the channels' annotations (by channel name: "training", "validation", ...; local
    folders) and split; fail when nothing usable is left. `report` receives the counts per
    channel and the split."""
    training, validation = channels.get(TRAINING), channels.get(VALIDATION)
    if training is None:
        raise UserInputError(
            f"there is no '{TRAINING}' channel; give the annotations and their images as a "
            f"channel named '{TRAINING}'."
        )
    split_path = None
    if hp.split_file:
        split_path = coco.safe_join(training, hp.split_file)
        if split_path is None or not split_path.is_file():
            raise UserInputError(
                f"split_file '{hp.split_file}' was not found in the training channel {training}; "
                "give a path relative to the channel's root or leave split_file out."
            )
    excluded = [hp.split_file] if hp.split_file else []
    train_report = DataReport()
    if _is_groundtruth(training, hp):
        train_data = groundtruth.read(training, hp, train_report)
        annotation_file = train_data.annotation_file
    else:
        annotation_file = coco.find_annotation_file(training, hp.annotations_file, excluded)
        train_data = coco.load_coco(training, annotation_file, train_report)
    report.add_channel(TRAINING, train_report)
    coco.check_num_classes(hp.num_classes, train_data.categories)

    if split_path is not None:
        train, val = coco.split_records(
            train_data.images, split_file=split_path, val_fraction=0, seed=hp.seed, report=report
        )
        val_source = f"split file {split_path}"
    elif validation is not None:
        val_report = DataReport()
        if _is_groundtruth(validation, hp):
            val_data = groundtruth.read(validation, hp, val_report, train_data.categories)
            val_file = val_data.annotation_file
        else:
            val_file = coco.find_annotation_file(validation, None, nameable=False)
            val_data = coco.load_coco(validation, val_file, val_report, categories=train_data.categories)
        report.add_channel(VALIDATION, val_report)
        coco.check_same_categories(train_data.categories, annotation_file,
                                   val_data.file_categories, val_file)
        train, val = train_data.images, val_data.images
        report.split = {"how": "validation channel", "train": len(train), "val": len(val)}
        val_source = f"validation channel's {val_file}"
    else:
        train, val = coco.split_records(
            train_data.images, split_file=None, val_fraction=hp.val_fraction, seed=hp.seed,
            report=report,
        )

    if not any(len(r.labels) for r in train):
        raise UserInputError(
            f"no usable training image with boxes is left in {annotation_file} (see "
            f"output/data/{REPORT_FILE}: {report.summary()}); check file_name paths, boxes and "
            "category ids."
        )
    if (split_path is not None or validation is not None) and not val:
        raise UserInputError(
            f"the validation set from the {val_source} is empty (see output/data/{REPORT_FILE}: "
            f"{report.summary()}); give it usable images, or remove the split file or the "
            "validation channel to hold out val_fraction of the training images at random."
        )
    return Dataset(train_data.categories, train, val)


def _is_groundtruth(channel: Path, hp: Hyperparameters) -> bool:
    # Until per-channel format detection lands: a manifest in the channel (or the format named).
    if hp.annotation_format != "auto":
        return hp.annotation_format == groundtruth.NAME
    return bool(groundtruth.find(channel))
