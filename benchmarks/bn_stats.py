"""Batch-norm statistics on the same weights: the running averages a checkpoint holds against
statistics re-estimated over N training images (issue 25; figures printed, not a test).

For each checkpoint a job wrote (copy them out as they appear: the job keeps only the last two),
the validation mAP of the weights that would be judged (the EMA's when on) with
  - the running statistics the checkpoint holds (what validation used before issue 25), and
  - statistics re-estimated (training/precise_bn.py) over the first N images of the seeded
    training subset, through the training augmentation or the validation preprocessing.
The weights are the same in every column, so the differences are the statistics alone.

    python benchmarks/bn_stats.py OPT_ML_BASE CHECKPOINT... [--images 16,64,all]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the job's /opt/ml folder (its data and hyperparameters)")
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--images", default="16,64,all", help="numbers of training images (all: every one)")
    parser.add_argument("--transforms", default="train,eval", help="train (augmented) and/or eval")
    parser.add_argument("--epochs", default=None, help="only these epochs, e.g. 4,5,10 (1-based)")
    args = parser.parse_args()

    import torch

    from sm_effdet.backbones import BACKBONES
    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, read_dataset
    from sm_effdet.data.transforms import eval_transform, train_transform
    from sm_effdet.evaluation import coco_eval
    from sm_effdet.hyperparameters import parse_hyperparameters
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization, normalize
    from sm_effdet.training.precise_bn import reestimate, stats_subset, trained_norms

    torch.set_num_threads(2)
    hp = parse_hyperparameters(json.loads((args.base / "input/config/hyperparameters.json").read_text()))
    dataset = read_dataset({"training": args.base / "input/data/training"}, hp, DataReport())
    hp = dataclasses.replace(hp, batch_size=hp.chosen_batch_size(len(dataset.train), 1)[0])  # as the job chose
    norm = backbone_normalization(BACKBONES[hp.backbone])
    bench = build_model(hp.backbone, len(dataset.categories), hp.img_size, False, None)
    gt = coco_eval.ground_truth(dataset.val, len(dataset.categories))
    val_loader = make_loader(DetectionDataset(dataset.val, eval_transform(hp.img_size, norm["fill"]), hp.img_size),
                             hp.batch_size, 0, shuffle=False, pin_memory=False)

    def images(batch):
        return normalize(batch["images"], norm["mean"], norm["std"])

    @torch.no_grad()
    def valid_map() -> float:
        bench.eval()
        parts = []
        for batch in val_loader:
            out = bench(images(batch), batch["targets"])
            parts.append(coco_eval.detections_to_results(out["detections"].numpy(), batch["indices"].numpy()))
        return coco_eval.evaluate(gt, __import__("numpy").concatenate(parts)).stats["AP"] or 0.0

    counts = [len(dataset.train) if c == "all" else int(c) for c in args.images.split(",")]
    transforms = {"train": train_transform(hp.img_size, hp.augment, norm["fill"]),
                  "eval": eval_transform(hp.img_size, norm["fill"])}
    chosen = args.transforms.split(",")
    header = ["checkpoint", "stored"] + [f"{t}:{n}" for t in chosen for n in counts]
    print(" | ".join(header), flush=True)
    # The end of each epoch: of the checkpoints of an epoch (timed ones too), the last.
    ends = {}
    for path in args.checkpoints:
        epoch, step = (int(re.search(rf"{k}(\d+)", path.name).group(1)) for k in ("epoch", "step"))
        if step >= ends.get(epoch, (0, None))[0]:
            ends[epoch] = (step, path)
    wanted = {int(e) - 1 for e in args.epochs.split(",")} if args.epochs else set(ends)
    for epoch_index, (_, path) in sorted(ends.items()):
        if epoch_index not in wanted:
            continue
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "bench.model."
        weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        frozen = epoch_index < hp.freeze_backbone_epochs
        _load(bench, weights)
        row = [f"epoch {epoch_index + 1}", f"{valid_map():.3f}"]
        for name in chosen:
            for count in counts:
                _load(bench, weights)
                loader = make_loader(DetectionDataset(stats_subset(dataset.train, count, hp.seed), transforms[name], hp.img_size),
                                     hp.batch_size, 0, shuffle=False, pin_memory=False)
                started = time.monotonic()
                reestimate(bench.model, trained_norms(bench.model, frozen), (images(b) for b in loader))
                seconds = time.monotonic() - started
                row.append(f"{valid_map():.3f} ({seconds:.0f} s)")
        print(" | ".join(row), flush=True)


def _load(bench, weights) -> None:
    bench.model.load_state_dict(weights)


if __name__ == "__main__":
    main()
