"""Run a model trained by this container: needs only torch, effdet, safetensors, Pillow, numpy
and opencv-python-headless.

This file is copied into the model folder (model.tar.gz) next to model.json, model.safetensors,
preprocessing.py and model_card.py, so the model can be used without the training code:

    python inference.py MODEL_DIR image.jpg [more.jpg ...] [--threshold 0.3]

or from Python (with the model folder on sys.path):

    model, card = load_model("model")
    detections = predict(model, card, "image.jpg")   # a path, bytes or a file object

The preprocessing is the one training validated with (preprocessing.py), with the mean, std
and padding fill that model.json records, so a model predicts as it was trained.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

try:  # inside the sm_effdet package
    from . import model_card, preprocessing
except ImportError:  # a model folder: the two modules lie beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import model_card  # type: ignore[no-redef]
    import preprocessing  # type: ignore[no-redef]


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the EfficientDet prediction bench described by model.json and load its weights."""
    from effdet import create_model
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    card = model_card.read_model_card(model_dir)
    size = card["img_size"]
    bench = create_model(
        card["effdet_model_name"],
        bench_task="predict",
        num_classes=card["num_classes"],
        image_size=(size, size),
        pretrained=False,
        pretrained_backbone=False,
    )
    bench.model.load_state_dict(load_file(str(model_dir / card["weights_file"])))
    return bench.eval().to(device), card


def preprocess(images: list[Any], card: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Decoded RGB arrays -> uint8 NCHW at img_size (resized, padded with the model's fill)."""
    _, _, fill = preprocessing.normalization_from_card(card)
    tensors = [
        preprocessing.to_chw_tensor(preprocessing.resize_and_pad(image, card["img_size"], fill)[0])
        for image in images
    ]
    return torch.stack(tensors), [(image.shape[1], image.shape[0]) for image in images]


@torch.no_grad()
def infer(
    model: torch.nn.Module, card: dict[str, Any], batch: torch.Tensor, sizes: list[tuple[int, int]],
    autocast_dtype: torch.dtype | None = None,
) -> list[Any]:
    """uint8 NCHW at img_size -> effdet rows [x1, y1, x2, y2, score, label] per image, in pixels."""
    mean, std, _ = preprocessing.normalization_from_card(card)
    # Buffers too: with ONNX Runtime as the network the bench keeps only its anchors.
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    info = preprocessing.prediction_info(sizes, card["img_size"], device)
    inputs = preprocessing.normalize(batch.to(device), mean, std)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        rows = model(inputs, info)
    return list(rows.float().cpu().numpy())


def predict_arrays(
    model: torch.nn.Module, card: dict[str, Any], images: list[Any], sizes: list[tuple[int, int]],
    score_threshold: float | None = None, max_detections: int = model_card.DEFAULT_MAX_DETECTIONS,
) -> list[list[dict[str, Any]]]:
    """Detections per image for decoded RGB uint8 arrays whose full (width, height) are `sizes`."""
    if score_threshold is None:
        score_threshold = model_card.default_score_threshold(card)
    batch, _ = preprocess(images, card)
    return [
        preprocessing.detections_to_records(r, size, card["classes"], score_threshold, max_detections)
        for r, size in zip(infer(model, card, batch, sizes), sizes)
    ]


def predict(
    model: torch.nn.Module, card: dict[str, Any], image: Any, threshold: float | None = None
) -> list[dict[str, Any]]:
    """Detections for one image (a path, bytes or a file object) in its own pixels."""
    array, size = preprocessing.decode_image(image, card["img_size"])
    return predict_arrays(model, card, [array], [size], threshold)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score threshold (default: model.json's recommended one, else 0.3)")
    args = parser.parse_args()
    model, card = load_model(args.model_dir)
    for path in args.images:
        print(json.dumps({"image": path, "detections": predict(model, card, path, args.threshold)}))


if __name__ == "__main__":
    main()
