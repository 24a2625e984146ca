"""A synthetic COCO dataset of drawn shapes, and the demo job that trains on it on CPU.

    python -m sm_effdet.demo                  # generate a tree in a temporary folder and train
    python -m sm_effdet.demo --make-tree DIR  # only write an /opt/ml tree (data + hyperparameters)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# Ids deliberately not contiguous and not starting at 1, as in many real exports.
SHAPES = {3: "rectangle", 7: "ellipse", 12: "triangle"}

# From scratch (no download), small and plain shapes: about 3 minutes on two CPU cores.
DEMO_HYPERPARAMETERS = {
    "backbone": "tf_lite0",
    "img_size": "256",
    "batch_size": "8",
    "epochs": "20",
    "learning_rate": "0.003",
    "warmup_epochs": "1",
    "pretrained": "false",
    "augment": "false",
    "num_workers": "2",
    "val_fraction": "0.2",
}


def draw_shapes_image(rng: random.Random, width: int, height: int) -> tuple[Image.Image, list]:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, 3)):
        category = rng.choice(list(SHAPES))
        side = rng.randint(min(width, height) // 5, min(width, height) // 2)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (x, y, x + side, y + side)
        colour = tuple(rng.randint(140, 255) for _ in range(3))
        if SHAPES[category] == "rectangle":
            draw.rectangle(box, fill=colour)
        elif SHAPES[category] == "ellipse":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=colour)
        objects.append((category, [float(x), float(y), float(side), float(side)]))
    return image, objects


def make_shapes_dataset(
    folder: Path,
    n_images: int = 60,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    image_dir: str = "images",
    annotation_name: str = "annotations.json",
    first_id: int = 1,
) -> dict[str, Any]:
    """Write JPEGs under folder/image_dir and a COCO JSON at folder/annotation_name."""
    rng = random.Random(seed)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        width, height = size if i % 3 else (size[1], size[0])  # some portrait images too
        image, objects = draw_shapes_image(rng, width, height)
        file_name = f"{image_dir}/shape_{i:05d}.jpg"
        image.save(folder / file_name, quality=90)
        image_id = first_id + i
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": v} for k, v in SHAPES.items()],
    }
    path = folder / annotation_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return coco


def make_tree(base: Path, n_images: int = 80, hyperparameters: dict[str, str] | None = None) -> Path:
    """An /opt/ml tree with a training channel and hyperparameters.json, as SageMaker makes it."""
    make_shapes_dataset(base / "input" / "data" / "training", n_images=n_images)
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(
        json.dumps(hyperparameters or DEMO_HYPERPARAMETERS, indent=2)
    )
    (config / "inputdataconfig.json").write_text(
        json.dumps({"training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}})
    )
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"})
    )
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description="Train EfficientDet on a generated shapes dataset.")
    parser.add_argument("--make-tree", metavar="DIR", type=Path, help="only write the /opt/ml tree")
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--epochs", type=int, help="override the demo's epochs")
    args = parser.parse_args()
    hyperparameters = dict(DEMO_HYPERPARAMETERS)
    if args.epochs:
        hyperparameters["epochs"] = str(args.epochs)
    if args.make_tree:
        make_tree(args.make_tree, args.images, hyperparameters)
        print(f"wrote an /opt/ml tree to {args.make_tree}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="sm-effdet-demo-"))
    make_tree(base, args.images, hyperparameters)
    print(f"demo: {args.images} generated images in {base}/input/data/training; training on CPU")
    train = Path(__file__).resolve().parents[2] / "train"
    started = time.monotonic()
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "CUDA_VISIBLE_DEVICES": ""}
    code = subprocess.call([sys.executable, str(train)], env=env)
    seconds = time.monotonic() - started
    if code:
        print(f"demo: training failed after {seconds:.0f} s: {(base / 'output' / 'failure').read_text()}")
        return code
    meta = json.loads((base / "model" / "model.json").read_text())
    print(
        f"demo: done in {seconds:.0f} s; model in {base}/model "
        f"(best epoch {meta['best_epoch']}, mAP {meta['metrics'].get('valid_map', 0):.3f}); "
        f"try: python {base}/model/inference.py {base}/model "
        f"{base}/input/data/training/images/shape_00000.jpg"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
