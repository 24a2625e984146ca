"""The LightningModule: training and validation steps, COCO mAP, optimiser and schedule.

Icevision's own Lightning adapter defines `validation_epoch_end`, which Lightning 2 refuses,
so the steps are written here around effdet's training bench.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from . import coco_eval
from .coco import DataReport
from .hyperparameters import Hyperparameters
from .transforms import MEAN, STD

log = logging.getLogger(__name__)


class EfficientDetModule(L.LightningModule):
    def __init__(
        self, bench: torch.nn.Module, hp: Hyperparameters, val_gt: dict[str, Any] | None,
        report: DataReport,
    ) -> None:
        super().__init__()
        self.bench = bench
        self.hp = hp
        self.val_gt = val_gt
        self.report = report
        self._skipped_names: set[str] = set()
        self._first_step_logged = False
        self._results: dict[int, list[list[float]]] = {}
        self.images_seen = 0
        self.images_skipped = 0
        # The moving average of the weights: a frozen copy updated after every optimiser step,
        # registered as a submodule so that it moves with the module and lives in checkpoints.
        self.ema = None
        if hp.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(bench.model, decay=hp.ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)  # never a DDP parameter
        self._ema_bench: list[torch.nn.Module] = []  # not a submodule: it shares self.ema's
        self._frozen: bool | None = None
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 from the loader; normalised here, on the device.
        return (images.float() - self.mean) / self.std

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._frozen:  # Lightning may have switched every layer back to train mode
            self.bench.model.backbone.eval()
        if not self._first_step_logged:
            self._first_step_logged = True
            import psutil

            started = psutil.Process().create_time()
            log.info("first training step began %.1f s after the process started",
                     time.time() - started)

    def on_train_epoch_start(self) -> None:
        self.images_seen = 0
        self.images_skipped = 0
        self.set_backbone_frozen(self.current_epoch < self.hp.freeze_backbone_epochs)

    def set_backbone_frozen(self, frozen: bool) -> None:
        """While frozen the backbone's learning rate is 0 (see configure_optimizers) and its
        batch norms keep their statistics; logged when it changes."""
        if frozen:
            self.bench.model.backbone.eval()
        if frozen != self._frozen and (frozen or self._frozen is not None):
            if frozen:
                log.info("backbone frozen: epochs %d to %d train the FPN and heads only",
                         self.current_epoch + 1, self.hp.freeze_backbone_epochs)
            else:
                log.info("backbone unfrozen: epoch %d on trains every layer", self.current_epoch + 1)
        self._frozen = frozen

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.bench.model, step=self.global_step)

    def eval_net(self) -> torch.nn.Module:
        """The weights that are validated and become the model: the EMA's when it is on."""
        return self.ema.module if self.ema is not None else self.bench.model

    def eval_bench(self) -> torch.nn.Module:
        if self.ema is None:
            return self.bench
        if not self._ema_bench:
            from effdet import DetBenchTrain

            self._ema_bench.append(DetBenchTrain(self.ema.module, create_labeler=True))
        return self._ema_bench[0].to(self.device).train(self.bench.training)

    def count_skipped(self, batch: dict[str, Any]) -> None:
        for file_name, reason in batch["skipped"]:
            if file_name not in self._skipped_names:  # once per image, not once per epoch
                self._skipped_names.add(file_name)
                self.report.add("image_skipped_at_load", reason)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.count_skipped(batch)
        self.images_skipped += len(batch["skipped"])
        if batch["images"] is None:  # every image of the batch was unreadable
            return None
        self.images_seen += len(batch["images"])
        out = self.bench(self.normalise(batch["images"]), batch["targets"])
        self.log("train_loss", out["loss"], on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["images"]))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._results = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.count_skipped(batch)
        if batch["images"] is None:
            return
        out = self.eval_bench()(self.normalise(batch["images"]), batch["targets"])
        self.log("valid_loss", out["loss"], on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["images"]))
        detections = out["detections"].float().cpu().numpy()
        for det, index in zip(detections, batch["indices"].tolist()):
            self._results[index] = coco_eval.detections_to_results(det[None], [index])

    def on_validation_epoch_end(self) -> None:
        parts = [self._results]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self._results)
        # Each image once: the distributed sampler pads the last batches with repeated images.
        per_image: dict[int, list[list[float]]] = {}
        for part in parts:
            for index, rows in part.items():
                per_image.setdefault(index, rows)
        results = [row for rows in per_image.values() for row in rows]
        metrics = coco_eval.coco_map(self.val_gt, results) if self.val_gt else {"map": 0.0, "map_50": 0.0}
        # Every rank computed the same numbers from the same gathered results, so averaging
        # them (sync_dist) changes nothing and keeps Lightning's epoch-level contract.
        self.log("valid_map", metrics["map"], sync_dist=True)
        self.log("valid_map_50", metrics["map_50"], sync_dist=True)
        self.log("valid_images", float(len(per_image)), sync_dist=True)
        self._results = {}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        groups = parameter_groups(self.bench.model, hp.weight_decay)
        lr = hp.peak_learning_rate
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum,
                                        nesterov=hp.momentum > 0, **fused)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, **fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        schedule = lr_factor_fn(hp.lr_schedule, total, round(hp.warmup_epochs * per_epoch))
        # Freezing as a learning rate of 0 for the backbone's groups rather than requires_grad:
        # DDP fixes the set of parameters it synchronises when it wraps the model.
        frozen_steps = round(hp.freeze_backbone_epochs * per_epoch)
        frozen = lambda step: 0.0 if step < frozen_steps else schedule(step)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [frozen if g["backbone"] else schedule for g in groups]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parameter_groups(net: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Backbone and the rest (for freezing), each with and without weight decay (biases and
    norms get none)."""
    # The head's group first: the epoch line reports param_groups[0]'s learning rate.
    groups = {(b, d): [] for b in (False, True) for d in (True, False)}
    for name, param in net.named_parameters():
        if param.requires_grad:
            groups[(name.startswith("backbone."), param.ndim > 1)].append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "backbone": backbone}
        for (backbone, decay), params in groups.items() if params
    ]


def lr_factor_fn(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the peak learning rate at each step: linear warmup, then the schedule."""
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.001 + 0.999 * step / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "step":
            return 1.0 if progress < 2 / 3 else 0.1 if progress < 8 / 9 else 0.01
        return 1.0

    return factor

