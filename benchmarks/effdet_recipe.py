"""effdet's own training recipe, on the same data, epochs, image size and starting weights as a
job, for `make bench-quality`'s side-by-side row (issue 25; figures printed, not a test).

Built from effdet's library as its train.py builds a run, not from this project's pipeline:
effdet.create_model with the DetBenchTrain bench, effdet's COCO parser and DetectionDatset,
create_loader with its training transforms (random flip, RandomResizePad at scale 0.1 to 2.0,
random interpolation, fill with the mean) and its evaluation transforms (ResizePad), the anchor
labeler in the loader's collate, timm's optimizer and scheduler as train.py calls them, gradient
norm clipped at 10. train.py's defaults, with what a short run on a CPU forces, said here:

  - optimizer `momentum` (SGD, momentum 0.9), weight decay 4e-5 (not on biases and norms: timm's
    filter), learning rate 0.01 at train.py's batch of 32, scaled linearly to the batch;
  - cosine schedule by epoch, warm-up from 1e-4, floor 1e-5; train.py's 5 warm-up epochs of 300
    become max(1, round(5 * epochs / 300)) and its 10 cool-down epochs none, so that the run
    lasts the same epochs as the job's;
  - no EMA (train.py's default; its 0.9998 without warm-up would stay near the starting weights
    over a few hundred steps);
  - effdet's PrefetchLoader needs CUDA (create_loader makes one), so the DataLoader is made as
    create_loader makes it inside, and its batches are normalised here on the CPU with the same
    mean and std (random erasing, the PrefetchLoader's other task, is off by default).

The starting weights are the job's for `pretrained=backbone`: timm's ImageNet weights of the
backbone (the file scripts/convert_efficientnet_lite0.py writes), the BiFPN and heads as effdet
initialises them. Validation: effdet's evaluation loader and bench (detections in image pixels)
scored by this project's COCO evaluation against the same records, so the numbers compare with
the job's valid_map. The data comes from this project's reader (the same boxes, the same split),
written as COCO JSON for effdet's parser.

    python benchmarks/effdet_recipe.py DATA_CHANNEL BACKBONE_FILE [--split-file split.json]
        [--epochs 10] [--img-size 256] [--batch-size 8] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

TRAIN_PY_BATCH = 32  # train.py's default batch size, at which its lr of 0.01 is set
TRAIN_PY_LR = 0.01


def coco_json(records: list[Any], categories: list[Any], path: Path) -> None:
    """The records as COCO JSON for effdet's parser: image ids are record positions and category
    ids the labels 1..K, as in this project's evaluation."""
    images, annotations = [], []
    for index, record in enumerate(records):
        images.append({"id": index, "file_name": str(record.path), "width": record.width,
                       "height": record.height})
        for box, label in zip(record.boxes, record.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    cats = [{"id": k, "name": c.name} for k, c in enumerate(categories, start=1)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))


def read_split(channel: Path, split_file: str | None, img_size: int, seed: int):
    from sm_effdet.data.formats import DataReport, read_dataset
    from sm_effdet.hyperparameters import parse_hyperparameters

    hp = {"img_size": img_size, "seed": seed, **({"split_file": split_file} if split_file else {})}
    return read_dataset({"training": channel}, parse_hyperparameters(hp), DataReport())


def run(channel: Path, backbone_file: Path, workdir: Path, split_file: str | None = None,
        epochs: int = 10, img_size: int = 256, batch_size: int = 8, seed: int = 42,
        model_name: str = "tf_efficientdet_lite0", workers: int = 0, log=print) -> list[dict[str, float]]:
    """Train with effdet's recipe; the per-epoch history (valid_map, valid_map_50, train_loss,
    lr, epoch_time)."""
    import numpy as np
    import torch
    from effdet import create_model
    from effdet.anchors import AnchorLabeler, Anchors
    from effdet.data import DetectionDatset, resolve_input_config
    from effdet.data.loader import DetectionFastCollate
    from effdet.data.parsers import create_parser
    from effdet.data.transforms import transforms_coco_eval, transforms_coco_train
    from safetensors.torch import load_file
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import dispatch_clip_grad, random_seed

    from sm_effdet.evaluation import coco_eval

    random_seed(seed, 0)
    dataset = read_split(channel, split_file, img_size, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", dataset.train), ("val", dataset.val)):
        coco_json(records, dataset.categories, workdir / f"{name}.json")
    num_classes = len(dataset.categories)

    bench = create_model(model_name, bench_task="train", num_classes=num_classes, pretrained=False,
                         pretrained_backbone=False, image_size=(img_size, img_size))
    backbone = load_file(str(backbone_file))
    own = bench.model.backbone.state_dict()
    usable = {k: v for k, v in backbone.items() if k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    assert not missing, f"{backbone_file} lacks {len(missing)} backbone tensors such as {missing[:3]}"
    bench.model.backbone.load_state_dict(usable, strict=False)
    config = bench.config
    # train.py: its --train-interpolation (random) for training, the model's (else bicubic) for
    # evaluation.
    input_config = resolve_input_config({}, model_config=config)
    labeler = AnchorLabeler(Anchors.from_config(config), num_classes, match_threshold=0.5)

    def loader(name: str, training: bool):
        # What effdet's create_loader builds (its transforms, its fast collate with the anchor
        # labeler, a shuffled DataLoader for training), less the PrefetchLoader around it, which
        # moves batches to CUDA and normalises them there; that is done below on the CPU.
        parser = create_parser("coco", cfg=_parser_cfg(workdir / f"{name}.json"))
        data = DetectionDatset(Path("/"), parser=parser)  # file names are absolute paths
        make = transforms_coco_train if training else transforms_coco_eval
        data.transform = make(
            input_config["input_size"][-2:],
            interpolation="random" if training else input_config["interpolation"],
            use_prefetcher=True, fill_color=input_config["fill_color"], mean=input_config["mean"],
            std=input_config["std"],
        )
        batches = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=training, num_workers=workers,
            collate_fn=DetectionFastCollate(anchor_labeler=labeler),
        )
        return batches, parser

    train_loader, _ = loader("train", True)
    val_loader, val_parser = loader("val", False)
    mean = torch.tensor([x * 255 for x in input_config["mean"]]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in input_config["std"]]).view(1, 3, 1, 1)

    lr = TRAIN_PY_LR * batch_size / TRAIN_PY_BATCH
    optimizer = create_optimizer_v2(bench, opt="momentum", lr=lr, weight_decay=4e-5, momentum=0.9)
    warmup = max(1, round(5 * epochs / 300))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=warmup,
                                       warmup_lr=1e-4, min_lr=1e-5, cooldown_epochs=0)
    log(f"effdet recipe: {model_name} at {img_size} px, batch {batch_size}, SGD momentum lr {lr:g} "
        f"(0.01 at 32, scaled), wd 4e-5, clip 10, cosine, {warmup} warm-up epoch(s) from 1e-4, "
        f"{epochs} epochs, {len(dataset.train)} train / {len(dataset.val)} validation images")
    gt = coco_eval.ground_truth(dataset.val, num_classes)
    history = []
    scheduler.step(0)
    for epoch in range(epochs):
        started = time.monotonic()
        bench.train()
        losses = []
        for images, target in train_loader:
            out = bench((images.float() - mean) / std, target)
            optimizer.zero_grad()
            out["loss"].backward()
            dispatch_clip_grad(bench.parameters(), value=10.0, mode="norm")
            optimizer.step()
            losses.append(float(out["loss"].detach()))
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step(epoch + 1)
        bench.eval()
        parts = []
        with torch.no_grad():
            for images, target in val_loader:
                out = bench((images.float() - mean) / std, target)
                ids = [val_parser.img_ids[int(i)] for i in target["img_idx"]]
                parts.append(coco_eval.detections_to_results(out["detections"].numpy(), np.asarray(ids)))
        evaluation = coco_eval.evaluate(gt, np.concatenate(parts) if parts else coco_eval.empty_results())
        row.update(evaluation.epoch_metrics(), epoch_time=time.monotonic() - started)
        history.append(row)
        log(f"effdet recipe epoch={epoch + 1}/{epochs} train_loss={row['train_loss']:.4f} "
            f"valid_map={row['valid_map']:.4f} valid_map_50={row['valid_map_50']:.4f} "
            f"lr={row['lr']:.3g} epoch_time={row['epoch_time']:.0f}")
        if not math.isfinite(row["train_loss"]):
            break
    return history


def _parser_cfg(path: Path):
    from effdet.data.parsers import CocoParserCfg

    # effdet's default drops images under 32 px a side; keep every image the job keeps.
    return CocoParserCfg(ann_filename=str(path), min_img_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("channel", type=Path, help="the training channel (COCO, VOC, ...: the job's reader)")
    parser.add_argument("backbone_file", type=Path, help="timm's ImageNet weights of the backbone")
    parser.add_argument("--split-file", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=Path("effdet-recipe"))
    parser.add_argument("--out", type=Path, default=None, help="write the history as JSON here")
    args = parser.parse_args()
    history = run(args.channel, args.backbone_file, args.workdir, args.split_file, args.epochs,
                  args.img_size, args.batch_size, args.seed, log=lambda m: print(m, flush=True))
    if args.out:
        args.out.write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()
