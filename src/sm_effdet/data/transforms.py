"""Train and eval transforms: resize the longest side, pad bottom-right, optional augmentation.

Images stay uint8 through the loader: normalisation happens on the device (four times fewer
bytes cross from the workers). Padding is at the bottom and right so that a prediction maps
back to the original image by one scale factor, which is effdet's `img_scale` convention.

The eval transform IS preprocessing.resize_and_pad, the function the server and inference.py
call; training's albumentations resize and pad are the same operations (OpenCV bilinear,
albumentations' rounding, the backbone's fill), which tests/test_preprocessing.py checks.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from ..model import preprocessing


def _bbox_params(min_visibility: float = 0.0) -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, min_area=1.0
    )


def train_transform(img_size: int, augment: bool, fill: tuple[int, int, int] = (0, 0, 0),
                    scale: tuple[float, float] = (0.75, 1.25), scale_p: float = 0.5) -> A.Compose:
    """`scale` and `scale_p`: the zoom range and the share of images zoomed (the recipe's)."""
    fill = tuple(int(v) for v in fill)
    augmentations = []
    if augment:
        augmentations = [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=scale, translate_percent=(-0.1, 0.1),
                     mode=cv2.BORDER_CONSTANT, cval=fill, p=scale_p),
            A.RandomBrightnessContrast(p=0.3),
            A.HueSaturationValue(p=0.3),
        ]
    # Resized first, so that augmentation works on at most img_size pixels a side (measured: the
    # transforms take 1.2 ms instead of 1.6 ms on a 640x480 image), padded last.
    resize = A.LongestMaxSize(max_size=img_size, interpolation=preprocessing.INTERPOLATION)
    pad = A.PadIfNeeded(
        min_height=img_size, min_width=img_size, border_mode=cv2.BORDER_CONSTANT, value=fill,
        position="top_left",
    )
    return A.Compose([resize, *augmentations, pad], bbox_params=_bbox_params(0.3))


class EvalTransform:
    """preprocessing.resize_and_pad with the boxes scaled alike (albumentations' call signature)."""

    def __init__(self, img_size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.img_size = img_size
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, image: np.ndarray, bboxes: Any, labels: Any) -> dict[str, Any]:
        padded, _ = preprocessing.resize_and_pad(image, self.img_size, self.fill)
        height, width = image.shape[:2]
        new_height, new_width = preprocessing.resized_shape(height, width, self.img_size)
        # Per axis, as albumentations scales the training boxes.
        scale = np.array([new_width / width, new_height / height] * 2, np.float32)
        boxes = np.asarray(bboxes, np.float32).reshape(-1, 4) * scale
        labels = np.asarray(labels, np.int64)
        # As albumentations' min_area=1: boxes under one pixel after resizing are dropped.
        keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) >= 1.0
        return {"image": padded, "bboxes": boxes[keep], "labels": labels[keep]}


def eval_transform(img_size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> EvalTransform:
    return EvalTransform(img_size, fill)
