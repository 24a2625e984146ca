"""Datasets and data loaders: images read and checked at load time, effdet's batch format."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from .coco import ImageRecord

log = logging.getLogger(__name__)


class ImageLoadError(Exception):
    pass


def load_image(record: ImageRecord) -> np.ndarray:
    """Read an image as RGB uint8 HxWx3, upright, and check it against its JSON size."""
    try:
        with Image.open(record.path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGB")
            array = np.asarray(img)
    except Exception as exc:
        raise ImageLoadError(f"cannot read {record.file_name}: {exc}") from exc
    height, width = array.shape[:2]
    if (width, height) != (record.width, record.height):
        raise ImageLoadError(
            f"{record.file_name} is {width}x{height} but the annotations say "
            f"{record.width}x{record.height}"
        )
    return array


class DetectionDataset(Dataset):
    """Records -> dicts of a uint8 CHW image, yxyx boxes and 1-based labels; None when unusable."""

    def __init__(self, records: list[ImageRecord], transform: Any) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        try:
            image = load_image(record)
        except ImageLoadError as exc:
            # One bad image must not end an epoch: it is skipped and the batch goes on without it.
            log.warning("skipping image: %s", exc)
            return None
        out = self.transform(image=image, bboxes=record.boxes, labels=record.labels)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], np.int64)
        image = out["image"]
        img_size = max(image.shape[:2])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            # effdet takes boxes as y1 x1 y2 x2
            "bbox": torch.from_numpy(boxes[:, [1, 0, 3, 2]]),
            "cls": torch.from_numpy(labels).float(),
            "img_scale": max(record.width, record.height) / img_size,
            "img_size": (record.width, record.height),
            "index": index,
        }


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    bbox, cls = [], []
    for s in samples:
        if len(s["cls"]):
            bbox.append(s["bbox"])
            cls.append(s["cls"])
        else:
            # An image with no boxes: one ignored placeholder (class -1) keeps effdet's labeler
            # happy and leaves every anchor as background.
            bbox.append(torch.zeros((1, 4)))
            cls.append(torch.full((1,), -1.0))
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": {
            "bbox": bbox,
            "cls": cls,
            "img_scale": torch.tensor([s["img_scale"] for s in samples], dtype=torch.float32),
            "img_size": torch.tensor([s["img_size"] for s in samples], dtype=torch.float32),
        },
        "indices": torch.tensor([s["index"] for s in samples]),
    }


def make_loader(
    dataset: DetectionDataset, batch_size: int, num_workers: int, shuffle: bool, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )
