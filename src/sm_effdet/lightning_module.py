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
import numpy as np
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
        # This epoch's validation: result rows per batch and the image indices they cover.
        self._result_parts: list[np.ndarray] = []
        self._seen_parts: list[np.ndarray] = []
        # The last finished validation: its deduplicated result rows and COCO evaluation, kept
        # for the best epoch's report (report.BestEvaluation).
        self.val_results: np.ndarray = coco_eval.empty_results()
        self.val_evaluation: coco_eval.Evaluation | None = None
        self.images_seen = 0
        self.images_skipped = 0
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 from the loader; normalised here, on the device.
        return (images.float() - self.mean) / self.std

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._first_step_logged:
            self._first_step_logged = True
            import psutil

            started = psutil.Process().create_time()
            log.info("first training step began %.1f s after the process started",
                     time.time() - started)

    def on_train_epoch_start(self) -> None:
        self.images_seen = 0
        self.images_skipped = 0

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
                 batch_size=len(batch["images"]), logger=False)
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._result_parts, self._seen_parts = [], []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.count_skipped(batch)
        if batch["images"] is None:
            return
        out = self.bench(self.normalise(batch["images"]), batch["targets"])
        self.log("valid_loss", out["loss"], on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["images"]), logger=False)
        # One device-to-host copy and one vectorised conversion per batch.
        indices = batch["indices"].numpy()
        self._seen_parts.append(indices)
        self._result_parts.append(
            coco_eval.detections_to_results(out["detections"].float().cpu().numpy(), indices)
        )

    def on_validation_epoch_end(self) -> None:
        results = np.concatenate(self._result_parts) if self._result_parts else coco_eval.empty_results()
        seen = np.concatenate(self._seen_parts) if self._seen_parts else np.zeros(0, np.int64)
        parts = [(seen, results)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (seen, results))
        results, images = unique_images(parts)
        self._result_parts, self._seen_parts = [], []
        if self.val_gt:
            evaluation = coco_eval.evaluate(self.val_gt, results)
            metrics = evaluation.epoch_metrics()
        else:
            evaluation, metrics = None, {"valid_map": 0.0, "valid_map_50": 0.0}
        self.val_results, self.val_evaluation = results, evaluation
        # Every rank computed the same numbers from the same gathered results, so averaging
        # them (sync_dist) changes nothing and keeps Lightning's epoch-level contract.
        for key, value in metrics.items():
            self.log(key, value, sync_dist=True, logger=False)
        self.log("valid_images", float(images), sync_dist=True, logger=False)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        decay, no_decay = [], []
        for name, param in self.bench.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.learning_rate, momentum=hp.momentum,
                                        nesterov=hp.momentum > 0, **fused)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, **fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        schedule = lr_factor_fn(hp.lr_schedule, total, round(hp.warmup_epochs * per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def unique_images(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Result rows with each image once, and the number of images: the distributed sampler pads
    the last batches with repeated images, so an image seen by an earlier rank is dropped."""
    seen: np.ndarray = np.zeros(0, np.int64)
    kept = []
    for indices, results in parts:
        kept.append(results[~np.isin(results[:, 0].astype(np.int64), seen)])
        seen = np.union1d(seen, indices.astype(np.int64))
    return np.concatenate(kept) if kept else coco_eval.empty_results(), len(seen)


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

