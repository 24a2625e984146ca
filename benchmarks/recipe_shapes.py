"""Optimizer and learning-rate settings compared from scratch on generated shapes (figures, not a test).

Each run is the real ./train on its own tree: tf_lite0 at 256 px, batch 8, 12 epochs, the
job's defaults otherwise (augmentation on, 20% held out), as in the issue that found SGD
collapsing. The "Recipe" figures of docs/training.md come from:

    uv run --frozen python benchmarks/recipe_shapes.py
    uv run --frozen python benchmarks/recipe_shapes.py --run "sgd lr 0.03" optimizer=sgd,learning_rate=0.03

About 4-5 minutes a run on 2 CPU cores; runs go one after another (two trainings at once on
a small machine slow each other far more than twice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

COMMON = {"backbone": "tf_lite0", "img_size": "256", "batch_size": "8", "epochs": "12",
          "pretrained": "false", "export_onnx": "false", "tensorboard": "false"}
RUNS = [
    ("adamw (defaults)", {}),
    ("sgd (only optimizer set)", {"optimizer": "sgd"}),
    ("sgd, effdet's recipe, clipped at 10", {"optimizer": "sgd", "learning_rate": "0.01",
                                             "weight_decay": "0.00004", "clip_grad_norm": "10"}),
    ("sgd, effdet's recipe, not clipped", {"optimizer": "sgd", "learning_rate": "0.01",
                                           "weight_decay": "0.00004", "clip_grad_norm": "0"}),
]


def run(base: Path, name: str, hyperparameters: dict) -> None:
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "train")], env=env, capture_output=True,
                            text=True, check=False)
    if result.returncode:
        print(f"  {name}: FAILED {(base / 'output' / 'failure').read_text()[:300]}", flush=True)
        return
    meta = json.loads((base / "model" / "model.json").read_text())
    curve = " ".join(f"{e.get('valid_map', 0):.2f}" for e in meta["history"])
    print(f"  {name:<40} valid mAP {meta['metrics']['valid_map']:.3f} mAP@50 "
          f"{meta['metrics']['valid_map_50']:.3f} ({time.monotonic() - started:.0f} s; per epoch: "
          f"{curve})", flush=True)


def main() -> None:
    from sm_effdet.demo import make_shapes_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--run", nargs=2, action="append", metavar=("NAME", "KEY=VALUE,..."),
                        help="a run of your own instead of the default four")
    args = parser.parse_args()
    runs = RUNS if not args.run else [
        (name, dict(item.split("=", 1) for item in spec.split(",") if item)) for name, spec in args.run
    ]
    print(f"recipe on generated shapes: {args.images} images, tf_lite0 at 256 px from scratch, "
          f"12 epochs, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="recipe-shapes-") as scratch:
        data = Path(scratch) / "shapes"
        make_shapes_dataset(data, n_images=args.images)
        for number, (name, extra) in enumerate(runs):
            base = Path(scratch) / f"run{number}"
            (base / "input" / "data").mkdir(parents=True)
            os.symlink(data, base / "input" / "data" / "training")
            run(base, name, {**COMMON, **extra})


if __name__ == "__main__":
    main()
