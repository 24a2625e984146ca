"""One preprocessing (issue 10) with each backbone's own statistics (issue 13)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from effdet import get_efficientdet_config
from PIL import Image

from sm_effdet.backbones import BACKBONES
from sm_effdet.data.transforms import eval_transform, train_transform
from sm_effdet.model import preprocessing

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_statistics_are_effdets_for_every_backbone(backbone, monkeypatch):
    monkeypatch.delenv(preprocessing.NORMALIZATION_OVERRIDE_ENV, raising=False)
    try:
        config = get_efficientdet_config(BACKBONES[backbone])
    except KeyError:  # effdet 0.4.1 has no config for efficientdet_d6, d7, d7x
        config = {}
    norm = preprocessing.backbone_normalization(BACKBONES[backbone])
    mean = [float(v) for v in config.get("mean", IMAGENET[0])]
    std = [float(v) for v in config.get("std", IMAGENET[1])]
    assert norm["mean"] == pytest.approx(mean) and norm["std"] == pytest.approx(std)
    # effdet's loader pads with the mean (fill_color='mean'), rounded to 0..255
    assert norm["fill"] == [int(round(255 * v)) for v in mean]
    if backbone.startswith("tf_lite"):
        assert norm["mean"] == [0.5] * 3 and norm["std"] == [0.5] * 3 and norm["fill"] == [128] * 3
    if "mean" not in config:  # effdet names none: ImageNet's
        assert norm["mean"] == pytest.approx(IMAGENET[0]) and norm["std"] == pytest.approx(IMAGENET[1])


def test_benchmark_override_gives_imagenet_statistics(monkeypatch):
    monkeypatch.setenv(preprocessing.NORMALIZATION_OVERRIDE_ENV, "imagenet")
    norm = preprocessing.backbone_normalization("tf_efficientdet_lite0")
    assert norm["mean"] == pytest.approx(IMAGENET[0]) and norm["fill"] == [124, 116, 104]


@pytest.mark.parametrize("backbone", ["tf_lite0", "tf_d0"])
def test_padding_of_a_non_square_image_is_the_backbones_fill_after_normalisation(backbone):
    norm = preprocessing.backbone_normalization(BACKBONES[backbone])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)  # wide: padded at the bottom
    padded, scale = preprocessing.resize_and_pad(image, 256, norm["fill"])
    assert scale == pytest.approx(256 / 500)
    tensor = preprocessing.normalize(preprocessing.to_chw_tensor(padded)[None], norm["mean"], norm["std"])
    rows = round(300 * 256 / 500)
    expected = (np.asarray(norm["fill"]) / 255 - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    pad = tensor[0, :, rows:, :].numpy()
    assert pad.size > 0
    for channel in range(3):
        assert np.allclose(pad[channel], expected[channel], atol=1e-6)
        # the mean itself, to within the rounding of the fill to whole 0..255 values
        assert abs(expected[channel]) <= 0.5 / 255 / norm["std"][channel] + 1e-6
    # the image part is the image, normalised
    assert not np.allclose(tensor[0, :, :rows].numpy(), expected[:, None, None])


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (256, 256), (100, 60)])
def test_training_resize_and_pad_are_the_same_operations_as_inference(size):
    fill = (128, 128, 128)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    boxes = [[10, 10, 50, 40]]
    ours, _ = preprocessing.resize_and_pad(image, 256, fill)
    trained = train_transform(256, augment=False, fill=fill)(image=image, bboxes=boxes, labels=[1])
    validated = eval_transform(256, fill)(image=image, bboxes=boxes, labels=[1])
    assert np.array_equal(trained["image"], ours)
    assert np.array_equal(validated["image"], ours)
    assert np.allclose(np.asarray(trained["bboxes"]), validated["bboxes"], atol=1e-3)


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, width // 2, height // 3))
    exif = Image.Exif()
    exif[preprocessing.EXIF_ORIENTATION] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_large_jpeg_is_decoded_at_reduced_scale_and_sized_as_the_original():
    array, size = preprocessing.decode_image(_jpeg(1600, 1200), target=256)
    assert size == (1600, 1200)
    assert array.shape == (300, 400, 3)  # 1/4 scale, still >= 256 on the longest side


def test_exif_rotated_image_is_turned_upright_with_its_upright_size():
    array, size = preprocessing.decode_image(_jpeg(600, 200, orientation=6), target=256)
    assert size == (200, 600)
    assert array.shape[:2] == (600 // 2, 200 // 2)  # drafted at 1/2, then turned


def test_non_images_and_bombs_are_refused_with_a_sentence():
    with pytest.raises(preprocessing.ImageDecodeError, match="cannot be decoded"):
        preprocessing.decode_image(b"not an image at all")
    out = io.BytesIO()
    Image.new("L", (4000, 3000)).save(out, "PNG")
    with pytest.raises(preprocessing.ImageDecodeError, match="more pixels than the limit of 1000000"):
        preprocessing.decode_image(out.getvalue(), max_pixels=1_000_000)


def test_detections_map_to_pixels_and_unit_boxes_clipped():
    rows = np.array([[-5, 10, 120, 90, 0.9, 2], [0, 0, 10, 10, 0.1, 1]], np.float32)
    classes = [{"label": 1, "id": 3, "name": "a"}, {"label": 2, "id": 7, "name": "b"}]
    out = preprocessing.detections_to_records(rows, (100, 80), classes, 0.3, 10)
    assert out == [{
        "box": [0.0, 10.0, 100.0, 80.0], "box_normalized": [0.0, 0.125, 1.0, 1.0],
        "score": pytest.approx(0.9), "label": 2, "class_name": "b", "category_id": 7,
    }]
    assert torch.is_tensor(preprocessing.prediction_info([(100, 80)], 256)["img_scale"])
