"""What runs during training for the report and TensorBoard: `BestEvaluation` keeps the
validation detections of the best epoch (so the report needs no extra inference pass),
`TrainingScalars` writes the step and epoch scalars, and `tensorboard_logger` is the Trainer's
logger.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch


class BestEvaluation(L.Callback):
    """Keeps the validation result rows of the best epoch, as chosen by `best` (any object with
    `best_epoch`, such as metrics_log.EpochSummary). Runs after that callback at epoch end and
    before the checkpoint callback, so that a resumed job keeps them too."""

    def __init__(self, best: Any) -> None:
        self.best = best
        self.epoch: int | None = None
        self.results: np.ndarray | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_if_best(trainer.current_epoch + 1, pl_module)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_if_best(0, pl_module)  # epoch 0: a warm start's starting weights

    def _keep_if_best(self, epoch: int, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "val_evaluation", None) is not None and self.best.best_epoch == epoch:
            self.epoch, self.results = epoch, pl_module.val_results

    # Tensors, so that checkpoints still load with weights_only=True.
    def state_dict(self) -> dict[str, Any]:
        results = self.results
        if results is not None:
            results = torch.from_numpy(np.ascontiguousarray(results))
        return {"epoch": self.epoch, "results": results}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state.get("epoch")
        results = state.get("results")
        self.results = None if results is None else results.numpy()


class TrainingScalars(L.Callback):
    """TensorBoard scalars through the Trainer's logger (written on global rank 0 only):
    `step/*` every `log_every_n_steps` steps and `epoch/*` after every epoch's validation.

    Reading the loss forces one device sync per logged step, once every n steps: negligible.
    """

    def __init__(self) -> None:
        self._epoch_start = time.monotonic()
        self._epoch_images = 0
        self._window_start = time.monotonic()
        self._window_images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._window_start = time.monotonic()
        self._epoch_images = self._window_images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        images = 0 if batch.get("images") is None else len(batch["images"])
        self._epoch_images += images
        self._window_images += images
        step = trainer.global_step
        if not trainer.is_global_zero or trainer.logger is None:
            return
        if step != 1 and step % max(trainer.log_every_n_steps, 1):
            return
        now = time.monotonic()
        values = {"step/lr": trainer.optimizers[0].param_groups[0]["lr"]}
        if now > self._window_start:
            values["step/images_per_second"] = self._window_images / (now - self._window_start)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            values["step/train_loss"] = float(loss.detach())
        trainer.logger.log_metrics(values, step=step)
        self._window_start, self._window_images = now, 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        seconds = time.monotonic() - self._epoch_start
        values = _epoch_scalars(trainer.callback_metrics, ("train_", "valid_"))
        values["epoch/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        values["epoch/epoch_time"] = seconds
        # Images of this rank, times the ranks: the job's throughput.
        values["epoch/images_per_second"] = (
            self._epoch_images * trainer.world_size / max(seconds, 1e-9)
        )
        trainer.logger.log_metrics(values, step=trainer.current_epoch + 1)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch 0, a warm start's starting weights: the validation curves begin where it began.
        if not trainer.is_global_zero or trainer.logger is None:
            return
        trainer.logger.log_metrics(_epoch_scalars(trainer.callback_metrics, ("valid_",)), step=0)


def _epoch_scalars(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    """`epoch/<name>` for each finite metric whose name starts with one of `prefixes`."""
    return {
        f"epoch/{key}": float(value) for key, value in metrics.items()
        if key.startswith(prefixes) and math.isfinite(float(value))
    }


def tensorboard_logger(folder: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    # name="" and version="": events go straight into the folder SageMaker uploads.
    return TensorBoardLogger(save_dir=str(folder), name="", version="", default_hp_metric=False)
