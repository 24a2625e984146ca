"""Datasets and data loaders: images read and checked at load time, effdet's batch format."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..model import preprocessing
from .formats import MAX_IMAGE_PIXELS, ImageRecord

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageLoadError(Exception):
    pass


def _same_size(size: tuple[int, int], expected: tuple[int, int], reduce: int) -> bool:
    # A draft decode divides each side by `reduce` and rounds up; without one, exact.
    return all(0 <= got * reduce - want < reduce for got, want in zip(size, expected))


class Decoded(NamedTuple):
    pixels: np.ndarray
    reduce: int  # the JPEG draft's reduction of each side (1: none)
    cut_short: bool
    size: tuple[int, int]  # full (width, height) of the picture used
    turn: int  # the EXIF orientation applied (1: none)
    ignored: int  # the EXIF orientation left unapplied (0: none)


def _decode(record: ImageRecord, target: int | None) -> Decoded:
    """The image's pixels in the picture its annotation describes.

    The picture as shown (EXIF orientation applied) unless the annotation's width and height
    are the stored size and not the upright one: then the boxes were drawn on the stored
    pixels (LabelImg shows images unrotated and writes their stored size), and those are used,
    so that the boxes stay on their objects. An orientation that keeps the size (2, 3, 4) or a
    square image cannot tell, and is applied: what CVAT, Label Studio and labelme show.
    """
    expected = (record.width, record.height)

    def pixels(img: Image.Image, size: tuple[int, int], reduce: int, turn: int) -> Decoded:
        shown = preprocessing.upright_size(size, turn)
        as_stored = size == expected and shown != expected
        return Decoded(preprocessing.to_rgb_array(img), reduce, False, size if as_stored else shown,
                       1 if as_stored else turn, turn if as_stored else 0)

    decoded, cut_short = preprocessing.decode_with(record.path, target, MAX_IMAGE_PIXELS, pixels)
    # Turned once the decoded image is closed: two copies of the pixels at most, as unturned.
    return decoded._replace(pixels=preprocessing.turn_upright(decoded.pixels, decoded.turn), cut_short=cut_short)


def read_image(record: ImageRecord, target: int | None = None) -> Decoded:
    """Read an image as RGB uint8 HxWx3, upright, checked against its JSON size.

    Decoding is preprocessing's (the server's and inference.py's): a JPEG at least twice as
    large as `target` is decoded by libjpeg at a reduced scale. The picture is the one the
    annotation describes (_decode): `ignored` names an EXIF orientation left unapplied.

    A JPEG that lost its last rows (cut short, however the file shows it) is used when at most
    preprocessing.MAX_MISSING_ROWS of them are lost; one with less left is skipped.
    """
    try:
        decoded = _decode(record, target)
    except preprocessing.ImageDecodeError as exc:
        raise ImageLoadError(str(exc).replace("the image", record.file_name, 1)) from exc
    except Exception as exc:
        raise ImageLoadError(f"cannot read {record.file_name}: {type(exc).__name__}: {exc}") from exc
    height, width = decoded.pixels.shape[:2]
    if not _same_size((width, height), (record.width, record.height), decoded.reduce):
        (w, h), turn = decoded.size, decoded.turn
        shown = f"{w}x{h}" + (f" as shown (its EXIF orientation {turn} turns the stored {h}x{w})"
                              if turn in preprocessing.QUARTER_TURNS else "")
        raise ImageLoadError(f"{record.file_name} is {shown} but the annotations say {record.width}x{record.height}")
    return decoded


def load_image(record: ImageRecord, target: int | None = None) -> tuple[np.ndarray, float, bool]:
    """The pixels, their scale against the JSON's coordinates, and whether the file was cut short."""
    decoded = read_image(record, target)
    return decoded.pixels, 1 / decoded.reduce, decoded.cut_short


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
            decoded = read_image(record, self.img_size)
        except ImageLoadError as exc:
            # One bad image must not end an epoch: it is skipped and the batch goes on without it.
            log.warning("skipping image: %s", exc)
            return {"skipped": (record.file_name, str(exc))}
        image, scale = decoded.pixels, 1 / decoded.reduce
        boxes = record.boxes if scale == 1 else np.clip(
            record.boxes * scale, 0, [image.shape[1], image.shape[0]] * 2
        )
        out = self.transform(image=image, bboxes=boxes, labels=record.labels)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], np.int64)
        image = out["image"]
        img_size = max(image.shape[:2])
        return {
            "image": preprocessing.to_chw_tensor(image),
            # effdet takes boxes as y1 x1 y2 x2
            "bbox": torch.from_numpy(boxes[:, [1, 0, 3, 2]]),
            "cls": torch.from_numpy(labels).float(),
            "img_scale": max(record.width, record.height) / img_size,
            "img_size": (record.width, record.height),
            "index": index,
            "truncated": record.file_name if decoded.cut_short else None,
            "exif_ignored": (record.file_name, decoded.ignored) if decoded.ignored else None,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    if not samples:
        return {"images": None, "skipped": skipped, "truncated": [], "exif_ignored": []}
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
        # Images annotated on their stored (unturned) pixels: counted likewise (read_image).
        "exif_ignored": [s["exif_ignored"] for s in samples if s["exif_ignored"]],
    }


def make_loader(
    dataset: DetectionDataset, batch_size: int, num_workers: int, shuffle: bool, pin_memory: bool,
    generator: torch.Generator | None = None,
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
        generator=generator,
    )
