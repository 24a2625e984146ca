"""Batch-norm statistics re-estimated for the weights that are validated and written (issue 25).

While training, a batch-norm layer normalises with each batch's own statistics and keeps running
averages for evaluation. effdet's BiFPN and head layers average with momentum 0.01 (effdet's
setting for 300-epoch runs) from mean 0 and variance 1, so on a short fine-tuning run many of
those averages are still near their initial values and the rest remember weights that have long
changed: validation and the written model normalise with the wrong scale. Before each validation
(and before the last epoch's weights become the model when there is no validation), the layers
that trained in train mode get the plain average of their per-batch statistics over a bounded set
of training images, computed with the current weights and no weight change (the idea of
detectron2's PreciseBN hook). Dropout and drop-path stay off, as at inference.

With several processes each computes on its share of those images and the averages are
all-reduced (weighted by batches), so every rank holds the same statistics.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

BACKBONE = "backbone."
# The default momentum (hyperparameter bn_momentum) of the BiFPN and head norms' running averages.
# effdet's 0.01 (TF's decay 0.99) suits runs of many thousand steps; on runs of hundreds of steps
# it leaves the averages near their start. Measured on the same weights (the momentum does not
# change training): raccoon, 10 epochs at 256 px, best valid mAP 0.287 against 0.221 (docs/training.md,
# Recipe). The backbone keeps timm's 0.1.
NORM_MOMENTUM = 0.1


def set_norm_momentum(net: torch.nn.Module, momentum: float = NORM_MOMENTUM) -> int:
    """Set the momentum of every batch norm outside the backbone; the number of layers."""
    layers = [m for name, m in net.named_modules()
              if isinstance(m, _BatchNorm) and not (name + ".").startswith(BACKBONE)]
    for bn in layers:
        bn.momentum = momentum
    return len(layers)


def trained_norms(net: torch.nn.Module, backbone_frozen: bool) -> list[_BatchNorm]:
    """The batch-norm layers whose statistics moved in training: every one that tracks running
    statistics, but the backbone's while it is frozen (they keep their pretrained statistics and
    normalise with them in training too)."""
    return [
        m for name, m in net.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        and not (backbone_frozen and (name + ".").startswith(BACKBONE))
    ]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def reestimate(net: torch.nn.Module, layers: list[_BatchNorm], batches: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of `layers` (inside `net`) by the average of their
    per-batch statistics over `batches` (normalised images on the net's device); return the
    number of batches used on every rank together. With none, the statistics are left as they
    were. A collective with several processes: every rank must call it."""
    if not layers:
        return 0
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in layers]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()  # dropout and drop-path off, as at inference
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # torch then keeps the cumulative average of the batches' statistics
        bn.train()
    seen = 0
    try:
        for images in batches:
            net(images)
            seen += 1
    finally:
        for m, training in modes:
            m.train(training)
        for bn, (momentum, _, _, _) in zip(layers, saved):
            bn.momentum = momentum
    used = seen
    if _distributed():
        # One flat tensor of every layer's statistics, weighted by this rank's batches.
        flat = torch.cat([t for bn in layers for t in (bn.running_mean, bn.running_var)]).float()
        flat = torch.cat([flat * seen, flat.new_tensor([seen])])
        torch.distributed.all_reduce(flat)
        used = int(flat[-1].item())  # one device sync, not one per layer
        if used > 0:
            flat = flat[:-1] / used
            offset = 0
            for bn in layers:
                for buffer in (bn.running_mean, bn.running_var):
                    buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                    offset += buffer.numel()
    for bn, (_, mean, var, tracked) in zip(layers, saved):
        bn.num_batches_tracked.copy_(tracked)  # untouched for whoever reads it
        if used == 0:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return used


def stats_subset(records: list[Any], limit: int, seed: int, rank: int = 0, world_size: int = 1) -> list[Any]:
    """The training images the statistics come from: the first `limit` of a seeded shuffle (the
    same on every rank and every epoch), this rank's share of them."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = sorted(order[:limit])
    return [records[i] for i in chosen[rank::world_size]]


def stats_loader(hp: Any, settings: dict[str, Any], rank: int, world_size: int, train_records: list[Any]) -> Any:
    """This rank's share of the training images the statistics come from, through the
    validation preprocessing: the statistics are those of the pictures validation and serving
    see, without the training augmentation's scale and colour changes."""
    from ..backbones import BACKBONES
    from ..data.dataset import DetectionDataset, make_loader
    from ..data.transforms import eval_transform
    from ..model.preprocessing import backbone_normalization

    fill = backbone_normalization(BACKBONES[hp.backbone])["fill"]
    records = stats_subset(train_records, hp.bn_stats_images, hp.seed, rank, world_size)
    # A few workers at most: a bounded number of images, read once an epoch. A generator of its
    # own: each pass over a loader draws a seed, and one drawn from the global generator would
    # change the training's augmentation, so that turning the statistics on changed the weights.
    return make_loader(
        DetectionDataset(records, eval_transform(hp.img_size, fill), hp.img_size),
        hp.batch_size, min(settings["workers"], 4), shuffle=False, pin_memory=settings["pin"],
        generator=torch.Generator().manual_seed(hp.seed),
    )


class BatchNormStatistics(L.Callback):
    """Re-estimates the statistics of the weights about to be judged: before each validation,
    or at the end of an epoch without one (before best_model.BestModel keeps the weights), once
    per training step count. Not for the starting weights of a warm start (epoch 0)."""

    def __init__(self, loader: Any, images: int) -> None:
        self.loader = loader  # this rank's share of stats_subset, the training batch size
        self.images = images  # on every rank together
        self._done_at_step: int | None = None
        self._logged = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.update(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.update(trainer, pl_module)

    def update(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._done_at_step == trainer.global_step:
            return
        self._done_at_step = trainer.global_step
        net = pl_module.eval_net()
        layers = trained_norms(net, bool(pl_module.frozen))
        started = time.monotonic()
        # Validation runs in inference mode; buffers updated there must stay usable in training.
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            batches = reestimate(net, layers, self._batches(pl_module.normalise, pl_module.device))
        if not self._logged:
            self._logged = True
            log.info(
                "batch-norm statistics of %d layers re-estimated from %d training images (%d "
                "batches on every rank together) in %.1f s, as before every validation",
                len(layers), self.images, batches, time.monotonic() - started,
            )

    def _batches(self, normalise: Callable, device: torch.device) -> Iterable[torch.Tensor]:
        for batch in self.loader:
            if batch["images"] is not None:  # unreadable images are counted by training
                yield normalise(batch["images"].to(device, non_blocking=True))
