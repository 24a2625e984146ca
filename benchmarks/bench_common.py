"""What several `make bench` sections and the GPU check (gpu_check.py) share: generated JPEGs,
the call of one of bench.py's child processes, rates and percentiles, a started ./serve's
health and the untrained model folder it serves."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The children run through the entry, which holds their registry (bench.py --child).
BENCH = Path(__file__).resolve().with_name("bench.py")


def jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    from sm_effdet.demo import draw_shapes_image

    image, _ = draw_shapes_image(random.Random(seed), width, height)
    image.save(path, quality=90)


def jpeg_set(folder: Path, width: int, height: int, n: int) -> Path:
    """n JPEGs of one size and a COCO JSON for them."""
    from sm_effdet.demo import make_shapes_dataset

    make_shapes_dataset(folder, n_images=n, size=(width, height))
    # make_shapes_dataset turns every third image to portrait; keep one size throughout.
    coco = json.loads((folder / "annotations.json").read_text())
    for entry in coco["images"]:
        if (entry["width"], entry["height"]) != (width, height):
            (folder / entry["file_name"]).unlink()
    coco["images"] = [e for e in coco["images"] if (e["width"], e["height"]) == (width, height)]
    kept = {e["id"] for e in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder


def run_child(name: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--child", name, *args],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def images_per_second(iterate, n_images: int) -> float:
    started = time.perf_counter()
    iterate()
    return n_images / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def wait_healthy(url: str, seconds: float = 300) -> None:
    """Until ./serve at `url` answers /ping with 200 (the model loaded and warmed up)."""
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def untrained_model_folder(folder: Path, img_size: int):
    """A model folder as a job writes it (model.json + weights) for an untrained tf_lite0 with
    3 classes: serving speed and memory do not depend on what the weights learned. Returns the
    effdet bench whose network was written."""
    from sm_effdet.backbones import BACKBONES
    from sm_effdet.model import artifacts
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization

    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None)
    card = {
        "effdet_model_name": BACKBONES["tf_lite0"], "backbone": "tf_lite0", "img_size": img_size,
        "num_classes": 3, "weights_file": artifacts.WEIGHTS_FILE,
        "classes": [{"label": i + 1, "id": i + 1, "name": f"class{i + 1}"} for i in range(3)],
        "normalization": backbone_normalization(BACKBONES["tf_lite0"]),
    }
    artifacts.write_model(folder, bench.model.state_dict(), card)
    return bench
