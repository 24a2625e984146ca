"""Step-time figures of issue 25's recipe, as same-run A/B pairs taken in turn (figures printed,
not a test): on a shared machine the load changes from minute to minute, so each A is timed
next to its B and the figures are medians over the pairs.

  1. freezing: a training step with the backbone frozen by requires_grad off (its norms in eval
     mode: no backbone backward pass) against the old way, a learning rate of 0 for it (the
     whole backward pass computed), and against an unfrozen step;
  2. batch-norm statistics: re-estimating them over one batch (forward only, no gradients)
     against a training step on one batch, and what that costs an epoch for N images.

    python benchmarks/recipe_timing.py [--img-size 256] [--batch-size 8] [--pairs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--backbone", default="tf_lite0")
    parser.add_argument("--train-images", type=int, default=160, help="for the per-epoch cost")
    parser.add_argument("--stats-images", default="64,160", help="for the per-epoch cost")
    args = parser.parse_args()

    import torch

    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.training.lightning_module import parameter_groups
    from sm_effdet.training.precise_bn import reestimate, trained_norms

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = build_model(args.backbone, 3, args.img_size, False, None)
    net = bench.model
    b, size = args.batch_size, args.img_size
    images = torch.randn(b, 3, size, size)
    box = torch.tensor([[size * 0.2, size * 0.1, size * 0.7, size * 0.6]])  # yxyx
    targets = {"bbox": [box] * b, "cls": [torch.tensor([1.0])] * b,
               "img_scale": torch.ones(b), "img_size": torch.full((b, 2), float(size))}
    optimizer = torch.optim.AdamW(parameter_groups(net, 1e-4), lr=1e-9)  # weights barely move

    def step(mode: str) -> float:
        frozen = mode == "frozen"
        net.backbone.requires_grad_(not frozen)
        bench.train()
        if mode != "unfrozen":
            net.backbone.eval()  # frozen either way: its norms keep their statistics
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        bench(images, targets)["loss"].backward()
        optimizer.step()
        return time.perf_counter() - started

    def stats_pass() -> float:
        started = time.perf_counter()
        reestimate(net, trained_norms(net, False), [images])
        return time.perf_counter() - started

    step("unfrozen"), step("frozen"), stats_pass()  # warm-up: allocations, first-call costs
    times = {"unfrozen": [], "lr0": [], "frozen": [], "stats": []}
    for _ in range(args.pairs):
        for mode in ("unfrozen", "lr0", "frozen"):
            times[mode].append(step(mode))
        times["stats"].append(stats_pass())
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.backbone} at {size} px, batch {b}, {torch.get_num_threads()} torch threads, "
          f"{args.pairs} rounds taken in turn (medians; every round's A and B side by side):")
    for k, v in times.items():
        print(f"  {k:<9} " + " ".join(f"{t:6.2f}" for t in v) + f"   median {median[k]:.2f} s")
    saved = 1 - median["frozen"] / median["lr0"]
    print(f"  frozen by requires_grad: {median['frozen']:.2f} s a step against {median['lr0']:.2f} s "
          f"with a learning rate of 0 ({saved:.0%} less; unfrozen {median['unfrozen']:.2f} s)")
    pair_ratios = [f / z for f, z in zip(times["frozen"], times["lr0"])]
    print("  per round, frozen / lr 0: " + " ".join(f"{r:.2f}" for r in pair_ratios))
    ratio = median["stats"] / median["unfrozen"]
    print(f"  statistics over one batch: {median['stats']:.2f} s, {ratio:.2f} of a training step")
    for count in (int(c) for c in args.stats_images.split(",")):
        cost = ratio * min(count, args.train_images) / args.train_images
        print(f"  {count} images each epoch of {args.train_images} training images: +{cost:.0%} "
              "of the epoch's training steps")


if __name__ == "__main__":
    main()
