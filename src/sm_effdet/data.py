"""Datasets and data loaders: images read and checked at load time, effdet's batch format."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset

from .coco import MAX_IMAGE_PIXELS, ImageRecord

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 0x0112
# A JPEG cut short is used when it lost at most this share of its rows.
MAX_MISSING_ROWS = 0.1


class ImageLoadError(Exception):
    pass


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits rather than let convert() saturate.
        array = np.asarray(img, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        if top > 255:
            array = array * (255.0 / (65535.0 if top <= 65535 else top))
        array = np.clip(array, 0, 255).astype(np.uint8)
        return np.repeat(array[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _same_size(size: tuple[int, int], expected: tuple[int, int], reduce: int) -> bool:
    # A draft decode divides each side by `reduce` and rounds up; without one, exact.
    return all(0 <= got * reduce - want < reduce for got, want in zip(size, expected))


@contextlib.contextmanager
def _truncated_images_allowed():
    # Pillow reads this module-level switch when it decodes; it is set only around the one
    # retry of a file already known to be cut short, and put back at once.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _is_truncation(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and str(exc).startswith("image file is truncated")


def _missing_rows(array: np.ndarray) -> int:
    """Rows at the bottom that libjpeg filled in because the file ended before them: it
    decodes missing data as flat mid-grey (128 in every channel)."""
    grey = (array == 128).reshape(array.shape[0], -1).all(axis=1)
    decoded = np.flatnonzero(~grey)
    return array.shape[0] - (int(decoded[-1]) + 1 if len(decoded) else 0)


def _decode(record: ImageRecord, target: int | None) -> tuple[np.ndarray, int]:
    """The image's pixels, upright as the annotations expect, and the JPEG reduction used."""
    too_many = f"{record.file_name} has more pixels than the limit of {MAX_IMAGE_PIXELS}"
    expected = (record.width, record.height)
    with warnings.catch_warnings():
        # Pillow warns from its limit and refuses from twice that; ours is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(record.path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageLoadError(f"{too_many} ({img.width}x{img.height})")
            reduce = 1
            longest = max(img.size)
            if target and img.format == "JPEG" and longest >= 2 * target:
                ratio = target / longest
                full_width = img.width
                drafted = img.draft(
                    img.mode, (math.ceil(img.width * ratio), math.ceil(img.height * ratio))
                )
                if drafted is not None:
                    # The decoder's own scale (1, 2, 4 or 8); the decoded width is rounded up,
                    # so dividing by it is not exact (899 px at 1/2 is 450: 1.998).
                    reduce = round(full_width / drafted[1][2])
            img.load()
            # exif_transpose copies the image even when there is nothing to turn.
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            upright = img if orientation == 1 else ImageOps.exif_transpose(img)
            if not _same_size(upright.size, expected, reduce) and _same_size(img.size, expected, reduce):
                upright = img
            return _to_rgb_array(upright), reduce


def load_image(record: ImageRecord, target: int | None = None) -> tuple[np.ndarray, float, bool]:
    """Read an image as RGB uint8 HxWx3, upright, checked against its JSON size.

    Returns the pixels, their scale against the JSON's coordinates, and whether the file was
    cut short. A JPEG at least twice as large as `target` is decoded by libjpeg at a reduced
    scale (1/2, 1/4 or 1/8, still at least `target` on its longest side): much less work than
    a full decode followed by a resize.

    A JPEG with an EXIF orientation is turned upright when that makes it match the JSON's width
    and height (the annotator saw it upright); when the stored pixels match instead, the
    annotator saw those, and they are used as they are, so that the boxes stay right.

    A JPEG missing its last bytes (an interrupted download, some cameras) is decoded as far as
    it goes, as OpenCV does, when at most MAX_MISSING_ROWS of its rows are lost (they come out
    grey); one with less left is skipped.
    """
    truncated = False
    try:
        try:
            array, reduce = _decode(record, target)
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            with _truncated_images_allowed():
                array, reduce = _decode(record, target)
            truncated = True
            missing = _missing_rows(array)
            if missing > MAX_MISSING_ROWS * array.shape[0]:
                raise ImageLoadError(
                    f"{record.file_name} is cut short: {missing} of its {array.shape[0]} rows "
                    "are missing"
                ) from None
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            f"{record.file_name} has more pixels than the limit of {MAX_IMAGE_PIXELS}"
        ) from exc
    except Exception as exc:
        raise ImageLoadError(f"cannot read {record.file_name}: {type(exc).__name__}: {exc}") from exc
    height, width = array.shape[:2]
    if not _same_size((width, height), (record.width, record.height), reduce):
        raise ImageLoadError(
            f"{record.file_name} is {width * reduce}x{height * reduce} but the "
            f"annotations say {record.width}x{record.height}"
        )
    return array, 1 / reduce, truncated


class DetectionDataset(Dataset):
    """Records -> dicts of a uint8 CHW image, yxyx boxes and 1-based labels.

    An image that cannot be used becomes {"skipped": (file_name, reason)}: the reason travels
    back from the loader's worker process with the batch, to be counted in the data report.
    """

    def __init__(self, records: list[ImageRecord], transform: Any, img_size: int | None = None) -> None:
        self.records = records
        self.transform = transform
        self.img_size = img_size  # allows reduced-scale JPEG decoding

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            image, scale, truncated = load_image(record, self.img_size)
        except ImageLoadError as exc:
            # One bad image must not end an epoch: it is skipped and the batch goes on without it.
            log.warning("skipping image: %s", exc)
            return {"skipped": (record.file_name, str(exc))}
        boxes = record.boxes if scale == 1 else np.clip(
            record.boxes * scale, 0, [image.shape[1], image.shape[0]] * 2
        )
        out = self.transform(image=image, bboxes=boxes, labels=record.labels)
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
            "truncated": record.file_name if truncated else None,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    if not samples:
        return {"images": None, "skipped": skipped, "truncated": []}
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
        "skipped": skipped,
        # JPEGs used although cut short: counted in the data report by the training process.
        "truncated": [s["truncated"] for s in samples if s["truncated"]],
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
