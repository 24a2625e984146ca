"""THE preprocessing and postprocessing of every EfficientDet this container trains or serves.

Decode (reduced-scale JPEG decoding, EXIF upright, any mode to RGB), resize the longest side to
img_size, pad bottom-right with the backbone's fill, normalise with the backbone's mean and std,
and map detections back to the image's pixels. Training's validation, the server and the
standalone inference.py all call these functions, so that the mAP a job reports is the mAP a
user gets: the network sees identical tensors.

This file is copied beside inference.py into the model folder and must stay standalone: it may
import only numpy, Pillow, OpenCV (opencv-python-headless), torch and effdet.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import cv2
import numpy as np
from PIL import Image, ImageFile

# ImageNet statistics, RGB in [0, 1]: what effdet's configuration implies where it names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Benchmark-only switch (make bench-quality): train with ImageNet statistics whatever the backbone.
NORMALIZATION_OVERRIDE_ENV = "SM_EFFDET_NORMALIZATION"
# Pillow's own default, raised once: larger images are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 178_956_970
EXIF_ORIENTATION = 0x0112
INTERPOLATION = cv2.INTER_LINEAR
# A JPEG cut short (an interrupted download, some cameras) is used when it lost at most this
# share of its rows; they come out grey.
MAX_MISSING_ROWS = 0.1


class ImageDecodeError(ValueError):
    pass


T = TypeVar("T")


# ---------------------------------------------------------------- per-backbone statistics


def backbone_normalization(effdet_model_name: str) -> dict[str, Any]:
    """Mean, std and padding fill the backbone's weights were trained with, from effdet's config.

    The TF-ported Lite models use (0.5, 0.5, 0.5) for both (inputs in [-1, 1]); the others name
    no statistics and use ImageNet's. The fill is the mean in 0..255, as effdet's own loader pads
    (`fill_color='mean'`), so padding becomes zero after normalisation.
    """
    from effdet import get_efficientdet_config

    try:
        config = get_efficientdet_config(effdet_model_name)
    except KeyError:  # effdet 0.4.1 lists no efficientdet_d6/d7/d7x: nothing names statistics
        config = {}
    mean = tuple(float(v) for v in config.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in config.get("std", IMAGENET_STD))
    if os.environ.get(NORMALIZATION_OVERRIDE_ENV, "").strip().lower() == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return {"mean": list(mean), "std": list(std), "fill": [round(255 * v) for v in mean]}


def normalization_from_card(card: dict[str, Any]) -> tuple[tuple, tuple, tuple]:
    """(mean, std, fill) from model.json; models written before `fill` existed padded with zeros."""
    norm = card["normalization"]
    fill = norm.get("fill", (0, 0, 0))
    return tuple(norm["mean"]), tuple(norm["std"]), tuple(int(v) for v in fill)


# ---------------------------------------------------------------- decoding


def open_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open (header only) an image file or bytes; refuse one over `max_pixels` before decoding."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # Pillow warns from its limit and refuses from twice that; ours is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"the image has more pixels than the limit of {max_pixels}") from exc
    if img.width * img.height > max_pixels:
        img.close()
        raise ImageDecodeError(
            f"the image has more pixels than the limit of {max_pixels} ({img.width}x{img.height})"
        )
    return img


def draft_and_load(img: Image.Image, target: int | None) -> int:
    """Decode, a JPEG at least twice `target` on its longest side at a reduced scale.

    libjpeg's DCT scaling (1/2, 1/4 or 1/8, still at least `target` on the longest side) is
    much less work than a full decode followed by a resize. Returns the factor by which each
    side was reduced (1 when not); each side comes out rounded up (899 px at 1/2 is 450).
    """
    reduce = 1
    longest = max(img.size)
    if target and img.format == "JPEG" and longest >= 2 * target:
        ratio = target / longest
        full_width = img.width
        drafted = img.draft(img.mode, (math.ceil(img.width * ratio), math.ceil(img.height * ratio)))
        if drafted is not None:
            # The decoder's own scale, from the box it reports: dividing the full width by the
            # rounded-up decoded width is not exact (899 / 450 = 1.998).
            reduce = round(full_width / drafted[1][2])
    img.load()
    return reduce


@contextlib.contextmanager
def truncated_images_allowed():
    """Let Pillow decode a JPEG that ends early, as OpenCV and most tools do.

    Pillow reads this module-level switch while decoding; it is set only around the one retry
    of a file already known to be cut short, and put back at once.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def is_truncation(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and str(exc).startswith("image file is truncated")


def missing_rows(array: np.ndarray) -> int:
    """Rows at the bottom that libjpeg filled in because the data ended before them: it decodes
    missing data as flat mid-grey (128 in every channel)."""
    if not array.shape[0] or not (array[-1] == 128).all():  # the common case, one row read
        return 0
    grey = (array == 128).reshape(array.shape[0], -1).all(axis=1)
    decoded = np.flatnonzero(~grey)
    return array.shape[0] - (int(decoded[-1]) + 1 if len(decoded) else 0)


def check_cut_short(img: Image.Image) -> int:
    """The rows a decoded JPEG lost (0 when whole); refuse one that lost more than
    MAX_MISSING_ROWS of them.

    Checked after every JPEG decode, not only when Pillow reports a truncation: a file cut short
    and closed with an end-of-image marker, or whose header claims more rows than its data
    holds, decodes without an error, the rows the data lacks filled with grey. The rows are
    read as stored (before EXIF turns them), where the lost ones are at the bottom.
    """
    if img.format != "JPEG" or not img.height:
        return 0
    if not missing_rows(np.asarray(img.crop((0, img.height - 1, img.width, img.height)))):
        return 0
    missing = missing_rows(np.asarray(img))
    if missing > MAX_MISSING_ROWS * img.height:
        raise ImageDecodeError(f"the image is cut short: {missing} of its {img.height} rows are missing")
    return missing


def decode_with(
    source: str | Path | bytes, target: int | None, max_pixels: int,
    use: Callable[[Image.Image, tuple[int, int], int, int], T],
) -> tuple[T, bool]:
    """Open and decode `source` (draft_and_load), check it for lost rows, and return
    `use(image, its size before a reduced-scale decode, reduce, its EXIF orientation)` and
    whether the file was cut short.

    The one decode of training, serving and inference.py, so that all three take and refuse
    the same files. The orientation is read from the header before any pixel (orientation()),
    the rule the data readers follow for sizes. A JPEG missing its last bytes is decoded as far
    as it goes (Pillow refuses it by default), then held to the same rule; another format cut
    short cannot tell how much it lost and is refused.
    """
    try:
        with open_image(source, max_pixels) as img:
            size, turn = img.size, orientation(img)
            reduce = draft_and_load(img, target)
            missing = check_cut_short(img)
            return use(img, size, reduce, turn), missing > 0
    except OSError as exc:
        if not is_truncation(exc):
            raise
    with truncated_images_allowed(), open_image(source, max_pixels) as img:
        if img.format != "JPEG":
            raise ImageDecodeError(f"the image is cut short (a {img.format} file missing its end)")
        size, turn = img.size, orientation(img)
        reduce = draft_and_load(img, target)
        check_cut_short(img)
        return use(img, size, reduce, turn), True


# ---------------------------------------------------------------- EXIF orientation
#
# The rule, everywhere (the data readers' sizes in data/formats/image_records.py, training,
# validation, the report's drawings, serving, inference.py): an image is used as viewers and
# labelling tools show it, its EXIF orientation applied; boxes are in that upright picture's
# pixels (Ultralytics' convention; CVAT, Label Studio and labelme store the upright size).

# Orientation -> what turns the stored pixels into the picture as shown (EXIF 2.32, tag
# 0x0112). OpenCV's: a 12-megapixel orientation 6 turned in 0.06 s, numpy's strided copy 0.55 s.
TURNS: dict[int, Callable[[np.ndarray], np.ndarray] | None] = {
    1: None,
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.flip(cv2.transpose(a), -1),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# The orientations that turn the picture by a quarter: its width and height swap.
QUARTER_TURNS = (5, 6, 7, 8)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 to 8; 1 when absent or malformed), read from the header only.

    Pillow's base getexif reads what the header holds (a JPEG's APP1, a TIFF's IFD, a WebP's
    EXIF chunk, a PNG's eXIf or XMP chunks before the pixel data); PngImageFile's own getexif
    would decode the whole image to look past the pixel data, and is not called. A TIFF's
    orientation tag is the same tag, and Pillow applies it itself (the size at open, the
    pixels at load): nothing is left to turn.
    """
    if img.format == "TIFF":
        return 1
    try:
        value = Image.Image.getexif(img).get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001  (a malformed EXIF block: the picture as stored)
        return 1
    return value if isinstance(value, int) and value in TURNS else 1


def upright_size(size: tuple[int, int], turn: int) -> tuple[int, int]:
    """(width, height) as shown: swapped by orientations 5 to 8, which turn by a quarter."""
    return (size[1], size[0]) if turn in QUARTER_TURNS else size


def turn_upright(array: np.ndarray, turn: int) -> np.ndarray:
    """HxWxC pixels as stored -> as shown (a copy; the array itself when orientation is 1).

    Done on the RGB array after the decoded image is closed, so that at most two copies of
    the pixels are held at once, as for an image without orientation.
    """
    operation = TURNS[turn]
    return array if operation is None else operation(array)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """RGB uint8 HxWx3 from any mode: 16-bit and float greyscale scaled, palettes, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale to 8 bits rather than let convert() saturate.
        array = np.asarray(img, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        if top > 255:
            array = array * (255.0 / (65535.0 if top <= 65535 else top))
        array = np.clip(array, 0, 255).astype(np.uint8)
        return np.repeat(array[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_image(
    source: str | Path | bytes | BinaryIO | Image.Image, target: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to upright RGB uint8 HxWx3 (reduced scale for large JPEGs when `target` is given).

    Returns the pixels and the upright image's full (width, height), which detections map to.
    """
    try:
        if isinstance(source, Image.Image):  # already opened by the caller, who closes it
            full_size, turn = source.size, orientation(source)
            draft_and_load(source, target)
            check_cut_short(source)
            array = to_rgb_array(source)
        else:
            if not isinstance(source, (str, Path)):
                source = source if isinstance(source, (bytes, bytearray, memoryview)) else source.read()
            (array, full_size, turn), _ = decode_with(
                source, target, max_pixels, lambda img, size, _, turn: (to_rgb_array(img), size, turn)
            )
        return turn_upright(array, turn), upright_size(full_size, turn)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"the image cannot be decoded ({type(exc).__name__})") from exc


# ---------------------------------------------------------------- resize, pad, normalise


def resized_shape(height: int, width: int, img_size: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to img_size, rounded as albumentations does."""
    scale = img_size / float(max(height, width))
    if scale == 1.0:
        return height, width
    return round(height * scale), round(width * scale)


def resize_longest(image: np.ndarray, img_size: int) -> np.ndarray:
    """Scale so the longest side is img_size (OpenCV bilinear, the same as A.LongestMaxSize)."""
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, img_size)
    if (new_height, new_width) == (height, width):
        return image
    return cv2.resize(image, (new_width, new_height), interpolation=INTERPOLATION)


def pad_bottom_right(image: np.ndarray, img_size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """Pad to img_size x img_size at the bottom and right (so one scale factor maps boxes back)."""
    height, width = image.shape[:2]
    if (height, width) == (img_size, img_size):
        return image
    canvas = np.empty((img_size, img_size, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    canvas[:height, :width] = image
    return canvas


def resize_and_pad(image: np.ndarray, img_size: int, fill: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """uint8 HxWx3 -> uint8 img_size x img_size x 3, and the factor the image was scaled by."""
    resized = resize_longest(image, img_size)
    return pad_bottom_right(resized, img_size, fill), resized.shape[1] / image.shape[1]


def to_chw_tensor(image: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize(images, mean, std):
    """uint8 NCHW (any device) -> float32 (x / 255 - mean) / std, computed as training does."""
    import torch

    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def prediction_info(sizes: list[tuple[int, int]], img_size: int, device=None) -> dict[str, Any]:
    """effdet's img_scale / img_size for images of these (width, height): boxes come back in pixels."""
    import torch

    return {
        "img_scale": torch.tensor([max(w, h) / img_size for w, h in sizes], dtype=torch.float32, device=device),
        "img_size": torch.tensor([[w, h] for w, h in sizes], dtype=torch.float32, device=device),
    }


# ---------------------------------------------------------------- postprocessing


def detections_to_records(
    rows: np.ndarray, size: tuple[int, int], classes: list[dict[str, Any]], score_threshold: float,
    max_detections: int,
) -> list[dict[str, Any]]:
    """effdet rows [x1, y1, x2, y2, score, label] (pixels) -> detections clipped to the image.

    Each has `box` [x1, y1, x2, y2] in pixels, `box_normalized` in [0, 1] of width and height,
    `score`, `label` (1-based), `class_name` and `category_id` (the training data's own id).
    """
    width, height = size
    by_label = {int(c["label"]): c for c in classes}
    out: list[dict[str, Any]] = []
    for x1, y1, x2, y2, score, label in np.asarray(rows, np.float64).reshape(-1, 6):
        if score < score_threshold or len(out) >= max_detections:
            continue
        category = by_label.get(int(label))
        if category is None:
            continue
        x1, x2 = (float(min(max(v, 0.0), width)) for v in (x1, x2))
        y1, y2 = (float(min(max(v, 0.0), height)) for v in (y1, y2))
        out.append(
            {
                "box": [x1, y1, x2, y2],
                "box_normalized": [x1 / width, y1 / height, x2 / width, y2 / height],
                "score": float(score),
                "label": int(label),
                "class_name": category["name"],
                "category_id": category["id"],
            }
        )
    return out
