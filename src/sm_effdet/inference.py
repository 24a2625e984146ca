"""Run a model trained by this container: needs only torch, effdet, safetensors and Pillow.

This file is copied into the model folder (model.tar.gz) next to model.json and
model.safetensors, so the model can be used without the training code:

    python inference.py MODEL_DIR image.jpg [more.jpg ...] [--threshold 0.3]

or from Python:

    model, meta = load_model("model")
    detections = predict(model, meta, PIL.Image.open("image.jpg"))
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the EfficientDet prediction bench described by model.json and load its weights."""
    from effdet import create_model
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    size = meta["img_size"]
    bench = create_model(
        meta["effdet_model_name"],
        bench_task="predict",
        num_classes=meta["num_classes"],
        image_size=(size, size),
        pretrained=False,
        pretrained_backbone=False,
    )
    bench.model.load_state_dict(load_file(str(model_dir / meta["weights_file"])))
    return bench.eval().to(device), meta


def preprocess(image: Image.Image, meta: dict[str, Any]) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """Resize the longest side to img_size, pad bottom-right with zeros, normalise."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.size
    size = meta["img_size"]
    scale = size / max(width, height)
    resized = image.resize((max(round(width * scale), 1), max(round(height * scale), 1)), Image.BILINEAR)
    canvas = np.zeros((size, size, 3), np.float32)
    array = np.asarray(resized, np.float32) / 255.0
    canvas[: array.shape[0], : array.shape[1]] = array
    norm = meta["normalization"]
    canvas = (canvas - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return torch.from_numpy(canvas.transpose(2, 0, 1)).unsqueeze(0), max(width, height) / size, (width, height)


@torch.no_grad()
def predict(
    model: torch.nn.Module, meta: dict[str, Any], image: Image.Image, threshold: float = 0.3
) -> list[dict[str, Any]]:
    """Detections in the image's own pixels: bbox [x, y, width, height], score, category."""
    tensor, img_scale, (width, height) = preprocess(image, meta)
    device = next(model.parameters()).device
    info = {
        "img_scale": torch.tensor([img_scale], device=device),
        "img_size": torch.tensor([[width, height]], dtype=torch.float32, device=device),
    }
    detections = model(tensor.to(device), info)[0].cpu().numpy()
    classes = {c["label"]: c for c in meta["classes"]}
    out = []
    for x1, y1, x2, y2, score, label in detections:
        if score < threshold:
            continue
        category = classes[int(label)]
        out.append(
            {
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
                "category_id": category["id"],
                "category_name": category["name"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()
    model, meta = load_model(args.model_dir)
    for path in args.images:
        with Image.open(path) as image:
            print(json.dumps({"image": path, "detections": predict(model, meta, image, args.threshold)}))


if __name__ == "__main__":
    main()
