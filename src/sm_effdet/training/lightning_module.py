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

from .. import stops
from ..backbones import BACKBONES
from ..data.formats import DataReport
from ..errors import UserInputError
from ..evaluation import coco_eval
from ..hyperparameters import Hyperparameters
from ..model.preprocessing import backbone_normalization, normalize

log = logging.getLogger(__name__)

# Consecutive steps with a non-finite loss before the job stops as diverged. One such step is
# normal with a 16-bit grad scaler (an overflow; the step is skipped); ten in a row is not.
NONFINITE_LIMIT = 10


class EfficientDetModule(L.LightningModule):
    def __init__(
        self, bench: torch.nn.Module, hp: Hyperparameters, val_gt: dict[str, Any] | None,
        report: DataReport, start: str = "coco",
    ) -> None:
        super().__init__()
        self.bench = bench
        self.hp = hp
        # Where the run's weights came from ('coco', 'backbone', 'scratch' or 'warm'; a resumed
        # job passes its first run's): backbone_lr_ratio 'auto' depends on it.
        self.start = start
        self.val_gt = val_gt
        self.report = report
        self._skipped_names: set[str] = set()
        self._truncated_names: set[str] = set()
        self._exif_ignored_names: set[str] = set()
        self._first_step_logged = False
        # This epoch's validation: result rows per batch and the image indices they cover.
        self._result_parts: list[np.ndarray] = []
        self._seen_parts: list[np.ndarray] = []
        # The last finished validation: its deduplicated result rows and COCO evaluation, kept
        # for the best epoch's report (callbacks.BestEvaluation).
        self.val_results: np.ndarray = coco_eval.empty_results()
        self.val_evaluation: coco_eval.Evaluation | None = None
        self.images_seen = 0
        self.images_skipped = 0
        self.batches_attempted = 0
        self.nonfinite_steps = 0
        # The backbone's own statistics (issue 13); model.json records the same ones.
        self.normalization = backbone_normalization(BACKBONES[hp.backbone])
        # The moving average of the weights: a frozen copy updated after every optimiser step,
        # registered as a submodule so that it moves with the module and lives in checkpoints.
        self.ema = None
        if hp.moving_average_decay() > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(bench.model, decay=hp.moving_average_decay(), use_warmup=True)
            self.ema.requires_grad_(False)  # never a DDP parameter
        self._ema_bench: list[torch.nn.Module] = []  # not a submodule: it shares self.ema's
        self._frozen: bool | None = None

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 from the loader; normalised here, on the device, as the server does.
        return normalize(images, self.normalization["mean"], self.normalization["std"])

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
        # Counted per run: a resumed epoch may have no batches left to attempt here.
        self.images_seen = 0
        self.images_skipped = 0
        self.batches_attempted = 0
        self.set_backbone_frozen(self.current_epoch < self.hp.freeze_backbone_epochs)

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def set_backbone_frozen(self, frozen: bool) -> None:
        """While frozen the backbone computes no gradients (requires_grad off: its backward pass
        is skipped, measured in benchmarks/recipe_timing.py) and its batch norms keep their
        statistics; logged when it changes."""
        self.bench.model.backbone.requires_grad_(not frozen)
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
        for file_name in batch.get("truncated", ()):
            if file_name not in self._truncated_names:
                self._truncated_names.add(file_name)
                self.report.add("image_truncated_but_used", file_name)
                log.warning("%s is cut short; its missing bottom rows are used as grey", file_name)
        for file_name, orientation in batch.get("exif_ignored", ()):
            if file_name not in self._exif_ignored_names:
                if not self._exif_ignored_names:  # one line for a dataset of them, counted in the report
                    log.warning(
                        "%s is annotated with its stored size, not its size as shown (EXIF orientation "
                        "%d): its boxes are taken as drawn on the unturned pixels (LabelImg's way), "
                        "and it trains unturned while the server turns pictures upright; count: "
                        "image_exif_orientation_not_applied in data_report.json", file_name, orientation)
                self._exif_ignored_names.add(file_name)
                self.report.add("image_exif_orientation_not_applied", f"{file_name}: orientation {orientation}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        stops.pause_for_test("training")
        self.batches_attempted += 1
        self.count_skipped(batch)
        self.images_skipped += len(batch["skipped"])
        if batch["images"] is None:  # every image of the batch was unreadable
            return None
        self.images_seen += len(batch["images"])
        out = self.bench(self.normalise(batch["images"]), batch["targets"])
        if not self.loss_is_finite(out["loss"]):
            return None  # no backward, no optimiser step: the weights stay as they were
        self.log("train_loss", out["loss"], on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["images"]), logger=False)
        return out["loss"]

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Count consecutive non-finite losses; stop the job as diverged at NONFINITE_LIMIT."""
        finite = torch.isfinite(loss.detach()).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank skips the same steps, so that DDP's collectives stay in step.
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item():
            self.nonfinite_steps = 0
            return True
        self.nonfinite_steps += 1
        epoch, step = self.current_epoch + 1, self.trainer.global_step + 1
        log.warning("the loss is not finite (%s) at epoch %d, step %d; the step is skipped",
                    float(loss.detach()), epoch, step)
        if self.nonfinite_steps >= NONFINITE_LIMIT:
            raise UserInputError(
                f"training diverged: the loss was not finite (NaN or infinity) for "
                f"{NONFINITE_LIMIT} steps in a row, up to epoch {epoch} step {step}; lower "
                f"learning_rate (now {self.hp.peak_learning_rate(self.start):g}) and use a new checkpoint location."
            )
        return False

    def on_validation_epoch_start(self) -> None:
        self._result_parts, self._seen_parts = [], []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        stops.pause_for_test("validation")
        self.count_skipped(batch)
        if batch["images"] is None:
            return
        out = self.eval_bench()(self.normalise(batch["images"]), batch["targets"])
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
        # Made before the first epoch, so before any freezing: every parameter of the network.
        groups = parameter_groups(self.bench.model, hp.weight_decay)
        lr = hp.peak_learning_rate(self.start)
        backbone_factor = hp.backbone_lr_factor(self.start)
        for group in groups:
            group["lr"] = lr * backbone_factor if group["backbone"] else lr
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum,
                                        nesterov=hp.momentum > 0, **fused)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, **fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        warmup = hp.warmup_steps(per_epoch, total)
        schedule = lr_factor_fn(hp.lr_schedule, total, warmup)
        frozen_steps = round(hp.freeze_backbone_epochs * per_epoch)
        backbone = backbone_schedule(schedule, frozen_steps, warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [backbone if g["backbone"] else schedule for g in groups]
        )
        start = f" for a start from {START_NAMES[self.start]}"
        log.info(
            "learning rates: FPN and heads %g (learning_rate %s), backbone %g (backbone_lr_ratio "
            "%s); %s schedule over %d steps after a warm-up of %d steps (warmup_epochs %s, %.1f "
            "steps an epoch)",
            lr, f"auto: {lr:g} for {hp.optimizer}{start}" if hp.learning_rate == "auto" else hp.learning_rate,
            lr * backbone_factor,
            f"auto: {backbone_factor:g}{start}" if hp.backbone_lr_ratio == "auto" else hp.backbone_lr_ratio,
            hp.lr_schedule, total, warmup, hp.warmup_epochs, per_epoch,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


START_NAMES = {"coco": "effdet's COCO detector", "backbone": "the ImageNet backbone",
               "scratch": "scratch", "warm": "an earlier model (warm start)"}


def backbone_schedule(schedule, frozen_steps: int, warmup_steps: int):
    """The backbone's multiplier: 0 while frozen (it has no gradients then; the 0 also keeps
    the optimiser from moving it should a gradient of zeros arrive), then the schedule, ramped up
    again over the warm-up length: its optimiser state starts afresh when it thaws, and Adam's
    first steps are as long as the rate."""
    if frozen_steps <= 0:
        return schedule

    def factor(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        ramp = min(1.0, (step - frozen_steps + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return schedule(step) * ramp

    return factor


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

